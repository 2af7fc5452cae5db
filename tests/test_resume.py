"""resume=<run id | checkpoint>: an interrupted run continues in the same MLflow run."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from cnnlab import train
from cnnlab.checks import ConfigError
from cnnlab.tracking.liveness import slurm_restarted
from cnnlab.tracking.resume import (
    CHECKPOINT_TAG,
    config_differences,
    find_target,
    requeued,
    run_id_in,
)
from tests.conftest import REPO, only_run


@pytest.fixture
def finished_run(small_cfg, tracking_uri: str):
    train.run(small_cfg(["seed=4"]))
    return only_run(tracking_uri)


def test_a_checkpoint_knows_its_run_and_a_run_its_checkpoint(finished_run) -> None:
    _, run = finished_run
    checkpoint = Path(run.data.tags[CHECKPOINT_TAG])
    assert checkpoint.name == "last.ckpt" and checkpoint.is_file()
    assert run_id_in(checkpoint) == run.info.run_id
    assert run.data.tags["cnnlab.pid"].isdigit() and run.data.tags["cnnlab.host"]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("0123456789abcdef0123456789abcdef", "neither a checkpoint file nor a run of the store"),
        ("runs/missing/last.ckpt", "no such checkpoint file"),
    ],
)
def test_a_resume_target_that_does_not_exist_is_named(finished_run, target, message) -> None:
    client, _ = finished_run
    with pytest.raises(ConfigError, match=f"resume={target}: {message}"):
        find_target(client, target)


def test_a_finished_run_is_not_resumed(finished_run) -> None:
    client, run = finished_run
    with pytest.raises(ConfigError, match="FINISHED; nothing to resume"):
        find_target(client, run.info.run_id)


def test_files_that_are_not_cnnlab_checkpoints_are_refused(finished_run, tmp_path) -> None:
    client, _ = finished_run
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(ConfigError, match="a checkpoint without an MLflow run id"):
        find_target(client, str(foreign))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        find_target(client, str(garbage))


def test_a_run_left_running_by_a_dead_process_is_marked_killed_once_it_resumes(
    finished_run, small_cfg
) -> None:
    client, run = finished_run
    run_id = run.info.run_id
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, "cnnlab.pid", str(os.getpid()))  # alive: this very process
    with pytest.raises(ConfigError, match=f"run {run_id} is still running"):
        find_target(client, run_id)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    client.set_tag(run_id, "cnnlab.pid", dead)
    target = find_target(client, run_id)
    unmarked = client.get_run(run_id)  # finding only reads
    assert unmarked.info.status == "RUNNING" and "cnnlab.died" not in unmarked.data.tags
    assert target.died == "process gone while RUNNING"
    assert target.checkpoint == Path(run.data.tags[CHECKPOINT_TAG])
    with pytest.raises(SystemExit):  # refused: the run stays as it was
        train.run(small_cfg(["seed=4", "model.dropout=0.5", f"resume={run_id}"]))
    refused = client.get_run(run_id)
    assert refused.info.status == "RUNNING" and "cnnlab.died" not in refused.data.tags
    train.run(small_cfg(["seed=4", f"resume={run_id}"]))
    resumed = client.get_run(run_id)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["cnnlab.died"] == "process gone while RUNNING"


def killed_with_a_cut_short_last_checkpoint(client: MlflowClient, run) -> Path:
    """The run KILLED by Ctrl-C (as TrackedRun records it), then its last.ckpt cut short
    (a SIGKILL while saving): the other checkpoint in its folder stays whole."""
    run_id = run.info.run_id
    client.set_tag(run_id, "error", "interrupted (KeyboardInterrupt)")
    client.set_terminated(run_id, "KILLED")
    last = Path(run.data.tags[CHECKPOINT_TAG])
    last.write_bytes(last.read_bytes()[:1000])
    return last


def test_a_cut_short_checkpoint_gives_way_to_the_newest_whole_one(finished_run, small_cfg) -> None:
    client, run = finished_run
    run_id = run.info.run_id
    last = killed_with_a_cut_short_last_checkpoint(client, run)
    (best,) = [path for path in last.parent.glob("*.ckpt") if path != last]
    assert find_target(client, run_id).checkpoint == best
    assert find_target(client, str(last)).checkpoint == best  # named as a file: the same
    train.run(small_cfg(["seed=4", f"resume={run_id}"]))
    resumed = client.get_run(run_id)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["cnnlab.resumed_from"] == str(best)


def test_a_run_without_a_whole_checkpoint_is_refused_and_left_as_it_was(
    finished_run, small_cfg, capsys
) -> None:
    client, run = finished_run
    run_id = run.info.run_id
    last = killed_with_a_cut_short_last_checkpoint(client, run)
    for path in last.parent.glob("*.ckpt"):
        if path != last:
            path.unlink()
    before = client.get_run(run_id)
    with pytest.raises(SystemExit) as exit_info:
        train.run(small_cfg(["seed=4", f"resume={run_id}"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("cnnlab: error: ") and err.count("\n") == 1, err
    assert f"{last} is cut short or unreadable, and {last.parent} holds no whole" in err
    after = client.get_run(run_id)
    assert after.info.status == "KILLED" and after.data.tags == before.data.tags


def test_a_run_resumed_after_its_final_metrics_logs_none_of_them_again(
    finished_run, small_cfg
) -> None:
    """Its process died after training, while logging the rest (artifacts, pictures)."""
    client, run = finished_run
    run_id = run.info.run_id
    before = {key: history(client, run_id, key) for key in ("time/fit_s", "val/acc_best")}
    client.set_terminated(run_id, "KILLED")
    train.run(small_cfg(["seed=4", f"resume={run_id}"]))
    assert client.get_run(run_id).info.status == "FINISHED"
    for key, logged in before.items():
        assert len(logged) == 1 and history(client, run_id, key) == logged, key
    saved = torch.load(run.data.tags[CHECKPOINT_TAG], weights_only=True)["callbacks"]
    assert 0 < saved["ResumeState"]["fit_seconds"] <= before["time/fit_s"][0][1]


def test_a_run_that_finishes_after_a_resume_keeps_no_error_of_its_interruption(
    finished_run, small_cfg
) -> None:
    client, run = finished_run
    run_id = run.info.run_id
    client.set_tag(run_id, "error", "interrupted (KeyboardInterrupt)")  # as TrackedRun does
    client.set_terminated(run_id, "KILLED")
    train.run(small_cfg(["seed=4", f"resume={run_id}"]))
    resumed = client.get_run(run_id)
    assert resumed.info.status == "FINISHED"
    assert "error" not in resumed.data.tags


def test_a_changed_setting_is_named_and_folders_are_not(finished_run, small_cfg) -> None:
    client, run = finished_run
    changed = small_cfg(["seed=4", "model.dropout=0.5", "paths.log_dir=/elsewhere"])
    assert config_differences(client, run.info.run_id, changed) == ["model/dropout: 0.2 -> 0.5"]


def test_resume_with_the_run_id_alone_takes_its_settings_and_may_train_it_longer(
    small_cfg, tracking_uri: str, capsys
) -> None:
    train.run(small_cfg(["seed=5", "model.dropout=0.3"]))  # 2 epochs, FINISHED
    client, run = only_run(tracking_uri)
    run_id = run.info.run_id
    for changed, named in (
        (["trainer.max_epochs=3", "model.dropout=0.5"], "model/dropout: 0.3 -> 0.5"),
        (["trainer.max_epochs=1"], "FINISHED; nothing to resume (a larger trainer.max_epochs"),
    ):
        with pytest.raises(SystemExit):
            train.run(small_cfg([f"resume={run_id}", *changed]))
        assert named in capsys.readouterr().err
    assert client.get_run(run_id).info.status == "FINISHED"  # refused: left as it was
    # Neither the seed nor the dropout retyped: they come from the run's own command line.
    train.run(small_cfg([f"resume={run_id}", "trainer.max_epochs=3"]))
    resumed = client.get_run(run_id)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["cnnlab.max_epochs"] == "2->3"
    assert resumed.data.params["model/dropout"] == "0.3" and resumed.data.params["seed"] == "5"
    assert [m.step for m in client.get_metric_history(run_id, "val/acc")] == [3, 7, 11]
    assert len(only_run(tracking_uri)[1].info.run_id) == len(run_id)  # still the one run


# End to end, as users run it: a run interrupted by Ctrl-C and one killed outright both
# continue to the same metrics as an uninterrupted run.
ARGS = [
    "seed=7", "trainer.deterministic=true", "trainer.max_epochs=3",
    "trainer.limit_train_batches=40", "trainer.limit_val_batches=4",
    "trainer.limit_test_batches=2", "trainer.log_every_n_steps=5",
    "trainer.enable_progress_bar=false", "logger.pictures=false", "model.dropout=0.2",
    "logger.flush_every_s=0",
]  # fmt: skip


def cnnlab(tmp_path: Path, name: str, *extra: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "MLFLOW_EXPERIMENT_NAME": "resume",
    }
    command = [sys.executable, "-m", "cnnlab.train", *ARGS, *extra,
               f"paths.log_dir={tmp_path}/logs", f"hydra.run.dir={tmp_path}/{name}"]  # fmt: skip
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def interrupt_mid_epoch(tmp_path: Path, name: str, signum: int) -> str:
    """Signal the run once its second epoch is under way (its train/loss reached step 50:
    with flush_every_s=0 every logged step is in the store at once)."""
    process = cnnlab(tmp_path, name)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if _last_step(client, tmp_path / name) >= 50:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signum)
    assert process.wait(timeout=120) != 0
    return process.stderr.read()


def _last_step(client: MlflowClient, output_dir: Path) -> int:
    experiment = client.get_experiment_by_name("resume")
    if experiment is None:
        return -1
    for run in client.search_runs([experiment.experiment_id]):
        if run.data.tags.get("hydra.output_dir") == str(output_dir):
            return max((m.step for m in client.get_metric_history(run.info.run_id, "train/loss")),
                       default=-1)  # fmt: skip
    return -1


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


@pytest.mark.slow
def test_interrupted_runs_resume_to_the_metrics_of_an_uninterrupted_one(tmp_path) -> None:
    whole = cnnlab(tmp_path, "whole")
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-3000:]
    told = interrupt_mid_epoch(tmp_path, "ctrl_c", signal.SIGINT)
    interrupt_mid_epoch(tmp_path, "killed", signal.SIGKILL)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("resume").experiment_id
    runs = {Path(r.data.tags["hydra.output_dir"]).name: r for r in client.search_runs([experiment])}
    assert runs["ctrl_c"].info.status == "KILLED"  # never left RUNNING
    assert runs["killed"].info.status == "RUNNING"  # SIGKILL: nobody could close it
    # Ctrl-C saved the state as it stood, mid-epoch 2; SIGKILL left epoch 1's.
    recorded = runs["ctrl_c"].data.tags[CHECKPOINT_TAG]
    assert recorded == str(tmp_path / "ctrl_c/checkpoints/interrupted.ckpt")
    assert torch.load(recorded, weights_only=True)["global_step"] % 40 != 0

    # Ctrl-C printed the command that continues the run: run it as printed.
    said = [line.split("continue with: ", 1)[1] for line in told.splitlines()
            if line.startswith("cnnlab: interrupted; continue with: ")]  # fmt: skip
    assert len(said) == 1, told[-3000:]
    command = said[0]
    assert command.startswith("python -m cnnlab.train ")
    assert command.endswith(f" resume={runs['ctrl_c'].info.run_id}")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "MLFLOW_EXPERIMENT_NAME": "resume"}  # fmt: skip
    by_id = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert by_id.returncode == 0, by_id.stderr[-3000:]
    by_file = cnnlab(tmp_path, "resume2", f"resume={tmp_path}/killed/checkpoints/last.ckpt")
    assert by_file.wait(timeout=600) == 0, by_file.stderr.read()[-3000:]

    assert len(client.search_runs([experiment])) == 3  # resumed in place, no new run
    reference = runs["whole"].info.run_id
    for name in ("ctrl_c", "killed"):
        run = client.get_run(runs[name].info.run_id)
        assert run.info.status == "FINISHED"
        for key in ("train/loss", "val/acc", "val/loss", "test/acc"):
            assert history(client, run.info.run_id, key) == history(client, reference, key), key
        # The whole fit's time across both starts: at least its epochs' training time.
        epochs = sum(value for _, value in history(client, run.info.run_id, "time/epoch_s"))
        ((_, fit_seconds),) = history(client, run.info.run_id, "time/fit_s")
        assert fit_seconds >= epochs, name
    assert "cnnlab.died" in client.get_run(runs["killed"].info.run_id).data.tags


def test_a_requeued_slurm_job_finds_its_run_and_newest_whole_checkpoint(
    finished_run, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, run = finished_run
    run_id, experiment_id = run.info.run_id, run.info.experiment_id
    client.set_tag(run_id, "slurm.job_id", "4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert not slurm_restarted()  # a first start continues nothing
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert slurm_restarted()
    assert requeued(client, experiment_id, []) is None  # it FINISHED: nothing to continue
    client.set_terminated(run_id, "KILLED")
    target = requeued(client, experiment_id, [])
    assert target.run_id == run_id
    assert target.checkpoint == Path(run.data.tags[CHECKPOINT_TAG])
    # Lightning's requeue handler saved a newer state in the run's folder: that one wins,
    # unless it was cut short (a SIGKILL while saving).
    folder = Path(run.data.tags["hydra.output_dir"])
    hpc = folder / "hpc_ckpt_1.ckpt"
    shutil.copy(target.checkpoint, hpc)
    os.utime(hpc, (time.time() + 5, time.time() + 5))
    assert requeued(client, experiment_id, []).checkpoint == hpc
    cut_short = folder / "hpc_ckpt_2.ckpt"
    cut_short.write_bytes(hpc.read_bytes()[:1000])
    os.utime(cut_short, (time.time() + 10, time.time() + 10))
    assert requeued(client, experiment_id, []).checkpoint == hpc
    monkeypatch.setenv("SLURM_JOB_ID", "4243")  # another job's start
    assert requeued(client, experiment_id, []) is None


def test_a_run_left_running_on_another_host_is_refused_by_name(finished_run) -> None:
    client, run = finished_run
    run_id = run.info.run_id
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, "cnnlab.host", "elsewhere")
    with pytest.raises(ConfigError, match=f"run {run_id} is RUNNING on host elsewhere; resume"):
        find_target(client, run_id)
    assert client.get_run(run_id).info.status == "RUNNING"  # untouched
