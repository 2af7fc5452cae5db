"""Tracking helpers against a real sqlite MLflow store."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cnnlab import tracking


def test_flatten_params_uses_slashes_and_drops_hydra_noise() -> None:
    config = {
        "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 0.003},
        "model": {"channels": [6, 16], "head": {"name": "fc"}},
        "seed": 1,
    }
    assert tracking.flatten_params(config) == {
        "optimizer": "torch.optim.AdamW",
        "optimizer/lr": "0.003",
        "model/channels": "[6, 16]",
        "model/head/name": "fc",
        "seed": "1",
    }


def test_long_values_are_kept_beyond_lightnings_250_characters() -> None:
    value = "x" * 1000
    assert tracking.flatten_params({"note": value}) == {"note": value}


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("postgresql://alice:s3cret@db:5432/mlflow", "postgresql://alice:***@db:5432/mlflow"),
        ("http://bob:pw@127.0.0.1:5000", "http://bob:***@127.0.0.1:5000"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ],
)
def test_redact_uri_hides_passwords(uri: str, expected: str) -> None:
    assert tracking.redact_uri(uri) == expected


@pytest.fixture
def client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri)


def test_experiment_artifacts_live_beside_a_local_store(
    client: MlflowClient, tmp_path: Path
) -> None:
    experiment_id = tracking.open_experiment(client, "study", str(tmp_path / "artifacts"))
    assert tracking.open_experiment(client, "study", None) == experiment_id
    location = client.get_experiment(experiment_id).artifact_location
    assert location == (tmp_path / "artifacts").as_uri()
    default = tracking.open_experiment(client, "beside", None)
    database = Path(client.tracking_uri.removeprefix("sqlite:///"))
    expected = (database.parent / "mlartifacts").resolve().as_uri()
    assert client.get_experiment(default).artifact_location == expected


def test_repeated_run_names_get_a_number(client: MlflowClient, tmp_path: Path) -> None:
    experiment_id = tracking.open_experiment(client, "names", str(tmp_path))
    names = []
    for _ in range(3):
        name = tracking.unique_run_name(client, experiment_id, "lenet5-max-fc-s0")
        client.create_run(experiment_id, run_name=name)
        names.append(name)
    assert names == ["lenet5-max-fc-s0", "lenet5-max-fc-s0-2", "lenet5-max-fc-s0-3"]


def test_a_failing_run_ends_failed_with_its_error_and_traceback(
    client: MlflowClient, tmp_path: Path
) -> None:
    experiment_id = tracking.open_experiment(client, "faults", str(tmp_path))
    with pytest.raises(RuntimeError), tracking.TrackedRun(client, experiment_id, "r", {}) as run:
        raise RuntimeError("loss is nan at step 7")
    record = client.get_run(run.run_id)
    assert record.info.status == "FAILED"
    assert record.data.tags["error"] == "RuntimeError: loss is nan at step 7"
    trace = client.download_artifacts(run.run_id, "error/traceback.txt")
    assert "raise RuntimeError" in Path(trace).read_text()


def test_an_interrupted_run_ends_killed(client: MlflowClient, tmp_path: Path) -> None:
    experiment_id = tracking.open_experiment(client, "faults", str(tmp_path))
    with (
        pytest.raises(KeyboardInterrupt),
        tracking.TrackedRun(client, experiment_id, "r", {}) as run,
    ):
        raise KeyboardInterrupt
    assert client.get_run(run.run_id).info.status == "KILLED"


def test_git_state_names_the_commit_and_dirty_flag(tmp_path: Path) -> None:
    assert tracking.git_state(tmp_path) == {}  # not a repository: no tags, no crash
    state = tracking.git_state(Path(__file__).parent)
    if state:  # a checkout with at least one commit
        assert len(state["mlflow.source.git.commit"]) == 40
        assert state["git.dirty"] in {"true", "false"}


@pytest.mark.parametrize("stop", [SystemExit(0), SystemExit(None), SystemExit(143)])
def test_any_system_exit_inside_a_run_is_killed_not_finished(
    stop: SystemExit, client: MlflowClient, tmp_path: Path
) -> None:
    experiment_id = tracking.open_experiment(client, "exits", str(tmp_path))
    with pytest.raises(SystemExit), tracking.TrackedRun(client, experiment_id, "r", {}) as run:
        raise stop
    record = client.get_run(run.run_id)
    assert record.info.status == "KILLED"
    assert record.data.tags["error"] == "interrupted (SystemExit)"


def test_sigterm_during_a_run_ends_it_killed(client: MlflowClient, tmp_path: Path) -> None:
    experiment_id = tracking.open_experiment(client, "signals", str(tmp_path))
    with (
        pytest.raises(SystemExit) as stop,
        tracking.TrackedRun(client, experiment_id, "r", {}) as run,
    ):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    assert stop.value.code == 143
    assert client.get_run(run.run_id).info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored


def test_a_run_whose_error_cannot_be_stored_still_ends(
    client: MlflowClient, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the artifact folder should be")
    experiment_id = tracking.open_experiment(client, "broken-artifacts", str(blocker))
    with pytest.raises(OSError), tracking.TrackedRun(client, experiment_id, "r", {}) as run:
        raise RuntimeError("boom")
    assert client.get_run(run.run_id).info.status == "FAILED"


def test_passwords_never_reach_params() -> None:
    flat = tracking.flatten_params({"logger": {"tracking_uri": "http://bob:pw@h:5000"}})
    assert flat == {"logger/tracking_uri": "http://bob:***@h:5000"}
    assert tracking.redact_uri("logger.tracking_uri=https://u:p@h seed=1") == (
        "logger.tracking_uri=https://u:***@h seed=1"
    )
