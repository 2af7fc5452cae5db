"""Bad input, everywhere: one clear line naming the bad value and what is allowed, exit
status 2, no traceback, and nothing recorded: the store already holding a run is left
byte for byte as it was (a problem found before training creates no run)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cnnlab import train
from tests.conftest import SMALL, cnnlab_train, compose_train, write_mnist

CASES = [
    # numbers out of range
    ("optimizer.lr=0", "optimizer.lr=0 is out of range; valid: (0, inf)"),
    ("optimizer.lr=abc", "optimizer.lr='abc' is not a number; valid: (0, inf)"),
    ("data.batch_size=-8", "data.batch_size=-8 is out of range; valid: (0, inf)"),
    ("data.val_size=100000", "data.val_size=100000 leaves"),
    ("model.dropout=1.5", "model.dropout=1.5 is out of range; valid: [0, 1)"),
    ("model.kernel_size=0", "model.kernel_size=0 is out of range; valid: [1, inf)"),
    ("model.pooling=lp model.pooling_p=0", "model.pooling_p=0.0 is out of range; valid: [1, inf)"),
    ("logger.flush_every_s=-1", "logger.flush_every_s=-1.0 is out of range; valid: [0, inf)"),
    ("trainer.max_epochs=-5", "trainer settings refused: "),
    ("label_smoothing=1", "label_smoothing=1.0 is out of range; valid: [0, 1)"),
    ("scheduler.pct_start=2", "optimizer or scheduler settings refused: "),
    ("seed=-1", "seed=-1 is out of range; valid: [0, 4294967295]"),
    ("seed=4294967296", "seed=4294967296 is out of range; valid: [0, 4294967295]"),
    ("logger.retry_s=-1", "logger.retry_s=-1.0 is out of range; valid: [0, inf)"),
    (
        "trainer.limit_train_batches=0",
        "trainer.limit_train_batches=0 is out of range; valid: (0, inf)",
    ),
    ("trainer.limit_train_batches=0.001", "trainer.limit_train_batches=0.001 leaves no training"),
    ("trainer.max_epochs=0", "the run trains no step; valid: max_epochs >= 1 or max_steps >= 1"),
    # keys appended to a typed group, which nothing would read
    ("+model.foo=1", "unknown setting model.foo; valid in model: activation, batchnorm, channels"),
    ("+data.bar=2", "unknown setting data.bar; valid in data: augment, batch_size, crop_fill"),
    ("+logger.x=1", "unknown setting logger.x; valid in logger: artifact_location, experiment"),
    # unknown names in every registry
    ("model.name=resnet", "unknown backbone 'resnet'; valid: alexnet_small, cnn, lenet5, speedrun"),
    ("model.pooling=maxx", "unknown pooling 'maxx'; valid: avg, gem, lp, max, mixed, none"),
    ("model.head=mlp", "unknown head 'mlp'; valid: fc, gap, max, nin"),
    ("model.activation=foo", "unknown activation 'foo'; valid: elu, gelu, leaky_relu, mish"),
    ("model.conv=foo", "unknown conv 'foo'; valid: depthwise_separable, grouped, standard"),
    ("data.name=svhn", "unknown dataset 'svhn'; valid: cifar10, cifar100, fashion_mnist, mnist"),
    ("+trainer.max_epoch=3", "unknown trainer argument 'max_epoch'; valid: "),
    ("trainer.accelerator=quantum", "trainer settings refused: "),
    ("trainer.precision=bogus", "trainer settings refused: "),
    (
        "trainer.strategy=ddp_spawn trainer.devices=2 trainer.accelerator=cpu",
        "trainer.strategy=ddp_spawn starts its processes with multiprocessing, which returns no",
    ),
    (
        "trainer.strategy=ddp_fork trainer.devices=2 trainer.accelerator=cpu",
        "trainer.strategy=ddp_fork starts its processes with multiprocessing",
    ),
    ("+optimizer.momentum=0.9", "optimizer or scheduler settings refused: "),
    ("optimizer._target_=torch.optim.Adamx", "Error locating target 'torch.optim.Adamx'"),
    ("callbacks.model_checkpoint.mode=maxx", "mode"),
    ("perf.compile_mode=fastest", "unknown perf.compile_mode 'fastest'; valid: default, max-"),
    ("perf.matmul_precision=low", "unknown perf.matmul_precision 'low'; valid: high, highest"),
    # shapes that collapse or are not exact
    ("model.channels=[6,16,32]", "stage3.conv1: input 4, F=5, P=0, S=1"),
    ("model.stride=2", "gives O = (28 + 2*0 - 5) / 2 + 1 = 12.5, not an integer"),
    # missing or damaged data
    ("data=cifar10 data.download=false", "missing cifar10 files in "),
    ("data.root={damaged} data.source=torchvision", "train-images-idx3-ubyte"),
    # tracking URIs
    ("logger.tracking_uri=bogus://x", "unsupported URI 'bogus://x'"),
    ("logger.tracking_uri=http://127.0.0.1:9", "the tracking server does not answer"),
    (
        "logger.experiment_name=trashed",
        "logger.experiment_name=trashed: experiment 2 of that name is in MLflow's trash",
    ),
    # resume targets
    ("resume=0123456789abcdef0123456789abcdef", "neither a checkpoint file nor a run"),
    ("resume=/no/such/last.ckpt", "resume=/no/such/last.ckpt: no such checkpoint file"),
    ("resume={killed} model.channels=[8,16]", "the config differs from run"),
    ("resume={finished}", "FINISHED; nothing to resume"),
]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A store holding a FINISHED and a KILLED run, and damaged MNIST files."""
    folder = tmp_path_factory.mktemp("recorded")
    uri = f"sqlite:///{folder}/mlflow.db"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        env.setenv("MLFLOW_EXPERIMENT_NAME", "tests")
        for name in ("finished", "killed"):
            out = folder / name
            train.run(compose_train([*SMALL, f"paths.log_dir={out}", f"paths.root_dir={out}"], out))
    client = MlflowClient(uri)
    runs = {Path(r.data.tags["hydra.output_dir"]).name: r for r in client.search_runs(["1"])}
    client.update_run(runs["killed"].info.run_id, status="KILLED")
    client.delete_experiment(client.create_experiment("trashed"))  # deleted, not purged
    damaged = write_mnist(folder / "damaged")
    images = damaged / "MNIST/raw/train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])  # truncated
    return {
        "store": str(folder / "mlflow.db"),
        "damaged": str(damaged),
        "finished": runs["finished"].info.run_id,
        "killed": runs["killed"].data.tags["checkpoint.last"],  # a checkpoint of that run
    }


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("overrides", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(
    overrides: str, expected: str, recorded: dict[str, str], tmp_path: Path, monkeypatch, capsys
) -> None:
    store = tmp_path / "mlflow.db"
    shutil.copy(recorded["store"], store)
    before = digest(store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tests")
    cfg = compose_train(
        [*SMALL, f"paths.log_dir={tmp_path}/logs", f"paths.root_dir={tmp_path}",
         *overrides.format(**recorded).split()],
        tmp_path / "run",
    )  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        train.run(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("cnnlab: error: ") and err.count("\n") == 1, err
    assert expected in err
    assert digest(store) == before  # every recorded run as it was; no new run


@pytest.mark.parametrize(
    ("override", "expected", "status"),
    [
        ("optimizer.lr=0", "cnnlab: error: optimizer.lr=0 is out of range; valid: (0, inf)", 2),
        ("model=resnet", "Could not find 'model/resnet'", 1),
        ("data=svhn", "Could not find 'data/svhn'", 1),
        ("experiment=nope", "Could not find 'experiment/nope'", 1),
        ("hydra/launcher=nope", "Could not find 'hydra/launcher/nope'", 1),
        ("model.dropot=0.3", "Key 'dropot' not in 'ModelConfig'", 1),
        ("data.source=foo", "Invalid value 'foo', expected one of [auto, torchvision, bundled]", 1),
        (
            "perf.memory_format=nhwc",
            "Invalid value 'nhwc', expected one of [auto, channels_last, contiguous]",
            1,
        ),
        ("paths.log_dir=/proc/cnnlab", "is not writable (No such file or directory)", 2),
    ],
)
def test_bad_input_on_the_command_line_exits_without_a_traceback(
    override: str, expected: str, status: int, tmp_path: Path
) -> None:
    store = tmp_path / "mlflow.db"
    log_dir = [] if override.startswith("paths.log_dir") else [f"paths.log_dir={tmp_path}/logs"]
    result = cnnlab_train(override, *log_dir, env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}"})
    assert result.returncode == status
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not store.exists()  # found before MLflow was touched: no store, no run


def test_a_corrupt_store_is_one_line_naming_it_and_is_left_alone(tmp_path: Path) -> None:
    store = tmp_path / "mlflow.db"
    store.write_bytes(b"not a database " * 100)
    before = digest(store)
    for command in (("seed=0",), ("-m", "seed=0,1")):  # a run, and a sweep
        result = cnnlab_train(
            *command,
            f"paths.log_dir={tmp_path}/logs",
            env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}"},
        )
        assert result.returncode == 2, result.stderr[-2000:]
        lines = [line for line in result.stderr.splitlines() if line.startswith("cnnlab: error:")]
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert f"logger.tracking_uri=sqlite:///{store}: the store cannot be opened" in lines[0]
        assert "file is not a database" in lines[0] and "restore it from a backup" in lines[0]
        assert "cnnlab_sweep.json" not in result.stderr
    assert digest(store) == before


def test_a_sweep_into_a_trashed_experiment_is_refused_with_the_real_cause(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment("sweep"))
    result = cnnlab_train(
        "-m", "seed=0,1", f"paths.log_dir={tmp_path}/logs",
        env={"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "sweep"},
    )  # fmt: skip
    assert result.returncode == 2
    assert "logger.experiment_name=sweep: experiment 1 of that name is in MLflow's trash" in (
        result.stderr
    )
    assert "restore it (mlflow experiments restore --experiment-id 1)" in result.stderr
    assert "cnnlab_sweep.json" not in result.stderr and "Traceback" not in result.stderr
    assert client.search_runs(["1"], run_view_type=3) == []  # ViewType.ALL: nothing created
