"""Checks shared by the config schemas, the model knobs and the data: one error type, one
message form ("<setting>=<value> is out of range; valid: [low, high)" or "unknown <kind>
...; valid: ..."), and how a user error ends: one line, an exit status, no password shown.
Imports nothing of cnnlab: every other module may use it."""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NoReturn, TypeVar

Value = TypeVar("Value")


class ConfigError(ValueError):
    """A setting is invalid; the message names the value and what is allowed."""


def lookup(
    kind: str, name: str, table: Mapping[str, Value], error: type[ValueError] = ConfigError
) -> Value:
    """``table[name]``, or ``error`` naming ``name`` and every valid one (timm's form)."""
    if name not in table:
        raise error(f"unknown {kind} {name!r}; valid: {', '.join(sorted(table))}")
    return table[name]


def check_choice(setting: str, value: str, valid: Iterable[str]) -> None:
    """Raise ConfigError unless ``value`` is one of ``valid``."""
    lookup(setting, value, dict.fromkeys(valid))


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
    left = "(" if low_open else "["
    right = ")" if high_open or high is None else "]"
    valid = f"{left}{_number(low)}, {'inf' if high is None else _number(high)}{right}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{setting}={value!r} is not a number; valid: {valid}")
    too_low = value <= low if low_open else value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ConfigError(f"{setting}={value!r} is out of range; valid: {valid}")


def _number(value: float) -> str:
    """An int exactly (a seed's bound 4294967295, not 4.29497e+09), a float briefly."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def check_writable(
    setting: str, folder: str | Path, fix: str = "set paths.log_dir to a folder you can write"
) -> None:
    """Raise ConfigError unless ``folder`` exists or can be made, and takes a file."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ConfigError(
            f"{setting}={folder} is not writable ({error.strerror}); {fix}"
        ) from error


def redact_uri(text: str) -> str:
    """Mask the password of every ``scheme://user:password@host`` in ``text``, so that none
    reaches a param, a tag or a log line."""
    return _CREDENTIALS.sub(r"\1***@", text)


_CREDENTIALS = re.compile(r"(\w[\w+.-]*://[^/:@\s]*:)[^@\s]*@")


def one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def fail(error: BaseException, status: int = 2) -> NoReturn:
    """Print ``error`` as one line and exit with ``status``: 2 for a user error, 1 for a
    failure of the world (a store that stayed down). ``HYDRA_FULL_ERROR=1``: re-raise."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"cnnlab: error: {redact_uri(one_line(error))}", file=sys.stderr)
    sys.exit(status)
