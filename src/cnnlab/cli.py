"""What the command-line entry points share: user errors end in one line, not a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from lightning.fabric.utilities.exceptions import MisconfigurationException
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from cnnlab.checks import ConfigError, check_writable
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
    MlflowException,
)


def one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def fail(error: BaseException) -> NoReturn:
    """Print ``error`` as one line and exit with status 2 (``HYDRA_FULL_ERROR=1``: re-raise)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"cnnlab: error: {one_line(error)}", file=sys.stderr)
    sys.exit(2)


@contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except USER_ERRORS as error:
        fail(error)


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
