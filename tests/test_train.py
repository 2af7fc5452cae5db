"""End to end: the real config, data files and MLflow store, a few batches of training."""

from __future__ import annotations

import re
from pathlib import Path

from mlflow import MlflowClient

from cnnlab import train
from tests.conftest import REPO, SMALL, cnnlab_train, only_run, run_cli, write_cifar


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_training_on_idx_files_records_a_complete_run(
    small_cfg, mnist_root: Path, tracking_uri: str
) -> None:
    cfg = small_cfg(
        [f"data.root={mnist_root}", "data.source=torchvision", "seed=3", "logger.pictures=true"]
    )
    best_val = train.run(cfg)
    client, run = only_run(tracking_uri)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "lenet5-bn-max-fc-s3"
    assert 0.0 <= best_val <= 1.0

    params = run.data.params
    assert params["data/source"] == "torchvision"
    assert params["data/source_resolved"] == "torchvision"
    assert params["model/name"] == "lenet5" and params["model/pooling"] == "max"
    assert params["optimizer"] == "torch.optim.AdamW" and params["optimizer/lr"] == "0.003"
    assert params["model/params_total"] == params["model/params_trainable"] == "44470"
    assert params["trainer/world_size"] == "1" and params["trainer/device_type"] == "cpu"
    assert params["logger/tracking_uri"] == tracking_uri
    assert not any("_target_" in key or "_partial_" in key for key in params)

    tags = run.data.tags
    assert tags["seed"] == "3"
    assert "data.source=torchvision" in tags["overrides"]
    assert tags["version.torch"] and tags["version.lightning"] and tags["version.mlflow"]
    assert tags["hydra.output_dir"].endswith("run")
    if "mlflow.source.git.commit" in tags:
        assert tags["git.dirty"] in {"true", "false"}

    assert metric_steps(client, run.info.run_id, "train/loss") == list(range(8))
    assert len(metric_steps(client, run.info.run_id, "val/acc")) == 2  # one per epoch
    for key in (
        "val/loss",
        "time/epoch_s",
        "time/images_per_s",
        "lr-AdamW",
        "test/acc",
        "test/loss",
        "train/acc",
    ):
        assert client.get_metric_history(run.info.run_id, key), key

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "model_summary.txt", "checkpoints"} <= artifacts
    checkpoints = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert len(checkpoints) == 1 and checkpoints[0].endswith(".ckpt")
    summary = Path(client.download_artifacts(run.info.run_id, "model_summary.txt")).read_text()
    assert "[1, 6, 24, 24]" in summary and "44,470" in summary
    pictures = {a.path for a in client.list_artifacts(run.info.run_id, "pictures")}
    assert pictures == {
        f"pictures/{name}.png"
        for name in (
            "confusion_matrix",
            "learning_curves",
            "first_layer_filters",
            "feature_maps",
            "misclassified",
        )
    }


def test_training_offline_on_the_bundled_digits(
    small_cfg, tmp_path: Path, tracking_uri: str
) -> None:
    cfg = small_cfg([f"data.root={tmp_path}/no-mnist-here", "data.download=false"])
    train.run(cfg)
    _, run = only_run(tracking_uri)
    assert run.info.status == "FINISHED"
    assert run.data.params["data/source"] == "auto"
    assert run.data.params["data/source_resolved"] == "bundled"


