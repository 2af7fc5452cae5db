"""Many processes logging at once, to a fresh sqlite store and to a tracking server:
every run, param and metric arrives, none lost or doubled."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import REPO
from tests.servers import MakeServer

pytestmark = pytest.mark.slow

PROCESSES = 4
STEPS = 8  # training steps per run, each logged (log_every_n_steps=1, flush_every_s=0)


def train_at_once(tmp_path: Path, uri: str) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "crowd"}
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cnnlab.train",
                f"seed={seed}",
                "trainer.max_epochs=1",
                f"trainer.limit_train_batches={STEPS}",
                "trainer.limit_val_batches=2",
                "trainer.limit_test_batches=1",
                "trainer.log_every_n_steps=1",
                "trainer.enable_progress_bar=false",
                "logger.flush_every_s=0",
                "logger.pictures=false",
                f"paths.log_dir={tmp_path}/logs",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(PROCESSES)
    ]
    return [
        subprocess.CompletedProcess(p.args, p.wait(timeout=600), *p.communicate())
        for p in processes
    ]


def assert_everything_arrived(client: MlflowClient) -> None:
    runs = client.search_runs([client.get_experiment_by_name("crowd").experiment_id])
    assert sorted(r.data.tags["seed"] for r in runs) == [str(s) for s in range(PROCESSES)]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert len({len(r.data.params) for r in runs}) == 1  # every param of every run
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(STEPS))  # none lost or doubled
        for key in ("val/acc", "test/acc", "val/acc_best", "time/fit_s"):
            assert len(client.get_metric_history(run.info.run_id, key)) == 1, key


def test_processes_opening_a_fresh_sqlite_store_at_once_lose_nothing(tmp_path: Path) -> None:
    # Without the lock around the store's creation all of them crashed in its migration.
    uri = f"sqlite:///{tmp_path}/fresh/mlflow.db"
    for result in train_at_once(tmp_path, uri):
        assert result.returncode == 0, result.stderr[-3000:]
    assert_everything_arrived(MlflowClient(uri))


def test_processes_logging_to_a_tracking_server_at_once_lose_nothing(tmp_path: Path) -> None:
    server = MakeServer(f"sqlite:///{tmp_path}/server.db", tmp_path / "artifacts")
    try:
        server.wait_ready()
        for result in train_at_once(tmp_path, server.uri):
            assert result.returncode == 0, result.stderr[-3000:]
        assert_everything_arrived(MlflowClient(server.uri))
    finally:
        server.stop()
