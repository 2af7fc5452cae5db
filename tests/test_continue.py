"""Sweeps that continue and reuse: a job's identity, what a job does with the runs of its
identity, ``sweep.resume``, ``sweep.reuse`` and ``sweep.dry_run`` (README "Continue a sweep")."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from cnnlab import train
from cnnlab.report.collect import load_sweep
from cnnlab.tracking import identity
from cnnlab.tracking.continuation import (
    REUSED_TAG,
    SUPERSEDED_TAG,
    Action,
    Continuation,
    decide,
    reproducible,
)
from cnnlab.tracking.identity import HASH_TAG
from cnnlab.tracking.parents import children_frame
from cnnlab.tracking.record import new_run
from tests.conftest import REPO, cnnlab_train, compose_train, only_run, read_only, run_cli
from tests.servers import MakeServer
from tests.test_faults import _command, _hold_lock, _wait_for

# Each changes what a run measures: each gives another identity.
DECIDING = [
    "model.pooling=avg",
    "model=alexnet_small",
    "model.head=gap",
    "model.batchnorm=false",
    "model.dropout=0.3",
    "data=fashion_mnist",
    "data.source=bundled",
    "data.batch_size=32",
    "data.val_size=0.2",
    "data.split_seed=1",
    "data.augment=true",
    "optimizer.lr=0.01",
    "scheduler.pct_start=0.3",
    "trainer.max_epochs=3",
    "trainer.precision=bf16-mixed",
    "trainer.limit_train_batches=7",
    "trainer.gradient_clip_val=1.0",
    "callbacks.model_checkpoint.monitor=val/loss",
    "seed=1",
    "label_smoothing=0.1",
    "test=false",
]
# Each leaves what a run measures as it is: each keeps the identity (tracking.identity).
NOT_DECIDING = [
    "paths.log_dir=/elsewhere",
    "paths.output_dir=/elsewhere/run",
    "logger.tracking_uri=http://127.0.0.1:1",
    "logger.experiment_name=other",
    "logger.flush_every_s=1",
    "logger.retry_s=5",
    "logger.pictures=false",
    "resume=abc",
    "sweep.fail_fast=true",
    "sweep.resume=latest",
    "sweep.reuse=true",
    "sweep.dry_run=true",
    "task_name=other",
    "perf.memory_format=contiguous",
    "perf.compile=true",
    "perf.matmul_precision=highest",
    "data.root=/elsewhere",
    "data.download=false",
    "data.eval_batch_size=64",
    "data.resident=false",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=true",
    "callbacks.model_checkpoint.dirpath=/elsewhere",
    "callbacks.model_checkpoint.filename=x",
    "callbacks.learning_rate_monitor.logging_interval=step",
    "callbacks.progress_bar.refresh_rate=1",
]


def _hash(tmp_path: Path, *overrides: str) -> str:
    return identity.of_job(compose_train(list(overrides), tmp_path), code="c").config_hash


@pytest.mark.parametrize("override", DECIDING)
def test_what_decides_a_result_is_in_the_identity(tmp_path: Path, override: str) -> None:
    assert _hash(tmp_path, override) != _hash(tmp_path)


@pytest.mark.parametrize("override", NOT_DECIDING)
def test_what_does_not_decide_a_result_is_left_out(tmp_path: Path, override: str) -> None:
    assert _hash(tmp_path, override) == _hash(tmp_path)


def test_every_setting_left_out_is_tested_and_documented() -> None:
    tested = {o.partition("=")[0] for o in NOT_DECIDING}
    for key in identity.NOT_DECIDING:
        assert any(t == key or t.startswith(f"{key}.") for t in tested), key
    readme = (REPO / "README.md").read_text()
    for key in identity.NOT_DECIDING:
        assert f"`{key}`" in readme, key


def test_the_code_version_is_the_commit_and_an_edit_is_another(tmp_path: Path) -> None:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    commit = git("rev-parse", "HEAD")
    assert identity.code_version(tmp_path) == commit
    (tmp_path / "a.py").write_text("x = 2\n")
    edited = identity.code_version(tmp_path)
    assert edited.startswith(f"{commit}+dirty.") and edited == identity.code_version(tmp_path)
    (tmp_path / "a.py").write_text("x = 3\n")
    assert identity.code_version(tmp_path) not in (commit, edited)
    assert identity.code_version(tmp_path, dirty_is_commit=True) == commit
    (tmp_path / "untracked.txt").write_text("notes")  # not code the run imports
    (tmp_path / "a.py").write_text("x = 1\n")
    assert identity.code_version(tmp_path) == commit


def _store(tmp_path: Path) -> tuple[MlflowClient, str, str]:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("tests")
    parent = client.create_run(experiment, tags={"cnnlab.role": "sweep"}).info.run_id
    return client, experiment, parent


def _child(client, experiment, parent, status, config_hash="h", **tags) -> str:
    tags = {HASH_TAG: config_hash, "mlflow.parentRunId": parent, **tags}
    run = client.create_run(experiment, tags=tags).info.run_id
    client.log_metric(run, "val/acc_best", 0.5)
    if status != "RUNNING":
        client.set_terminated(run, status)
    return run


def test_a_job_keeps_a_finished_child_and_runs_a_failed_one_again(tmp_path: Path) -> None:
    client, experiment, parent = _store(tmp_path)
    how = Continuation(parent)
    assert decide(client, experiment, "h", how).action is Action.train
    failed = _child(client, experiment, parent, "FAILED", error="boom")
    retry = decide(client, experiment, "h", how)
    assert retry.action is Action.retry and retry.run.info.run_id == failed and retry.trains
    skip = decide(client, experiment, "h", Continuation(parent, retry_failed=False))
    assert skip.action is Action.skip and not skip.trains
    client.set_tag(failed, SUPERSEDED_TAG, "later")  # run again: out of the picture
    assert decide(client, experiment, "h", how).action is Action.train
    finished = _child(client, experiment, parent, "FINISHED")
    kept = decide(client, experiment, "h", how)
    assert kept.action is Action.kept and kept.run.info.run_id == finished
    assert kept.score == 0.5 and not kept.trains
    assert decide(client, experiment, "other", how).action is Action.train


def test_a_killed_child_continues_from_its_whole_checkpoint(tmp_path: Path) -> None:
    client, experiment, parent = _store(tmp_path)
    last = tmp_path / "last.ckpt"
    killed = _child(client, experiment, parent, "KILLED", **{"checkpoint.last": str(last)})
    # Killed before its first checkpoint: nothing to continue, so a new child.
    assert decide(client, experiment, "h", Continuation(parent)).action is Action.retry
    torch.save({"callbacks": {"ResumeState": {"mlflow_run_id": killed}}}, last)
    resumed = decide(client, experiment, "h", Continuation(parent))
    assert resumed.action is Action.resume and resumed.target.checkpoint == last.resolve()


def test_a_child_left_running_is_continued_when_its_process_is_gone(tmp_path: Path) -> None:
    client, experiment, parent = _store(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = _child(client, experiment, parent, "RUNNING", "live", **_process(os.getpid()))
    assert decide(client, experiment, "live", Continuation(parent)).action is Action.running
    client.set_terminated(alive, "KILLED")
    _child(client, experiment, parent, "RUNNING", "dead", **_process(gone.pid))
    # No checkpoint: run again (a whole one would be continued, as for KILLED).
    assert decide(client, experiment, "dead", Continuation(parent)).action is Action.retry


def _process(pid: int) -> dict[str, str]:
    return {"cnnlab.host": socket.gethostname(), "cnnlab.pid": str(pid)}


def test_reuse_takes_a_finished_run_of_another_study_at_its_origin(tmp_path: Path) -> None:
    client, experiment, parent = _store(tmp_path)
    other = client.create_run(experiment, tags={"cnnlab.role": "sweep"}).info.run_id
    origin = _child(client, experiment, other, "FINISHED")
    assert decide(client, experiment, "h", Continuation(parent)).action is Action.train
    reused = decide(client, experiment, "h", Continuation(parent, reuse=True))
    assert reused.action is Action.reuse and reused.run.info.run_id == origin
    copy = _child(client, experiment, other, "FINISHED", **{REUSED_TAG: origin})
    again = decide(client, experiment, "h", Continuation(parent, reuse=True))
    assert again.run.info.run_id == origin and copy != origin


def test_reuse_is_off_where_a_run_would_not_repeat_its_result() -> None:
    assert reproducible({"accelerator": "cpu", "deterministic": False})
    assert reproducible({"accelerator": "gpu", "deterministic": True})
    assert reproducible({"accelerator": "gpu", "deterministic": False}) is (
        not torch.cuda.is_available()
    )


SMALL_SWEEP = [
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "logger.pictures=false",
    "logger.flush_every_s=0",
]


def _env(tmp_path: Path) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
            "MLFLOW_EXPERIMENT_NAME": "sweep"}  # fmt: skip


def test_a_dry_run_lists_the_jobs_and_creates_nothing(tmp_path: Path) -> None:
    shown = cnnlab_train(
        "-m", "model.pooling=max,avg", "seed=0,1,2", "optimizer.lr=0.01,-1",
        "sweep.dry_run=true", f"paths.log_dir={tmp_path}/logs", env=_env(tmp_path),
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "dry run: 12 jobs would be: 6 trained, 6 refused; nothing was trained" in shown.stdout
    assert re.search(r"refused +pooling=max-lr=-1-s0: optimizer.lr", shown.stdout), shown.stdout
    client = MlflowClient(_env(tmp_path)["MLFLOW_TRACKING_URI"])
    assert client.get_experiment_by_name("sweep") is None
    assert not list(tmp_path.rglob("*.ckpt"))


def _store_with(tmp_path: Path, given: str) -> None:
    """A store holding nothing, an experiment "sweep" without a sweep, or no store at all."""
    if given == "no store":
        return
    client = MlflowClient(_env(tmp_path)["MLFLOW_TRACKING_URI"])
    client.create_experiment("other")
    if given == "a single run":
        client.create_run(client.create_experiment("sweep"), run_name="single")


@pytest.mark.parametrize(
    ("given", "overrides", "says"),
    [
        ("a single run", ["sweep.resume=nosuchrun"], "sweep.resume=nosuchrun: not the parent "),
        ("a single run", ["sweep.resume=latest"], "sweep.resume=latest: this experiment has no"),
        ("no store", ["sweep.resume=latest"], "sweep.resume=latest: no MLflow store at "),
        ("no store", ["sweep.resume=latest", "sweep.dry_run=true"], "no MLflow store at "),
        ("an empty store", ["sweep.resume=latest"], "no experiment 'sweep' in sqlite:///"),
        ("no store", ["hparams_search=lenet_optuna", "sweep.dry_run=true"], "lists the jobs of"),
    ],
)
def test_a_sweep_that_cannot_continue_says_why_in_one_line(
    tmp_path: Path, given: str, overrides: list[str], says: str
) -> None:
    _store_with(tmp_path, given)
    result = cnnlab_train(
        "-m", "seed=0,1", *overrides, f"paths.log_dir={tmp_path}/logs", env=_env(tmp_path)
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("cnnlab: error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert says in errors[0] and "Traceback" not in result.stderr
    if given == "no store" and "sweep.resume=latest" in overrides:
        assert not (tmp_path / "mlflow.db").exists()  # nothing to continue: nothing created
    client = MlflowClient(_env(tmp_path)["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("sweep")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    assert [r.info.run_name for r in runs] == (["single"] if given == "a single run" else [])


def _finished_sweep(tmp_path: Path) -> tuple[MlflowClient, str]:
    """A store holding one FINISHED sweep without jobs, and its parent's id."""
    client = MlflowClient(_env(tmp_path)["MLFLOW_TRACKING_URI"])
    parent = client.create_run(client.create_experiment("sweep"), tags={"cnnlab.role": "sweep"})
    client.set_terminated(parent.info.run_id, "FINISHED")
    return client, parent.info.run_id


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("cnnlab: error:")]


