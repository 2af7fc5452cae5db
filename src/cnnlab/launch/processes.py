"""A sweep job in processes of its own.

A job with several DDP processes started by Lightning runs as a fresh single-run process of
its own, because Lightning's ``ddp`` launcher starts its workers by re-running the command
line: under ``-m`` every worker would re-run the whole sweep, and the ``LOCAL_RANK``/
``WORLD_SIZE`` it sets would mislead the next job of the sweep. Strategies whose workers
Lightning starts with multiprocessing are refused (training.job.check_not_spawned).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L

from cnnlab.training import compat

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


def needs_own_process(trainer: L.Trainer) -> bool:
    """Lightning would start this job's DDP workers by re-running the command line."""
    strategy = trainer.strategy
    return (
        compat.starts_by_script(strategy)
        and not strategy.cluster_environment.creates_processes_externally
    )


def run_in_own_process(
    config_name: str, sweep_dir: str, output_dir: str, overrides: list[str]
) -> float:
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
        f"--config-name={config_name}",
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
