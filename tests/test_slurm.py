"""Sweeps through Slurm (hydra/launcher=slurm) on a real single-node cluster, and through
submitit's local executor (hydra/launcher=submitit_local), the same path without one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_sweep
from tests.slurm_cluster import SlurmCluster, Unavailable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Unavailable as why:
        cluster.stop()
        pytest.skip(f"no Slurm cluster here: {why}")
    yield {"SLURM_CONF": str(cluster.conf)}
    cluster.stop()


def test_a_slurm_sweep_runs_each_job_with_its_own_ddp_tasks(slurm, tmp_path: Path) -> None:
    result, _, parent, children = run_sweep(
        tmp_path,
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2,1",
        env=slurm,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert {r.info.status for r in children} == {"FINISHED"}
    by_devices = {r.data.tags["factor.trainer.devices"]: r for r in children}
    assert sorted(by_devices) == ["1", "2"]  # one run per job, none from a second task
    for devices, run in by_devices.items():
        assert run.data.params["trainer/world_size"] == devices
        assert run.data.params["trainer/processes_from"] == "SLURMEnvironment (external)"
    # One Slurm job per sweep job, with one task per DDP process (submitit logs each task).
    submitit = next((tmp_path / "logs/train/multiruns").iterdir()) / ".submitit"
    for devices, run in by_devices.items():
        job_id = run.data.tags["slurm.job_id"]
        tasks = sorted(p.name for p in (submitit / job_id).glob(f"{job_id}_*_log.out"))
        assert tasks == [f"{job_id}_{task}_log.out" for task in range(int(devices))]
    assert "SlurmLauncher" in parent.data.tags["cnnlab.launcher"]
    assert parent.data.tags["jobs.finished"] == "2"


def test_submitit_local_runs_the_jobs_as_children_of_one_parent(tmp_path: Path) -> None:
    result, _, parent, children = run_sweep(tmp_path, "hydra/launcher=submitit_local", "seed=0,1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(r.info.run_name for r in children) == ["s0", "s1"]
    assert {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert "LocalLauncher" in parent.data.tags["cnnlab.launcher"]
