"""Sweeps: Hydra multiruns recorded as one MLflow parent run with a child per job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from cnnlab.tracking.groups import GROUPS_TABLE, log_group_table
from cnnlab.tracking.jobs import SWEEP_FILE, effective_grid, factors_of, job_context
from tests.conftest import REPO, cnnlab_train, run_sweep

GRID = {"model.pooling": "max,avg,lp,gem,mixed,stride", "seed": "0,1,2"}
GROUP_COLUMNS = [
    "group",
    "factor.model.pooling",
    "runs",
    "val_acc_mean",
    "val_acc_std",
    "val_acc_min",
    "val_acc_max",
]


def test_the_command_line_narrows_the_experiments_grid_and_adds_factors() -> None:
    grid = effective_grid(
        [
            "experiment=pooling_ablation",
            "model.pooling=max,lp",
            "seed=0,1",
            "model.head=gap,fc",
            "data.batch_size=32",
        ],
        GRID,
    )
    assert grid == {"model.pooling": "max,lp", "seed": "0,1", "model.head": "gap,fc"}
    assert factors_of(grid) == ["model.pooling", "model.head"]


def test_a_job_knows_its_parent_factors_group_and_name(tmp_path: Path) -> None:
    (tmp_path / SWEEP_FILE).write_text(
        json.dumps(
            {
                "parent_run_id": "p1",
                "experiment_id": "3",
                "factors": ["model.pooling", "model.head"],
            }
        )
    )
    job = job_context(
        str(tmp_path), ["experiment=x", "model.pooling=lp", "model.head=gap", "seed=2"], 2
    )
    assert job.run_name == "pooling=lp-head=gap-s2"
    assert job.group == "model.pooling=lp,model.head=gap"
    assert job.tags() == {
        "mlflow.parentRunId": "p1",
        "group": "model.pooling=lp,model.head=gap",
        "seed": "2",
        "factor.model.pooling": "lp",
        "factor.model.head": "gap",
    }
    assert job_context(str(tmp_path / "elsewhere"), [], 0) is None


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "conf/experiment").glob("*.yaml")))
def test_every_experiment_composes_with_its_grid(name: str) -> None:
    shown = cnnlab_train("--cfg", "hydra", f"experiment={name}")
    assert shown.returncode == 0, shown.stderr
    assert "seed: 0,1,2" in shown.stdout


@pytest.mark.slow
def test_pooling_ablation_is_one_parent_with_a_tagged_child_per_grid_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result, client, parent, children = run_sweep(
        tmp_path, "experiment=pooling_ablation", "model.pooling=max,avg,stride", "seed=0,1"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(children) == 6
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags["factor.model.pooling"] for r in children} == {"max", "avg", "stride"}
    assert not any("factor.seed" in r.data.tags for r in children)
    assert {r.info.run_name for r in children} == {
        f"pooling={p}-s{s}" for p in ("max", "avg", "stride") for s in (0, 1)
    }
    tags = parent.data.tags
    assert parent.info.status == "FINISHED"
    assert json.loads(tags["cnnlab.grid"]) == {"model.pooling": "max,avg,stride", "seed": "0,1"}
    assert tags["jobs.total"] == "6" and tags["jobs.finished"] == "6"
    assert tags["jobs.failed"] == "0"
    assert tags["best.group"].startswith("model.pooling=") and tags["best.n"] == "2"
    assert "experiment=pooling_ablation" in tags["cnnlab.command"]
    jobs_csv = Path(client.download_artifacts(parent.info.run_id, "jobs.csv")).read_text()
    assert len(jobs_csv.strip().splitlines()) == 7  # a header and six jobs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)  # as a user reads it back
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sweep")
    groups = mlflow.load_table(GROUPS_TABLE, run_ids=[parent.info.run_id])
    assert list(groups.columns) == [*GROUP_COLUMNS, "test_acc_mean"]
    assert sorted(groups["factor.model.pooling"]) == ["avg", "max", "stride"]
    assert list(groups["runs"]) == [2, 2, 2]
    assert groups["group"][0] == tags["best.group"]  # best mean first
    assert {"path": GROUPS_TABLE, "type": "table"} in json.loads(tags["mlflow.loggedArtifacts"])


@pytest.mark.slow
def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    result, _, parent, children = run_sweep(tmp_path, "model.channels=[6,16],[6,16,32]")
    assert result.returncode == 1
    assert "1 sweep job(s) FAILED" in result.stderr
    status = {r.data.tags["factor.model.channels"]: r.info.status for r in children}
    assert status == {"[6,16]": "FINISHED", "[6,16,32]": "FAILED"}
    failed = next(r for r in children if r.info.status == "FAILED")
    assert "stage3.conv1: input 4, F=5" in failed.data.tags["error"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["jobs.failed"] == "1"


@pytest.mark.slow
def test_fail_fast_stops_at_the_first_failed_job(tmp_path: Path) -> None:
    result, _, parent, children = run_sweep(
        tmp_path, "model.channels=[6,16,32],[6,16]", "sweep.fail_fast=true"
    )
    assert result.returncode != 0
    assert [r.info.status for r in children] == ["FAILED"]  # the second job never ran
    assert parent.info.status == "KILLED"


@pytest.mark.slow
def test_an_interrupted_sweep_leaves_its_parent_and_job_killed(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_EXPERIMENT_NAME": "sweep",
        "PYTHONUNBUFFERED": "1",
    }
    command = [
        sys.executable,
        "-m",
        "cnnlab.train",
        "-m",
        "seed=0,1,2",
        "trainer.max_epochs=50",
        "trainer.enable_progress_bar=false",
        f"paths.log_dir={tmp_path}/logs",
    ]
    log = tmp_path / "sweep.log"  # what the sweep said, for the assertion messages
    with log.open("w") as output:
        sweep_process = subprocess.Popen(
            command, cwd=REPO, env=env, start_new_session=True, stdout=output, stderr=output
        )
    client = MlflowClient(uri)
    try:
        # Generous bounds: on a loaded machine a start, a batch and a run's closing are slow.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not _running_child(client):
            time.sleep(1)
        assert _running_child(client), f"no job started: {log.read_text()[-3000:]}"
        os.killpg(sweep_process.pid, signal.SIGINT)  # Ctrl-C
        try:
            assert sweep_process.wait(timeout=600) != 0
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running: {log.read_text()[-3000:]}") from None
    finally:
        if sweep_process.poll() is None:
            os.killpg(sweep_process.pid, signal.SIGKILL)
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    status = {r.data.tags.get("cnnlab.role", "job"): r.info.status for r in runs}
    assert status == {"sweep": "KILLED", "job": "KILLED"}
    assert len(runs) == 2  # the parent and the one job that had started


def _running_child(client: MlflowClient) -> bool:
    experiment = client.get_experiment_by_name("sweep")
    if experiment is None:
        return False
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
    return any("mlflow.parentRunId" in r.data.tags for r in runs)


@pytest.mark.slow
def test_joblib_runs_parallel_jobs_on_a_fresh_store_with_the_cores_split(tmp_path) -> None:
    result, _, parent, children = run_sweep(
        tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model.head=fc,gap"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(r.data.tags["factor.model.head"] for r in children) == ["fc", "gap"]
    assert {r.info.status for r in children} == {"FINISHED"}
    cores = os.cpu_count()
    threads = {r.data.params["trainer/cpu_threads"] for r in children}
    assert threads == {str(max(1, cores // min(2, cores)))}
    assert "JoblibLauncher" in parent.data.tags["cnnlab.launcher"]
    assert parent.data.tags["jobs.finished"] == "2" and parent.info.status == "FINISHED"


def test_searched_floats_are_short_in_run_names_and_exact_in_groups(tmp_path: Path) -> None:
    (tmp_path / SWEEP_FILE).write_text(
        json.dumps({"parent_run_id": "p", "experiment_id": "1", "factors": ["optimizer.lr"]})
    )
    job = job_context(str(tmp_path), ["optimizer.lr=0.0016505274986537953"], 0)
    assert job.run_name == "lr=0.001651-s0"
    assert job.group == "optimizer.lr=0.0016505274986537953"


def test_the_optuna_search_composes_with_in_memory_storage() -> None:
    shown = cnnlab_train("--cfg", "hydra", "hparams_search=lenet_optuna")
    assert shown.returncode == 0, shown.stderr
    assert "OptunaSweeper" in shown.stdout and "storage: null" in shown.stdout


@pytest.mark.slow
def test_an_optuna_search_records_every_trial_and_its_best(tmp_path: Path) -> None:
    result, client, parent, children = run_sweep(
        tmp_path, "hparams_search=lenet_optuna", "hydra.sweeper.n_trials=3"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(children) == 3 and {r.info.status for r in children} == {"FINISHED"}
    assert parent.data.tags["cnnlab.factors"] == (
        "optimizer.lr,optimizer.weight_decay,model.dropout,model.pooling"
    )
    best = max(children, key=lambda r: r.data.metrics["val/acc_best"])
    assert parent.data.tags["best.group"] == best.data.tags["group"]
    results = client.download_artifacts(parent.info.run_id, "optimization_results.yaml")
    assert f"best_value: {best.data.metrics['val/acc_best']}" in Path(results).read_text()


def children(scores: dict[str, list[float]]) -> pd.DataFrame:
    """Finished children as ``mlflow.search_runs`` frames them: a group per pooling."""
    rows = [
        {
            "status": "FINISHED",
            "tags.group": f"model.pooling={pooling}",
            "tags.factor.model.pooling": pooling,
            "metrics.val/acc_best": score,
        }
        for pooling, values in scores.items()
        for score in values
    ]
    failed = {
        "status": "FAILED",
        "tags.group": "model.pooling=lp",
        "tags.factor.model.pooling": "lp",
    }
    return pd.DataFrame([*rows, failed | {"metrics.val/acc_best": float("nan")}])


def test_a_resumed_sweeps_group_table_replaces_the_earlier_one(
    tmp_path: Path, tracking_uri: str
) -> None:
    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment("tests", artifact_location=tmp_path.as_uri())
    parent = client.create_run(experiment_id).info.run_id
    log_group_table(client, parent, children({"max": [0.9, 0.8]}))
    log_group_table(client, parent, children({"max": [0.9, 0.8, 0.85], "avg": [0.95]}))
    groups = mlflow.load_table(GROUPS_TABLE, run_ids=[parent])
    assert list(groups.columns) == GROUP_COLUMNS
    assert groups[["group", "runs"]].values.tolist() == [
        ["model.pooling=avg", 1],
        ["model.pooling=max", 3],
    ]
    assert groups["val_acc_mean"].tolist() == pytest.approx([0.95, 0.85])
