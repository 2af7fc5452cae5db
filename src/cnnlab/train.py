"""Train one configuration and record it in MLflow: ``python -m cnnlab.train [overrides]``.

Everything that can be wrong with the input (config, data files, shapes, Trainer and
optimizer arguments, tracking URI) is found before the MLflow run is created; a user error
prints one line and exits with 2. Under DDP only global rank 0 talks to MLflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

from cnnlab import config, launch, pictures, tracking
from cnnlab.callbacks import EpochSpeed, ResumeState
from cnnlab.classifier import Classifier, NonFiniteLossError
from cnnlab.cli import USER_ERRORS, fail, one_line, user_errors
from cnnlab.data import ImageDataModule
from cnnlab.models import InputSpec, Net, build_model
from cnnlab.models.summary import ModelReport, describe
from cnnlab.resume import CHECKPOINT_TAG, Target, config_differences, find_target, process_tags

log = logging.getLogger("cnnlab")

# A progress bar per artifact download (config.yaml on resume) is noise in a training log.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Batches come from tensors in memory; worker processes would only add copies.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# EpochSpeed logs rank 0's clock on purpose: a sum or mean over ranks would not be a time.
warnings.filterwarnings("ignore", ".*log\\('time/.*sync_dist=True.*")

config.register_configs()


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
    module = Classifier(net, info.classes, instantiate(settings.optimizer), scheduler)
    try:  # complete the partials once now, so that a bad argument fails before the run
        module.optimization(total_steps=1)
    except (TypeError, ValueError) as error:
        raise config.ConfigError(f"optimizer or scheduler settings refused: {error}") from error
    callbacks = [instantiate(callback) for callback in settings.callbacks.values()]
    callbacks += [EpochSpeed(), ResumeState()]
    trainer_args = {"default_root_dir": settings.paths.output_dir, **settings.trainer}
    if devices is not None:
        trainer_args["devices"] = devices
    try:
        trainer = L.Trainer(**trainer_args, logger=False, callbacks=callbacks)
    # ImportError: an accelerator or strategy whose package is missing (torch_xla, ...)
    except (MisconfigurationException, TypeError, ValueError, ImportError) as error:
        raise config.ConfigError(f"trainer settings refused: {error}") from error
    return Job(cfg, settings, datamodule, spec, net, module, trainer)


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
        "overrides": tracking.redact_uri(" ".join(hydra_cfg.overrides.task)),
        "seed": str(settings.seed),
        "hydra.output_dir": hydra_cfg.runtime.output_dir,
        "mlflow.source.name": "cnnlab.train",
        **process_tags(),
        **tracking.git_state(config.REPO_ROOT),
        **tracking.package_versions(),
        **({"slurm.job_id": os.environ["SLURM_JOB_ID"]} if "SLURM_JOB_ID" in os.environ else {}),
    }


def run_params(job: Job, report: ModelReport) -> dict[str, str]:
    resolved = OmegaConf.to_container(job.cfg, resolve=True, enum_to_str=True)
    return tracking.flatten_params(resolved) | {
        "model/params_total": str(report.params_total),
        "model/params_trainable": str(report.params_trainable),
        "model/flops": str(report.flops),
        "trainer/world_size": str(job.trainer.world_size),
        "trainer/device_ids": ",".join(map(str, job.trainer.device_ids)),
        "trainer/processes_from": processes_from(job.trainer),
        "trainer/device_type": job.trainer.strategy.root_device.type,
        "trainer/cpu_threads": str(torch.get_num_threads()),
        "data/source_resolved": str(job.datamodule.source_used),
    }


def processes_from(trainer: L.Trainer) -> str:
    """Who started this job's processes: Lightning, or the cluster (Slurm's srun, torchrun)."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if environment is None:
        return "single process"
    name = type(environment).__name__
    return f"{name} (external)" if environment.creates_processes_externally else name


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


