"""``python -m cnnlab.train resume=<run id | checkpoint path>``: an interrupted run continues
in the same MLflow run from its last checkpoint, with the same config.

Each checkpoint carries its MLflow run id (callbacks.ResumeState), and each run records the
checkpoint it resumes from (tag ``checkpoint.last``) and the process that writes it
(``cnnlab.host``, ``cnnlab.pid``), so a run left RUNNING by a killed process is told apart
from a live one.
"""

from __future__ import annotations

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

from cnnlab import tracking
from cnnlab.checks import ConfigError

CHECKPOINT_TAG = "checkpoint.last"
# Settings that may differ between the first start and a resume: the resume itself, and
# the folders (a resumed run writes its checkpoints where the interrupted one did).
IGNORED = ("resume", "paths/", "callbacks/model_checkpoint/dirpath")


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
    return {"cnnlab.host": socket.gethostname(), "cnnlab.pid": str(os.getpid())}


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
    host, pid = run.data.tags.get("cnnlab.host"), run.data.tags.get("cnnlab.pid", "")
    if host != socket.gethostname():
        raise ConfigError(
            f"resume={target}: run {run_id} is RUNNING on host {host}; resume it there, "
            "where cnnlab can tell whether its process still lives"
        )
    if pid.isdigit() and _alive(int(pid)):
        raise ConfigError(f"resume={target}: run {run_id} is still running (pid {pid})")
    # Its process died without a word (SIGKILL, power loss): never take it for live.
    client.set_tag(run_id, "cnnlab.died", "process gone while RUNNING")
    client.set_terminated(run_id, "KILLED")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
