"""Sweeps through Slurm (hydra/launcher=slurm) on a real single-node cluster, and through
submitit's local executor (hydra/launcher=submitit_local), the same path without one."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

from cnnlab import train
from cnnlab.checks import ConfigError
from cnnlab.tracking.resume import find_target, mark_died
from tests.conftest import REPO, only_run, run_sweep
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


def test_a_requeued_slurm_job_continues_its_run(slurm, tmp_path: Path) -> None:
    """Lightning's auto-requeue as a cluster drives it: the requeue signal (USR1, what
    ``--signal=USR1@90`` sends before a time limit) saves an HPC checkpoint and runs
    ``scontrol requeue``; Slurm then stops the job (SIGTERM) and starts it again, and the
    new start continues the same MLflow run from the newest checkpoint."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, **slurm, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "sweep"}
    command = [sys.executable, "-m", "cnnlab.train", "-m", "hydra/launcher=slurm",
               *REQUEUE_ARGS, f"paths.log_dir={tmp_path}/logs"]  # fmt: skip
    sweep = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    client = MlflowClient(uri)
    run = _wait_for_step(client, sweep, 50)  # the second epoch is under way
    job_id = run.data.tags["slurm.job_id"]
    subprocess.run(["scancel", "--signal=USR1", job_id], env=env, check=True, timeout=30)
    _start_when_requeued(job_id, env)
    output, _ = sweep.communicate(timeout=400)
    assert sweep.returncode == 0, output[-4000:]

    runs = client.search_runs([run.info.experiment_id])
    children = [r for r in runs if r.data.tags.get("cnnlab.role") != "sweep"]
    assert [r.info.run_id for r in children] == [run.info.run_id]  # the same run, no new one
    run = children[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["slurm.restart_count"] == "1"
    folder = Path(run.data.tags["hydra.output_dir"])
    assert (folder / "hpc_ckpt_1.ckpt").is_file()  # Lightning's requeue handler saved it
    assert run.data.tags["cnnlab.resumed_from"].startswith(str(folder))
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(4, 120, 5))  # every step once: 3 epochs of 40, every 5th
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 3


REQUEUE_ARGS = [
    "seed=7", "trainer.max_epochs=3", "trainer.limit_train_batches=40",
    "trainer.limit_val_batches=4", "trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=5", "trainer.enable_progress_bar=false",
    "logger.pictures=false", "logger.flush_every_s=0",
]  # fmt: skip


def _wait_for_step(client: MlflowClient, process: subprocess.Popen, step: int) -> Run:
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        experiment = client.get_experiment_by_name("sweep")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        for run in runs:
            if run.data.tags.get("cnnlab.role") == "sweep":
                continue
            history = client.get_metric_history(run.info.run_id, "train/loss")
            if max((m.step for m in history), default=-1) >= step:
                return run
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"no run reached step {step}: {process.communicate()[0][-3000:]}")