def train(
    job: Job, client: MlflowClient, experiment_id: str, sweep: tracking.JobContext | None = None
) -> float:
    """Fit, test and record ``job`` in a new run (a child of ``sweep``'s parent run when it
    is a sweep job); returns the best validation accuracy."""
    settings = job.settings
    logged: dict[str, int] = {}
    if job.resume:  # the same run again, its params and artifacts as they are
        tags = {"cnnlab.resumed_from": str(job.resume.checkpoint), **process_tags()}
        tracked = tracking.TrackedRun.reopen(client, job.resume.run_id, tags)
        logged = tracking.logged_steps(client, job.resume.run_id)
        experiment_id = job.resume.run.info.experiment_id
    else:
        base_name = sweep.run_name if sweep else settings.logger.run_name or run_name(settings)
        name = tracking.unique_run_name(client, experiment_id, base_name)
        tags = run_tags(settings) | (sweep.tags() if sweep else {}) | checkpoint_tag(job)
        tracked = tracking.TrackedRun(client, experiment_id, name, tags)
    with tracked as run:
        next(c for c in job.trainer.callbacks if isinstance(c, ResumeState)).run_id = run.run_id
        job.trainer.logger = tracking.BatchedMLFlowLogger(
            run.run_id, settings.logger.tracking_uri, settings.logger.flush_every_s, logged
        )
        if not job.resume:
            record_setup(job, run)
        best_val = fit_and_test(job)
        step = job.trainer.global_step
        run.log_metric("time/fit_s", job.fit_seconds, step=step)
        if not math.isnan(best_val):  # the checkpoint the test used: what a sweep compares
            run.log_metric("val/acc_best", best_val, step=step)
        checkpoint = job.trainer.checkpoint_callback
        if checkpoint and checkpoint.best_model_path:
            run.log_artifact(checkpoint.best_model_path, "checkpoints")
        if settings.logger.pictures:
            log_pictures(job, run)
        report_result(job.trainer, run, experiment_id, best_val)
    return best_val


def record_setup(job: Job, run: tracking.TrackedRun) -> None:
    """Params, the resolved config and the model's layer table of a new run."""
    report = describe(job.net, job.spec)
    run.log_params(run_params(job, report))
    config_yaml = OmegaConf.to_yaml(job.cfg, resolve=True)
    run.log_text(tracking.redact_uri(config_yaml), "config.yaml")
    run.log_text(report.table, "model_summary.txt")


def checkpoint_tag(job: Job) -> dict[str, str]:
    """Where the run's last checkpoint will be: what ``resume=<run id>`` continues from."""
    checkpoint = job.trainer.checkpoint_callback
    if checkpoint is None or not checkpoint.save_last or not checkpoint.dirpath:
        return {}
    last = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}.ckpt"
    return {CHECKPOINT_TAG: str(last.resolve())}


PICTURE_IMAGES = 512  # test images the pictures are drawn from (misclassified, feature maps)
CURVES = ("train/loss", "train/acc", "val/loss", "val/acc")


def log_pictures(job: Job, run: tracking.TrackedRun) -> None:
    """Per-run pictures (cnnlab.pictures) of the tested model, under ``pictures/``."""
    start = time.perf_counter()
    job.trainer.logger.flush()  # every buffered metric in the store: the curves read it back
    test = job.datamodule.test_set
    images, labels = test.images[:PICTURE_IMAGES], test.labels[:PICTURE_IMAGES]
    history = {
        name: [(m.step, m.value) for m in run.client.get_metric_history(run.run_id, name)]
        for name in CURVES
    }
    net = job.net.cpu()
    figures = pictures.for_run(
        net,
        images,
        job.datamodule.normalize(images),
        labels,
        job.datamodule.info.class_names,
        history,
        job.module.test_confusion_matrix,
    )
    for name, figure in figures.items():
        run.client.log_figure(run.run_id, figure, f"pictures/{name}")
    log.info("pictures drawn and logged in %.1f s", time.perf_counter() - start)


def report_result(
    trainer: L.Trainer, run: tracking.TrackedRun, experiment_id: str, best_val: float
) -> None:
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
    sweep = sweep_context(cfg.seed)
    if sweep is not None:
        return run_sweep_job(cfg, sweep)
    with user_errors():
        job = prepare(cfg)
        client, experiment_id = None, ""
        if job.trainer.global_rank == 0:
            logger = job.settings.logger
            client = tracking.connect(logger.tracking_uri)
            experiment_id = tracking.open_experiment(
                client, logger.experiment_name, logger.artifact_location
            )
        if job.settings.resume:
            job.resume = plan_resume(job, client)
            checkpoint = job.trainer.checkpoint_callback
            if checkpoint is not None:  # on where the interrupted run left its checkpoints
                checkpoint.dirpath = str(job.resume.checkpoint.parent)
    try:
        return fit_and_record(job, client, experiment_id)
    except NonFiniteLossError as error:  # recorded FAILED; the user gets one line
        fail(error)


def plan_resume(job: Job, client: MlflowClient | None) -> Target:
    """The run and checkpoint ``resume=`` names, refused when the config has changed."""
    first_rank = job.trainer.global_rank == 0
    client = client or tracking.connect(job.settings.logger.tracking_uri)
    target = find_target(client, job.settings.resume, check_status=first_rank)
    differences = config_differences(client, target.run_id, job.cfg) if first_rank else []
    if differences:
        raise config.ConfigError(
            f"resume={job.settings.resume}: the config differs from run {target.run_id}'s: "
            + "; ".join(differences)
            + ". Resume with its settings, or start a new run"
        )
    return target


