"""What Hydra's runtime says about this start, read once by the entry point
(:meth:`Runtime.from_hydra`) and handed on as plain values: nothing below the entry points
reads Hydra's global state, so a job can be built from a notebook."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from cnnlab.launch import local
from cnnlab.launch.processes import SWEEP_DIR_ENV


@dataclass(frozen=True)
class Runtime:
    output_dir: str
    overrides: list[str] = field(default_factory=list)  # the command line's, as typed
    config_name: str = "train"
    # Hydra runs this start as one job of a multirun (-m) in this process.
    multirun: bool = False
    # The sweep this job belongs to: its folder under -m, or the folder handed to a sweep
    # job started in a process of its own (launch.processes); None for a single run.
    sweep_dir: str | None = None
    job_num: int = 0
    parallel_jobs: int = 1  # jobs of the sweep running at once on this machine

    @classmethod
    def from_hydra(cls) -> Runtime:
        hydra_cfg = HydraConfig.get()
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        sweep_dir = hydra_cfg.sweep.dir if multirun else os.environ.get(SWEEP_DIR_ENV)
        return cls(
            output_dir=hydra_cfg.runtime.output_dir,
            overrides=list(hydra_cfg.overrides.task),
            config_name=hydra_cfg.job.config_name or "train",
            multirun=multirun,
            sweep_dir=sweep_dir,
            job_num=hydra_cfg.job.get("num") or 0,
            parallel_jobs=local.parallel_jobs(hydra_cfg.launcher.get("n_jobs")) if multirun else 1,
        )
