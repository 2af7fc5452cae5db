"""Where a sweep job runs: its share of the CPU cores, its GPU, and its own processes.

Hydra's launchers decide which jobs run at once; this module makes each job fit beside the
others. Parallel local jobs (``hydra/launcher=joblib``) split the CPU cores and take one GPU
each. A job with several DDP processes started by Lightning runs as a fresh single-run
process of its own, because Lightning's ``ddp`` launcher starts its workers by re-running
the command line: under ``-m`` every worker would re-run the whole sweep, and the
``LOCAL_RANK``/``WORLD_SIZE`` it sets would mislead the next job of the sweep.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

# A sweep job running in its own process finds its sweep and returns its result through these.
SWEEP_DIR_ENV = "CNNLAB_SWEEP_DIR"
RESULT_ENV = "CNNLAB_JOB_RESULT"
# Set by Lightning's launchers and torch.distributed for one job; never inherited by the next.
DISTRIBUTED_ENV = (
    "LOCAL_RANK",
    "NODE_RANK",
    "GLOBAL_RANK",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "PL_GLOBAL_SEED",
    "PL_SEED_WORKERS",
)


def parallel_jobs() -> int:
    """How many jobs of this multirun run at once on this machine (1 outside joblib)."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return 1
    n_jobs = hydra_cfg.launcher.get("n_jobs")
    if not n_jobs:
        return 1
    cores = usable_cores()
    return max(1, cores + 1 + n_jobs) if n_jobs < 0 else min(n_jobs, cores)  # joblib's -1, -2...


def share_cores(parallel: int) -> None:
    """Split the cores between parallel jobs: oversubscribed, two 2-thread jobs on 2 cores
    ran ~20x slower than one job alone on this project's CPU."""
    if parallel > 1:
        torch.set_num_threads(max(1, usable_cores() // parallel))


def usable_cores() -> int:
    """The cores this process may run on (a Slurm allocation or a container limits them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def wants_one_gpu(trainer_args: dict) -> bool:
    """A job on one GPU device that the launcher may place (not pinned to given ids)."""
    accelerator = str(trainer_args.get("accelerator", "auto"))
    devices = trainer_args.get("devices", "auto")
    return (
        accelerator in ("auto", "gpu", "cuda")
        and str(devices) in ("1", "auto")
        and torch.cuda.device_count() > 1
    )


@contextlib.contextmanager
def gpu_slot(lock_dir: Path, count: int, fallback: int = 0) -> Iterator[int]:
    """Hold one of ``count`` GPUs for a job: the first free one, else wait for ``fallback``.

    An exclusive ``flock`` per GPU in the sweep folder, so that jobs in any process on this
    machine (joblib's workers) take one GPU each; a lock goes with its process if it dies.
    """
    lock_dir.mkdir(parents=True, exist_ok=True)
    handle, index = None, fallback % count
    for candidate in range(count):
        handle = open(lock_dir / f".gpu{candidate}.lock", "w")  # noqa: SIM115 - held below
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            handle = None
            continue
        index = candidate
        break
    if handle is None:  # every GPU busy: queue for one
        handle = open(lock_dir / f".gpu{index}.lock", "w")  # noqa: SIM115 - held below
        fcntl.flock(handle, fcntl.LOCK_EX)
    try:
        yield index
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def needs_own_process(trainer: L.Trainer) -> bool:
    """Lightning would start this job's DDP workers by re-running the command line."""
    strategy = trainer.strategy
    return (
        isinstance(getattr(strategy, "launcher", None), _SubprocessScriptLauncher)
        and not strategy.cluster_environment.creates_processes_externally
    )


def run_in_own_process(sweep_dir: str, output_dir: str, overrides: list[str]) -> float:
    """Run one sweep job as ``python -m cnnlab.train <its overrides>`` with a clean
    environment; it records itself as a child of the sweep and returns its best validation
    accuracy (NaN: it failed and recorded so, or died without a result)."""
    result = Path(output_dir) / "cnnlab_result.json"
    result.unlink(missing_ok=True)
    env = {key: value for key, value in os.environ.items() if key not in DISTRIBUTED_ENV}
    env |= {SWEEP_DIR_ENV: sweep_dir, RESULT_ENV: str(result)}
    command = [
        sys.executable,
        "-m",
        "cnnlab.train",
        f"--config-name={HydraConfig.get().job.config_name}",
        *overrides,
        f'hydra.run.dir="{output_dir}"',  # quoted: job folders may hold '=' and ','
    ]
    # Its own session: a Ctrl-C meant for the sweep reaches the job as a SIGTERM from here,
    # which it answers by checkpointing and closing its run (KILLED), not by dying mid-step.
    job = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        returncode = job.wait()
    except BaseException:
        stop(job)
        raise
    if returncode != 0:
        raise RuntimeError(f"the job's own process exited with status {returncode}")
    return json.loads(result.read_text())["best_val"] if result.exists() else math.nan


def stop(job: subprocess.Popen, grace_s: float = 60) -> None:
    """SIGTERM to the job's process group, then SIGKILL if it is still there after grace_s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(job.pid, signal.SIGTERM)
        try:
            job.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)


def write_result(best_val: float) -> None:
    """Hand this job's result to the sweep process that started it (see run_in_own_process)."""
    path = os.environ.get(RESULT_ENV)
    if path:
        Path(path).write_text(json.dumps({"best_val": best_val}))
