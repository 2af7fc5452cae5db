"""``python -m cnnlab.eval``: a trained run's checkpoint tested again, as a user runs it, into
a real sqlite store; the result is a new run nested under the trained one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from cnnlab.training.classifier import Classifier
from tests.conftest import REPO, SMALL, cnnlab_train, read_only, run_cli, write_mnist
from tests.servers import free_port


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """Tiny LeNet-5 runs on MNIST files in torchvision's format: one with max pooling, one
    with average pooling, and a FAILED one that saved no checkpoint (its loss went non-finite
    at once): the store, its client, the max run, the failed one and the avg one."""
    folder = tmp_path_factory.mktemp("eval")
    root = write_mnist(folder / "mnist")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db", "MLFLOW_EXPERIMENT_NAME": "t"}
    common = [*SMALL, f"data.root={root}", "data.source=torchvision", f"paths.log_dir={folder}"]
    for pooling in ("max", "avg"):
        assert cnnlab_train(*common, f"model.pooling={pooling}", env=env).returncode == 0
    failed = cnnlab_train(*common, "optimizer.lr=1e12", "~scheduler", env=env)
    assert failed.returncode == 2, failed.stderr[-2000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    finished = [r for r in runs if r.info.status == "FINISHED"]
    by_pooling = {r.data.params["model/pooling"]: r for r in finished}
    no_checkpoint = next(r for r in runs if r.info.status == "FAILED")
    return folder, env, client, by_pooling["max"], no_checkpoint, by_pooling["avg"]


def cnnlab_eval(folder: Path, env: dict[str, str], *args: str):
    return run_cli(sys.executable, "-m", "cnnlab.eval", *args, f"paths.log_dir={folder}", env=env)


def evaluations(client: MlflowClient, run_id: str):
    return client.search_runs(
        [client.get_run(run_id).info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'"
    )


def test_eval_tests_the_best_checkpoint_again_in_a_run_nested_under_the_trained_one(trained):
    folder, env, client, run, *_ = trained
    before = client.get_run(run.info.run_id).data
    # Training tested 2 batches (SMALL); asked for the same, the eval sees the same images.
    result = cnnlab_eval(folder, env, f"run={run.info.run_id}", "trainer.limit_test_batches=2")
    assert result.returncode == 0, result.stderr[-3000:]
    [evaluation] = evaluations(client, run.info.run_id)
    tags = evaluation.data.tags
    assert evaluation.info.status == "FINISHED"
    assert tags["cnnlab.role"] == "eval"
    assert tags["eval.checkpoint"] == f"runs:/{run.info.run_id}/{before.tags['checkpoint.best']}"
    assert tags["eval.dataset"] == "mnist (torchvision)"
    # The same checkpoint on the same test batches: the same accuracy as training's test.
    assert evaluation.data.metrics["test/acc"] == pytest.approx(before.metrics["test/acc"])
    assert evaluation.data.params["data/test_images"] == before.params["data/test_images"]
    [tested] = evaluation.inputs.dataset_inputs  # the trained run's own test set
    [trained_test] = [
        i for i in client.get_run(run.info.run_id).inputs.dataset_inputs
        if {t.value for t in i.tags} == {"test"}
    ]  # fmt: skip
    assert [t.value for t in tested.tags] == ["test"]
    assert tested.dataset.digest == trained_test.dataset.digest
    after = client.get_run(run.info.run_id).data
    assert (after.metrics, after.params, after.tags) == (before.metrics, before.params, before.tags)
    assert f"MLflow run: {evaluation.info.run_id}" in result.stdout


def test_eval_on_another_source_tests_all_of_it_and_names_it(trained):
    folder, env, client, run, *_ = trained
    result = cnnlab_eval(folder, env, f"run={run.info.run_id}", "data.source=bundled")
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = max(evaluations(client, run.info.run_id), key=lambda r: r.info.start_time)
    assert evaluation.data.tags["eval.dataset"] == "mnist (bundled)"
    assert evaluation.data.params["data/source_resolved"] == "bundled"
    # The whole test set: training's limit_test_batches=2 was training's own.
    [tested] = evaluation.inputs.dataset_inputs
    rows = json.loads(tested.dataset.profile)["num_rows"]
    assert rows == int(evaluation.data.params["data/test_images"]) > 2 * 64
    assert evaluation.data.params.get("trainer/limit_test_batches") in (None, "None")
    assert 0 <= evaluation.data.metrics["test/acc"] <= 1


@pytest.mark.slow
def test_eval_of_a_checkpoint_file_finds_the_run_that_saved_it(trained):
    folder, env, client, run, *_ = trained
    last = run.data.tags["checkpoint.last"]
    result = cnnlab_eval(folder, env, f"ckpt={last}")
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = max(evaluations(client, run.info.run_id), key=lambda r: r.info.start_time)
    assert evaluation.data.tags["eval.checkpoint"] == last
    # Moved away from its run's folder: the model comes from the file alone, and the result
    # is a run of its own in the configured experiment.
    moved = folder / "elsewhere" / "model.ckpt"
    moved.parent.mkdir()
    shutil.copy(last, moved)
    result = cnnlab_eval(folder, env, f"ckpt={moved}", "data.source=bundled")
    assert result.returncode == 0, result.stderr[-3000:]
    [alone] = client.search_runs([run.info.experiment_id], f"tags.`eval.checkpoint` = '{moved}'")
    assert "mlflow.parentRunId" not in alone.data.tags
    assert alone.info.run_name == "eval-model" and alone.info.status == "FINISHED"


@pytest.mark.slow
def test_an_evaluation_killed_mid_test_is_marked_killed_by_the_next_one(trained):
    """SIGKILL while the test set is being tested (one image a batch, so it takes a while):
    the evaluation's run is left RUNNING by a dead process; the next evaluation marks it
    KILLED and records its own, and the trained run is untouched."""
    folder, env, client, run, *_ = trained
    before = client.get_run(run.info.run_id).data
    command = [sys.executable, "-m", "cnnlab.eval", f"run={run.info.run_id}", "data.source=bundled",
               "data.eval_batch_size=1", f"paths.log_dir={folder}"]  # fmt: skip
    evaluating = subprocess.Popen(
        command, cwd=REPO, env={**os.environ, **env}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not _testing(client, run.info.run_id) and evaluating.poll() is None:
            assert time.monotonic() < deadline, "the evaluation never started testing"
            time.sleep(0.1)
    finally:
        os.killpg(evaluating.pid, signal.SIGKILL)
        evaluating.wait(timeout=60)
    [killed] = [r for r in evaluations(client, run.info.run_id) if r.info.status == "RUNNING"]
    again = cnnlab_eval(folder, env, f"run={run.info.run_id}", "trainer.limit_test_batches=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    newest = max(evaluations(client, run.info.run_id), key=lambda r: r.info.start_time)
    assert newest.info.status == "FINISHED" and newest.info.run_id != killed.info.run_id
    after = client.get_run(run.info.run_id).data
    assert (after.metrics, after.params, after.tags) == (before.metrics, before.params, before.tags)


def _testing(client: MlflowClient, run_id: str) -> bool:
    """An evaluation of ``run_id`` is RUNNING with its config logged: it is in the test."""
    for evaluation in evaluations(client, run_id):
        if evaluation.info.status != "RUNNING":
            continue
        artifacts = {a.path for a in client.list_artifacts(evaluation.info.run_id)}
        if "config.yaml" in artifacts:
            return True
    return False


def test_a_checkpoint_rebuilds_its_model_alone(trained):
    """Lightning's own loader, from the file alone: the model's knobs are plain data in the
    checkpoint's hyperparameters, and it loads with weights_only."""
    run = trained[3]
    path = run.data.tags["checkpoint.last"]
    module = Classifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    for key, tensor in module.state_dict().items():
        assert torch.equal(tensor, saved["state_dict"][key]), key
    assert module.hparams.model["pooling"] == run.data.params["model/pooling"]
    assert module.hparams.model["name"] == run.data.params["model/name"]
    logits = module.eval()(torch.zeros(2, 1, 28, 28))
    assert logits.shape == (2, 10)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "nothing to evaluate; valid: run=<run id>, ckpt=<checkpoint file>"),
        (("run=0123abc",), "run=0123abc: no such run in sqlite:///"),
        (("run={run}", "model.pooling=avg"), "model.pooling=avg: an evaluation tests the model"),
        (("run={run}", "data=cifar10"), "data=cifar10 gives 3x32x32 images of 10 classes"),
        (("run={failed}",), "has no checkpoint: it saved none before it ended"),
        (("ckpt={folder}/mlflow.db",), "mlflow.db: not a checkpoint torch can read"),
        (("ckpt={folder}/nothing.ckpt",), "nothing.ckpt: no such file"),
        (("run={run}", "ckpt={other_ckpt}"), "last.ckpt was saved by run {other}"),
        (("run={run}", "ckpt={moved}"), "(model.pooling: avg against max)"),
    ],
)
def test_bad_eval_input_is_one_line_exit_2_and_records_nothing(trained, args, message):
    folder, env, client, run, failed, other = trained
    moved = folder / "moved" / "other.ckpt"  # the avg run's checkpoint, away from its folder
    if not moved.exists():
        moved.parent.mkdir(exist_ok=True)
        shutil.copy(other.data.tags["checkpoint.last"], moved)
    names = {"run": run.info.run_id, "failed": failed.info.run_id, "folder": folder,
             "other": other.info.run_id, "other_ckpt": other.data.tags["checkpoint.last"],
             "moved": moved}  # fmt: skip
    experiment = run.info.experiment_id
    runs_before = len(client.search_runs([experiment]))
    result = cnnlab_eval(folder, env, *(arg.format(**names) for arg in args))
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("cnnlab: error: ") and message.format(**names) in last, last
    assert "Traceback" not in result.stderr
    assert len(client.search_runs([experiment])) == runs_before


