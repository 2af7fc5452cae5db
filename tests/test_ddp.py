"""Several processes per job: DDP on the CPU with gloo, recorded as exactly one MLflow run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from tests.conftest import cnnlab_train, real_digits, run_cli, run_sweep, write_idx

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


def test_a_ddp_job_on_a_cold_cache_applies_rank_0s_memory_format_on_every_rank(
    tmp_path: Path,
) -> None:
    # Each rank timed the formats on its own clock, they could choose differently, and DDP
    # refused the model ("appears not to match strides"). The session's warm cache hid it:
    # this job gets an empty one, as a first run on a new machine has.
    uri, cold = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "cold"
    result = cnnlab_train(
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.enable_progress_bar=false",
        "perf.memory_format=auto",
        f"paths.log_dir={tmp_path}/logs",
        env={
            "MLFLOW_TRACKING_URI": uri,
            "MLFLOW_EXPERIMENT_NAME": "ddp",
            "CNNLAB_CACHE": str(cold),
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]  # DDP took every rank's model
    measured = (result.stdout + result.stderr).count("memory format:")
    assert measured == 1  # rank 0 alone measured; rank 1 took its choice
    assert len(json.loads((cold / "perf.json").read_text())) == 1
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]


def write_indexed_mnist(root: Path, count: int) -> Path:
    """Real-format MNIST files whose image i carries i in its first two pixels."""
    images, labels = real_digits(count)
    images[:, 0, 0] = np.arange(count) % 256
    images[:, 0, 1] = np.arange(count) // 256
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
    return root


def test_each_ddp_rank_gets_a_disjoint_shard_reshuffled_per_epoch(tmp_path: Path) -> None:
    root = write_indexed_mnist(tmp_path / "data", 300)
    out = tmp_path / "seen.json"
    result = run_cli(
        sys.executable, str(Path(__file__).with_name("ddp_shards.py")), str(root), str(out)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert len(ranks) == 2
    val_ids = set(ranks[0]["val/0"]) | set(ranks[1]["val/0"])
    assert len(val_ids) == 60  # the same 60-image validation set, split between the ranks
    for epoch in ("0", "1"):
        first, second = (set(rank[f"train/{epoch}"]) for rank in ranks)
        assert len(ranks[0][f"train/{epoch}"]) == len(ranks[1][f"train/{epoch}"]) == 120
        assert not first & second  # 240 training images: no padding, no overlap
        assert first | second == set(range(300)) - val_ids
    assert ranks[0]["train/0"] != ranks[0]["train/1"]  # a new order every epoch


def test_a_sweep_over_devices_gives_every_job_its_world_size_and_one_run(tmp_path) -> None:
    # 2 -> 1 crashed and 1 -> 2 trained on one process when Lightning's launcher re-ran the
    # sweep's command line and left LOCAL_RANK/WORLD_SIZE behind for the next job. The jobs
    # run 2, 1, 2, 1 devices (a grid that named one job twice would keep the second).
    result, _, parent, children = run_sweep(
        tmp_path,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.limit_train_batches=4,3",
        "trainer.devices=2,1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(children) == 4  # exactly one run per job, none from a DDP worker
    world = sorted(
        (r.data.tags["factor.trainer.devices"], r.data.params["trainer/world_size"])
        for r in children
    )
    assert world == [("1", "1"), ("1", "1"), ("2", "2"), ("2", "2")]
    assert {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert parent.data.tags["jobs.finished"] == "4"
    sweeps = list((tmp_path / "logs/train/multiruns").iterdir())
    assert len(sweeps) == 1  # no worker re-ran the sweep
    assert sorted(p.name for p in sweeps[0].iterdir() if p.is_dir()) == ["0", "1", "2", "3"]


def test_the_speedrun_recipe_under_ddp_fits_its_whitening_on_every_rank(tmp_path: Path) -> None:
    """airbench's pieces on two gloo ranks: the whitening fitted on each and rank 0's
    broadcast, lookahead on each rank's copy, the grouped optimizer, the timer; on the
    bundled digits (a DDP rank is a fresh process: CIFAR fixture files would fail their md5)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = cnnlab_train(
        "trainer=ddp", "trainer.devices=2", "trainer.max_epochs=2",
        "trainer.limit_train_batches=4", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false",
        "model=speedrun", "model.channels=[4,8,8]", "model.whiten_images=64",
        "model.whiten_bias_epochs=1", "optimizer._target_=cnnlab.training.optim.grouped_sgd",
        "+optimizer.momentum=0.85", "+optimizer.nesterov=true",
        "+optimizer.decoupled_weight_decay=true", "+optimizer.norm_bias_lr_scale=64",
        "scheduler=piecewise_linear", "data.drop_last=true", "tta=flip_translate",
        "+callbacks.lookahead._target_=cnnlab.training.lookahead.Lookahead",
        f"paths.log_dir={tmp_path}/logs",
        env={"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "ddp"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer/world_size"] == "2"
    assert {"time/train_s", "test/acc"} <= set(run.data.metrics)
