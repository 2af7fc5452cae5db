"""Train one configuration and record it in MLflow: ``python -m cnnlab.train [overrides]``.

One flow for a single run and for a sweep job (:func:`run_job`): read Hydra's runtime once,
plan (check the settings, connect the store, decide what a resume continues from: all
before anything is built or recorded), prepare (build data, model, Trainer), open or reopen
the run, fit, record. What differs between a single run and a sweep job is data
(:class:`Policy`): how a refused or failed job ends. Everything that can be wrong with the
input is found before the MLflow run is created; a user error prints one line and exits
with 2. Under DDP only global rank 0 writes to MLflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

from cnnlab import cli, compose, config, pictures, tracking
from cnnlab.checks import fail, one_line
from cnnlab.cli import USER_ERRORS
from cnnlab.data.inputs import dataset_inputs
from cnnlab.launch import local, processes
from cnnlab.launch.runtime import Runtime
from cnnlab.models.summary import describe
from cnnlab.plan import Plan, plan_job, store
from cnnlab.tracking import record
from cnnlab.tracking.continuation import Action
from cnnlab.training.classifier import NonFiniteLossError
from cnnlab.training.export import servable
from cnnlab.training.job import FitResult, Job, facts, fit_and_test, prepare

log = logging.getLogger("cnnlab")

# A progress bar per artifact download (config.yaml on resume) is noise in a training log.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Batches come from tensors in memory; worker processes would only add copies.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# A run resumed mid-epoch goes on with the next batch: cnnlab's sampler takes the resume
# point (training.job.Start), though Lightning cannot see that it does.
warnings.filterwarnings("ignore", ".*resuming from a checkpoint that ended before the epoch.*")
# EpochSpeed logs rank 0's clock on purpose: a sum or mean over ranks would not be a time.
warnings.filterwarnings("ignore", ".*log\\('time/.*sync_dist=True.*")

compose.register_configs()

# Failures of a job that has started training, each ending in one line: a loss gone
# non-finite (a setting to change: exit 2), a store that stayed down (exit 1).
JOB_FAILURES = (NonFiniteLossError, tracking.StoreUnavailable)
PICTURE_IMAGES = 512  # test images the pictures are drawn from (misclassified, feature maps)
CURVES = ("train/loss", "train/acc", "val/loss", "val/acc")


@dataclass(frozen=True)
class Policy:
    """How a job ends when it is refused or fails: a single run exits with one line; a sweep
    job is recorded FAILED and the sweep goes on (None: no result), unless ``fail_fast``."""

    sweep: tracking.JobContext | None = None
    fail_fast: bool = False

    def refused(self, error: Exception, client: MlflowClient | None, overrides: list[str]) -> None:
        if self.sweep is None:
            fail(error)
        print(f"cnnlab: error: {self.sweep.run_name}: {one_line(error)}", file=sys.stderr)
        if client is not None:  # the sweep's table shows the job that never trained
            tags = self.sweep.tags() | {"overrides": tracking.redact_uri(" ".join(overrides))}
            record.record_refused(
                client, self.sweep.experiment_id, self.sweep.run_name, tags, one_line(error)
            )
        if self.fail_fast:
            raise error

    def failed(self, error: Exception) -> None:
        if self.sweep is None:
            if isinstance(error, JOB_FAILURES):  # recorded FAILED; the user gets one line
                fail(error, status=1 if isinstance(error, tracking.StoreUnavailable) else 2)
            raise error
        if self.fail_fast:
            raise error
        if isinstance(error, JOB_FAILURES):
            print(f"cnnlab: error: {self.sweep.run_name}: {one_line(error)}", file=sys.stderr)
        else:
            log.exception(
                "sweep job %s failed (recorded FAILED); sweep goes on", self.sweep.run_name
            )


def run(cfg: DictConfig) -> float | None:
    """Check ``cfg``, then train and record it; a user error exits before any run exists.
    Returns the best validation accuracy (None: a sweep job without a result, which an
    optimizing sweeper such as Optuna records as a failed trial and goes on)."""
    runtime = Runtime.from_hydra()
    sweep = sweep_of(runtime, cfg.seed)
    policy = Policy(sweep, bool(OmegaConf.select(cfg, "sweep.fail_fast", default=False)))
    with placement(runtime, cfg) as devices:
        return run_job(cfg, runtime, policy, devices)


def run_job(
    cfg: DictConfig, runtime: Runtime, policy: Policy, devices: list[int] | None = None
) -> float | None:
    """plan → prepare → open or reopen the run → fit → record, for any job."""
    # A sweep job's store exists (the sweep callback made it): a refused job is recorded there.
    try:
        client = store(cfg, in_sweep=True) if policy.sweep is not None else None
    except tracking.StoreUnavailable as error:  # gone since the sweep began: nothing records it
        return policy.failed(error)
    try:
        planned = plan_job(cfg, runtime, policy.sweep, client)
        if not planned.decision.trains:  # a sweep job its store already answers
            return settled(planned, policy.sweep, runtime)
        job, planned = built(planned, runtime, policy.sweep, devices)
    except USER_ERRORS as error:
        return policy.refused(error, client, runtime.overrides)
    try:
        best_val = fit_or_delegate(job, planned, runtime, policy.sweep)
    except Exception as error:
        return policy.failed(error)
    if policy.sweep is not None and job.trainer.global_rank == 0:
        processes.write_result(best_val)
        tracking.write_outcome(runtime.output_dir, planned.decision.action.value)
    return None if policy.sweep is not None and math.isnan(best_val) else best_val


def settled(plan: Plan, sweep: tracking.JobContext, runtime: Runtime) -> float | None:
    """A sweep job not trained again: its FINISHED child kept, another study's run reused
    (recorded as a child naming it), or left as it is (FAILED, or running elsewhere); its
    recorded score goes to the sweeper."""
    decision = plan.decision
    if rank_zero_only.rank == 0:
        if decision.action is Action.reuse:
            overrides = tracking.redact_uri(" ".join(runtime.overrides))
            tags = sweep.tags() | plan.identity.tags() | {"overrides": overrides}
            record.record_reused(
                plan.client, sweep.experiment_id, sweep.run_name, tags, decision.run
            )
        tracking.write_outcome(runtime.output_dir, decision.action.value)
        log.info("%s: %s %s", sweep.run_name, decision.action.value, decision.why or
                 f"(run {decision.run.info.run_id})")  # fmt: skip
    score = decision.score if decision.action in (Action.kept, Action.reuse) else None
    processes.write_result(math.nan if score is None else score)
    return score


def prepared(
    cfg: DictConfig,
    runtime: Runtime,
    sweep: tracking.JobContext | None = None,
    devices: list[int] | None = None,
    client: MlflowClient | None = None,
) -> tuple[Job, Plan]:
    """The job planned and built, every check passed; for global rank 0 of a single run the
    experiment exists now. Raises the user's error (USER_ERRORS) before any run exists."""
    return built(plan_job(cfg, runtime, sweep, client), runtime, sweep, devices)


