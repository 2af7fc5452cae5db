"""Checks shared by the config schemas and the model knobs: one error type, one message form
("<setting>=<value> is out of range; valid: [low, high)" or "unknown <kind> ...; valid: ...")."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path


class ConfigError(ValueError):
    """A setting is invalid; the message names the value and what is allowed."""


def check_choice(setting: str, value: str, valid: Iterable[str]) -> None:
    """Raise ConfigError unless ``value`` is one of ``valid``."""
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
    left = "(" if low_open else "["
    right = ")" if high_open or high is None else "]"
    valid = f"{left}{low:g}, {'inf' if high is None else f'{high:g}'}{right}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{setting}={value!r} is not a number; valid: {valid}")
    too_low = value <= low if low_open else value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ConfigError(f"{setting}={value!r} is out of range; valid: {valid}")


def check_writable(setting: str, folder: str | Path) -> None:
    """Raise ConfigError unless ``folder`` exists or can be made, and takes a file."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ConfigError(
            f"{setting}={folder} is not writable ({error.strerror}); "
            "set paths.log_dir to a folder you can write"
        ) from error
