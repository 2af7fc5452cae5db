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

import os
import pickle
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from cnnlab import tracking
from cnnlab.checks import ConfigError

CHECKPOINT_TAG = "checkpoint.last"
# Settings that may differ between the first start and a resume: the resume itself, and
# the folders (a resumed run writes its checkpoints where the interrupted one did).
IGNORED = ("resume", "paths/", "callbacks/model_checkpoint/dirpath")


# Lightning's auto-requeue on SLURM saves its state here, in the Trainer's default_root_dir.
HPC_CHECKPOINTS = "hpc_ckpt_*.ckpt"


@dataclass(frozen=True)
class Target:
    run: Run
    checkpoint: Path

    @property
    def run_id(self) -> str:
        return self.run.info.run_id


def find_target(client: MlflowClient, target: str, *, check_status: bool = True) -> Target:
    """The run and checkpoint that ``resume=target`` names, or one clear error."""
    path = Path(target)
    if path.is_file():
        run = _get_run(client, run_id_in(path), target)
        checkpoint = path
    elif path.suffix == ".ckpt" or os.sep in target:
        raise ConfigError(f"resume={target}: no such checkpoint file")
    else:
        run = _get_run(client, target, target)
        recorded = run.data.tags.get(CHECKPOINT_TAG)
        checkpoint = Path(recorded or "")
        if not recorded or not checkpoint.is_file():
            raise ConfigError(
                f"resume={target}: run {target} has no checkpoint to resume from "
                f"({recorded or 'none recorded'}); it stopped before its first epoch ended"
            )
    if check_status:
        _check_status(client, run, target)
    return Target(run, checkpoint.resolve())  # ModelCheckpoint compares absolute paths


def run_id_in(checkpoint: Path) -> str:
    """The MLflow run a cnnlab checkpoint belongs to (loaded with weights_only=True)."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise ConfigError(f"resume={checkpoint}: not a readable checkpoint ({error})") from error
    for callback_state in state.get("callbacks", {}).values():
        if isinstance(callback_state, dict) and callback_state.get("mlflow_run_id"):
            return callback_state["mlflow_run_id"]
    raise ConfigError(f"resume={checkpoint}: a checkpoint without an MLflow run id (not cnnlab's)")


def _saved_by(checkpoint: Path, run_id: str) -> bool:
    """A whole, readable checkpoint of that run (one cut short by SIGKILL is not)."""
    try:
        return checkpoint.is_file() and run_id_in(checkpoint) == run_id
    except ConfigError:
        return False


def config_differences(client: MlflowClient, run_id: str, cfg: DictConfig) -> list[str]:
    """``setting: recorded -> now`` for each setting that differs from the run's config."""
    recorded_file = client.download_artifacts(run_id, "config.yaml")
    recorded = _flat(OmegaConf.load(recorded_file))
    now = _flat(OmegaConf.create(tracking.redact_uri(OmegaConf.to_yaml(cfg, resolve=True))))
    return [
        f"{key}: {recorded.get(key, '(unset)')} -> {now.get(key, '(unset)')}"
        for key in sorted(recorded.keys() | now.keys())
        if not key.startswith(IGNORED) and recorded.get(key) != now.get(key)
    ]


def process_tags() -> dict[str, str]:
    tags = {"cnnlab.host": socket.gethostname(), "cnnlab.pid": str(os.getpid())}
    if "SLURM_JOB_ID" in os.environ:
        tags["slurm.job_id"] = os.environ["SLURM_JOB_ID"]
        tags["slurm.restart_count"] = os.environ.get("SLURM_RESTART_COUNT", "0")
    return tags


def slurm_restarted() -> bool:
    """True in a Slurm job that Slurm has requeued and started again."""
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    return "SLURM_JOB_ID" in os.environ and restarts.isdigit() and int(restarts) > 0


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
    own = [path for path in candidates if _saved_by(path, run.info.run_id)]
    if not own:
        return None
    return Target(run, max(own, key=lambda path: path.stat().st_mtime).resolve())


def _flat(cfg: DictConfig) -> dict[str, str]:
    return tracking.flatten_params(OmegaConf.to_container(cfg, resolve=True))


def _get_run(client: MlflowClient, run_id: str, target: str) -> Run:
    try:
        return client.get_run(run_id)
    except MlflowException as error:
        raise ConfigError(
            f"resume={target}: neither a checkpoint file nor a run of the store "
            f"{tracking.redact_uri(client.tracking_uri)}"
        ) from error


def _check_status(client: MlflowClient, run: Run, target: str) -> None:
    status, run_id = run.info.status, run.info.run_id
    if status == "FINISHED":
        raise ConfigError(f"resume={target}: run {run_id} FINISHED; nothing to resume")
    if status != "RUNNING":
        return  # KILLED or FAILED: resumable
    tags = run.data.tags
    host, pid = tags.get("cnnlab.host"), tags.get("cnnlab.pid", "")
    job_id = tags.get("slurm.job_id")
    if host == socket.gethostname():
        if pid.isdigit() and _alive(int(pid)):
            raise ConfigError(f"resume={target}: run {run_id} is still running (pid {pid})")
        died = "process gone while RUNNING"
    elif job_id and _slurm_job_ended(job_id):
        died = f"Slurm job {job_id} no longer running"
    else:
        raise ConfigError(
            f"resume={target}: run {run_id} is RUNNING on host {host}"
            + (f" (Slurm job {job_id}, still running)" if job_id else "")
            + "; resume it there, where cnnlab can tell whether its process still lives"
        )
    # Its process died without a word (SIGKILL, power loss): never take it for live.
    client.set_tag(run_id, "cnnlab.died", died)
    client.set_terminated(run_id, "KILLED")


def _slurm_job_ended(job_id: str) -> bool:
    """Whether Slurm says job ``job_id`` runs no more (False when it cannot say)."""
    try:
        squeue = subprocess.run(
            ["squeue", "--noheader", "--jobs", job_id, "--format", "%T"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return False
    if squeue.returncode != 0:  # gone from the controller's memory altogether
        return "Invalid job id" in squeue.stderr
    return squeue.stdout.strip() in ("", "PENDING", "COMPLETED", "CANCELLED", "FAILED")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
