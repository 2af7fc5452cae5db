"""What a sweep job does with what the store already holds for its identity
(cnnlab.tracking.identity): train it, keep a FINISHED child, continue a KILLED one, run a
FAILED one again, or reuse a FINISHED run of another study. Decided once, by
:func:`decide`, for a job about to run and for ``sweep.dry_run``'s list alike; only reads.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from mlflow import MlflowClient
from mlflow.entities import Run

from cnnlab.checks import ConfigError
from cnnlab.tracking.identity import HASH_TAG
from cnnlab.tracking.liveness import died_here
from cnnlab.tracking.resume import Target, find_target

# On a child whose job has a newer child in the parent (a FAILED one run again, one of an
# earlier setting or code): the run that took its place (record.supersede_earlier).
SUPERSEDED_TAG = "cnnlab.superseded_by"
REUSED_TAG = "cnnlab.reused_from"  # on a child that took its result from another study's run
SCORE = "val/acc_best"


class Action(enum.Enum):
    train = "trained"  # nothing recorded for it: a new child
    kept = "kept"  # its child FINISHED in an earlier start of this sweep: not trained again
    resume = "resumed"  # its child was KILLED (or died RUNNING): continued from its checkpoint
    retry = "retried"  # its child FAILED (or was killed before a whole checkpoint): a new one
    reuse = "reused"  # another study's run of this identity FINISHED: its result is taken
    skip = "skipped"  # its child FAILED and sweep.retry_failed=false
    running = "running"  # its child is still running (here, or on another host)


@dataclass(frozen=True)
class Decision:
    action: Action
    run: Run | None = None  # the run kept, continued, retried, skipped or reused
    target: Target | None = None  # for resume: the run and its newest whole checkpoint
    why: str = ""

    @property
    def trains(self) -> bool:
        return self.action in (Action.train, Action.resume, Action.retry)

    @property
    def score(self) -> float | None:
        """The recorded result a sweeper gets for a job not trained again (Optuna's value)."""
        return self.run.data.metrics.get(SCORE) if self.run is not None else None


@dataclass(frozen=True)
class Continuation:
    """How a sweep treats what its store holds (``sweep.*`` settings)."""

    parent_run_id: str | None  # the sweep's parent: its children are looked at first
    retry_failed: bool = True
    reuse: bool = False

    @classmethod
    def of(cls, parent_run_id: str, sweep: Any, trainer: Mapping[str, Any]) -> Continuation:
        """From the ``sweep.*`` settings. Reuse is off for a run that would not repeat its
        result: ``trainer.deterministic=false`` where a GPU trains it (cuDNN picks its
        algorithms by timing); on the CPU the same seed gives the same run."""
        return cls(parent_run_id, sweep.retry_failed, sweep.reuse and reproducible(trainer))


def reproducible(trainer: Mapping[str, Any]) -> bool:
    on_cpu = trainer.get("accelerator") == "cpu" or not torch.cuda.is_available()
    return on_cpu or bool(trainer.get("deterministic"))


def decide(
    client: MlflowClient, experiment_id: str, config_hash: str, how: Continuation
) -> Decision:
    """What a job of identity ``config_hash`` does: by its newest child in the reopened
    parent, or else, with reuse on, by a FINISHED run of that identity in the experiment."""
    if how.parent_run_id:
        children = _runs(client, experiment_id, config_hash, how.parent_run_id)
        finished = [run for run in children if run.info.status == "FINISHED"]
        if finished:
            return Decision(Action.kept, finished[0])
        if children:
            return _continue(client, children[0], how)
    if how.reuse:
        finished = _runs(client, experiment_id, config_hash, status="FINISHED")
        if finished:
            return Decision(Action.reuse, _origin(client, finished[0]))
    return Decision(Action.train)


def _continue(client: MlflowClient, child: Run, how: Continuation) -> Decision:
    """A child that did not finish: continued when KILLED (or dead while RUNNING) with a
    whole checkpoint, else run again as a new child (or skipped)."""
    status = child.info.status
    if status == "RUNNING" and not died_here(child.data.tags):
        host = child.data.tags.get("cnnlab.host", "an unknown host")
        return Decision(Action.running, child, why=f"run {child.info.run_id} RUNNING on {host}")
    if status in ("KILLED", "RUNNING"):
        try:
            target = find_target(client, child.info.run_id)
        except ConfigError as error:  # killed before its first whole checkpoint
            return Decision(Action.retry, child, why=str(error))
        return Decision(Action.resume, child, target)
    if not how.retry_failed:
        return Decision(Action.skip, child, why="FAILED; sweep.retry_failed=false")
    return Decision(Action.retry, child, why=child.data.tags.get("error", "FAILED"))


def _runs(
    client: MlflowClient,
    experiment_id: str,
    config_hash: str,
    parent_run_id: str | None = None,
    status: str | None = None,
) -> list[Run]:
    """Runs of this identity, newest first, but those a retry superseded."""
    conditions = [f"tags.`{HASH_TAG}` = '{config_hash}'"]
    if parent_run_id:
        conditions.append(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    if status:
        conditions.append(f"attributes.status = '{status}'")
    runs = client.search_runs(
        [experiment_id], " and ".join(conditions), order_by=["attributes.start_time DESC"]
    )
    return [run for run in runs if SUPERSEDED_TAG not in run.data.tags]


def _origin(client: MlflowClient, run: Run) -> Run:
    """The run that trained ``run``'s result: itself, or the one it reused."""
    source = run.data.tags.get(REUSED_TAG)
    return client.get_run(source) if source else run
