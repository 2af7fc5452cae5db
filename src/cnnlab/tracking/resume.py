"""``python -m cnnlab.train resume=<run id | checkpoint path>``: an interrupted run continues
in the same MLflow run from its last checkpoint, with the same config. A Slurm job that
Slurm requeues (preempted, timed out, or Lightning's auto-requeue on the signal
``--signal=USR1@90``) does the same by itself when it starts again (:func:`requeued`).

Each checkpoint carries its MLflow run id (callbacks.ResumeState), and each run records the
checkpoint it resumes from (tag ``checkpoint.last``) and the process that writes it
(``cnnlab.host``, ``cnnlab.pid``), so a run left RUNNING by a killed process is told apart
from a live one.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from cnnlab.checks import ConfigError, redact_uri
from cnnlab.tracking.liveness import process_alive, slurm_job_ended
from cnnlab.tracking.runs import flatten_params

log = logging.getLogger("cnnlab")

CHECKPOINT_TAG = "checkpoint.last"
# The command line's overrides as a JSON list: resume=<run id> alone continues with them.
OVERRIDES_TAG = "cnnlab.overrides"
# The one setting a resume may change: a run may train on for more epochs.
MAY_GROW = "trainer/max_epochs"
# Settings that may differ between the first start and a resume: the resume itself, and
# the folders (a resumed run writes its checkpoints where the interrupted one did).
IGNORED = ("resume", "paths/", "callbacks/model_checkpoint/dirpath")


# Lightning's auto-requeue on SLURM saves its state here, in the Trainer's default_root_dir.
HPC_CHECKPOINTS = "hpc_ckpt_*.ckpt"


@dataclass(frozen=True)
class Target:
    run: Run
    checkpoint: Path
    # Why a run left RUNNING is taken for dead; recorded (mark_died) once the resume goes ahead.
    died: str = ""
    grown: str = ""  # "2->3": trainer.max_epochs grew, to train the run on (tag cnnlab.max_epochs)

    @property
    def run_id(self) -> str:
        return self.run.info.run_id


def find_target(client: MlflowClient, target: str, *, check_status: bool = True) -> Target:
    """The run and a whole checkpoint of it that ``resume=target`` names, or one clear error.

    Only reads: a refused resume leaves the run as it was. A checkpoint cut short (a SIGKILL
    while saving) or unreadable gives way to the newest whole one of that run beside it.
    """
    path = Path(target)
    if path.is_file():
        run, checkpoint = _run_of_file(client, path, target)
    elif path.suffix == ".ckpt" or os.sep in target:
        raise ConfigError(f"resume={target}: no such checkpoint file")
    else:
        run = _get_run(client, target, target)
        checkpoint = _recorded_checkpoint(run, target)
    died = resumable(run, target) if check_status else ""
    return Target(run, checkpoint.resolve(), died)  # ModelCheckpoint compares absolute paths


def decide(client: MlflowClient, target: str, cfg: DictConfig) -> Target:
    """What ``resume=target`` continues, refused in one error when the run may not be
    resumed (FINISHED, still running) or ``cfg`` differs from its config but for a longer
    ``trainer.max_epochs``, which trains the run on (a FINISHED one too). Only reads.
    """
    found = find_target(client, target, check_status=False)
    grown = epochs_grown(client, found.run_id, cfg)
    died = resumable(found.run, target, longer=bool(grown))
    differences = config_differences(client, found.run_id, cfg)
    if differences:
        raise ConfigError(
            f"resume={target}: the config differs from run {found.run_id}'s: "
            + "; ".join(differences)
            + ". Resume with its settings, or start a new run"
        )
    return Target(found.run, found.checkpoint, died, grown)


def mark_died(client: MlflowClient, target: Target) -> None:
    """Record that the process of a run left RUNNING died without a word (SIGKILL, power
    loss), so that it is never taken for live again; nothing when it did not."""
    if target.died:
        client.set_tag(target.run_id, "cnnlab.died", target.died)
        client.set_terminated(target.run_id, "KILLED")


def _run_of_file(client: MlflowClient, path: Path, target: str) -> tuple[Run, Path]:
    """The run a checkpoint file belongs to, and the file; or, when the file is cut short or
    unreadable, the newest whole checkpoint beside it, if those all belong to one run."""
    try:
        state = _load(path)
    except ConfigError as unreadable:
        beside = [candidate for candidate in path.parent.glob("*.ckpt") if candidate != path]
        runs = {_run_id_or_none(candidate) for candidate in beside} - {None}
        if len(runs) != 1:
            raise unreadable from None
        (run_id,) = runs
        return _get_run(client, run_id, target), _fall_back(path, beside, run_id, target)
    return _get_run(client, _run_id(state, path), target), path


def _recorded_checkpoint(run: Run, target: str) -> Path:
    """The checkpoint the run recorded (tag ``checkpoint.last``), or the newest whole one of
    the run in its folder when that one is cut short, unreadable or missing."""
    run_id, recorded = run.info.run_id, run.data.tags.get(CHECKPOINT_TAG)
    checkpoint = Path(recorded or "")
    if recorded and _saved_by(checkpoint, run_id):
        return checkpoint
    beside = list(checkpoint.parent.glob("*.ckpt")) if recorded else []
    if recorded and newest_whole(beside, run_id) is not None:
        return _fall_back(checkpoint, beside, run_id, target)
    if recorded and checkpoint.is_file():
        raise ConfigError(
            f"resume={target}: {recorded} is cut short or unreadable, and {checkpoint.parent} "
            f"holds no whole checkpoint of run {run_id}; start a new run"
        )
    raise ConfigError(
        f"resume={target}: run {target} has no checkpoint to resume from "
        f"({recorded or 'none recorded'}); it stopped before its first epoch ended"
    )


def _fall_back(named: Path, candidates: list[Path], run_id: str, target: str) -> Path:
    """The newest whole checkpoint of the run among ``candidates``, said out loud."""
    own = newest_whole(candidates, run_id)
    log.warning(
        "resume=%s: %s is cut short or unreadable; continuing from %s, the newest whole "
        "checkpoint of run %s", target, named, own, run_id,
    )  # fmt: skip
    return own


def newest_whole(candidates: list[Path], run_id: str) -> Path | None:
    """The newest of ``candidates`` that is a whole checkpoint of run ``run_id``."""
    own = [path for path in candidates if _saved_by(path, run_id)]
    return max(own, key=lambda path: path.stat().st_mtime) if own else None


def run_id_in(checkpoint: Path) -> str:
    """The MLflow run a cnnlab checkpoint belongs to (loaded with weights_only=True)."""
    return _run_id(_load(checkpoint), checkpoint)


def _load(checkpoint: Path) -> dict:
    try:
        return torch.load(checkpoint, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise ConfigError(f"resume={checkpoint}: not a readable checkpoint ({error})") from error


def _run_id(state: dict, checkpoint: Path) -> str:
    for callback_state in state.get("callbacks", {}).values():
        if isinstance(callback_state, dict) and callback_state.get("mlflow_run_id"):
            return callback_state["mlflow_run_id"]
    raise ConfigError(f"resume={checkpoint}: a checkpoint without an MLflow run id (not cnnlab's)")


def _run_id_or_none(checkpoint: Path) -> str | None:
    try:
        return run_id_in(checkpoint)
    except ConfigError:
        return None


def _saved_by(checkpoint: Path, run_id: str) -> bool:
    """A whole, readable checkpoint of that run (one cut short by SIGKILL is not)."""
    try:
        return checkpoint.is_file() and run_id_in(checkpoint) == run_id
    except ConfigError:
        return False


def config_differences(client: MlflowClient, run_id: str, cfg: DictConfig) -> list[str]:
    """``setting: recorded -> now`` for each setting that differs from the run's config, but
    a longer ``trainer.max_epochs`` (:func:`epochs_grown`)."""
    recorded, now = _recorded_and_now(client, run_id, cfg)
    return [
        f"{key}: {recorded.get(key, '(unset)')} -> {now.get(key, '(unset)')}"
        for key in sorted(recorded.keys() | now.keys())
        if not key.startswith(IGNORED)
        and recorded.get(key) != now.get(key)
        and not (key == MAY_GROW and _grows(recorded.get(key), now.get(key)))
    ]


def epochs_grown(client: MlflowClient, run_id: str, cfg: DictConfig) -> str:
    """``"20->30"`` when ``cfg`` trains the run for more epochs than it was set to, else ""."""
    recorded, now = _recorded_and_now(client, run_id, cfg)
    before, after = recorded.get(MAY_GROW), now.get(MAY_GROW)
    return f"{before}->{after}" if _grows(before, after) else ""


def _grows(before: str | None, after: str | None) -> bool:
    try:
        return int(after) > int(before) >= 0
    except (TypeError, ValueError):
        return False


def _recorded_and_now(
    client: MlflowClient, run_id: str, cfg: DictConfig
) -> tuple[dict[str, str], dict[str, str]]:
    recorded_file = client.download_artifacts(run_id, "config.yaml")
    recorded = _flat(OmegaConf.load(recorded_file))
    now = _flat(OmegaConf.create(redact_uri(OmegaConf.to_yaml(cfg, resolve=True))))
    return recorded, now


def recorded_overrides(client: MlflowClient, target: str) -> list[str]:
    """The command-line overrides of the run ``resume=target`` names (tag
    ``cnnlab.overrides``), without Hydra's own and ``resume=``; [] when it has none."""
    path = Path(target)
    try:
        run = _run_of_file(client, path, target)[0] if path.is_file() else client.get_run(target)
    except (ConfigError, MlflowException):
        return []  # find_target says what is wrong with the target, in one line
    overrides = json.loads(run.data.tags.get(OVERRIDES_TAG, "[]"))
    return [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/", "resume="))]


def requeued(client: MlflowClient, experiment_id: str, folders: list[str]) -> Target | None:
    """In a requeued Slurm job: the run its earlier start recorded (tag ``slurm.job_id``,
    which requeueing keeps) and the newest checkpoint of that run, whether cnnlab saved it on
    SIGTERM or Lightning on its requeue signal (in the run's folder or in ``folders``).
    None when there is none: that start ended cleanly, or died before its first checkpoint.
    """
    job_id = os.environ["SLURM_JOB_ID"]
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`slurm.job_id` = '{job_id}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs or runs[0].info.status not in ("RUNNING", "KILLED"):
        return None
    run = runs[0]  # Slurm ended its process: RUNNING means it was killed outright
    tags = run.data.tags
    candidates = [Path(tags[CHECKPOINT_TAG])] if tags.get(CHECKPOINT_TAG) else []
    for folder in {tags.get("hydra.output_dir", ""), *folders} - {""}:
        candidates += Path(folder).glob(HPC_CHECKPOINTS)
    own = newest_whole(candidates, run.info.run_id)
    return Target(run, own.resolve()) if own else None


def _flat(cfg: DictConfig) -> dict[str, str]:
    return flatten_params(OmegaConf.to_container(cfg, resolve=True))


def _get_run(client: MlflowClient, run_id: str, target: str) -> Run:
    try:
        return client.get_run(run_id)
    except MlflowException as error:
        raise ConfigError(
            f"resume={target}: neither a checkpoint file nor a run of the store "
            f"{redact_uri(client.tracking_uri)}"
        ) from error


def resumable(run: Run, target: str, *, longer: bool = False) -> str:
    """Refuses a run that is FINISHED (unless it is to train ``longer``) or may still be
    running; returns why a run left RUNNING is taken for dead ("" when it is not)."""
    status, run_id = run.info.status, run.info.run_id
    if status == "FINISHED" and not longer:
        raise ConfigError(
            f"resume={target}: run {run_id} FINISHED; nothing to resume (a larger "
            "trainer.max_epochs trains it on)"
        )
    if status != "RUNNING":
        return ""  # KILLED, FAILED, or FINISHED to train longer: resumable
    tags = run.data.tags
    host, pid = tags.get("cnnlab.host"), tags.get("cnnlab.pid", "")
    job_id = tags.get("slurm.job_id")
    if host == socket.gethostname():
        if pid.isdigit() and process_alive(int(pid)):
            raise ConfigError(f"resume={target}: run {run_id} is still running (pid {pid})")
        return "process gone while RUNNING"
    if job_id and slurm_job_ended(job_id):
        return f"Slurm job {job_id} no longer running"
    raise ConfigError(
        f"resume={target}: run {run_id} is RUNNING on host {host}"
        + (f" (Slurm job {job_id}, still running)" if job_id else "")
        + "; resume it there, where cnnlab can tell whether its process still lives"
    )
