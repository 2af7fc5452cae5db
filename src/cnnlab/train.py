"""Train one configuration and record it in MLflow: ``python -m cnnlab.train [overrides]``.

Everything that can be wrong with the input (config, data files, shapes, tracking URI) is
found before the MLflow run is created; a user error prints one line and exits with 2.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, NoReturn

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from cnnlab import config, tracking
from cnnlab.callbacks import EpochSpeed
from cnnlab.classifier import Classifier
from cnnlab.data import DataError, ImageDataModule
from cnnlab.models import Net, build_model
from cnnlab.models.summary import describe

log = logging.getLogger("cnnlab")

# Raised by the checks that run before training: reported in one line, never a traceback.
USER_ERRORS = (config.ConfigError, DataError, ValueError, InstantiationException, MlflowException)

# Batches come from tensors in memory; worker processes would only add copies.
warnings.filterwarnings("ignore", ".*does not have many workers.*")

config.register_configs()


@dataclass
class Job:
    """A checked configuration with everything built that can fail before training."""

    cfg: DictConfig
    settings: config.TrainConfig
    datamodule: ImageDataModule
    net: Net
    module: Classifier
    callbacks: list[L.Callback]


def fail(error: BaseException) -> NoReturn:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"cnnlab: error: {error}", file=sys.stderr)
    sys.exit(2)


def check_trainer_args(args: dict[str, Any]) -> None:
    valid = set(inspect.signature(L.Trainer.__init__).parameters) - {"self", "logger", "callbacks"}
    for name in args:
        config.check_choice("trainer argument", name, valid)


def prepare(cfg: DictConfig) -> Job:
    """Check the config and build data, model and callbacks; nothing is recorded yet."""
    settings = config.to_settings(cfg)
    check_trainer_args(settings.trainer)
    L.seed_everything(settings.seed, workers=True, verbose=False)
    data = dataclasses.asdict(settings.data) | {"source": settings.data.source.value}
    datamodule = ImageDataModule(**data, shuffle_seed=settings.seed)
    datamodule.setup("fit")
    net = build_model(**dataclasses.asdict(settings.model), data=datamodule.input_spec)
    scheduler = instantiate(settings.scheduler) if settings.scheduler else None
    module = Classifier(
        net, datamodule.input_spec.classes, instantiate(settings.optimizer), scheduler
    )
    callbacks = [instantiate(spec) for spec in settings.callbacks.values()] + [EpochSpeed()]
    return Job(cfg, settings, datamodule, net, module, callbacks)


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


def run_tags(settings: config.TrainConfig) -> dict[str, str]:
    hydra_cfg = HydraConfig.get()
    return {
        "overrides": " ".join(hydra_cfg.overrides.task),
        "seed": str(settings.seed),
        "hydra.output_dir": hydra_cfg.runtime.output_dir,
        "mlflow.source.name": "cnnlab.train",
        **tracking.git_state(config.REPO_ROOT),
        **tracking.package_versions(),
    }


def train(job: Job, client: MlflowClient, experiment_id: str) -> float:
    """Fit, test and record ``job`` in a new run; returns the best validation accuracy."""
    settings, tracking_uri = job.settings, job.settings.logger.tracking_uri
    name = tracking.unique_run_name(
        client, experiment_id, settings.logger.run_name or run_name(settings)
    )
    report = describe(job.net, job.datamodule.input_spec)
    with tracking.TrackedRun(client, experiment_id, name, run_tags(settings)) as run:
        logger = tracking.BatchedMLFlowLogger(
            run.run_id, tracking_uri, settings.logger.flush_every_s
        )
        trainer = L.Trainer(
            **{"default_root_dir": settings.paths.output_dir, **settings.trainer},
            logger=logger,
            callbacks=job.callbacks,
        )
        resolved = OmegaConf.to_container(job.cfg, resolve=True, enum_to_str=True)
        resolved["logger"]["tracking_uri"] = tracking.redact_uri(tracking_uri)
        run.log_params(
            tracking.flatten_params(resolved)
            | {
                "model/params_total": str(report.params_total),
                "model/params_trainable": str(report.params_trainable),
                "model/mult_adds": str(report.mult_adds),
                "trainer/world_size": str(trainer.world_size),
                "trainer/device_type": trainer.strategy.root_device.type,
                "data/source_resolved": str(job.datamodule.source_used),
            }
        )
        run.log_text(OmegaConf.to_yaml(resolved), "config.yaml")
        run.log_text(report.table, "model_summary.txt")
        trainer.fit(job.module, datamodule=job.datamodule)
        checkpoint = trainer.checkpoint_callback
        best_path = checkpoint.best_model_path if checkpoint else ""
        if best_path:
            run.log_artifact(best_path, "checkpoints")
        if settings.test:
            trainer.test(job.module, datamodule=job.datamodule, ckpt_path=best_path or None)
        best_val = float(checkpoint.best_model_score) if checkpoint else float("nan")
        report_result(trainer, run, experiment_id, best_val)
    return best_val


def report_result(
    trainer: L.Trainer, run: tracking.TrackedRun, experiment_id: str, best_val: float
) -> None:
    if trainer.global_rank != 0:
        return
    test_acc = trainer.callback_metrics.get("test/acc")
    lines = [f"best validation accuracy: {best_val:.2%}"]
    if test_acc is not None:
        lines.insert(0, f"test accuracy: {float(test_acc):.2%}")
    lines += [
        f"MLflow run: {run.run_id} ({run.run.info.run_name})",
        "open it: make ui, then http://127.0.0.1:5000/#/experiments/"
        f"{experiment_id}/runs/{run.run_id}",
    ]
    print("\n".join(lines), flush=True)


def run(cfg: DictConfig) -> float:
    """Check ``cfg``, then train and record it; a user error exits before any run exists."""
    try:
        job = prepare(cfg)
        client = MlflowClient(job.settings.logger.tracking_uri)
        experiment_id = tracking.open_experiment(
            client, job.settings.logger.experiment_name, job.settings.logger.artifact_location
        )
    except USER_ERRORS as error:
        fail(error)
    return train(job, client, experiment_id)


@hydra.main(version_base="1.3", config_path=str(config.CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float:
    return run(cfg)


if __name__ == "__main__":
    main()
