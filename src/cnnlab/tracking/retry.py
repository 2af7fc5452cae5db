"""Writes to a store in trouble: retried with backoff up to a bound, then one clear error.

MLflow's sqlite store gives up on a lock after its own 20 s ``busy_timeout`` (a run whose
store another process holds for 45 s ended FAILED with no metric), and its HTTP client
retries each call 7 times with a doubling backoff, so a dead server held a run for more than
15 minutes, deaf to SIGTERM (Lightning's handler only sets a flag that a retrying call never
reads). Here every call of the store goes through :func:`call`: a busy or unreachable store
is retried for at most ``retry_s`` seconds in all, a SIGTERM or Ctrl-C ends the wait at
once, and after a stop nothing waits again (the run's last writes get one try each).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import requests
from mlflow import MlflowClient
from sqlalchemy.exc import OperationalError

log = logging.getLogger("cnnlab")
T = TypeVar("T")

DEFAULT_RETRY_S = 180.0  # logger.retry_s: a busy store's lock, a server's restart
FIRST_DELAY_S, MAX_DELAY_S = 0.5, 15.0
# What a store in trouble says: sqlite's lock, a server that refuses or does not answer, a
# proxy's or server's "try later". Anything else (a bad request) fails at once.
TRANSIENT = (
    "database is locked",
    "database is busy",
    "database table is locked",
    "Max retries exceeded",
    "Connection refused",
    "Connection aborted",
    "Failed to establish a new connection",
    "Read timed out",
    "Connection reset",
    "RemoteDisconnected",
    "503",
    "502",
    "504",
    "429",
    "TEMPORARILY_UNAVAILABLE",
)

# MLflow's own HTTP retries, made short: this module's loop bounds the whole wait.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


class StoreUnavailable(RuntimeError):
    """The store stayed busy or unreachable for the whole retry bound."""


_stopping = threading.Event()  # a stop was asked for while waiting: no more waits
# Stores that stayed down for a whole bound, with what was said then: one try each now, and
# a failure there repeats that message, so the line the user reads names the real wait.
_gave_up: dict[str, str] = {}


def reset(where: str) -> None:
    """A new job's connection: its own bound again for a store given up on before."""
    _gave_up.pop(where, None)


def transient(error: BaseException) -> bool:
    if isinstance(error, StoreUnavailable):  # a bound already spent
        return False
    if isinstance(error, requests.ConnectionError | requests.Timeout):
        return True
    if isinstance(error, OperationalError) and "locked" in str(error):
        return True
    text = f"{type(error).__name__}: {error}"
    return any(marker in text for marker in TRANSIENT)


def call(function: Callable[..., T], *args: Any, retry_s: float, where: str, **kwargs: Any) -> T:
    """``function(*args, **kwargs)``, retried while the store is busy or unreachable.

    Raises:
        StoreUnavailable: still failing after ``retry_s`` seconds; names the store.
    """
    deadline = time.monotonic() + retry_s
    delay, warned = FIRST_DELAY_S, False
    while True:
        try:
            return function(*args, **kwargs)
        except Exception as error:
            if not transient(error):
                raise
            left = deadline - time.monotonic()
            if where in _gave_up:
                raise StoreUnavailable(_gave_up[where]) from error
            if _stopping.is_set() or left <= 0:
                waited = f" for {retry_s:g} s" if left <= 0 else " (stopped while waiting)"
                _gave_up[where] = (
                    f"the MLflow store {where} is busy or unreachable{waited} "
                    f"({type(error).__name__}: {_first_line(error)}); raise logger.retry_s "
                    "to wait longer"
                )
                raise StoreUnavailable(_gave_up[where]) from error
            if not warned:
                log.warning("MLflow store %s busy or unreachable; retrying for up to %.0f s "
                            "(logger.retry_s)", where, left)  # fmt: skip
                warned = True
            _wait(min(delay, left))
            delay = min(delay * 2, MAX_DELAY_S)


def _wait(seconds: float) -> None:
    """Sleep, ended at once by SIGTERM: Lightning's own handler only sets a flag, which
    nothing reads while a store call waits. In the main thread only (signals go there)."""
    if threading.current_thread() is not threading.main_thread():
        time.sleep(seconds)
        return

    def stop(signum: int, frame: Any) -> None:
        _stopping.set()
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        time.sleep(seconds)  # Ctrl-C raises KeyboardInterrupt here by itself
    except KeyboardInterrupt:
        _stopping.set()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else ""


class RetryingClient(MlflowClient):
    """An MlflowClient whose every public call goes through :func:`call` (a call made
    inside another is retried on its own; the outer one then fails at once)."""

    def __init__(self, tracking_uri: str, retry_s: float, where: str) -> None:
        """``where``: the store as error messages name it (its URI, password masked)."""
        super().__init__(tracking_uri)
        self._retry_s, self._where = retry_s, where

    def __getattribute__(self, name: str) -> Any:
        attribute = super().__getattribute__(name)
        if name.startswith("_") or not callable(attribute):
            return attribute
        retry_s, where = self._retry_s, self._where

        def retried(*args: Any, **kwargs: Any) -> Any:
            return call(attribute, *args, retry_s=retry_s, where=where, **kwargs)

        return retried


def bound_of(client: MlflowClient) -> tuple[float, str]:
    """``client``'s retry bound and its store's name: for a call made outside its methods
    (MLflow's fluent API). A plain MlflowClient's calls are tried once."""
    if isinstance(client, RetryingClient):
        return client._retry_s, client._where
    return 0.0, client.tracking_uri
