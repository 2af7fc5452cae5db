"""``logger.log_model=true``: the tested model as MLflow's pytorch flavor, exported with
``torch.export`` (pt2, no pickle), loaded in a fresh process in which cnnlab cannot be
imported, and predicting what the run's test measured."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from mlflow import MlflowClient

from cnnlab import train
from cnnlab.data import ImageDataModule
from cnnlab.tracking.models import MODEL_TAG
from tests.conftest import only_run, run_cli

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
    small_cfg, tracking_uri: str, tmp_path: Path
) -> None:
    cfg = small_cfg(["logger.log_model=true"])
    train.run(cfg)
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