def _start_when_requeued(job_id: str, env: dict[str, str]) -> None:
    """Slurm holds a requeued job back for a while (its begin time, a couple of minutes);
    start it as soon as it is back in the queue, as an administrator would. The job's
    ``Restarts`` count says it was requeued, so a job that Slurm started again between two
    looks still counts; the bound is generous, a loaded machine takes its time to stop a job."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        job = _job_fields(job_id, env)
        if int(job.get("Restarts", "0")) >= 1:
            if job.get("JobState") in ("RUNNING", "COMPLETED"):
                return  # started again
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                           env=env, check=False, timeout=30)  # fmt: skip
        time.sleep(1)
    raise AssertionError(f"Slurm job {job_id} was not requeued: {_job_fields(job_id, env)}")


def _job_fields(job_id: str, env: dict[str, str] | None = None) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "--oneliner", "show", "job", job_id], env=env,
                           capture_output=True, text=True, timeout=30).stdout  # fmt: skip
    return dict(field.split("=", 1) for field in shown.split() if "=" in field)


def test_a_run_left_running_on_another_host_resumes_once_its_slurm_job_ended(
    slurm, small_cfg, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    train.run(small_cfg([]))
    client, run = only_run(tracking_uri)
    run_id = run.info.run_id
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, "cnnlab.host", "node-elsewhere")
    sleeper = _sbatch("sleep 60")
    client.set_tag(run_id, "slurm.job_id", sleeper)
    _wait_while(sleeper, "PENDING")
    with pytest.raises(ConfigError, match=f"Slurm job {sleeper}, still running"):
        find_target(client, run_id)
    done = _sbatch("true")
    client.set_tag(run_id, "slurm.job_id", done)
    _wait_while(done, "PENDING", "RUNNING", "COMPLETING")
    target = find_target(client, run_id)
    assert target.run_id == run_id
    assert target.died == f"Slurm job {done} no longer running"
    assert client.get_run(run_id).info.status == "RUNNING"  # finding it writes nothing
    mark_died(client, target)  # what a resume that goes ahead does
    marked = client.get_run(run_id)
    assert marked.info.status == "KILLED"
    assert marked.data.tags["cnnlab.died"] == f"Slurm job {done} no longer running"
    subprocess.run(["scancel", sleeper], check=False, timeout=30)


def _sbatch(script: str) -> str:
    # --output: sbatch would leave slurm-<id>.out in the working folder (the checkout)
    submitted = subprocess.run(["sbatch", "--parsable", "--output=/dev/null", "--wrap", script],
                               capture_output=True, text=True, check=True, timeout=30)  # fmt: skip
    return submitted.stdout.strip()


def _wait_while(job_id: str, *states: str) -> None:
    deadline = time.monotonic() + 300
    while _squeue_state(job_id) in states:
        assert time.monotonic() < deadline, f"Slurm job {job_id} stays {states}"
        time.sleep(0.5)


def _squeue_state(job_id: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--format", "%T"], env=env,
                          capture_output=True, text=True, timeout=30).stdout.strip()  # fmt: skip


def test_a_slurm_sweep_that_grows_trains_only_its_new_job(slurm, tmp_path: Path) -> None:
    # Every DDP task of a job decides alike from the store: kept jobs start no training.
    ddp = ["hydra/launcher=slurm", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    first, *_ = run_sweep(tmp_path, *ddp, "seed=0", env=slurm)
    assert first.returncode == 0, first.stderr[-3000:]
    grown, _, parent, children = run_sweep(
        tmp_path, *ddp, "seed=0,1", "sweep.resume=latest", env=slurm
    )
    assert grown.returncode == 0, grown.stderr[-3000:]
    assert "this start: 1 trained, 1 kept, 0 resumed" in grown.stdout
    assert sorted(r.info.run_name for r in children) == ["s0", "s1"]
    assert {r.info.status for r in children} == {"FINISHED"}
    assert parent.data.tags["jobs.finished"] == "2"


def test_a_slurm_job_cancelled_mid_sweep_continues_in_its_run_and_is_reused(
    slurm, tmp_path: Path
) -> None:
    """The killed-sweep study on the cluster: a job scancelled mid-training (SIGTERM) ends
    KILLED; sweep.resume=latest continues it in the same run from its checkpoint and keeps
    the finished one; a repeated study with reuse trains nothing."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, **slurm, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "sweep"}
    grid = ["hydra/launcher=slurm", "seed=0,1", "trainer.max_epochs=4",
            "trainer.limit_train_batches=40", "trainer.limit_val_batches=2",
            "trainer.limit_test_batches=1", "trainer.log_every_n_steps=5",
            "trainer.enable_progress_bar=false", "logger.pictures=false",
            "logger.flush_every_s=0", f"paths.log_dir={tmp_path}/logs"]  # fmt: skip
    command = [sys.executable, "-m", "cnnlab.train", "-m", *grid]
    sweep = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    client = MlflowClient(uri)
    run = _wait_for_step(client, sweep, 50)  # its second epoch is under way
    subprocess.run(["scancel", run.data.tags["slurm.job_id"]], env=env, check=True, timeout=30)
    output, _ = sweep.communicate(timeout=900)  # this cluster has no sacct: see job_return
    assert sweep.returncode == 1 and "Traceback" not in output, output[-4000:]
    said = f"Slurm job {run.data.tags['slurm.job_id']} (seed={run.data.tags['seed']} "
    assert said in output, output[-4000:]
    assert "ended without a result" in output and "1 sweep job(s) FAILED" in output
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    continued = subprocess.run([*command, "sweep.resume=latest"], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=900)  # fmt: skip
    assert continued.returncode == 0, continued.stderr[-4000:]
    assert "1 resumed" in continued.stdout, continued.stdout[-3000:]
    runs = client.search_runs([run.info.experiment_id])
    children = [r for r in runs if r.data.tags.get("cnnlab.role") != "sweep"]
    assert sorted(r.data.tags["seed"] for r in children) == ["0", "1"]
    assert {r.info.status for r in children} == {"FINISHED"}
    resumed = client.get_run(run.info.run_id)
    assert "cnnlab.resumed_from" in resumed.data.tags
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(4, 160, 5))  # 4 epochs of 40, every 5th step, once
    again = subprocess.run([*command, "sweep.reuse=true"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=900)  # fmt: skip
    assert again.returncode == 0, again.stderr[-4000:]
    assert "0 trained, 0 kept, 0 resumed, 0 retried, 2 reused" in again.stdout
