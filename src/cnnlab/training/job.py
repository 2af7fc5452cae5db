"""A job: one configuration checked and built (data, model, optimizer, Trainer) before
anything is recorded, then fitted and tested.

:func:`prepare` takes plain values: the composed config, the devices and CPU threads the
launcher gives the job, the point a resume starts from (:class:`Start`, read from the
checkpoint by :func:`start_from`) and the logger; it reads no global runtime, so a job can
be built from a notebook (``prepare(compose([...], folder))``).
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import StrategyRegistry
from omegaconf import DictConfig

from cnnlab import config
from cnnlab.checks import check_writable
from cnnlab.data import ImageDataModule
from cnnlab.data.datamodule import EpochBatchSampler
from cnnlab.data.sources import DatasetInfo
from cnnlab.models import InputSpec, Net, build_model
from cnnlab.models.summary import ModelReport
from cnnlab.training import compat
from cnnlab.training.callbacks import EpochSpeed, InterruptCheckpoint, ResumeState, TrainTimer
from cnnlab.training.classifier import Classifier, describing
from cnnlab.training.perf import FastPath
from cnnlab.training.whitening import WhiteningFit


@dataclass(frozen=True)
class Start:
    """Where training starts: from scratch, or from a whole checkpoint of the run a resume
    continues (what :func:`start_from` reads from it)."""

    checkpoint: Path | None = None
    epoch: int = 0  # the epoch the checkpoint was taken in
    batches_done: int = 0  # training batches of that epoch done (0: the epoch was complete)
    fit_seconds_before: float = 0.0  # trainer.fit's time in the run's earlier starts


def start_from(checkpoint: Path) -> Start:
    """The resume point saved in a cnnlab checkpoint (callbacks.ResumeState), read with
    ``weights_only=True``."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    saved = state.get("callbacks", {}).get(ResumeState.__qualname__, {})
    return Start(
        checkpoint,
        epoch=int(state.get("epoch", 0)),
        batches_done=int(saved.get("batches_done", 0)),
        fit_seconds_before=float(saved.get("fit_seconds", 0.0)),  # older: not saved
    )


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
    start: Start = field(default_factory=Start)
    resume_state: ResumeState = field(default_factory=ResumeState)
    interrupt: InterruptCheckpoint | None = None  # saves the state on Ctrl-C and SIGTERM


@dataclass(frozen=True)
class FitResult:
    """What fitting and testing a job gave."""

    best_val: float  # the best validation accuracy, NaN when no checkpoint scored
    best_checkpoint: str  # its file, "" when none was saved
    fit_seconds: float  # trainer.fit's time, in all the run's starts
    step: int  # the global step reached
    test_acc: float | None  # of the best checkpoint, None when not tested


def facts(job: Job, report: ModelReport) -> dict[str, str]:
    """What the built job says about itself, as params: the model's size and cost, where it
    runs, with how many processes and threads, and which data source delivered how many images."""
    trainer = job.trainer
    return {
        "model/params_total": str(report.params_total),
        "model/params_trainable": str(report.params_trainable),
        "model/flops": str(report.flops),
        "trainer/world_size": str(trainer.world_size),
        "trainer/device_ids": ",".join(map(str, trainer.device_ids)),
        "trainer/processes_from": processes_from(trainer),
        "trainer/device_type": trainer.strategy.root_device.type,
        "trainer/cpu_threads": str(torch.get_num_threads()),
        "data/source_resolved": str(job.datamodule.source_used),
        **split_sizes(job.datamodule),
    }


def split_sizes(datamodule: ImageDataModule) -> dict[str, str]:
    """How many images each split holds (the report's context header), once they are set up."""
    splits = {"train": datamodule.train_set, "val": datamodule.val_set, "test": datamodule.test_set}
    return {
        f"data/{name}_images": str(len(data)) for name, data in splits.items() if data is not None
    }


