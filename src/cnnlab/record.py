"""One job recorded as one MLflow run: its name, tags, params, config, the metrics Lightning
logs, the best checkpoint, pictures, and the result printed for the user."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from mlflow import MlflowClient
from omegaconf import OmegaConf

from cnnlab import config, pictures, tracking
from cnnlab.callbacks import InterruptCheckpoint, ResumeState
from cnnlab.job import Job, fit_and_test
from cnnlab.models.summary import ModelReport, describe
from cnnlab.resume import CHECKPOINT_TAG, process_tags

log = logging.getLogger("cnnlab")


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


def record(
    job: Job, client: MlflowClient, experiment_id: str, sweep: tracking.JobContext | None = None
) -> float:
    """Fit, test and record ``job`` in a new run (a child of ``sweep``'s parent run when it
    is a sweep job), or in the run it resumes; returns the best validation accuracy."""
    settings = job.settings
    logged: dict[str, int] = {}
    if job.resume:  # the same run again, its params and artifacts as they are
        tags = {"cnnlab.resumed_from": str(job.resume.checkpoint), **process_tags()}
        logged = tracking.logged_steps(client, job.resume.run_id)
        tracked = tracking.TrackedRun.reopen(client, job.resume.run_id, tags)
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
        try:
            best_val = fit_and_test(job)
        except BaseException:
            record_interruption(job, run)
            raise
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


def record_interruption(job: Job, run: tracking.TrackedRun) -> None:
    """Point ``resume=`` at the state saved when training was interrupted, if it was."""
    for callback in job.trainer.callbacks:
        if isinstance(callback, InterruptCheckpoint) and callback.saved:
            run.client.set_tag(run.run_id, CHECKPOINT_TAG, str(Path(callback.ckpt_path).resolve()))


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
    uri = run.client.tracking_uri
    server = uri.rstrip("/") if uri.startswith(("http://", "https://")) else ""
    where = f"{tracking.redact_uri(server)}" if server else "make ui, then http://127.0.0.1:5000"
    lines += [
        f"MLflow run: {run.run_id} ({run.run.info.run_name})",
        f"open it: {where}/#/experiments/{experiment_id}/runs/{run.run_id}",
    ]
    print("\n".join(lines), flush=True)
