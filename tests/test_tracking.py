"""Tracking helpers against a real sqlite MLflow store."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cnnlab import tracking, train
from tests.conftest import only_run


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


KIND = "mlflow.experimentKind"


def test_experiments_are_filed_as_model_training_unless_they_have_a_kind(
    client: MlflowClient, tmp_path: Path
) -> None:
    new = tracking.open_experiment(client, "new", str(tmp_path))
    assert client.get_experiment(new).tags[KIND] == "custom_model_development"
    untagged = client.create_experiment("older", artifact_location=tmp_path.as_uri())
    assert tracking.open_experiment(client, "older", None) == untagged
    assert client.get_experiment(untagged).tags[KIND] == "custom_model_development"
    chosen = client.create_experiment("genai", tags={KIND: "genai_development"})
    tracking.open_experiment(client, "genai", None)
    assert client.get_experiment(chosen).tags[KIND] == "genai_development"  # the user's kind


def test_links_open_the_ui_on_the_runs_table_not_the_genai_overview() -> None:
    # MLflow 3.17's UI picks its view from the link, not the experiment's tag (test_browser)
    link = tracking.runs.run_link("http://u:pw@h:5000/", "3", "abc")
    assert link == "http://u:***@h:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert tracking.runs.experiment_link("http://h:5000", "3") == (
        "http://h:5000/#/experiments/3/runs?workflowType=machine_learning"
    )


def test_a_run_records_its_three_sets_as_dataset_inputs(
    small_cfg, mnist_root: Path, tracking_uri: str
) -> None:
    data = [f"data.root={mnist_root}", "data.source=torchvision", "logger.system_metrics=false"]
    train.run(small_cfg([*data, "data.split_seed=0"]))
    train.run(small_cfg([*data, "data.split_seed=1"]))
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("tests")
    digests = []
    for run in client.search_runs([experiment.experiment_id], order_by=["start_time ASC"]):
        inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
        by_context = {
            next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
            for i in inputs
        }
        assert sorted(by_context) == ["test", "train", "validation"]
        assert {d.name for d in by_context.values()} == {"mnist"}
        assert {json.loads(d.source)["uri"] for d in by_context.values()} == {
            str((mnist_root / "MNIST" / "raw").resolve())
        }
        rows = {c: json.loads(d.profile)["num_rows"] for c, d in by_context.items()}
        assert rows == {"train": 540, "validation": 60, "test": 200}
        digests.append({c: d.digest for c, d in by_context.items()})
    first, second = digests
    assert first["train"] != second["train"] and first["validation"] != second["validation"]
    assert first["test"] == second["test"]  # the split seed draws no test image
    assert len({*first.values()}) == 3


def no_monitor_thread() -> bool:
    return not any(t.name == "SystemMetricsMonitor" for t in threading.enumerate())


def test_a_run_logs_system_metrics_until_it_ends(small_cfg, tracking_uri: str) -> None:
    train.run(small_cfg(["logger.system_metrics_every_s=0.1"]))
    client, run = only_run(tracking_uri)
    assert no_monitor_thread()
    history = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert history and "system/system_memory_usage_megabytes" in run.data.metrics
    assert max(m.timestamp for m in history) <= run.info.end_time


def test_a_failing_run_stops_its_system_metrics(client: MlflowClient, tmp_path: Path) -> None:
    experiment_id = tracking.open_experiment(client, "monitored", str(tmp_path))
    with pytest.raises(RuntimeError), tracking.TrackedRun(client, experiment_id, "r", {}) as run:
        run.monitor_system(0.05)
        time.sleep(0.5)
        raise RuntimeError("boom")
    assert no_monitor_thread()
    ended = client.get_run(run.run_id)
    assert ended.info.status == "FAILED"
    history = client.get_metric_history(run.run_id, "system/cpu_utilization_percentage")
    assert history and max(m.timestamp for m in history) <= ended.info.end_time
    time.sleep(0.3)
    assert len(client.get_metric_history(run.run_id, "system/cpu_utilization_percentage")) == len(
        history
    )


PLATEAU = [
    "scheduler._target_=torch.optim.lr_scheduler.ReduceLROnPlateau",
    "~scheduler.max_lr",
    "~scheduler.pct_start",
    "+scheduler.patience=0",
]


@pytest.mark.parametrize(
    ("scheduler", "steps"),
    [([], list(range(8))), (PLATEAU, [0, 4])],  # one-cycle: per step; plateau: per epoch
    ids=["one-cycle", "plateau"],
)
def test_the_learning_rate_is_logged_at_its_schedulers_interval(
    small_cfg, tracking_uri: str, scheduler: list[str], steps: list[int]
) -> None:
    train.run(small_cfg([*scheduler, "logger.system_metrics=false"]))
    client, run = only_run(tracking_uri)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "lr-AdamW")] == steps