def test_eval_on_a_read_only_store_or_a_dead_server_is_one_line(trained, tmp_path: Path):
    """The store is checked before anything is recorded: a sqlite store in a read-only folder
    (a read-only mount) is left byte for byte; a server that does not answer is named."""
    folder, _, _, run, *_ = trained
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(folder / "mlflow.db", store / "mlflow.db")
    before = (store / "mlflow.db").read_bytes()
    command = [sys.executable, "-m", "cnnlab.eval", f"run={run.info.run_id}",
               f"paths.log_dir={tmp_path}/logs"]  # fmt: skip
    dead = f"http://127.0.0.1:{free_port()}"
    cases = [
        (read_only(store, *command), f"sqlite:///{store}/mlflow.db", "(Read-only file system)"),
        (command, dead, f"logger.tracking_uri={dead}: the tracking server does not answer"),
    ]
    for argv, uri, message in cases:
        result = run_cli(*argv, env={"MLFLOW_TRACKING_URI": uri})
        assert result.returncode == 2, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("cnnlab: error")]
        assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
        assert "Traceback" not in result.stderr
    assert (store / "mlflow.db").read_bytes() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("run=0123abc",), "run=0123abc: no MLflow store at {missing}"),
        (("ckpt=/nothing.ckpt",), "ckpt=/nothing.ckpt: no such file"),
        (("run=0123abc", "model.head=gap"), "model.head=gap: an evaluation tests the model"),
    ],
)
def test_eval_against_a_store_that_does_not_exist_creates_none(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    missing = tmp_path / "gone" / "mlflow.db"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{missing}"}
    result = cnnlab_eval(tmp_path, env, *args)
    assert result.returncode == 2
    assert message.format(missing=missing) in result.stderr.strip().splitlines()[-1]
    assert not missing.parent.exists()
