"""Whether the process that writes a run still lives: the tags that name it (host, pid,
Slurm job), and the runs left RUNNING by a process that died without a word (SIGKILL,
power loss), marked KILLED by whoever notices first on the same host."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Mapping

from mlflow import MlflowClient


def process_tags() -> dict[str, str]:
    """Who writes a run: host and pid, and the Slurm job, so that a run left RUNNING by a
    process that died without a word (SIGKILL, power loss) is told apart from a live one."""
    tags = {"cnnlab.host": socket.gethostname(), "cnnlab.pid": str(os.getpid())}
    if "SLURM_JOB_ID" in os.environ:
        tags["slurm.job_id"] = os.environ["SLURM_JOB_ID"]
        tags["slurm.restart_count"] = os.environ.get("SLURM_RESTART_COUNT", "0")
    return tags


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def slurm_restarted() -> bool:
    """True in a Slurm job that Slurm has requeued and started again."""
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    return "SLURM_JOB_ID" in os.environ and restarts.isdigit() and int(restarts) > 0


def slurm_job_ended(job_id: str) -> bool:
    """Whether Slurm says job ``job_id`` runs no more (False when it cannot say)."""
    try:
        squeue = subprocess.run(
            ["squeue", "--noheader", "--jobs", job_id, "--format", "%T"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return False
    if squeue.returncode != 0:  # gone from the controller's memory altogether
        return "Invalid job id" in squeue.stderr
    return squeue.stdout.strip() in ("", "PENDING", "COMPLETED", "CANCELLED", "FAILED")


def died_here(tags: Mapping[str, str]) -> bool:
    """A run's process was on this host and is gone (a reused pid reads as alive: safe)."""
    pid = tags.get("cnnlab.pid", "")
    return (
        tags.get("cnnlab.host") == socket.gethostname()
        and pid.isdigit()
        and not process_alive(int(pid))
    )


def end_dead_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED (tag ``cnnlab.died``) each RUNNING run of the experiment whose process on
    this host is gone; returns their ids. Runs of other hosts are left to their hosts."""
    dead = [
        run
        for run in client.search_runs(
            [experiment_id], "attributes.status = 'RUNNING'", max_results=5000
        )
        if died_here(run.data.tags)
    ]
    for run in dead:
        client.set_tag(run.info.run_id, "cnnlab.died", "process gone while RUNNING")
        client.set_terminated(run.info.run_id, "KILLED")
    return [run.info.run_id for run in dead]