def processes_from(trainer: L.Trainer) -> str:
    """Who started this job's processes: Lightning, or the cluster (Slurm's srun, torchrun)."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if environment is None:
        return "single process"
    name = type(environment).__name__
    return f"{name} (external)" if environment.creates_processes_externally else name


def check_trainer_args(args: dict[str, Any]) -> None:
    valid = set(inspect.signature(L.Trainer.__init__).parameters) - {"self", "logger", "callbacks"}
    for name in args:
        config.check_choice("trainer argument", name, valid)


def prepare(
    cfg: DictConfig,
    *,
    devices: list[int] | None = None,
    threads: int | None = None,
    start: Start | None = None,
    logger: Logger | None = None,
) -> Job:
    """Check the config and build data, model, optimizer and Trainer; nothing is recorded.

    ``devices``: the device ids the launcher gave this job, instead of ``trainer.devices``;
    ``threads``: the CPU threads it may use (its share of the cores beside parallel jobs);
    ``start``: the checkpoint a resume continues from, whose folder it saves into;
    ``logger``: the Trainer's logger (None: none).
    """
    settings = config.to_settings(cfg)
    start = start or Start()
    check_writable("paths.output_dir", settings.paths.output_dir)  # checkpoints, logs
    check_trainer_args(settings.trainer)
    if threads is not None:
        torch.set_num_threads(threads)
    L.seed_everything(settings.seed, workers=True, verbose=False)
    resume_at = (start.epoch, start.batches_done)
    datamodule = ImageDataModule(settings.data, shuffle_seed=settings.seed, resume_at=resume_at)
    datamodule.setup("fit")
    spec, net, module = build_module(settings, datamodule.info)
    resume_state = ResumeState(start.fit_seconds_before)
    callbacks, interrupt = build_callbacks(settings, resume_state, start)
    trainer = build_trainer(settings, callbacks, devices, logger)
    complete_optimization(module, settings, datamodule, trainer.world_size)
    return Job(
        cfg, settings, datamodule, spec, net, module, trainer, start, resume_state, interrupt
    )


def build_module(
    settings: config.TrainConfig, info: DatasetInfo
) -> tuple[InputSpec, Net, Classifier]:
    """The input's shape, the net (every layer size checked) and the LightningModule."""
    spec = InputSpec.of(info)
    net = build_model(settings.model, spec)
    scheduler = instantiate(settings.scheduler) if settings.scheduler else None
    module = Classifier(
        net,
        info.classes,
        instantiate(settings.optimizer),
        scheduler,
        settings.label_smoothing,
        tta=settings.tta,
        **describing(settings.model, spec),
    )
    return spec, net, module


def complete_optimization(
    module: Classifier, settings: config.TrainConfig, datamodule: ImageDataModule, world_size: int
) -> None:
    """Complete the optimizer and scheduler partials now, for the run's real length, so that
    a bad argument fails before any run exists."""
    steps = planned_steps(
        settings.trainer,
        len(datamodule.train_set),
        datamodule.batch_size,
        world_size,
        drop_last=settings.data.drop_last,
    )
    try:
        module.optimization(total_steps=steps)
    except (TypeError, ValueError) as error:
        raise config.ConfigError(f"optimizer or scheduler settings refused: {error}") from error


