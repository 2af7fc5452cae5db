"""Several processes per job: DDP on the CPU with gloo, recorded as exactly one MLflow run."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import cnnlab_train

pytestmark = pytest.mark.slow


def test_ddp_on_two_cpu_processes_records_one_run_with_its_world_size(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = cnnlab_train(
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=6",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "trainer.log_every_n_steps=2",
        "trainer.enable_progress_bar=false",
        f"paths.log_dir={tmp_path}/logs",
        env={"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "ddp"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1  # rank 1 trains but records nothing of its own
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer/world_size"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [
        1,
        3,
        5,
        7,
        9,
        11,
    ]
    assert {"val/acc", "test/acc", "time/images_per_s"} <= set(run.data.metrics)
