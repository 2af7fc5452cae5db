"""Placing sweep jobs: one GPU each for parallel local jobs, own processes for DDP jobs."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import lightning as L
import pytest

from cnnlab.launch.local import gpu_slot
from cnnlab.launch.processes import needs_own_process


def test_parallel_jobs_take_different_gpus_and_give_them_back(tmp_path: Path) -> None:
    with gpu_slot(tmp_path, 2) as first, gpu_slot(tmp_path, 2) as second:
        assert {first, second} == {0, 1}
    with gpu_slot(tmp_path, 2) as again:
        assert again == 0


def _hold_gpu(lock_dir: Path, held: multiprocessing.Event, done: multiprocessing.Event) -> None:
    with gpu_slot(lock_dir, 2):
        held.set()
        done.wait(30)


def test_a_gpu_held_by_another_process_is_not_taken(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    held, done = context.Event(), context.Event()
    other = context.Process(target=_hold_gpu, args=(tmp_path, held, done))
    other.start()
    try:
        assert held.wait(30)
        with gpu_slot(tmp_path, 2) as mine:
            assert mine == 1
    finally:
        done.set()
        other.join(30)


def test_with_every_gpu_busy_a_job_waits_for_one(tmp_path: Path) -> None:
    taken: list[int] = []

    def second_job() -> None:
        with gpu_slot(tmp_path, 1) as gpu:
            taken.append(gpu)

    with gpu_slot(tmp_path, 1):
        waiting = threading.Thread(target=second_job)
        waiting.start()
        time.sleep(0.5)
        assert taken == []  # still queued while the first job holds the only GPU
    waiting.join(10)
    assert taken == [0]


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "own_process"),
    [
        ({"devices": 2, "strategy": "ddp"}, True),  # Lightning re-runs the command line
        ({"devices": 1}, False),
        ({"devices": 2, "strategy": "ddp_spawn"}, False),  # forks from within the job
    ],
)
def test_only_jobs_whose_workers_rerun_the_command_line_get_their_own_process(
    kwargs: dict, own_process: bool
) -> None:
    assert needs_own_process(_trainer(**kwargs)) is own_process


def test_under_slurm_the_ddp_workers_come_from_srun(monkeypatch: pytest.MonkeyPatch) -> None:
    slurm = {
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_JOB_NAME": "cnnlab",
        "SLURM_JOB_ID": "7",
        "SLURM_NODELIST": "localhost",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert not needs_own_process(_trainer(devices=2, strategy="ddp"))
