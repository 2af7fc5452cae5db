"""One job recorded as one MLflow run: its name, tags, params, config, the metrics Lightning
logs (through :class:`cnnlab.tracking.BatchedMLFlowLogger`), the best checkpoint, pictures,
and the result printed for the user. Everything arrives as plain values: this module knows
MLflow, not Lightning's objects."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Run

from cnnlab import config
from cnnlab.checks import redact_uri
from cnnlab.tracking.continuation import REUSED_TAG, SUPERSEDED_TAG
from cnnlab.tracking.liveness import process_tags
from cnnlab.tracking.logger import UNSENT_FILE, send_unsent
from cnnlab.tracking.resume import CHECKPOINT_TAG, OVERRIDES_TAG, Target, mark_died
from cnnlab.tracking.runs import TrackedRun, git_state, package_versions, run_link, unique_run_name

log = logging.getLogger("cnnlab")
# The best checkpoint, as the run's artifact, and its score: what the report loads.
BEST_CHECKPOINT_TAG = "checkpoint.best"
BEST_SCORE_TAG = "checkpoint.best_score"


def run_name(settings: config.TrainConfig) -> str:
    model = settings.model
    parts = [
        model.name,
        "bn" if model.batchnorm else "",
        model.pooling,
        model.head,
        f"s{settings.seed}",
    ]
    return "-".join(part for part in parts if part)


def run_tags(settings: config.TrainConfig, overrides: list[str], output_dir: str) -> dict[str, str]:
    """The tags of a new run: what it was started with, by whom, from which code."""
    return {
        "overrides": redact_uri(" ".join(overrides)),
        OVERRIDES_TAG: json.dumps([redact_uri(o) for o in overrides]),
        "seed": str(settings.seed),
        "hydra.output_dir": output_dir,
        "mlflow.source.name": "cnnlab.train",
        **process_tags(),
        **git_state(config.REPO_ROOT),
        **package_versions(),
    }


def new_run(
    client: MlflowClient, experiment_id: str, base_name: str, tags: Mapping[str, str]
) -> TrackedRun:
    """A new run named ``base_name`` (``-2``, ``-3``... when taken); in a sweep, the job's
    earlier children (same group and seed) are superseded by it."""
    name = unique_run_name(client, experiment_id, base_name)
    run = TrackedRun(client, experiment_id, name, tags)
    if "mlflow.parentRunId" in tags:
        supersede_earlier(client, experiment_id, run.run_id, tags)
    return run


def reopened_run(
    client: MlflowClient, target: Target, identity_tags: Mapping[str, str] | None = None
) -> TrackedRun:
    """The run a resume continues, RUNNING again; what its earlier start could not say is
    recorded now that the resume goes ahead: that its process died, that it trains longer,
    and the metrics a store that went down did not take."""
    mark_died(client, target)
    if target.grown:
        client.set_tag(target.run_id, "cnnlab.max_epochs", target.grown)
    _send_unsent(client, target.run)
    tags = {"cnnlab.resumed_from": str(target.checkpoint), **process_tags()}
    # A run trained on for more epochs is now that longer run (tracking.identity).
    return TrackedRun.reopen(client, target.run_id, tags | dict(identity_tags or {}))


def supersede_earlier(
    client: MlflowClient, experiment_id: str, run_id: str, tags: Mapping[str, str]
) -> None:
    """Mark the parent's other children of this job (its group and seed) as superseded by
    ``run_id``: a FAILED one run again, or one trained before a setting or the code
    changed. They stay in MLflow, out of the sweep's counts and its report, so a group
    never pools runs of two configurations."""
    # The seed (digits) is asked of the store; the group, which may hold any character and
    # MLflow's filter has no escape, is compared here.
    siblings = f"tags.`mlflow.parentRunId` = '{tags['mlflow.parentRunId']}'"
    same_seed = f"{siblings} and tags.seed = '{tags.get('seed')}'"
    for run in client.search_runs([experiment_id], same_seed, max_results=50000):
        other = run.data.tags
        if (
            run.info.run_id != run_id
            and SUPERSEDED_TAG not in other
            and other.get("group") == tags.get("group")
        ):
            client.set_tag(run.info.run_id, SUPERSEDED_TAG, run_id)


def record_reused(
    client: MlflowClient, experiment_id: str, base_name: str, tags: Mapping[str, str], source: Run
) -> None:
    """A FINISHED child that takes its result from ``source``, a run of the same identity
    in another study (tag cnnlab.reused_from): its params and final metrics, so the sweep's
    summary and report read it as any child; the report counts the two once."""
    metrics = source.data.metrics
    run = new_run(client, experiment_id, base_name, {**tags, REUSED_TAG: source.info.run_id})
    with run:
        run.log_params(source.data.params)
        for key, value in metrics.items():
            run.log_metric(key, value)


def _send_unsent(client: MlflowClient, run: Run) -> None:
    """Log into ``run`` the metrics its earlier process kept on disk when the store stayed
    down (UNSENT_FILE in its output folder), once."""
    folder = run.data.tags.get("hydra.output_dir")
    if folder:
        sent = send_unsent(client, run.info.run_id, Path(folder) / UNSENT_FILE)
        if sent:
            log.info("sent %d metrics kept on disk while the store was down", sent)


def record_setup(
    run: TrackedRun,
    params: Mapping[str, str],
    config_yaml: str,
    model_table: str,
    datasets: Iterable[Mapping[str, Any]] = (),
) -> None:
    """Params, the resolved config, the model's layer table and the datasets (train,
    validation, test: see TrackedRun.log_datasets) of a new run."""
    run.log_params(params)
    run.log_text(redact_uri(config_yaml), "config.yaml")
    run.log_text(model_table, "model_summary.txt")
    run.log_datasets(datasets)


def record_result(
    run: TrackedRun,
    metrics: Mapping[str, float],
    step: int,
    logged: Mapping[str, int],
    best_checkpoint: str,
    best_score: float,
) -> None:
    """The run's final metrics at ``step`` (none it has at that step already: a resumed
    run whose process died after logging them), and its best checkpoint as an artifact,
    named with its score in tags."""
    for key, value in metrics.items():
        if step > logged.get(key, -1):
            run.log_metric(key, value, step=step)
    if best_checkpoint:
        run.log_artifact(best_checkpoint, "checkpoints")
        run.client.set_tag(
            run.run_id, BEST_CHECKPOINT_TAG, f"checkpoints/{Path(best_checkpoint).name}"
        )
        run.client.set_tag(run.run_id, BEST_SCORE_TAG, f"{best_score:.6f}")


def record_figures(run: TrackedRun, figures: Mapping[str, Figure]) -> None:
    for name, figure in figures.items():
        run.client.log_figure(run.run_id, figure, f"pictures/{name}")


def metric_history(run: TrackedRun, names: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """``(step, value)`` of each metric in ``names``, as the store has them."""
    client = run.client
    return {
        name: [(m.step, m.value) for m in client.get_metric_history(run.run_id, name)]
        for name in names
    }


def record_interruption(run: TrackedRun, checkpoint: str, overrides: list[str]) -> None:
    """Point ``resume=`` at the state saved when training was interrupted, and tell the
    user the command that continues it."""
    run.client.set_tag(run.run_id, CHECKPOINT_TAG, str(Path(checkpoint).resolve()))
    print(f"cnnlab: interrupted; continue with: {resume_command(run.run_id, overrides)}",
          file=sys.stderr, flush=True)  # fmt: skip


def resume_command(run_id: str, overrides: list[str]) -> str:
    """The command line that continues run ``run_id``: these settings, without the folders
    Hydra picks per start (``hydra.*``) or an earlier ``resume=``."""
    kept = [shlex.quote(o) for o in overrides if not o.startswith(("hydra.", "resume="))]
    return redact_uri(" ".join(["python", "-m", "cnnlab.train", *kept, f"resume={run_id}"]))


def last_checkpoint_tag(dirpath: str | None, save_last: bool, last_name: str) -> dict[str, str]:
    """Where the run's last checkpoint will be: what ``resume=<run id>`` continues from."""
    if not save_last or not dirpath:
        return {}
    return {CHECKPOINT_TAG: str((Path(dirpath) / f"{last_name}.ckpt").resolve())}


def report_result(
    run: TrackedRun, experiment_id: str, best_val: float, test_acc: float | None
) -> None:
    lines = [f"best validation accuracy: {best_val:.2%}"]
    if test_acc is not None:
        lines.insert(0, f"test accuracy: {test_acc:.2%}")
    lines += [
        f"MLflow run: {run.run_id} ({run.run.info.run_name})",
        f"open it: {run_link(run.client.tracking_uri, experiment_id, run.run_id)}",
    ]
    print("\n".join(lines), flush=True)


def record_refused(
    client: MlflowClient, experiment_id: str, base_name: str, tags: Mapping[str, str], message: str
) -> None:
    """A FAILED run for a job refused before training (a sweep job): the sweep's table shows
    it, with ``message`` as its error."""
    new_run(client, experiment_id, base_name, tags).end_failed(message)
