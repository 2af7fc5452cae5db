"""Typed configuration: the schemas Hydra composes into, and the checks run before training.

The YAML files under ``conf/`` extend the dataclasses registered here (model presets come
from :data:`cnnlab.models.PRESETS`, so they are written once), so a misspelt key or a
value of the wrong type fails when the config is composed. Range checks that a type cannot
express live in ``__post_init__`` and run when :func:`to_settings` converts the composed
config into these objects, before any data is read or any MLflow run exists.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from cnnlab.checks import ConfigError, check_choice, check_range
from cnnlab.models import PRESETS, ModelConfig, preset

# The checkout that holds conf/: cnnlab is installed editable from it (see the Makefile).
REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"


class DataSource(enum.Enum):
    """Where images come from: ``auto`` tries the torchvision files, then the bundled digits."""

    auto = "auto"
    torchvision = "torchvision"
    bundled = "bundled"


@dataclass
class DataConfig:
    name: str = "mnist"
    root: str = "data"
    source: DataSource = DataSource.auto
    download: bool = True  # fetch the torchvision files when missing (needs network)
    batch_size: int = 128
    eval_batch_size: int = 1024
    # Validation images split off the training set: a count if >= 1, else a fraction.
    val_size: float = 0.1
    split_seed: int = 0  # fixes the train/val split independently of the training seed
    # Per-batch augmentation on the model's device (training batches only): random crop with
    # 4 px padding and horizontal flip for CIFAR, small random affine for MNIST.
    augment: bool = False
    # On a GPU: the whole dataset (uint8) lives there and batches are gathered there;
    # false: each batch is copied from pinned host memory. No effect on the CPU.
    resident: bool = True

    def __post_init__(self) -> None:
        check_range("data.batch_size", self.batch_size, low=0, low_open=True)
        check_range("data.eval_batch_size", self.eval_batch_size, low=0, low_open=True)
        check_range("data.val_size", self.val_size, low=0, low_open=True)


@dataclass
class LoggerConfig:
    """MLflow tracking; MLflow's own environment variables win (see conf/logger/mlflow.yaml)."""

    tracking_uri: str = "sqlite:///mlflow.db"
    experiment_name: str = "cnnlab"
    # Where a new experiment in a local (sqlite) store keeps its artifacts.
    artifact_location: str | None = None
    run_name: str | None = None  # None: made from the model's knobs and the seed
    flush_every_s: float = 5.0  # metrics are sent in batches at most this often
    pictures: bool = True  # per-run pictures (cnnlab.pictures) as artifacts: ~2 s a run

    def __post_init__(self) -> None:
        check_range("logger.flush_every_s", self.flush_every_s, low=0)


class MemoryFormat(enum.Enum):
    """Of the model's weights and batches; ``auto`` measures which is faster (cnnlab.perf)."""

    auto = "auto"
    channels_last = "channels_last"
    contiguous = "contiguous"


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MATMUL_PRECISIONS = ("highest", "high", "medium")


@dataclass
class PerfConfig:
    """Speed settings that change no result beyond floating-point rounding (cnnlab.perf)."""

    memory_format: MemoryFormat = MemoryFormat.auto
    # torch.compile the model: measured on this project's 2-core CPU, LeNet-5 0.86-0.90x and
    # the CIFAR cnn 1.02-1.10x after a ~15 s first compile (make bench); see the README.
    compile: bool = False
    compile_mode: str = "default"
    matmul_precision: str = "high"  # float32 matmuls on a GPU (TF32 with "high")

    def __post_init__(self) -> None:
        check_choice("perf.compile_mode", self.compile_mode, COMPILE_MODES)
        check_choice("perf.matmul_precision", self.matmul_precision, MATMUL_PRECISIONS)


@dataclass
class SweepConfig:
    # Stop the sweep at the first failed job; by default it is recorded FAILED and the
    # remaining jobs run.
    fail_fast: bool = False


@dataclass
class PathsConfig:
    root_dir: str = str(REPO_ROOT)
    data_dir: str = "${paths.root_dir}/data"
    log_dir: str = "${paths.root_dir}/logs"
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class TrainConfig:
    """The whole run. ``trainer`` holds Lightning ``Trainer`` arguments as they are."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] | None = None
    trainer: dict[str, Any] = field(default_factory=dict)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: dict[str, Any] = field(default_factory=dict)
    paths: PathsConfig = field(default_factory=PathsConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    seed: int = 0
    task_name: str = "train"
    test: bool = True  # evaluate the best checkpoint on the test set after fitting
    label_smoothing: float = 0.0  # of the training loss (validation and test losses: none)
    resume: str | None = None  # an interrupted run's id or checkpoint: continue that run

    def __post_init__(self) -> None:
        if "lr" not in self.optimizer:
            raise ConfigError("optimizer.lr is missing; set a learning rate > 0")
        check_range("optimizer.lr", self.optimizer["lr"], low=0, low_open=True)
        check_range("label_smoothing", self.label_smoothing, low=0, high=1)


__all__ = [
    "ConfigError",
    "ModelConfig",
    "TrainConfig",
    "check_choice",
    "check_range",
    "register_configs",
    "to_settings",
]


def _sweep_batch(fail_fast: bool) -> int | None:
    """Jobs per launch batch: Hydra re-raises a job's failure only after its batch ends."""
    return 1 if fail_fast else None


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore: ``train_schema`` (listed first by
    conf/train.yaml) and one ``model`` group option per preset in cnnlab.models.PRESETS."""
    if not OmegaConf.has_resolver("cnnlab_sweep_batch"):
        OmegaConf.register_new_resolver("cnnlab_sweep_batch", _sweep_batch)
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    for name in PRESETS:
        store.store(group="model", name=name, node=preset(name))


def to_settings(cfg: DictConfig) -> TrainConfig:
    """Resolve and convert a composed config into checked dataclasses (runs ``__post_init__``).

    Raises:
        ConfigError: a value is out of range or unknown.
    """
    try:
        settings = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:  # e.g. an interpolation that cannot be resolved
        raise ConfigError(str(err).splitlines()[0]) from err
    assert isinstance(settings, TrainConfig)
    return settings


def compose(overrides: list[str], output_dir: str | Path) -> DictConfig:
    """``conf/train.yaml`` with ``overrides`` composed as ``python -m cnnlab.train`` would,
    with Hydra's runtime set (output folder ``output_dir``): for :func:`cnnlab.train.run`
    from Python (notebooks, benchmarks, tests)."""
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.name = "train"
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