def fit_and_record(
    job: Job,
    client: MlflowClient | None,
    experiment_id: str,
    sweep: tracking.JobContext | None = None,
) -> float:
    """Train ``job``; only global rank 0 records it (a DDP worker has nothing to record)."""
    if job.trainer.global_rank != 0:
        job.trainer.logger = DummyLogger()
        return fit_and_test(job)
    try:
        return train(job, client, experiment_id, sweep)
    except SIGTERMException as error:  # the run is KILLED; exit as a terminated process does
        raise SystemExit(143) from error


def sweep_context(seed: int) -> tracking.JobContext | None:
    """The sweep this job is part of; None for a single run."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep_dir = hydra_cfg.sweep.dir
    elif launch.SWEEP_DIR_ENV in os.environ:  # a sweep job started in its own process
        sweep_dir = os.environ[launch.SWEEP_DIR_ENV]
    else:
        return None
    sweep = tracking.job_context(sweep_dir, list(hydra_cfg.overrides.task), seed)
    if sweep is None:  # Hydra reports a failing callback only as a warning
        fail(
            config.ConfigError(
                f"no {tracking.SWEEP_FILE} in {sweep_dir}: the MLflow sweep callback "
                "(hydra.callbacks.mlflow_sweep) did not set up this multirun; see its warning above"
            )
        )
    return sweep


def run_sweep_job(cfg: DictConfig, sweep: tracking.JobContext) -> float:
    """One job of a sweep: whatever fails is recorded as a FAILED child run, and the sweep
    goes on (NaN is its result) unless ``sweep.fail_fast``. The store and the experiment
    exist already (the sweep callback made them)."""
    client = tracking.connect(cfg.logger.tracking_uri)
    fail_fast = bool(OmegaConf.select(cfg, "sweep.fail_fast", default=False))
    with placement(cfg) as devices:
        try:
            job = prepare(cfg, devices)
            if job.settings.resume:
                raise config.ConfigError(
                    f"resume={job.settings.resume} continues one run; not part of a sweep (-m)"
                )
        except USER_ERRORS as error:
            print(f"cnnlab: error: {one_line(error)}", file=sys.stderr)
            record_failure(client, sweep, error)
            if fail_fast:
                raise
            return math.nan
        try:
            best_val = fit_or_delegate(job, client, sweep)
        except NonFiniteLossError as error:
            if fail_fast:
                raise
            print(f"cnnlab: error: {sweep.run_name}: {error} (recorded FAILED)", file=sys.stderr)
            return math.nan
        except Exception:
            if fail_fast:
                raise
            log.exception("sweep job %s failed (recorded FAILED); sweep goes on", sweep.run_name)
            return math.nan
    if job.trainer.global_rank == 0:
        launch.write_result(best_val)
    return best_val


@contextlib.contextmanager
def placement(cfg: DictConfig) -> Iterator[list[int] | None]:
    """The GPU of a parallel local job (one job per GPU), or None: the config decides."""
    hydra_cfg = HydraConfig.get()
    if launch.parallel_jobs() > 1 and launch.wants_one_gpu(dict(cfg.trainer)):
        lock_dir = Path(hydra_cfg.sweep.dir)
        with launch.gpu_slot(lock_dir, torch.cuda.device_count(), hydra_cfg.job.num) as gpu:
            yield [gpu]
    else:
        yield None


def fit_or_delegate(job: Job, client: MlflowClient, sweep: tracking.JobContext) -> float:
    """Train a sweep job here, or in its own process where Lightning would start the DDP
    workers by re-running the command line (the whole sweep, under ``-m``)."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN and launch.needs_own_process(job.trainer):
        return launch.run_in_own_process(
            hydra_cfg.sweep.dir, hydra_cfg.runtime.output_dir, list(hydra_cfg.overrides.task)
        )
    return fit_and_record(job, client, sweep.experiment_id, sweep)


def record_failure(client: MlflowClient, sweep: tracking.JobContext, error: Exception) -> None:
    """A FAILED child run for a job stopped before training: the sweep's table shows it."""
    tags = sweep.tags() | {
        "overrides": tracking.redact_uri(" ".join(HydraConfig.get().overrides.task))
    }
    name = tracking.unique_run_name(client, sweep.experiment_id, sweep.run_name)
    try:
        with tracking.TrackedRun(client, sweep.experiment_id, name, tags):
            raise error
    except type(error):
        pass


@hydra.main(version_base="1.3", config_path=str(config.CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float:
    return run(cfg)


if __name__ == "__main__":
    main()