def build_callbacks(
    settings: config.TrainConfig, resume_state: ResumeState, start: Start
) -> tuple[list[L.Callback], InterruptCheckpoint | None]:
    """The configured callbacks and cnnlab's own. A resumed run saves its checkpoints beside
    the one it continues from (where the interrupted start saved them)."""
    saving_into = {"dirpath": str(start.checkpoint.parent)} if start.checkpoint else {}
    callbacks = [
        instantiate(callback, **(saving_into if "dirpath" in callback else {}))
        for callback in settings.callbacks.values()
    ]
    if not settings.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    perf = settings.perf
    model = settings.model
    whitening = (
        [WhiteningFit(model.whiten_images, model.whiten_bias_epochs)] if model.whiten else []
    )
    callbacks += [
        EpochSpeed(),
        TrainTimer(),  # before WhiteningFit: the fit is part of the time airbench reports
        *whitening,
        resume_state,
        FastPath(perf.memory_format.value, perf.compile, perf.compile_mode, perf.matmul_precision),
    ]
    saving = [c for c in callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
    interrupt = None
    if saving:  # Ctrl-C and SIGTERM leave the current state beside the epoch checkpoints
        interrupt = InterruptCheckpoint(saving[0].dirpath)
        callbacks.append(interrupt)
    return callbacks, interrupt


def build_trainer(
    settings: config.TrainConfig,
    callbacks: list[L.Callback],
    devices: list[int] | None,
    logger: Logger | None,
) -> L.Trainer:
    """The Trainer of ``settings.trainer``, or one clear error for arguments Lightning refuses."""
    trainer_args = {"default_root_dir": settings.paths.output_dir, **settings.trainer}
    if devices is not None:
        trainer_args["devices"] = devices
    try:
        trainer = L.Trainer(**trainer_args, logger=logger or False, callbacks=callbacks)
    # ImportError: an accelerator or strategy whose package is missing (torch_xla, ...)
    except (MisconfigurationException, TypeError, ValueError, ImportError) as error:
        raise config.ConfigError(f"trainer settings refused: {error}") from error
    check_not_spawned(trainer, str(settings.trainer.get("strategy", "auto")))
    return trainer


def check_not_spawned(trainer: L.Trainer, requested: str) -> None:
    """Refuse strategies whose workers Lightning starts with multiprocessing (``ddp_spawn``,
    ``ddp_fork``, ``ddp_notebook``): their launcher hands back to the main process only the
    best checkpoint's path, not its score, so a job's result (``val/acc_best``, a sweep's
    best group, Optuna's objective) would be lost.

    Raises:
        ConfigError: naming the strategy and the ones that work.
    """
    if compat.starts_by_multiprocessing(trainer.strategy):
        valid = [
            name
            for name in StrategyRegistry.available_strategies()
            if not any(word in name for word in ("spawn", "fork", "notebook"))
        ]
        raise config.ConfigError(
            f"trainer.strategy={requested} starts its processes with multiprocessing, which "
            "returns no validation score to the run; use ddp (Lightning starts the processes "
            f"as scripts) or start them with srun or torchrun; valid: auto, {', '.join(valid)}"
        )


def planned_steps(
    trainer_args: dict[str, Any], images: int, batch_size: int, world: int, drop_last: bool = False
) -> int:
    """The optimizer steps ``trainer.fit`` will take, as Lightning's
    ``estimated_stepping_batches`` counts them once the fit has begun; checked here so that a
    run that would train nothing, or that its scheduler cannot plan, fails before it exists.

    Raises:
        ConfigError: ``limit_train_batches`` or the run's length leaves no step.
    """
    if trainer_args.get("fast_dev_run"):
        return 1  # Lightning runs one batch of each loop (or the number given), then stops
    sampler = EpochBatchSampler(
        images, batch_size, shuffle=False, world_size=world, drop_last=drop_last
    )
    batches = len(sampler)
    if batches == 0:  # drop_last with fewer images than one batch
        raise config.ConfigError(
            f"data.drop_last=true drops every batch: data.batch_size={batch_size} is more than "
            f"the {sampler.shard_size} training images of each of {world} process(es); valid: "
            f"a batch size <= {sampler.shard_size}, or data.drop_last=false"
        )
    limit = trainer_args.get("limit_train_batches")
    if limit is not None:
        config.check_range("trainer.limit_train_batches", limit, low=0, low_open=True)
        available = batches
        batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
        if batches == 0:
            raise config.ConfigError(
                f"trainer.limit_train_batches={limit} leaves no training batch of {available} "
                "an epoch; valid: a count >= 1 or a fraction that keeps one batch"
            )
    accumulate = trainer_args.get("accumulate_grad_batches") or 1
    per_epoch = math.ceil(batches / accumulate)
    max_epochs = trainer_args.get("max_epochs")
    max_steps = trainer_args.get("max_steps", -1)
    if max_epochs is None:
        max_epochs = 1000 if max_steps in (None, -1) else -1  # Lightning's defaults
    total = per_epoch * max_epochs if max_epochs >= 0 else math.inf
    if max_steps not in (None, -1):
        total = min(total, max_steps)
    if total == 0:
        raise config.ConfigError(
            f"trainer.max_epochs={max_epochs}, trainer.max_steps={max_steps}: the run trains "
            "no step; valid: max_epochs >= 1 or max_steps >= 1"
        )
    return total if total != math.inf else 1  # an unbounded run: the scheduler checks itself


def fit_and_test(job: Job) -> FitResult:
    """Fit (from ``job.start``), then test the best checkpoint."""
    trainer = job.trainer
    start = time.perf_counter()
    trainer.fit(job.module, datamodule=job.datamodule, ckpt_path=job.start.checkpoint,
                weights_only=True)  # fmt: skip
    fit_seconds = job.start.fit_seconds_before + time.perf_counter() - start
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
    test_acc = trainer.callback_metrics.get("test/acc")
    return FitResult(
        best_val=math.nan if score is None else float(score),
        best_checkpoint=best_path,
        fit_seconds=fit_seconds,
        step=trainer.global_step,
        test_acc=None if test_acc is None else float(test_acc),
    )
