"""Where a job runs on this machine: its share of the CPU cores and its GPU.

Hydra's launchers decide which jobs run at once; this module makes each job fit beside the
others. Parallel local jobs (``hydra/launcher=joblib``) split the CPU cores and take one GPU
each.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import torch


def parallel_jobs(n_jobs: int | None) -> int:
    """How many jobs run at once on this machine when the launcher runs ``n_jobs`` at a
    time (joblib's setting: -1 all cores, -2 all but one...; None or 0: one at a time)."""
    if not n_jobs:
        return 1
    cores = usable_cores()
    return max(1, cores + 1 + n_jobs) if n_jobs < 0 else min(n_jobs, cores)  # joblib's -1, -2...


def threads_per_job(parallel: int) -> int | None:
    """Each job's share of the cores when ``parallel`` jobs run at once (None: one job, which
    keeps torch's own choice): oversubscribed, two 2-thread jobs on 2 cores ran ~20x slower
    than one job alone on this project's CPU."""
    return max(1, usable_cores() // parallel) if parallel > 1 else None


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