def built(
    planned: Plan,
    runtime: Runtime,
    sweep: tracking.JobContext | None = None,
    devices: list[int] | None = None,
) -> tuple[Job, Plan]:
    """``planned``'s job: data, model and Trainer built and checked."""
    threads = local.threads_per_job(runtime.parallel_jobs)
    job = prepare(
        planned.cfg, devices=devices, threads=threads, start=planned.start, logger=planned.logger
    )
    return job, with_experiment(planned, job, sweep)


def with_experiment(plan: Plan, job: Job, sweep: tracking.JobContext | None) -> Plan:
    """On global rank 0 of a single run, once every setting has passed its checks: the
    experiment the run goes in, created when missing."""
    if sweep is not None or plan.target is not None or job.trainer.global_rank != 0:
        return plan
    logger = plan.settings.logger
    experiment_id = tracking.open_experiment(
        plan.client, logger.experiment_name, logger.artifact_location
    )
    return dataclasses.replace(plan, experiment_id=experiment_id)


def sweep_of(runtime: Runtime, seed: int) -> tracking.JobContext | None:
    """The sweep this job is part of; None for a single run."""
    if runtime.sweep_dir is None:
        return None
    sweep = tracking.job_context(runtime.sweep_dir, runtime.overrides, seed)
    if sweep is None:  # Hydra reports a failing callback only as a warning
        fail(
            config.ConfigError(
                f"no {tracking.SWEEP_FILE} in {runtime.sweep_dir}: the MLflow sweep callback "
                "(hydra.callbacks.mlflow_sweep) did not set up this multirun; see its warning above"
            )
        )
    return sweep


@contextlib.contextmanager
def placement(runtime: Runtime, cfg: DictConfig) -> Iterator[list[int] | None]:
    """The GPU of a parallel local job (one job per GPU), or None: the config decides."""
    if runtime.parallel_jobs > 1 and local.wants_one_gpu(dict(cfg.trainer)):
        lock_dir = Path(runtime.sweep_dir or runtime.output_dir)
        with local.gpu_slot(lock_dir, torch.cuda.device_count(), runtime.job_num) as gpu:
            yield [gpu]
    else:
        yield None


def fit_or_delegate(
    job: Job, plan: Plan, runtime: Runtime, sweep: tracking.JobContext | None
) -> float:
    """Train the job here, or, for a sweep job whose DDP workers Lightning would start by
    re-running the command line (the whole sweep, under ``-m``), in its own process."""
    if sweep is not None and runtime.multirun and processes.needs_own_process(job.trainer):
        return processes.run_in_own_process(
            runtime.config_name, runtime.sweep_dir, runtime.output_dir, runtime.overrides
        )
    return fit_and_record(job, plan, runtime, sweep).best_val


def fit_and_record(
    job: Job, plan: Plan, runtime: Runtime, sweep: tracking.JobContext | None = None
) -> FitResult:
    """Train ``job``; only global rank 0 records it (a DDP worker has nothing to record)."""
    if job.trainer.global_rank != 0:
        return fit_and_test(job)
    try:
        return record_job(job, plan, runtime, sweep)
    except SIGTERMException as error:  # the run is KILLED; exit as a terminated process does
        received = job.interrupt.received if job.interrupt else None
        raise SystemExit(128 + (received or signal.SIGTERM)) from error


