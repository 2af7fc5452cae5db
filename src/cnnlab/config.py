"""Typed configuration: the schemas Hydra composes into, and the checks run before training.

The YAML files under ``conf/`` extend the dataclasses registered here, so a misspelt key or a
value of the wrong type fails when the config is composed. Range checks that a type cannot
express live in ``__post_init__`` and run when :func:`to_settings` converts the composed
config into these objects, before any data is read or any MLflow run exists.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

# The checkout that holds conf/: cnnlab is installed editable from it (see the Makefile).
REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"


class ConfigError(ValueError):
    """A setting is invalid; the message names the value and what is allowed."""


def check_choice(setting: str, value: str, valid: Any) -> None:
    """Raise ConfigError unless ``value`` is one of ``valid`` (any iterable of names)."""
    names = sorted(valid)
    if value not in names:
        raise ConfigError(f"unknown {setting} {value!r}; valid: {', '.join(names)}")


def check_range(
    setting: str,
    value: float,
    *,
    low: float,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = True,
) -> None:
    """Raise ConfigError unless ``low <= value (<) high``; ``*_open`` excludes a bound."""
    too_low = value <= low if low_open else value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open or high is None else "]"
        upper = "inf" if high is None else f"{high:g}"
        raise ConfigError(
            f"{setting}={value!r} is out of range; valid: {left}{low:g}, {upper}{right}"
        )


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
    augment: bool = False

    def __post_init__(self) -> None:
        check_range("data.batch_size", self.batch_size, low=0, low_open=True)
        check_range("data.eval_batch_size", self.eval_batch_size, low=0, low_open=True)
        check_range("data.val_size", self.val_size, low=0, low_open=True)


@dataclass
class ModelConfig:
    """Knobs of every backbone; a preset in conf/model/ sets the ones it needs."""

    name: str = "lenet5"
    channels: list[int] = field(default_factory=lambda: [6, 16])
    kernel_size: int = 5
    stride: int = 1
    padding: int = 0
    convs_per_stage: int = 1
    activation: str = "relu"
    batchnorm: bool = False
    pooling: str = "max"
    pooling_kernel: int = 2
    pooling_stride: int | None = None  # None: equal to pooling_kernel
    pooling_p: float = 2.0  # power of LP pooling
    head: str = "fc"
    fc_hidden: list[int] = field(default_factory=lambda: [120, 84])
    dropout: float = 0.0  # in the head, before each linear layer
    # PyTorch floors non-integer output sizes; cnnlab refuses them unless this is false.
    strict_shapes: bool = True

    def __post_init__(self) -> None:
        check_range("model.dropout", self.dropout, low=0, high=1)
        check_range("model.pooling_p", self.pooling_p, low=1)
        check_range("model.kernel_size", self.kernel_size, low=1)
        check_range("model.stride", self.stride, low=1)
        check_range("model.padding", self.padding, low=0)
        check_range("model.convs_per_stage", self.convs_per_stage, low=1)
        check_range("model.pooling_kernel", self.pooling_kernel, low=1)
        if self.pooling_stride is not None:
            check_range("model.pooling_stride", self.pooling_stride, low=1)
        if not self.channels:
            raise ConfigError("model.channels=[] is empty; give one channel count per stage")
        for i, width in enumerate(self.channels):
            check_range(f"model.channels[{i}]", width, low=1)
        for i, width in enumerate(self.fc_hidden):
            check_range(f"model.fc_hidden[{i}]", width, low=1)


@dataclass
class LoggerConfig:
    """MLflow tracking; MLflow's own environment variables win (see conf/logger/mlflow.yaml)."""

    tracking_uri: str = "sqlite:///mlflow.db"
    experiment_name: str = "cnnlab"
    # Where a new experiment in a local (sqlite) store keeps its artifacts.
    artifact_location: str | None = None
    run_name: str | None = None  # None: made from the model's knobs and the seed
    flush_every_s: float = 5.0  # metrics are sent in batches at most this often

    def __post_init__(self) -> None:
        check_range("logger.flush_every_s", self.flush_every_s, low=0)


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
    seed: int = 0
    task_name: str = "train"
    test: bool = True  # evaluate the best checkpoint on the test set after fitting

    def __post_init__(self) -> None:
        if "lr" not in self.optimizer:
            raise ConfigError("optimizer.lr is missing; set a learning rate > 0")
        check_range("optimizer.lr", self.optimizer["lr"], low=0, low_open=True)


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore; conf/train.yaml lists ``train_schema`` first."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)


def to_settings(cfg: DictConfig) -> TrainConfig:
    """Resolve and convert a composed config into checked dataclasses (runs ``__post_init__``).

    Raises:
        ConfigError: a value is out of range or unknown.
    """
    try:
        settings = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as err:  # omegaconf's validation errors carry the key and the value
        raise ConfigError(str(err).splitlines()[0]) from err
    assert isinstance(settings, TrainConfig)
    return settings
