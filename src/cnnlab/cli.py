"""What the command-line entry points share: user errors end in one line, not a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig

from cnnlab import tracking
from cnnlab.checks import ConfigError, check_writable, fail
from cnnlab.data import DataError

# Raised by the checks that run before training: bad settings (ConfigError, ShapeError among
# them), bad data files, a _target_ or its arguments that Hydra cannot instantiate, a
# Trainer argument Lightning refuses, an unusable tracking store. Anything else is a bug and
# keeps its traceback.
USER_ERRORS = (
    ConfigError,
    DataError,
    InstantiationException,
    MisconfigurationException,
    *tracking.USER_ERRORS,
)


@contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except USER_ERRORS as error:
        fail(error)


SHOW_FLAGS = ("--cfg", "-c", "--info", "-i")
MULTIRUN_FLAGS = ("--multirun", "-m")


def check_flags(argv: list[str]) -> None:
    """Hydra refuses ``-m`` with ``--cfg`` in a traceback; this says what to use instead."""
    if any(a in MULTIRUN_FLAGS for a in argv) and any(a in SHOW_FLAGS for a in argv):
        fail(ConfigError(
            "--cfg and --info show one job's config, not a sweep's: add sweep.dry_run=true "
            "to -m to list the jobs and what each would do, or drop -m to see one job's config"
        ))  # fmt: skip


class OutputFolderCheck(Callback):
    """Hydra callback: the run or sweep folder must take files before Hydra makes it (it would
    fail with a traceback wall). Hydra reports callback exceptions only as warnings, so a
    bad folder ends here with one line and exit status 2."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _check(folder: str, key: str) -> None:
        try:
            check_writable(key, folder)
        except ConfigError as error:
            fail(error)
