"""What the command-line entry points share: user errors end in one line, not a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from hydra.errors import InstantiationException
from lightning.fabric.utilities.exceptions import MisconfigurationException
from mlflow.exceptions import MlflowException

from cnnlab.checks import ConfigError
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
