"""``logger.log_model=true``: the tested model as MLflow's pytorch flavor, exported with
``torch.export`` (pt2, no pickle), loaded in a fresh process in which cnnlab cannot be
imported, and predicting what the run's test measured."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from cnnlab import train
from cnnlab.data import ImageDataModule
from cnnlab.tracking.models import MODEL_TAG
from tests.conftest import cnnlab_train, only_run, run_cli, run_sweep
from tests.servers import MakeServer

# Loads a model URI with cnnlab made unimportable, predicts the images in an .npy file and
# prints the predicted classes and the files of the model's data as JSON.
LOAD_WITHOUT_CNNLAB = """
import json, os, sys
sys.modules["cnnlab"] = None  # any import of cnnlab now fails
import mlflow, mlflow.pytorch, numpy, torch
uri, images = sys.argv[1], numpy.load(sys.argv[2])
local = mlflow.artifacts.download_artifacts(uri)
model = mlflow.pytorch.load_model(local)
predicted = model(torch.from_numpy(images)).argmax(dim=1).tolist()
print(json.dumps({"predicted": predicted, "files": os.listdir(os.path.join(local, "data"))}))
"""


def load_without_cnnlab(uri: str, images: np.ndarray, folder: Path, tracking_uri: str) -> dict:
    np.save(folder / "images.npy", images)
    result = run_cli(
        sys.executable,
        "-c",
        LOAD_WITHOUT_CNNLAB,
        uri,
        str(folder / "images.npy"),
        env={"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def images_tested(cfg) -> tuple[np.ndarray, np.ndarray]:
    """The test images the run's test saw (its first ``limit_test_batches`` batches), as the
    pixel values a served model takes."""
    datamodule = ImageDataModule(train.config.to_settings(cfg).data)
    datamodule.setup("test")
    count = cfg.trainer.limit_test_batches * cfg.data.eval_batch_size
    test = datamodule.test_set
    return test.images[:count].float().numpy(), test.labels[:count].numpy()


def test_a_logged_model_loads_without_cnnlab_and_predicts_what_the_test_measured(
    small_cfg, tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = small_cfg(["logger.log_model=true"])
    train.run(cfg)
    # MLflow's fluent API was pointed at the run's store only while it logged the model:
    # the process's store follows its environment again, and no experiment is left set.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/other.db"
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ
    _, run = only_run(tracking_uri)
    uri = f"runs:/{run.info.run_id}/model"
    assert run.data.tags[MODEL_TAG] == uri
    images, labels = images_tested(cfg)
    loaded = load_without_cnnlab(uri, images, tmp_path, tracking_uri)
    assert loaded["files"] == ["model.pt2"]  # torch.export's archive: no pickled module
    accuracy = float(np.mean(np.array(loaded["predicted"]) == labels))
    assert abs(accuracy - run.data.metrics["test/acc"]) < 1e-6
    assert [m.model_id for m in run.outputs.model_outputs]  # the UI's "Logged models"


def test_no_model_is_logged_unless_asked(small_cfg, tracking_uri: str) -> None:
    train.run(small_cfg())
    _, run = only_run(tracking_uri)
    assert MODEL_TAG not in run.data.tags
    assert not run.outputs.model_outputs
    experiment = run.info.experiment_id
    assert not MlflowClient(tracking_uri).search_logged_models([experiment])


def best_child(parent, children):
    group = parent.data.tags["best.group"]
    ours = [c for c in children if c.data.tags["group"] == group and c.info.status == "FINISHED"]
    return max(ours, key=lambda c: c.data.metrics["val/acc_best"])


@pytest.mark.slow
def test_a_sweep_registers_its_best_run_with_the_alias_best_on_a_server(tmp_path: Path) -> None:
    server = MakeServer(f"sqlite:///{tmp_path}/server.db", tmp_path / "artifacts")
    try:
        server.wait_ready(timeout=600)  # a loaded machine may take minutes
        grid = ("model.pooling=max,avg", "seed=0,1", "sweep.register_best=digits")
        result, client, parent, children = run_sweep(tmp_path, *grid, uri=server.uri)
        assert result.returncode == 0, result.stderr[-3000:]
        version = client.get_model_version_by_alias("digits", "best")
        best = best_child(parent, children)
        assert version.run_id == best.info.run_id
        assert parent.data.tags["best.model"] == (
            f"models:/digits@best (version {version.version} of run {best.info.run_id})"
        )
        assert f"best model: models:/digits@best (version {version.version}" in result.stdout
        images = np.random.default_rng(0).integers(0, 256, (3, 1, 28, 28)).astype(np.float32)
        loaded = load_without_cnnlab("models:/digits@best", images, tmp_path, server.uri)
        assert loaded["files"] == ["model.pt2"] and len(loaded["predicted"]) == 3
        # Another sweep (one job): a new version, and the alias moves to it.
        result = cnnlab_train(
            "-m", "seed=2", "sweep.register_best=digits", "debug=fast",
            "trainer.enable_progress_bar=false", f"paths.log_dir={tmp_path}/again",
            env={"MLFLOW_TRACKING_URI": server.uri, "MLFLOW_EXPERIMENT_NAME": "another"},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert client.get_model_version_by_alias("digits", "best").version == "2"
    finally:
        server.stop()


@pytest.mark.slow
def test_a_best_run_without_a_model_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """Continued with register_best, a sweep whose kept runs logged no model: the sweep
    ends FINISHED, nothing is registered, and it says why."""
    result, client, parent, _ = run_sweep(tmp_path, "seed=0,1")
    assert result.returncode == 0, result.stderr[-3000:]
    again, client, parent, _ = run_sweep(
        tmp_path, "seed=0,1", "sweep.resume=latest", "sweep.register_best=digits"
    )
    assert again.returncode == 1
    last = again.stderr.strip().splitlines()[-1]
    assert last.startswith("cnnlab: error: sweep.register_best=digits: the best run ")
    assert "has no logged model" in last
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best.model"].startswith("not registered: ")
    assert not client.search_registered_models()


@pytest.mark.parametrize("name", ["a/b", "@best", ""])
def test_a_bad_model_name_is_refused_before_any_store_exists(tmp_path: Path, name: str) -> None:
    store = tmp_path / "mlflow.db"
    result = cnnlab_train(
        "-m", "seed=0,1", f"sweep.register_best='{name}'", f"paths.log_dir={tmp_path}",
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        f"cnnlab: error: sweep.register_best={name!r}: not a model name for "
        "models:/<name>@best; valid: letters, digits, '.', '_' and '-'"
    )
    assert not store.exists()
