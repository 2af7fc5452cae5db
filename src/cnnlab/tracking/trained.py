"""What an evaluation (``python -m cnnlab.eval``) tests, found and read from the store: the
training run, its checkpoint (read with ``weights_only``) and its recorded config. Every
problem is a :class:`ConfigError` raised before anything is recorded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from cnnlab.checks import ConfigError
from cnnlab.tracking.record import BEST_CHECKPOINT_TAG
from cnnlab.tracking.resume import CHECKPOINT_TAG

EVAL_ROLE = "eval"  # tag cnnlab.role of an evaluation's run


@dataclass(frozen=True)
class Trained:
    """What is evaluated: its training run (None: a checkpoint of no run this store knows),
    the checkpoint file, and how the result names it."""

    run: Run | None
    checkpoint: Path
    name: str  # runs:/<id>/checkpoints/<file> for the run's own, else the file's path
    state: dict[str, Any]  # the checkpoint, read with weights_only
    config: DictConfig | None  # the run's resolved config.yaml; None without a run

    @property
    def described(self) -> dict[str, Any]:
        """The model's knobs and input as the checkpoint keeps them ({} when it is older)."""
        return self.state.get("hyper_parameters", {})


def find_trained(client: MlflowClient, run_id: str | None, ckpt: str | None, into: Path) -> Trained:
    """The run and checkpoint ``run=`` and ``ckpt=`` name, both read; a checkpoint alone is
    matched to the run that saved it, when this store has it."""
    if ckpt:
        checkpoint = Path(ckpt).expanduser().resolve()
        owner = run_of_checkpoint(client, checkpoint)
        run = training_run(client, run_id) if run_id else owner
        if run_id and owner is not None and owner.info.run_id != run_id:
            raise ConfigError(
                f"ckpt={ckpt} was saved by run {owner.info.run_id} ({owner.info.run_name}), "
                f"not by run={run_id}; valid: run={owner.info.run_id}, or ckpt= alone"
            )
        name = str(checkpoint)
    else:
        run = training_run(client, run_id)
        name = best_checkpoint_of(run)
        checkpoint = Path(client.download_artifacts(run.info.run_id, name, str(into)))
        name = f"runs:/{run.info.run_id}/{name}"
    recorded = recorded_config(client, run, into) if run is not None else None
    trained = Trained(run, checkpoint, name, read_checkpoint(checkpoint), recorded)
    check_same_model(trained)
    return trained


def check_file(ckpt: str) -> None:
    if not Path(ckpt).expanduser().is_file():
        raise ConfigError(f"ckpt={ckpt}: no such file")


def training_run(client: MlflowClient, run_id: str) -> Run:
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        raise ConfigError(f"run={run_id}: no such run in {client.tracking_uri}") from error
    role = run.data.tags.get("cnnlab.role")
    if role in ("sweep", EVAL_ROLE):
        raise ConfigError(f"run={run_id} is a {role} run; valid: the id of a training run")
    return run


def best_checkpoint_of(run: Run) -> str:
    """The artifact path of ``run``'s best checkpoint, which training tags."""
    path = run.data.tags.get(BEST_CHECKPOINT_TAG)
    if not path:
        raise ConfigError(
            f"run={run.info.run_id} ({run.info.run_name}, {run.info.status}) has no checkpoint: "
            "it saved none before it ended; valid: a run tagged checkpoint.best, or "
            "ckpt=<checkpoint file>"
        )
    return path


def run_of_checkpoint(client: MlflowClient, checkpoint: Path) -> Run | None:
    """The run whose checkpoints are saved in ``checkpoint``'s folder (training tags where
    its last one goes), or None."""
    last = str(checkpoint.parent / "last.ckpt")
    if "'" in last:  # MLflow's filter language has no escape for it
        return None
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(experiments, f"tags.`{CHECKPOINT_TAG}` = '{last}'", max_results=2)
    return found[0] if len(found) == 1 else None


def read_checkpoint(path: Path) -> dict[str, Any]:
    try:  # tensors and plain data only: no code runs from the file
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a file that is no checkpoint
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"ckpt={path}: not a checkpoint torch can read ({first})") from error
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ConfigError(f"ckpt={path}: not a Lightning checkpoint (no state_dict in it)")
    return state


def recorded_config(client: MlflowClient, run: Run, into: Path) -> DictConfig:
    """The resolved config training recorded (``config.yaml``)."""
    try:
        path = client.download_artifacts(run.info.run_id, "config.yaml", str(into))
    except (MlflowException, OSError) as error:
        raise ConfigError(
            f"run={run.info.run_id} has no config.yaml artifact: it was not recorded by "
            "cnnlab.train; valid: the id of a training run"
        ) from error
    return OmegaConf.load(path)


def check_same_model(trained: Trained) -> None:
    """A checkpoint that describes its model must describe the run's."""
    described = trained.described.get("model")
    if trained.config is None or described is None:
        return
    recorded = OmegaConf.to_container(trained.config.model, resolve=True)
    differing = sorted(key for key in described if described[key] != recorded.get(key))
    if differing:
        raise ConfigError(
            f"ckpt={trained.checkpoint} holds another model than run "
            f"{trained.run.info.run_id} trained (model.{differing[0]}: "
            f"{described[differing[0]]} against {recorded.get(differing[0])}); valid: a "
            "checkpoint of that run, or ckpt= alone"
        )
