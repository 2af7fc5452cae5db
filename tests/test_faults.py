"""A hostile world: sweeps whose jobs all fail, processes killed outright, a store locked by
another process, a tracking server that dies mid-run, tiny runs and odd names. Each ends in
a true MLflow state, one clear line and an honest exit status, with nothing recorded lost."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from cnnlab import train
from cnnlab.checks import ConfigError
from cnnlab.tracking import retry
from cnnlab.tracking.liveness import end_dead_runs, process_tags
from cnnlab.tracking.logger import UNSENT_FILE, send_unsent
from cnnlab.tracking.store import connect
from tests.conftest import REPO, cnnlab_train, only_run, read_only, run_cli, run_sweep
from tests.servers import MakeServer


def _command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "cnnlab.train", *overrides]


def _env(uri: str, experiment: str = "tests") -> dict[str, str]:
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_EXPERIMENT_NAME": experiment,
        "PYTHONUNBUFFERED": "1",
    }


def _wait_for(condition, what: str, timeout: float = 300, every: float = 0.5) -> None:
    """Poll ``condition`` with a generous bound: a loaded machine starts things slowly."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s")


def _runs(client: MlflowClient, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


# -- tiny runs and odd names ------------------------------------------------------------


def test_a_run_of_exactly_four_steps_trains_with_the_default_one_cycle(
    small_cfg, tracking_uri: str
) -> None:
    # pct_start=0.25 of 4 steps is a warm-up of zero length: OneCycleLR divides by it.
    train.run(small_cfg(["trainer.max_epochs=1", "trainer.limit_train_batches=4"]))
    client, run = only_run(tracking_uri)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [
        0,
        1,
        2,
        3,
    ]


def test_a_run_name_with_a_quote_and_a_percent_sign_is_kept_and_made_unique(
    small_cfg, tracking_uri: str
) -> None:
    name = "it's 100%"
    for _ in range(2):
        train.run(small_cfg([f'logger.run_name="{name}"', "trainer.max_epochs=1"]))
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert sorted(r.info.run_name for r in runs) == [name, f"{name}-2"]


# -- runs whose process died -------------------------------------------------------------


def test_a_run_left_running_by_a_dead_process_is_marked_killed_and_a_live_one_is_not(
    tracking_uri: str,
) -> None:
    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment("tests")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid names no process now
    here = process_tags()
    ghost = client.create_run(experiment, tags=here | {"cnnlab.pid": str(dead.pid)})
    alive = client.create_run(experiment, tags=here)  # this very process
    elsewhere = client.create_run(
        experiment, tags={"cnnlab.host": "another-host", "cnnlab.pid": "1"}
    )
    assert end_dead_runs(client, experiment) == [ghost.info.run_id]
    assert client.get_run(ghost.info.run_id).info.status == "KILLED"
    assert client.get_run(ghost.info.run_id).data.tags["cnnlab.died"] == (
        "process gone while RUNNING"
    )
    for run in (alive, elsewhere):
        assert client.get_run(run.info.run_id).info.status == "RUNNING"


# -- the store in trouble ----------------------------------------------------------------


def test_a_store_call_waits_out_a_lock_but_not_past_its_bound(tmp_path: Path) -> None:
    """Real sqlite locks held by another process: MLflow alone gives up after 20 s."""
    store = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{store}")
    client.create_experiment("tests")
    holder = _hold_lock(store, seconds=2)
    try:
        retry.call(_locked_write, store, retry_s=120, where="the store")  # waits it out
    finally:
        holder.wait()
    holder = _hold_lock(store, seconds=30)
    try:
        start = time.monotonic()
        with pytest.raises(retry.StoreUnavailable, match="busy or unreachable for 1 s"):
            retry.call(_locked_write, store, retry_s=1, where="the store")
        assert time.monotonic() - start < 25  # gave up at its bound, not at the lock's end
    finally:
        holder.kill()
        holder.wait()


def test_a_sweep_jobs_server_gone_is_waited_for_once_then_tried_once(tmp_path: Path) -> None:
    """A wrong URI is one line at once; a server that answered the sweep and is gone is
    waited for as a restart, for one bound per process, then each later job tries once."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{closed.getsockname()[1]}"
    with pytest.raises(ConfigError, match="the tracking server does not answer"):
        connect(uri, retry_s=60)
    start = time.monotonic()
    with pytest.raises(retry.StoreUnavailable, match=f"{uri} is busy or unreachable for 2 s"):
        connect(uri, retry_s=2, answered=True)
    assert time.monotonic() - start >= 2  # waited its bound
    start = time.monotonic()
    with pytest.raises(retry.StoreUnavailable, match="for 2 s"):
        connect(uri, retry_s=600, answered=True)  # the next job: one try, not 600 s
    assert time.monotonic() - start < 60
    store = f"sqlite:///{tmp_path}/mlflow.db"
    connect(store, retry_s=1, answered=True).search_experiments()  # a store that answers


def _locked_write(store: Path) -> None:
    with sqlite3.connect(store, timeout=0.1) as connection:
        connection.execute("UPDATE experiments SET name = name")


def _hold_lock(store: Path, seconds: float, when_running: bool = False) -> subprocess.Popen:
    """Another process that takes an exclusive lock on ``store`` for ``seconds`` (once a run
    is RUNNING, with ``when_running``) and prints when it took it."""
    script = f"""
import sqlite3, sys, time
connection = sqlite3.connect({str(store)!r}, isolation_level=None, timeout=60)
while {when_running!r}:
    try:
        if connection.execute("SELECT count(*) FROM metrics").fetchone()[0] > 0:
            break
    except sqlite3.OperationalError:
        pass
    time.sleep(0.1)
connection.execute("BEGIN EXCLUSIVE")
print(time.time(), flush=True)
time.sleep({seconds})
connection.execute("COMMIT")
print(time.time(), flush=True)
"""
    holder = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    if not when_running:
        holder.stdout.readline()
    return holder


@pytest.mark.slow
def test_a_run_waits_out_a_45_s_lock_on_its_store_and_loses_no_metric(
    tmp_path: Path, mnist_root: Path
) -> None:
    store = tmp_path / "mlflow.db"
    holder = _hold_lock(store, seconds=45, when_running=True)
    try:
        result = run_cli(
            *_command(
                "trainer.max_epochs=3", "trainer.limit_train_batches=4",
                "trainer.log_every_n_steps=1",
                "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
                "trainer.enable_progress_bar=false", "logger.pictures=false",
                "logger.flush_every_s=0", f"data.root={mnist_root}", "data.source=torchvision",
                f"paths.log_dir={tmp_path}/logs",
            ),
            env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}", "MLFLOW_EXPERIMENT_NAME": "tests"},
            timeout=900,
        )  # fmt: skip
        locked_at, released_at = (
            float(line) for line in holder.communicate(timeout=300)[0].split()
        )
    finally:
        holder.kill()
    assert released_at - locked_at >= 45
    assert result.returncode == 0, result.stderr[-3000:]
    assert "busy or unreachable; retrying for up to" in result.stdout + result.stderr
    client, run = only_run(f"sqlite:///{store}")
    assert run.info.status == "FINISHED"
    assert run.info.end_time / 1000 > released_at  # it was writing while the lock was held
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(12))  # 3 epochs x 4 batches, each once
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 3


def _server_run(tmp_path: Path, server: MakeServer, retry_s: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        _command(
            *extra,
            "trainer.max_epochs=200", "trainer.limit_train_batches=4",
            "trainer.log_every_n_steps=1",
            "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
            "logger.pictures=false", "logger.flush_every_s=0", f"logger.retry_s={retry_s}",
            f"paths.log_dir={tmp_path}/logs", "hydra.run.dir=" + str(tmp_path / "run"),
        ),
        cwd=REPO, env=_env(server.uri), start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _has_metrics(uri: str) -> bool:
    try:
        runs = _runs(MlflowClient(uri), "tests")
    except Exception:  # the server's store is still being made
        return False
    return bool(runs) and "train/loss" in runs[0].data.metrics


@pytest.mark.slow
def test_a_tracking_server_that_dies_mid_run_fails_it_in_one_line_and_keeps_its_metrics(
    tmp_path: Path,
) -> None:
    server = MakeServer(f"sqlite:///{tmp_path}/server.db", tmp_path / "artifacts")
    server.wait_ready()
    job = _server_run(tmp_path, server, retry_s=20)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    try:
        # Once there is a checkpoint to continue from (a run that fails before its first
        # one has nothing for resume= to continue).
        _wait_for(lambda: _has_metrics(server.uri) and last.exists(), "a checkpoint and metrics")
        server.stop()  # and it does not come back
        _, err = job.communicate(timeout=600)  # bounded by logger.retry_s, not by MLflow's 15 min
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 1, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("cnnlab: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert f"the MLflow store {server.uri} is busy or unreachable for 20 s" in lines[0]
    spool = tmp_path / "run" / UNSENT_FILE
    unsent = [json.loads(line) for line in spool.read_text().splitlines()]
    assert unsent and {"key", "value", "step", "timestamp"} <= set(unsent[0])
    # The server comes back where it was; resume= sends what was kept, then trains on.
    server = MakeServer(f"sqlite:///{tmp_path}/server.db", tmp_path / "artifacts", server.port)
    server.wait_ready()
    client = MlflowClient(server.uri)
    run_id = _runs(client, "tests")[0].info.run_id
    resumed = _server_run(tmp_path, server, 20, f"resume={run_id}")
    try:
        _wait_for(lambda: not spool.exists() or resumed.poll() is not None, "the resume")
        if resumed.poll() is None:  # it sent what was kept and trains on: stop it there
            os.killpg(resumed.pid, signal.SIGTERM)
        _, err = resumed.communicate(timeout=300)
        assert not spool.exists(), err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        for kept in unsent:
            history = client.get_metric_history(run_id, kept["key"])
            assert [m.value for m in history if m.step == kept["step"]] == [kept["value"]]
    finally:
        if resumed.poll() is None:
            os.killpg(resumed.pid, signal.SIGKILL)
        server.stop()


def test_metrics_kept_on_disk_are_sent_once_even_when_part_reached_the_store(
    tmp_path: Path,
) -> None:
    # A batch the store took while its answer was lost is in the run and in the file.
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = client.create_run(client.create_experiment("tests")).info.run_id
    kept = [Metric("train/loss", 0.5, 1000 + step, step) for step in range(4)]
    client.log_batch(run_id, metrics=kept[:2])
    spool = tmp_path / UNSENT_FILE
    spool.write_text(
        "".join(
            json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step})
            + "\n"
            for m in kept
        )
        + '{"key": "train/lo'  # a line cut short by a kill
    )
    assert send_unsent(client, run_id, spool) == 2 and not spool.exists()
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]


@pytest.mark.slow
def test_sigterm_ends_a_run_that_waits_for_a_dead_server_within_seconds(tmp_path: Path) -> None:
    server = MakeServer(f"sqlite:///{tmp_path}/server.db", tmp_path / "artifacts")
    server.wait_ready()
    job = _server_run(tmp_path, server, retry_s=3600)
    try:
        _wait_for(lambda: _has_metrics(server.uri), "the run's first metrics on the server")
        server.stop()
        time.sleep(5)  # the run is now waiting for the store
        os.killpg(job.pid, signal.SIGTERM)
        start = time.monotonic()
        _, err = job.communicate(timeout=300)
        stopped_in = time.monotonic() - start
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0
    assert stopped_in < 120, f"{stopped_in:.0f} s after SIGTERM"  # its retry bound was an hour
    assert "Traceback" not in err, err[-3000:]


# -- sweeps ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_sweep_whose_every_job_fails_exits_1_with_its_parent_failed_and_summarized(
    tmp_path: Path,
) -> None:
    result, client, parent, children = run_sweep(tmp_path, "model.channels=[6,16,32],[6,16,32,64]")
    assert result.returncode == 1, result.stderr[-3000:]
    assert {r.info.status for r in children} == {"FAILED"} and len(children) == 2
    assert parent.info.status == "FAILED"
    tags = parent.data.tags
    assert (tags["jobs.total"], tags["jobs.finished"], tags["jobs.failed"]) == ("2", "0", "2")
    assert "best.group" not in tags
    jobs_csv = Path(client.download_artifacts(parent.info.run_id, "jobs.csv")).read_text()
    assert len(jobs_csv.strip().splitlines()) == 3
    assert f"sweep done: parent run {parent.info.run_id}: 2 jobs, 0 finished, 2 failed" in (
        result.stdout
    )
    assert "2 sweep job(s) FAILED" in result.stderr
    assert "KeyError" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_sweep_killed_outright_is_reported_stopped_and_its_runs_marked_killed(
    tmp_path: Path,
) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweep = subprocess.Popen(
        _command(
            "-m", "debug=fast", "trainer.max_epochs=1,500",
            "trainer.enable_progress_bar=false", f"paths.log_dir={tmp_path}/logs",
        ),
        cwd=REPO, env=_env(uri, "sweep"), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = MlflowClient(uri)

    def second_job_running() -> bool:
        runs = _runs(client, "sweep")
        return any(
            r.info.status == "RUNNING" and r.data.tags.get("factor.trainer.max_epochs") == "500"
            for r in runs
        )

    try:
        _wait_for(second_job_running, "the sweep's second job")
        os.killpg(sweep.pid, signal.SIGKILL)  # power loss: nothing closes anything
        sweep.wait(timeout=60)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    parent = next(r for r in _runs(client, "sweep") if r.data.tags.get("cnnlab.role") == "sweep")
    assert parent.info.status == "RUNNING"
    assert parent.data.tags["cnnlab.pid"] == str(sweep.pid)
    report = run_cli(
        sys.executable, "-m", "cnnlab.report", "--tracking-uri", uri, "--out", str(tmp_path / "r"),
    )  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    text = (tmp_path / "r" / "report.md").read_text()
    assert "Stopped: the sweep ended before its last job" in text
    assert "still running" not in text
    status = {r.info.run_id: r.info.status for r in _runs(client, "sweep")}
    assert set(status.values()) == {"KILLED", "FINISHED"}
    assert status[parent.info.run_id] == "KILLED"
    died = [r for r in _runs(client, "sweep") if "cnnlab.died" in r.data.tags]
    assert len(died) == 2  # the parent and the job it was running


@pytest.mark.slow
def test_a_failed_optuna_trial_is_recorded_and_the_search_goes_on(tmp_path: Path) -> None:
    # The search's keys are dotted ("model.pooling"), which an override cannot add: a search
    # of the user's own, found on Hydra's search path, adds one value that fails its check.
    searches = tmp_path / "conf" / "hparams_search"
    searches.mkdir(parents=True)
    (searches / "failing.yaml").write_text(
        (REPO / "conf/hparams_search/lenet_optuna.yaml").read_text()
        + "      data.val_size: choice(0.1, -1)  # -1 is refused: that trial FAILED\n"
    )
    result, _, parent, children = run_sweep(
        tmp_path,
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "hparams_search=failing",
        "hydra.sweeper.n_trials=4",
    )
    assert result.returncode == 1, result.stderr[-3000:]  # a job failed: said, not hidden
    status = [r.info.status for r in children]
    assert len(status) == 4 and "FAILED" in status and "FINISHED" in status, status
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["jobs.total"] == "4"
    assert "Values were told" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_the_next_sweep_marks_a_dead_sweep_killed(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sweep")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tags = process_tags() | {"cnnlab.pid": str(dead.pid), "cnnlab.role": "sweep"}
    ghost = client.create_run(experiment, tags=tags)
    result = cnnlab_train(
        "-m", "seed=0", "debug=fast", "trainer.enable_progress_bar=false",
        f"paths.log_dir={tmp_path}/logs",
        env={"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "sweep"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert client.get_run(ghost.info.run_id).info.status == "KILLED"
    assert "best group: (one configuration)" in result.stdout
    assert 'report: make report ARGS="--parent ' in result.stdout


@pytest.mark.parametrize("existing", [False, True], ids=["new store", "existing store"])
def test_a_store_in_a_read_only_folder_is_one_line_before_any_run(
    tmp_path: Path, existing: bool
) -> None:
    folder = tmp_path / "store"
    folder.mkdir()
    store = folder / "mlflow.db"
    if existing:
        MlflowClient(f"sqlite:///{store}").create_experiment("tests")
    before = store.read_bytes() if existing else None
    for sweep in ([], ["-m", "seed=0,1"]):
        result = run_cli(
            *read_only(folder, *_command(*sweep, f"paths.log_dir={tmp_path}/logs")),
            env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}", "MLFLOW_EXPERIMENT_NAME": "tests"},
        )
        assert result.returncode == 2, result.stderr[-3000:]
        lines = [line for line in result.stderr.splitlines() if line.startswith("cnnlab: error:")]
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert f"the store's folder={folder} is not writable (Read-only file system)" in lines[0]
    assert (store.read_bytes() if existing else store.exists()) == (before if existing else False)
