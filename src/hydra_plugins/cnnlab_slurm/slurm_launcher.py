"""``hydra/launcher=slurm``: one Slurm job per sweep job, with that job's own DDP shape.

hydra-submitit-launcher submits a whole sweep with one set of resources; an ablation over
``trainer.devices`` needs each job's own: ``tasks_per_node = trainer.devices`` and
``nodes = trainer.num_nodes`` (and as many GPUs per node, on GPUs). Slurm's ``srun`` starts
the tasks and Lightning's SLURMEnvironment makes them one DDP job; cnnlab starts none.
(Hydra takes launchers only from the ``hydra_plugins`` package, hence this module's home.)
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

EXECUTOR_INIT = {"submitit_folder", "max_num_timeout"}  # given to the executor, not sbatch
RESULT_GRACE_S = 60.0  # a job gone from the queue this long without a result has none
POLL_S = 2.0


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    def launch(self, job_overrides: list[list[str]], initial_job_idx: int) -> list[JobReturn]:
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        jobs = []
        for num, overrides in enumerate(job_overrides, initial_job_idx):
            job_cfg = self.hydra_context.config_loader.load_sweep_config(
                self.config, list(overrides)
            )
            resources = job_resources(job_cfg.trainer, self.params)
            log.info("\t#%d : %s (%s)", num, " ".join(filter_overrides(overrides)), resources)
            executor = self._executor(resources)
            arguments = (list(overrides), "hydra.sweep.dir", num, f"job{num}")
            jobs.append((overrides, executor.submit(self, *arguments, Singleton.get_state())))
        return [job_return(job, list(overrides)) for overrides, job in jobs]

    def _executor(self, resources: dict[str, Any]) -> Any:
        import submitit  # imported when used: Hydra imports every plugin module at start-up

        params = self.params | resources
        executor = submitit.AutoExecutor(
            cluster="slurm",
            folder=params["submitit_folder"],
            slurm_max_num_timeout=params["max_num_timeout"],
        )
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{
                key if key in shared else f"slurm_{key}": value
                for key, value in params.items()
                if key not in EXECUTOR_INIT
            }
        )
        return executor


def job_return(job: Any, overrides: list[str]) -> JobReturn:
    """The result of rank 0 of a Slurm job, once it is done. A job that ended without one
    (scancelled, killed on its node, past its time) is one line and no result, as a failed
    job of the other launchers: the sweep goes on, and its summary counts the job's run.
    Without Slurm accounting (no sacct) submitit never learns that such a job ended and
    would wait for ever; it is taken for ended once squeue has not shown it for
    ``RESULT_GRACE_S`` (its result file, written as it ends, would be there by then)."""
    from submitit.core.utils import UncompletedJobError

    from cnnlab.tracking.liveness import slurm_job_ended

    gone_since = None
    while not job.done():
        if not slurm_job_ended(job.job_id):
            gone_since = None
        elif gone_since is None:
            gone_since = time.monotonic()
        elif time.monotonic() - gone_since > RESULT_GRACE_S:
            return _no_result(job, overrides, "it is no longer in the queue")
        time.sleep(POLL_S)
    try:
        return job.results()[0]
    except UncompletedJobError as error:
        return _no_result(job, overrides, str(error).splitlines()[0][:300])


def _no_result(job: Any, overrides: list[str], why: str) -> JobReturn:
    print(f"cnnlab: error: Slurm job {job.job_id} ({' '.join(overrides)}) ended without a "
          f"result: {why}; see {job.paths.stderr}", file=sys.stderr, flush=True)  # fmt: skip
    return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=None)


def job_resources(trainer: DictConfig, defaults: dict[str, Any]) -> dict[str, Any]:
    """Slurm tasks (one per DDP process) and nodes for a job's Trainer settings."""
    devices = trainer.get("devices", "auto")
    if isinstance(devices, str) and devices.strip().isdigit():  # "2" from the command line
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        tasks = devices
    elif OmegaConf.is_list(devices) or isinstance(devices, list):
        tasks = len(devices)
    elif isinstance(devices, str) and "," in devices:  # "0,1": device ids
        tasks = len([part for part in devices.split(",") if part.strip()])
    else:  # "auto" or -1: as many as the launcher's settings say
        tasks = defaults["tasks_per_node"]
    resources = {"tasks_per_node": tasks, "nodes": int(trainer.get("num_nodes", 1))}
    if str(trainer.get("accelerator")) in ("gpu", "cuda"):
        resources["gpus_per_node"] = tasks
    return resources
