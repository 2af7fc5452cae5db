"""A job: one configuration checked and built (data, model, optimizer, Trainer) before
anything is recorded, then fitted and tested."""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from omegaconf import DictConfig

from cnnlab import config, launch
from cnnlab.callbacks import EpochSpeed, InterruptCheckpoint, ResumeState
from cnnlab.checks import check_writable
from cnnlab.classifier import Classifier
from cnnlab.data import ImageDataModule
from cnnlab.models import InputSpec, Net, build_model
from cnnlab.perf import FastPath
from cnnlab.resume import Target


@dataclass
class Job:
    """A checked configuration with everything built that can fail before training."""

    cfg: DictConfig
    settings: config.TrainConfig
    datamodule: ImageDataModule
    spec: InputSpec
    net: Net
    module: Classifier
    trainer: L.Trainer
    fit_seconds: float = math.nan  # wall time of trainer.fit, validation passes included
    resume: Target | None = None  # the interrupted run and checkpoint this job continues


def check_trainer_args(args: dict[str, Any]) -> None:
    valid = set(inspect.signature(L.Trainer.__init__).parameters) - {"self", "logger", "callbacks"}
    for name in args:
        config.check_choice("trainer argument", name, valid)


def prepare(cfg: DictConfig, devices: list[int] | None = None) -> Job:
    """Check the config and build data, model, optimizer and Trainer; nothing is recorded.
    ``devices``: the device ids the launcher gave this job, instead of ``trainer.devices``."""
    settings = config.to_settings(cfg)
    check_writable("paths.output_dir", settings.paths.output_dir)  # checkpoints, logs
    check_trainer_args(settings.trainer)
    launch.share_cores(launch.parallel_jobs())
    L.seed_everything(settings.seed, workers=True, verbose=False)
    data = dataclasses.asdict(settings.data) | {"source": settings.data.source.value}
    datamodule = ImageDataModule(**data, shuffle_seed=settings.seed)
    datamodule.setup("fit")
    info = datamodule.info
    spec = InputSpec(info.channels, info.size, info.classes)
    net = build_model(settings.model, spec)
    scheduler = instantiate(settings.scheduler) if settings.scheduler else None
    module = Classifier(
        net, info.classes, instantiate(settings.optimizer), scheduler, settings.label_smoothing
    )
    try:  # complete the partials once now, so that a bad argument fails before the run
        module.optimization(total_steps=1)
    except (TypeError, ValueError) as error:
        raise config.ConfigError(f"optimizer or scheduler settings refused: {error}") from error
    callbacks = [instantiate(callback) for callback in settings.callbacks.values()]
    if not settings.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    perf = settings.perf
    callbacks += [
        EpochSpeed(),
        ResumeState(),
        FastPath(perf.memory_format.value, perf.compile, perf.compile_mode, perf.matmul_precision),
    ]
    saving = [c for c in callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
    if saving:  # Ctrl-C and SIGTERM leave the current state beside the epoch checkpoints
        callbacks.append(InterruptCheckpoint(saving[0].dirpath))
    trainer_args = {"default_root_dir": settings.paths.output_dir, **settings.trainer}
    if devices is not None:
        trainer_args["devices"] = devices
    try:
        trainer = L.Trainer(**trainer_args, logger=False, callbacks=callbacks)
    # ImportError: an accelerator or strategy whose package is missing (torch_xla, ...)
    except (MisconfigurationException, TypeError, ValueError, ImportError) as error:
        raise config.ConfigError(f"trainer settings refused: {error}") from error
    return Job(cfg, settings, datamodule, spec, net, module, trainer)


def fit_and_test(job: Job) -> float:
    """Fit, then test the best checkpoint; returns the best validation accuracy (NaN: none)."""
    trainer = job.trainer
    start = time.perf_counter()
    trainer.fit(
        job.module,
        datamodule=job.datamodule,
        ckpt_path=job.resume.checkpoint if job.resume else None,
        weights_only=True,
    )
    job.fit_seconds = time.perf_counter() - start
    checkpoint = trainer.checkpoint_callback
    best_path = checkpoint.best_model_path if checkpoint else ""
    if job.settings.test:
        trainer.test(
            job.module,
            datamodule=job.datamodule,
            ckpt_path=best_path or None,
            weights_only=True,  # tensors and plain data only: no code runs from the file
        )
    score = checkpoint.best_model_score if checkpoint else None
    return math.nan if score is None else float(score)
