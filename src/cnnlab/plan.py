"""A job's plan, decided before anything is built or recorded (``docs/ARCHITECTURE.md``,
"Decided up front"): its settings checked, the store, and for a resume or a Slurm restart
the run it continues, from which whole checkpoint, with which steps already logged. Only
reads the store: what a resume records is written once the run reopens
(:func:`cnnlab.tracking.record.reopened_run`)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

from cnnlab import compose, config, tracking
from cnnlab.launch.runtime import Runtime
from cnnlab.tracking import identity, resume
from cnnlab.tracking.continuation import Action, Continuation, Decision, decide
from cnnlab.training.job import Start, start_from

log = logging.getLogger("cnnlab")


@dataclass(frozen=True)
class Plan:
    """What a job is, decided before anything is built: its config (for a resume, the run's
    own settings under this command line's), the store, and where training starts."""

    cfg: DictConfig
    settings: config.TrainConfig
    client: MlflowClient | None  # None on DDP ranks that need not read the store
    experiment_id: str = ""
    target: resume.Target | None = None  # the run a resume or a Slurm restart continues
    start: Start = field(default_factory=Start)
    logged: dict[str, int] = field(default_factory=dict)  # last step of each metric it has
    logger: Logger = field(default_factory=DummyLogger)
    identity: identity.Identity | None = None  # what decides its result (tag config_hash)
    # A sweep job: what it does with its identity's runs (train, keep, resume, retry, reuse).
    decision: Decision = field(default_factory=lambda: Decision(Action.train))


def store(cfg: DictConfig, *, in_sweep: bool = False) -> MlflowClient | None:
    """The tracking store, ready, on the process that writes to it (global rank 0) and on
    any that must read what a resume continues; None on the other DDP ranks. A sweep job's
    store answered the sweep: one that does not answer now is waited for (a restart)."""
    first_rank = rank_zero_only.rank == 0
    continues = cfg.resume or OmegaConf.select(cfg, "sweep.resume")
    if not (first_rank or continues or tracking.slurm_restarted()):
        return None
    return tracking.connect(cfg.logger.tracking_uri, cfg.logger.retry_s, answered=in_sweep)


def plan_job(
    cfg: DictConfig,
    runtime: Runtime,
    sweep: tracking.JobContext | None = None,
    client: MlflowClient | None = None,
) -> Plan:
    """The job's config, store and start, checked; only reads the store. DDP ranks but the
    first read only what they need to start (the checkpoint), and write nothing."""
    if cfg.resume and sweep is not None:
        raise config.ConfigError(f"resume={cfg.resume} continues one run; not part of a sweep (-m)")
    if cfg.resume:
        client = client or store(cfg)
        cfg = with_recorded_settings(cfg, runtime, client)
    settings = config.to_settings(cfg)
    client = client or store(cfg)
    first_rank = rank_zero_only.rank == 0
    experiment_id = sweep.experiment_id if sweep else ""
    if settings.resume and first_rank:
        target = resume.decide(client, settings.resume, cfg)
    elif settings.resume:  # rank 0 has decided, and reopened the run
        target = resume.find_target(client, settings.resume, check_status=False)
    else:
        experiment_id = experiment_id or existing_experiment(client, settings.logger)
        target = requeued_target(client, experiment_id, settings)
    job_identity = identity.of_job(cfg)
    decision = Decision(Action.train)
    if sweep is not None and target is None and client is not None:
        decision = decide_in_sweep(client, sweep, job_identity, cfg)
        target = decision.target
    logged = steps_logged(client, target) if target and first_rank else {}
    logger = run_logger(settings, logged) if first_rank else DummyLogger()
    start = start_from(target.checkpoint) if target else Start()
    return Plan(
        cfg, settings, client, experiment_id, target, start, logged, logger, job_identity, decision
    )


def decide_in_sweep(
    client: MlflowClient, sweep: tracking.JobContext, job: identity.Identity, cfg: DictConfig
) -> Decision:
    """What a sweep job does with the runs of its identity (tracking.continuation)."""
    how = Continuation.of(sweep.parent_run_id, cfg.sweep, cfg.trainer)
    return decide(client, sweep.experiment_id, job.config_hash, how)


def existing_experiment(client: MlflowClient | None, logger: config.LoggerConfig) -> str:
    experiment = client.get_experiment_by_name(logger.experiment_name) if client else None
    return experiment.experiment_id if experiment else ""


def with_recorded_settings(cfg: DictConfig, runtime: Runtime, client: MlflowClient) -> DictConfig:
    """``resume=<run>``: the config of that run's own command line (tag cnnlab.overrides)
    with this command line's overrides on top, so the user need not retype its settings;
    ``cfg`` itself for a run that recorded none."""
    recorded = resume.recorded_overrides(client, str(cfg.resume))
    if not recorded:
        return cfg
    parser = OverridesParser.create()
    named = {override.key_or_group for override in parser.parse_overrides(runtime.overrides)}
    kept = [o for o in recorded if parser.parse_override(o).key_or_group not in named]
    recomposed = compose.recompose(runtime.config_name, [*kept, *runtime.overrides])
    recomposed.paths.output_dir = cfg.paths.output_dir  # this start's folder, resolved
    return recomposed


def requeued_target(
    client: MlflowClient | None, experiment_id: str, settings: config.TrainConfig
) -> resume.Target | None:
    """In a Slurm job that Slurm has requeued: the run and checkpoint its earlier start
    left, to continue (resume.requeued); None on a first start, outside Slurm, or when that
    start left nothing to continue."""
    if client is None or not experiment_id or not tracking.slurm_restarted():
        return None
    target = resume.requeued(client, experiment_id, [settings.paths.output_dir])
    if target is not None and rank_zero_only.rank == 0:
        log.info(
            "Slurm job %s started again (restart %s): run %s continues from %s",
            os.environ["SLURM_JOB_ID"], os.environ["SLURM_RESTART_COUNT"],
            target.run_id, target.checkpoint,
        )  # fmt: skip
    return target


def steps_logged(client: MlflowClient, target: resume.Target) -> dict[str, int]:
    """The last step of each metric the continued run has, counting those its earlier
    process kept on disk for a store that was down (sent when the run reopens)."""
    logged = tracking.logged_steps(client, target.run_id)
    folder = target.run.data.tags.get("hydra.output_dir")
    if folder:
        for key, step in tracking.unsent_steps(Path(folder) / tracking.UNSENT_FILE).items():
            logged[key] = max(step, logged.get(key, -1))
    return logged


def run_logger(settings: config.TrainConfig, logged: dict[str, int]) -> Logger:
    logger = settings.logger
    return tracking.BatchedMLFlowLogger(
        logger.tracking_uri,
        logger.flush_every_s,
        logged,
        retry_s=logger.retry_s,
        unsent=Path(settings.paths.output_dir) / tracking.UNSENT_FILE,
    )