def test_make_train_as_a_user_runs_it(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = (
        "trainer.max_epochs=1 trainer.limit_train_batches=5 trainer.limit_val_batches=2 "
        f"trainer.limit_test_batches=2 paths.log_dir={tmp_path}/logs"
    )
    result = run_cli(
        "make",
        "--no-print-directory",
        "train",
        f"ARGS={args}",
        env={"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "tests"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"test accuracy: \d+\.\d\d%", result.stdout)
    run_id = re.search(r"MLflow run: ([0-9a-f]{32})", result.stdout).group(1)
    assert "make ui" in result.stdout
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"


def test_hydra_help_and_cfg_job_work() -> None:
    shown = cnnlab_train("--cfg", "job", "model.pooling=avg")
    assert shown.returncode == 0, shown.stderr
    assert "pooling: avg" in shown.stdout and "_target_: torch.optim.AdamW" in shown.stdout
    helped = cnnlab_train("--help")
    assert helped.returncode == 0 and "Configuration groups" in helped.stdout
    assert "alexnet_small, cnn, lenet5, speedrun" in helped.stdout
    info = cnnlab_train("--info")
    assert info.returncode == 0 and "Config search path" in info.stdout


def test_readme_names_the_setup_commands() -> None:
    readme = (REPO / "README.md").read_text()
    assert "make train" in readme and "make test" in readme


def test_every_model_knob_is_a_run_param(small_cfg, tracking_uri: str) -> None:
    overrides = [
        "model=cnn",
        "model.pooling=lp",
        "model.pooling_p=3",
        "model.head=gap",
        "model.dropout2d=0.1",
        "model.residual=true",
        "model.activation=gelu",
    ]
    train.run(small_cfg(overrides))
    _, run = only_run(tracking_uri)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "cnn-bn-lp-gap-s0"
    params = run.data.params
    knobs = dict(
        name="cnn",
        pooling="lp",
        pooling_p="3.0",
        head="gap",
        dropout2d="0.1",
        residual="True",
        activation="gelu",
        channels="[32, 64]",
        conv="standard",
        groups="1",
        strict_shapes="True",
        kernel_size="3",
        padding="1",
    )
    assert {f"model/{k}": v for k, v in knobs.items()}.items() <= params.items()
    assert int(params["model/flops"]) > 0
    assert params["model/params_total"] == "68394"  # 66,026 + two 1x1 projections with BN


def test_a_run_without_validation_still_finishes(small_cfg, tracking_uri: str) -> None:
    best = train.run(small_cfg(["trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0"]))
    assert best != best  # NaN: no validation score to report
    _, run = only_run(tracking_uri)
    assert run.info.status == "FINISHED"


def test_a_plateau_scheduler_watches_the_validation_loss(small_cfg, tracking_uri: str) -> None:
    plateau = [
        "scheduler._target_=torch.optim.lr_scheduler.ReduceLROnPlateau",
        "~scheduler.max_lr",
        "~scheduler.pct_start",
        "+scheduler.patience=0",
    ]
    train.run(small_cfg(plateau))
    _, run = only_run(tracking_uri)
    assert run.info.status == "FINISHED"


def test_cifar10_with_augmentation_trains_end_to_end(
    small_cfg, tmp_path: Path, tracking_uri: str, skip_cifar_checksums
) -> None:
    root = write_cifar(tmp_path / "cifar")
    train.run(
        small_cfg(
            [
                "data=cifar10",
                f"data.root={root}",
                "data.val_size=100",
                "model=cnn",
                "data.batch_size=32",
                "data.eval_batch_size=64",
            ]
        )
    )
    _, run = only_run(tracking_uri)
    assert run.info.status == "FINISHED"
    assert run.data.params["data/name"] == "cifar10"
    assert run.data.params["data/augment"] == "True"
    assert run.data.params["model/params_total"] == "66602"


def test_a_nan_loss_stops_the_run_at_once_with_one_line(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = cnnlab_train(
        *SMALL,
        "optimizer.lr=1e12",
        "~scheduler",
        f"paths.log_dir={tmp_path}/logs",
        env={"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "tests"},
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("cnnlab: error: training loss is nan at step ")
    assert "(epoch 0, batch " in last and "learning rate 1e+12" in last
    assert "Traceback" not in result.stderr
    client, run = only_run(uri)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("NonFiniteLossError: training loss is nan at step")
    steps = metric_steps(client, run.info.run_id, "train/loss")
    assert len(steps) <= 2  # stopped at the first non-finite loss, not at the epoch's end


def test_a_seeded_deterministic_run_repeats_exactly(small_cfg, tracking_uri: str) -> None:
    for _ in range(2):
        train.run(small_cfg(["seed=5", "trainer.deterministic=true", "model.dropout=0.3"]))
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert len(runs) == 2 and {r.data.tags["seed"] for r in runs} == {"5"}
    for key in ("train/loss", "val/loss", "val/acc", "test/acc"):
        first, second = (
            [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, key)] for r in runs
        )
        assert first == second and first, key