def test_a_continued_sweep_waits_out_a_locked_store_and_gives_up_in_one_line(
    tmp_path: Path,
) -> None:
    """A store another process holds locked is busy, not broken: the sweep waits for it, and
    past logger.retry_s ends in one line with the parent as it was."""
    client, parent = _finished_sweep(tmp_path)
    store = tmp_path / "mlflow.db"
    dry = ["-m", "seed=0", "sweep.resume=latest", f"paths.log_dir={tmp_path}/logs"]
    holder = _hold_lock(store, seconds=3)
    try:
        waited = cnnlab_train(*dry, "sweep.dry_run=true", env=_env(tmp_path))
    finally:
        holder.wait()
    assert waited.returncode == 0, waited.stderr[-3000:]
    assert "dry run: 1 jobs would be: 1 trained" in waited.stdout
    holder = _hold_lock(store, seconds=300)
    try:
        refused = cnnlab_train(*dry, "logger.retry_s=2", env=_env(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    errors = _error_lines(refused)
    assert refused.returncode == 1 and len(errors) == 1, refused.stderr[-3000:]
    assert f"the MLflow store sqlite:///{store} is busy or unreachable for 2 s" in errors[0]
    assert "restore it from a backup" not in refused.stderr  # a lock is not a broken store
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and len(client.search_runs([run.info.experiment_id])) == 1


def test_a_sweep_to_continue_in_a_read_only_or_unreachable_store_is_one_line(
    tmp_path: Path,
) -> None:
    client, parent = _finished_sweep(tmp_path)
    store = tmp_path / "mlflow.db"
    before = store.read_bytes()
    again = ["-m", "seed=0", "sweep.resume=latest", f"paths.log_dir={tmp_path}-logs"]
    refused = run_cli(*read_only(tmp_path, *_command(*again)), env=_env(tmp_path))
    errors = _error_lines(refused)
    assert refused.returncode == 2 and len(errors) == 1, refused.stderr[-3000:]
    assert "is not writable (Read-only file system)" in errors[0]
    assert store.read_bytes() == before
    with socket.socket() as closed:  # a port nobody listens on: a server that is gone
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    gone = cnnlab_train(*again, f"logger.tracking_uri=http://127.0.0.1:{port}")
    errors = _error_lines(gone)
    assert gone.returncode == 2 and len(errors) == 1, gone.stderr[-3000:]
    assert f"logger.tracking_uri=http://127.0.0.1:{port}: the tracking server does not" in errors[0]
    assert client.get_run(parent).info.status == "FINISHED"


def _sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return cnnlab_train(
        "-m", *SMALL_SWEEP, *overrides, f"paths.log_dir={tmp_path}/logs", env=_env(tmp_path)
    )


def _runs(tmp_path: Path) -> tuple[MlflowClient, list, list]:
    client = MlflowClient(_env(tmp_path)["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    parents = [r for r in runs if r.data.tags.get("cnnlab.role") == "sweep"]
    return client, parents, [r for r in runs if r not in parents]


@pytest.mark.slow
def test_a_killed_sweep_continues_grows_and_is_reused(tmp_path: Path) -> None:
    grid = ["model.pooling=max,avg", "seed=0,1", "trainer.max_epochs=6"]
    _kill_when(tmp_path, grid, lambda: _third_job_has_checkpoint(tmp_path), "the third job")
    continued = _sweep(tmp_path, *grid, "sweep.resume=latest")
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert "this start: 1 trained, 2 kept, 1 resumed, 0 retried, 0 reused" in continued.stdout
    client, parents, children = _runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {r.info.status for r in children} == {"FINISHED"} and len(children) == 4
    assert {r.info.run_name for r in children} == {
        f"pooling={p}-s{s}" for p in ("max", "avg") for s in (0, 1)
    }
    resumed = [r for r in children if "cnnlab.resumed_from" in r.data.tags]
    assert [r.info.run_name for r in resumed] == ["pooling=avg-s0"]
    for run in children:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(18)), run.info.run_name  # 6 epochs x 3, each once
    # One more seed: only its two jobs train, in the same parent.
    grown = _sweep(tmp_path, *grid[:1], "seed=0,1,2", grid[2], "sweep.resume=latest")
    assert grown.returncode == 0, grown.stderr[-3000:]
    assert "this start: 2 trained, 4 kept, 0 resumed" in grown.stdout
    client, parents, children = _runs(tmp_path)
    assert len(parents) == 1 and len(children) == 6
    report = load_sweep(client, "sweep", parents[0].info.run_id)
    assert report.finished.groupby("group").size().to_dict() == {
        "model.pooling=avg": 3, "model.pooling=max": 3,
    }  # fmt: skip
    # The same study again, reusing: nothing trains and it finds the same numbers.
    again = _sweep(tmp_path, *grid[:1], "seed=0,1,2", grid[2], "sweep.reuse=true")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "this start: 0 trained, 0 kept, 0 resumed, 0 retried, 6 reused" in again.stdout
    client, parents, children = _runs(tmp_path)
    first, second = sorted(parents, key=lambda r: r.info.start_time)
    reused = load_sweep(client, "sweep", second.info.run_id)
    assert reused.finished.groupby("group")["val_acc"].mean().to_dict() == (
        report.finished.groupby("group")["val_acc"].mean().to_dict()
    )
    assert (
        client.get_run(second.info.run_id).data.tags["best.val_acc_mean"]
        == (client.get_run(first.info.run_id).data.tags["best.val_acc_mean"])
    )
    # Both studies pooled: each reused copy counts once, as the run that trained it.
    both = load_sweep(client, "sweep", f"{first.info.run_id},{second.info.run_id}")
    assert set(both.finished["run_id"]) == set(report.finished["run_id"])
    assert both.finished.groupby("group").size().to_dict() == {
        "model.pooling=avg": 3, "model.pooling=max": 3,
    }  # fmt: skip


@pytest.mark.slow
def test_a_continued_sweep_killed_while_reopening_and_between_jobs_still_finishes(
    tmp_path: Path,
) -> None:
    """SIGKILL a continued sweep just after it reopened its parent, then again once a job of
    it finished: each later ``sweep.resume=latest`` goes on, and the study ends whole."""
    first = _sweep(tmp_path, "seed=0,1", "trainer.max_epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    grown = ["seed=0,1,2,3", "trainer.max_epochs=1", "sweep.resume=latest"]

    def parent_running() -> bool:
        _, parents, _ = _runs(tmp_path)
        return parents[0].info.status == "RUNNING"

    def seed_2_finished() -> bool:
        _, _, children = _runs(tmp_path)
        return any(r.info.run_name == "s2" and r.info.status == "FINISHED" for r in children)

    for killed_when, what in ((parent_running, "the parent reopened"), (seed_2_finished, "s2")):
        _kill_when(tmp_path, grown, killed_when, what)
        client, parents, _ = _runs(tmp_path)
        assert [p.info.status for p in parents] == ["RUNNING"]  # left so by the SIGKILL
    done = _sweep(tmp_path, *grown)
    assert done.returncode == 0, done.stderr[-3000:]
    client, parents, _ = _runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    jobs = children_frame(client, parents[0].info.experiment_id, parents[0].info.run_id)
    assert sorted(jobs["tags.seed"]) == ["0", "1", "2", "3"]  # each seed once
    assert set(jobs["status"]) == {"FINISHED"}
    assert parents[0].data.tags["jobs.finished"] == "4"
    for run_id in jobs["run_id"]:
        steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
        assert sorted(steps) == list(range(3)), run_id  # 1 epoch of 3 steps, each once


@pytest.mark.slow
def test_a_continued_sweep_whose_server_dies_fails_and_continues_once_it_is_back(
    tmp_path: Path,
) -> None:
    """The tracking server goes away during a continued sweep and does not come back: the
    sweep ends non-zero and says why; once the server is back, the next sweep.resume=latest
    finishes the study with each seed once and no step logged twice."""
    server = MakeServer(f"sqlite:///{tmp_path}/server.db", tmp_path / "artifacts")
    server.wait_ready()
    on = [
        *SMALL_SWEEP,
        "trainer.max_epochs=1",
        "logger.retry_s=10",
        f"paths.log_dir={tmp_path}/logs",
    ]
    env = {"MLFLOW_TRACKING_URI": server.uri, "MLFLOW_EXPERIMENT_NAME": "sweep"}
    try:
        first = cnnlab_train("-m", *on, "seed=0", env=env)
        assert first.returncode == 0, first.stderr[-3000:]
        grow = [
            sys.executable,
            "-m",
            "cnnlab.train",
            "-m",
            *on,
            "seed=0,1,2",
            "sweep.resume=latest",
        ]
        sweep = subprocess.Popen(
            grow, cwd=REPO, env={**os.environ, **env}, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        client = MlflowClient(server.uri)
        try:
            seed_1 = lambda: any(r.info.run_name == "s1" for r in _runs_of(client))  # noqa: E731
            _wait_for(seed_1, "the job of seed 1", 600)
            server.stop()
            _, err = sweep.communicate(timeout=900)
        finally:
            if sweep.poll() is None:
                os.killpg(sweep.pid, signal.SIGKILL)
        assert sweep.returncode == 1, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("cnnlab: error:")]
        assert errors and "Traceback" not in err, err[-3000:]
        assert f"the MLflow store {server.uri} is busy or unreachable" in errors[-1]
        server = MakeServer(f"sqlite:///{tmp_path}/server.db", tmp_path / "artifacts", server.port)
        server.wait_ready()
        done = cnnlab_train("-m", *on, "seed=0,1,2", "sweep.resume=latest", env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        parents = [r for r in _runs_of(client) if r.data.tags.get("cnnlab.role") == "sweep"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        jobs = children_frame(client, parents[0].info.experiment_id, parents[0].info.run_id)
        assert sorted(jobs["tags.seed"]) == ["0", "1", "2"]  # each once (a retry is named -2)
        assert set(jobs["status"]) == {"FINISHED"}
        for run_id in jobs["run_id"]:
            steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
            assert sorted(steps) == list(range(3)), run_id
    finally:
        server.stop()


def _runs_of(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("sweep")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def _kill_when(tmp_path: Path, overrides: list[str], condition, what: str) -> None:
    env = {**os.environ, **_env(tmp_path), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "cnnlab.train", "-m", *SMALL_SWEEP, *overrides,
               f"paths.log_dir={tmp_path}/logs"]  # fmt: skip
    sweep = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_for(condition, what, 600, every=0.1)
    finally:
        os.killpg(sweep.pid, signal.SIGKILL)
        sweep.wait(timeout=60)


def _third_job_has_checkpoint(tmp_path: Path) -> bool:
    """The third job (pooling=avg, seed 0) has validated twice: a whole checkpoint exists."""
    try:
        client, _, children = _runs(tmp_path)
    except Exception:  # the store or the experiment is still being made
        return False
    third = [r for r in children if r.info.run_name == "pooling=avg-s0"]
    if not third:
        return False
    return len(client.get_metric_history(third[0].info.run_id, "val/acc")) >= 2


@pytest.mark.slow
def test_a_killed_joblib_sweep_continues_grows_and_is_reused(tmp_path: Path) -> None:
    """The same over joblib (each job in a worker process), on a fresh store: SIGKILL the
    sweep once a job has a whole checkpoint, continue it grown by a seed, then repeat the
    study with reuse."""
    joblib = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "trainer.max_epochs=6"]
    first = [*joblib, "model.head=fc,gap", "seed=0"]
    _kill_when(tmp_path, first, lambda: _validated(tmp_path, 2), "a job's second validation")
    grown = [*joblib, "model.head=fc,gap", "seed=0,1"]
    continued = _sweep(tmp_path, *grown, "sweep.resume=latest")
    assert continued.returncode == 0, continued.stderr[-3000:]
    # The other job may not have validated yet when the sweep dies: it is retried, not resumed.
    said = re.search(
        r"this start: (\d+) trained, (\d+) kept, (\d+) resumed, (\d+) retried", continued.stdout
    )
    assert said and int(said[3]) >= 1 and sum(map(int, said.groups())) == 4, continued.stdout
    client, parents, _ = _runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    jobs = children_frame(client, parents[0].info.experiment_id, parents[0].info.run_id)
    assert sorted(zip(jobs["tags.factor.model.head"], jobs["tags.seed"], strict=True)) == [
        ("fc", "0"), ("fc", "1"), ("gap", "0"), ("gap", "1"),
    ]  # fmt: skip
    assert set(jobs["status"]) == {"FINISHED"}
    for run_id in jobs["run_id"]:
        steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
        assert sorted(steps) == list(range(18)), run_id  # 6 epochs x 3, each once
    again = _sweep(tmp_path, *grown, "sweep.reuse=true")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "this start: 0 trained, 0 kept, 0 resumed, 0 retried, 4 reused" in again.stdout


def _validated(tmp_path: Path, times: int) -> bool:
    """Some job of the sweep has validated ``times`` times: a whole checkpoint exists."""
    try:
        client, _, children = _runs(tmp_path)
    except Exception:  # the store or the experiment is still being made
        return False
    return any(len(client.get_metric_history(r.info.run_id, "val/acc")) >= times for r in children)


def test_cfg_under_multirun_points_to_the_dry_run(tmp_path: Path) -> None:
    shown = cnnlab_train("-m", "seed=0,1", "--cfg", "job", env=_env(tmp_path))
    assert shown.returncode == 2 and "Traceback" not in shown.stderr, shown.stderr[-3000:]
    assert shown.stderr.strip().splitlines() == [
        "cnnlab: error: --cfg and --info show one job's config, not a sweep's: add "
        "sweep.dry_run=true to -m to list the jobs and what each would do, or drop -m to see "
        "one job's config"
    ]


def test_every_run_records_its_identity(small_cfg, tracking_uri: str) -> None:
    cfg = small_cfg(["seed=3"])
    train.run(cfg)
    _, run = only_run(tracking_uri)
    assert run.data.tags[HASH_TAG] == identity.of_job(cfg).config_hash
    assert run.data.tags[identity.GROUP_TAG] == identity.of_job(cfg).group_hash
    assert run.data.tags["cnnlab.code_version"] == identity.of_job(cfg).code


def test_the_group_identity_is_the_identity_but_the_seed(tmp_path: Path) -> None:
    def of(*overrides: str) -> identity.Identity:
        return identity.of_job(compose_train(list(overrides), tmp_path), code="c")

    seeds = of("seed=1"), of("seed=2")
    assert seeds[0].config_hash != seeds[1].config_hash
    assert seeds[0].group_hash == seeds[1].group_hash
    assert of("seed=1", "model.pooling=avg").group_hash != seeds[0].group_hash
    assert identity.identity(compose_train(["seed=1"], tmp_path), "d").group_hash != (
        seeds[0].group_hash
    )  # another code version is another group


@pytest.mark.parametrize("where", ["here", "elsewhere"])
def test_a_sweep_still_running_is_not_continued_twice(tmp_path: Path, where: str) -> None:
    """A parent RUNNING with a live process here, or RUNNING on another host (whose process
    cnnlab cannot see), is refused and left as it was."""
    client = MlflowClient(_env(tmp_path)["MLFLOW_TRACKING_URI"])
    experiment = client.create_experiment("sweep")
    alive = _process(os.getpid())  # this test's own process: alive
    if where == "elsewhere":
        alive["cnnlab.host"] = "node-elsewhere"
    parent = client.create_run(experiment, tags={"cnnlab.role": "sweep", **alive}).info.run_id
    result = cnnlab_train(
        "-m", "seed=0,1", f"sweep.resume={parent}", f"paths.log_dir={tmp_path}/logs",
        env=_env(tmp_path),
    )  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if line.startswith("cnnlab: error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    says = {
        "here": f"sweep {parent} is still running (pid {os.getpid()})",
        "elsewhere": f"sweep {parent} is RUNNING on host node-elsewhere (pid {os.getpid()}); "
        "continue it there",
    }
    assert f"sweep.resume={parent}: {says[where]}" in errors[0]
    assert client.get_run(parent).info.status == "RUNNING"
    assert len(client.search_runs([experiment])) == 1


def test_a_jobs_new_child_supersedes_its_earlier_ones_in_the_parent(tmp_path: Path) -> None:
    client, experiment, parent = _store(tmp_path)
    job = {"mlflow.parentRunId": parent, "group": "model.pooling=max", "seed": "0"}
    earlier = _child(client, experiment, parent, "FINISHED", "old", **job)
    other_seed = _child(client, experiment, parent, "FINISHED", "o", **(job | {"seed": "1"}))
    with new_run(client, experiment, "pooling=max-s0", job | {HASH_TAG: "new"}) as run:
        pass
    assert client.get_run(earlier).data.tags[SUPERSEDED_TAG] == run.run_id
    assert SUPERSEDED_TAG not in client.get_run(other_seed).data.tags
    assert SUPERSEDED_TAG not in client.get_run(run.run_id).data.tags
    # Out of the parent's jobs: the summary and the report see the new child alone.
    frame = children_frame(client, experiment, parent)
    assert sorted(frame["run_id"]) == sorted([other_seed, run.run_id])
