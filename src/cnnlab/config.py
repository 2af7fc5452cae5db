"""Typed configuration: the schemas Hydra composes into, and the checks run before training.

The YAML files under ``conf/`` extend these dataclasses (registered by cnnlab.compose; the
data's and the model's own live with them, in cnnlab.data.config and cnnlab.models), so a
misspelt key or a value of the wrong type fails when the config is composed. Range checks
that a type cannot express live in ``__post_init__`` and run when :func:`to_settings`
converts the composed config into these objects, before any data is read or any MLflow run
exists.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cnnlab.checks import ConfigError, check_choice, check_range
from cnnlab.data.config import CROP_FILLS, FLIPS, DataConfig, DataSource
from cnnlab.models import ModelConfig
from cnnlab.models.tta import TTA

# The checkout that holds conf/: cnnlab is installed editable from it (see the Makefile).
REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"


@dataclass
class LoggerConfig:
    """MLflow tracking; MLflow's own environment variables win (see conf/logger/mlflow.yaml)."""

    tracking_uri: str = "sqlite:///mlflow.db"
    experiment_name: str = "cnnlab"
    # Where a new experiment in a local (sqlite) store keeps its artifacts.
    artifact_location: str | None = None
    run_name: str | None = None  # None: made from the model's knobs and the seed
    flush_every_s: float = 5.0  # metrics are sent in batches at most this often
    # How long a write waits in all for a busy (locked) or unreachable store before the run
    # fails; what was not sent stays in the run's folder for resume= (cnnlab.tracking.retry).
    retry_s: float = 180.0
    pictures: bool = True  # per-run pictures (cnnlab.pictures) as artifacts: ~2 s a run
    # The tested model as MLflow's pytorch flavor (runs:/<id>/model, torch.export): ~0.5-2.5 s
    log_model: bool = False
    # CPU, memory, disk, network (NVIDIA GPU with nvidia-ml-py) as system/* metrics, sampled
    # every system_metrics_every_s seconds by a thread of MLflow's: ~8 ms of CPU a sample and
    # ~30 ms a run (measured on a sqlite store), so on by default
    system_metrics: bool = True
    system_metrics_every_s: float = 10.0

    def __post_init__(self) -> None:
        check_range("logger.flush_every_s", self.flush_every_s, low=0)
        check_range(
            "logger.system_metrics_every_s", self.system_metrics_every_s, low=0, low_open=True
        )
        check_range("logger.retry_s", self.retry_s, low=0)


class MemoryFormat(enum.Enum):
    """Of the model's weights and batches; ``auto`` measures which is faster
    (cnnlab.training.perf)."""

    auto = "auto"
    channels_last = "channels_last"
    contiguous = "contiguous"


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MATMUL_PRECISIONS = ("highest", "high", "medium")


@dataclass
class PerfConfig:
    """Speed settings that change no result beyond floating-point rounding
    (cnnlab.training.perf)."""

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
    """How a multirun treats its jobs (README "Continue a sweep"); none is in a job's
    identity (cnnlab.tracking.identity)."""

    # Stop the sweep at the first failed job; by default it is recorded FAILED and the
    # remaining jobs run.
    fail_fast: bool = False
    # Continue the sweep of that parent run id (or the newest, "latest"): its FINISHED jobs
    # are kept, KILLED ones continue from their checkpoint, FAILED ones run again.
    resume: str | None = None
    retry_failed: bool = True  # with resume: run a FAILED job again (false: leave it FAILED)
    # Take the result of a FINISHED run of the same identity anywhere in the experiment
    # instead of training it again. Off: the data files are not in the identity, so a
    # study reusing another's runs trusts that both read the same files.
    reuse: bool = False
    dry_run: bool = False  # list the jobs and what each would do; train nothing
    # A tree with uncommitted changes counts as its commit (default: as its own version).
    ignore_dirty: bool = False
    # A registered model name: every job logs its model (logger.log_model), and the best
    # group's best run becomes a new version of that model with the alias "best".
    register_best: str | None = None

    def __post_init__(self) -> None:
        if self.register_best is not None and not MODEL_NAME.fullmatch(self.register_best):
            raise ConfigError(
                f"sweep.register_best={self.register_best!r}: not a model name for "
                "models:/<name>@best; valid: letters, digits, '.', '_' and '-'"
            )


@dataclass
class PathsConfig:
    root_dir: str = str(REPO_ROOT)
    data_dir: str = "${paths.root_dir}/data"
    log_dir: str = "${paths.root_dir}/logs"
    output_dir: str = "${hydra:runtime.output_dir}"


SEED_MAX = 2**32 - 1
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a name models:/ URIs take as it is


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
    # Test-time augmentation of validation and test predictions: none | flip (the mirror
    # image too) | flip_translate (and both moved 1 px: six views, airbench's level 2)
    tta: str = "none"
    resume: str | None = None  # an interrupted run's id or checkpoint: continue that run

    def __post_init__(self) -> None:
        if "lr" not in self.optimizer:
            raise ConfigError("optimizer.lr is missing; set a learning rate > 0")
        check_range("optimizer.lr", self.optimizer["lr"], low=0, low_open=True)
        check_range("label_smoothing", self.label_smoothing, low=0, high=1)
        check_choice("tta", self.tta, TTA)
        # The seeds NumPy takes, as Lightning's seed_everything checks them (it raises a bare
        # ValueError mid-setup otherwise).
        check_range("seed", self.seed, low=0, high=SEED_MAX, high_open=False)


__all__ = [
    "CROP_FILLS",
    "FLIPS",
    "ConfigError",
    "DataConfig",
    "DataSource",
    "ModelConfig",
    "TrainConfig",
    "check_choice",
    "check_range",
    "to_settings",
]


def to_settings(cfg: DictConfig) -> TrainConfig:
    """Resolve and convert a composed config into checked dataclasses (runs ``__post_init__``).

    Raises:
        ConfigError: a value is out of range or unknown.
    """
    check_known_keys(cfg)
    try:
        settings = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:  # e.g. an interpolation that cannot be resolved
        raise ConfigError(str(err).splitlines()[0]) from err
    assert isinstance(settings, TrainConfig)
    return settings


def check_known_keys(node: DictConfig, prefix: str = "") -> None:
    """Refuse a key a typed node does not have (``+model.foo=1``): Hydra's ``+`` adds it even
    to a structured config, where nothing would read it, yet it would be logged as a param.

    Raises:
        ConfigError: naming the key and the valid ones.
    """
    schema = OmegaConf.get_type(node)
    fields = (
        {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    )
    for key in node:
        name = f"{prefix}{key}"
        if fields is not None and key not in fields:
            raise ConfigError(
                f"unknown setting {name}; valid in {prefix.rstrip('.') or 'the config'}: "
                + ", ".join(sorted(fields))
            )
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            check_known_keys(child, f"{name}.")
