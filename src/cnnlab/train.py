"""Train one configuration and record it in MLflow: ``python -m cnnlab.train [overrides]``.

Everything that can be wrong with the input (config, data files, shapes, Trainer and
optimizer arguments, tracking URI) is found before the MLflow run is created; a user error
prints one line and exits with 2. Under DDP only global rank 0 talks to MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

from cnnlab import config, launch, resume, tracking
from cnnlab.callbacks import InterruptCheckpoint
from cnnlab.classifier import NonFiniteLossError
from cnnlab.cli import USER_ERRORS, fail, one_line, user_errors
from cnnlab.job import Job, fit_and_test, prepare
from cnnlab.record import record
from cnnlab.resume import Target, config_differences, find_target

log = logging.getLogger("cnnlab")

# A progress bar per artifact download (config.yaml on resume) is noise in a training log.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Batches come from tensors in memory; worker processes would only add copies.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# A run resumed mid-epoch goes on with the next batch: cnnlab's sampler takes the resume
# point (callbacks.ResumeState), though Lightning cannot see that it does.
warnings.filterwarnings("ignore", ".*resuming from a checkpoint that ended before the epoch.*")
# EpochSpeed logs rank 0's clock on purpose: a sum or mean over ranks would not be a time.
warnings.filterwarnings("ignore", ".*log\\('time/.*sync_dist=True.*")

config.register_configs()


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
            continue_from(job, plan_resume(job, client))
        else:
            continue_from(job, requeued_target(job, client, experiment_id))
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


def requeued_target(job: Job, client: MlflowClient | None, experiment_id: str) -> Target | None:
    """In a Slurm job that Slurm has requeued: the run and checkpoint its earlier start
    left, to continue (resume.requeued); None on a first start, outside Slurm, or when that
    start left nothing to continue. DDP ranks other than 0 only read the store."""
    if not resume.slurm_restarted():
        return None
    logger = job.settings.logger
    client = client or tracking.connect(logger.tracking_uri)
    if not experiment_id:
        experiment = client.get_experiment_by_name(logger.experiment_name)
        experiment_id = experiment.experiment_id if experiment else ""
    target = resume.requeued(client, experiment_id, [str(job.trainer.default_root_dir)])
    if target is not None and job.trainer.global_rank == 0:
        log.info(
            "Slurm job %s started again (restart %s): run %s continues from %s",
            os.environ["SLURM_JOB_ID"], os.environ["SLURM_RESTART_COUNT"],
            target.run_id, target.checkpoint,
        )  # fmt: skip
    return target


def continue_from(job: Job, target: Target | None) -> None:
    """Train ``job`` on from ``target``'s checkpoint, saving where the run left off."""
    job.resume = target
    if target is None:
        return
    for callback in job.trainer.callbacks:
        if isinstance(callback, ModelCheckpoint | InterruptCheckpoint):
            callback.dirpath = str(target.checkpoint.parent)


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
        return record(job, client, experiment_id, sweep)
    except SIGTERMException as error:  # the run is KILLED; exit as a terminated process does
        stopper = [c for c in job.trainer.callbacks if isinstance(c, InterruptCheckpoint)]
        raise SystemExit(128 + ((stopper and stopper[0].received) or signal.SIGTERM)) from error


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
    # Under Slurm every task of a job runs this; only the first talks to MLflow.
    first_rank = rank_zero_only.rank == 0
    client = tracking.connect(cfg.logger.tracking_uri) if first_rank else None
    fail_fast = bool(OmegaConf.select(cfg, "sweep.fail_fast", default=False))
    with placement(cfg) as devices:
        try:
            job = prepare(cfg, devices)
            if job.settings.resume:
                raise config.ConfigError(
                    f"resume={job.settings.resume} continues one run; not part of a sweep (-m)"
                )
            continue_from(job, requeued_target(job, client, sweep.experiment_id))
        except USER_ERRORS as error:
            print(f"cnnlab: error: {one_line(error)}", file=sys.stderr)
            if client is not None:
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