def record_job(
    job: Job, plan: Plan, runtime: Runtime, sweep: tracking.JobContext | None
) -> FitResult:
    """Fit and test ``job`` in its run: a new one (a child of the sweep's parent for a sweep
    job), or the one it continues; returns the best validation accuracy."""
    client, target = plan.client, plan.target
    experiment_id = target.run.info.experiment_id if target else plan.experiment_id
    tracked = (
        record.reopened_run(client, target, plan.identity.tags() if plan.identity else {})
        if target
        else new_run(job, plan, runtime, sweep)
    )
    with tracked as run:
        plan.logger.open(run.run_id, experiment_id)
        if job.settings.logger.system_metrics:
            run.monitor_system(job.settings.logger.system_metrics_every_s, resumed=bool(target))
        if target is None:
            report = describe(job.net, job.spec)
            resolved = OmegaConf.to_container(job.cfg, resolve=True, enum_to_str=True)
            params = tracking.flatten_params(resolved) | facts(job, report)
            config_yaml = OmegaConf.to_yaml(job.cfg, resolve=True)
            datasets = dataset_inputs(job.datamodule)
            record.record_setup(run, params, config_yaml, report.table, datasets)
        try:
            result = fit_and_test(job)
        except BaseException:
            if job.interrupt is not None and job.interrupt.saved:
                record.record_interruption(run, job.interrupt.ckpt_path, runtime.overrides)
            raise
        record_result(job, run, plan, result)
        record.report_result(run, experiment_id, result.best_val, result.test_acc)
    return result


def new_run(
    job: Job, plan: Plan, runtime: Runtime, sweep: tracking.JobContext | None
) -> tracking.TrackedRun:
    settings = job.settings
    base_name = sweep.run_name if sweep else settings.logger.run_name or record.run_name(settings)
    tags = record.run_tags(settings, runtime.overrides, runtime.output_dir)
    tags |= plan.identity.tags() if plan.identity else {}
    checkpoint = job.trainer.checkpoint_callback
    if checkpoint is not None:
        tags |= record.last_checkpoint_tag(
            checkpoint.dirpath, bool(checkpoint.save_last), checkpoint.CHECKPOINT_NAME_LAST
        )
    return record.new_run(
        plan.client, plan.experiment_id, base_name, tags | (sweep.tags() if sweep else {})
    )


def record_result(job: Job, run: tracking.TrackedRun, plan: Plan, result: FitResult) -> None:
    final = {"time/fit_s": result.fit_seconds}
    if not math.isnan(result.best_val):  # the checkpoint the test used: what a sweep compares
        final["val/acc_best"] = result.best_val
    record.record_result(
        run, final, result.step, plan.logged, result.best_checkpoint, result.best_val
    )
    logs_model = job.settings.logger.log_model or bool(job.settings.sweep.register_best)
    if not (logs_model or job.settings.logger.pictures):
        return
    weights = best_weights(job, result)
    if logs_model:  # MLflow's pytorch flavor, runs:/<id>/model
        tracking.log_model(run, *servable(job.net, job.datamodule))
    if job.settings.logger.pictures:
        log_pictures(job, run, weights)


def best_weights(job: Job, result: FitResult) -> str:
    """Put the best checkpoint's weights in ``job.net`` (the test has loaded them already),
    so that the logged model and the pictures show what was tested; returns which ones the
    net holds."""
    if not result.best_checkpoint:
        return "final weights"
    if not job.settings.test:
        state = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)
        job.module.load_state_dict(state["state_dict"])
    return "best checkpoint"


def log_pictures(job: Job, run: tracking.TrackedRun, weights: str) -> None:
    """Per-run pictures (cnnlab.pictures) of the net's ``weights``, under ``pictures/``."""
    start = time.perf_counter()
    job.trainer.logger.flush()  # every buffered metric in the store: the curves read it back
    test = job.datamodule.test_set
    images, labels = test.images[:PICTURE_IMAGES], test.labels[:PICTURE_IMAGES]
    figures = pictures.for_run(
        job.net.cpu(),
        images,
        job.datamodule.normalize(images),
        labels,
        job.datamodule.info.class_names,
        record.metric_history(run, CURVES),
        job.module.test_confusion_matrix,
        run_name=run.run.info.run_name,
        test_size=len(test.labels),
        weights=weights,
    )
    record.record_figures(run, figures)
    log.info("pictures drawn and logged in %.1f s", time.perf_counter() - start)


@hydra.main(version_base="1.3", config_path=str(config.CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


def console() -> None:
    """``cnnlab-train`` and ``python -m cnnlab.train``: the flags Hydra would refuse in a
    traceback are refused in one line first, then Hydra runs."""
    cli.check_flags(sys.argv[1:])
    main()


if __name__ == "__main__":
    console()
