"""Lightning's MLFlowLogger, made to batch metrics and to leave the run's end to cnnlab."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from mlflow import MlflowClient
from mlflow.entities import Metric

from cnnlab.tracking import retry
from cnnlab.tracking.runs import redact_uri

# MLflow takes at most this many metrics in one log_batch call.
MAX_METRICS_PER_BATCH = 1000
# In the run's output folder: the metrics a store that stayed down did not take.
UNSENT_FILE = "unsent_metrics.jsonl"


class BatchedMLFlowLogger(MLFlowLogger):
    """Logs into a run cnnlab opened (:class:`cnnlab.tracking.TrackedRun`), sending metrics
    in batches.

    It is built with the Trainer, before the run exists (every setting is checked before a
    run is created), and is told the run when it opens (:meth:`open`); only global rank 0
    opens it: on the other DDP ranks it stays closed and Lightning's ``rank_zero_only``
    keeps them from logging.

    The stock logger sends one ``log_batch`` per logging step (about 7-8 ms each on a
    sqlite store, against ~3 ms for a LeNet-5 step) and ends the run in ``finalize``, before
    the test stage. Here metrics wait in memory and go out at most every ``flush_every_s``
    seconds, at the end of each stage (``finalize``), or when the buffer is full; the run's
    status is set by :class:`cnnlab.tracking.TrackedRun`.

    A busy or unreachable store is retried for ``retry_s`` (cnnlab.tracking.retry); if it
    stays down, what was buffered is written to ``unsent`` (a JSON line per metric) before
    the error goes on, so nothing measured is lost: ``resume=`` sends it (:func:`send_unsent`).
    """

    def __init__(
        self,
        tracking_uri: str,
        flush_every_s: float = 5.0,
        logged: Mapping[str, int] | None = None,
        retry_s: float = retry.DEFAULT_RETRY_S,
        unsent: Path | None = None,
    ) -> None:
        """``logged``: the last step of each metric the run has already (a resumed run)."""
        super().__init__(tracking_uri=tracking_uri, log_model=False)
        self.retry_s = retry_s
        self.unsent = unsent
        self.flush_every_s = flush_every_s
        self.logged = dict(logged or {})
        self._pending: list[Metric] = []
        self._last_flush = time.monotonic()

    def open(self, run_id: str, experiment_id: str) -> None:
        """Log into run ``run_id`` of experiment ``experiment_id`` from now on."""
        tracking_uri = self._tracking_uri
        self._mlflow_client = retry.RetryingClient(
            tracking_uri, self.retry_s, redact_uri(tracking_uri)
        )
        self._run_id, self._experiment_id = run_id, experiment_id
        self._initialized = True  # MLFlowLogger.experiment: the run is there, create none

    @property
    @rank_zero_experiment
    def experiment(self) -> MlflowClient:
        if not self._initialized:  # the run is cnnlab's to open, never the logger's
            raise RuntimeError("BatchedMLFlowLogger used before its run was opened")
        return self._mlflow_client

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now_ms, step = int(time.time() * 1000), step or 0
        # A resumed run redoes the steps after its checkpoint; those logged before the
        # interruption stay as they are, so no step appears twice.
        self._pending.extend(
            Metric(key, float(value), now_ms, step)
            for key, value in metrics.items()
            if step > self.logged.get(key, -1)
        )
        due = time.monotonic() - self._last_flush >= self.flush_every_s
        if due or len(self._pending) >= MAX_METRICS_PER_BATCH:
            self.flush()

    @rank_zero_only
    def flush(self) -> None:
        try:
            while self._pending:
                batch = self._pending[:MAX_METRICS_PER_BATCH]
                self.experiment.log_batch(self.run_id, metrics=batch)
                del self._pending[: len(batch)]
        except retry.StoreUnavailable:
            self._keep_unsent()
            raise
        self._last_flush = time.monotonic()

    def _keep_unsent(self) -> None:
        if self.unsent is None or not self._pending:
            return
        self.unsent.parent.mkdir(parents=True, exist_ok=True)
        with self.unsent.open("a") as file:
            for metric in self._pending:
                record = {"key": metric.key, "value": metric.value}
                record |= {"timestamp": metric.timestamp, "step": metric.step}
                file.write(json.dumps(record) + "\n")
            file.flush()
        self._pending.clear()  # on disk now: never sent twice from here

    def log_hyperparams(self, params: Any) -> None:
        """Nothing: the run's params are its resolved config, which cnnlab records itself
        (tracking.record.record_setup). The module's hyperparameters describe the same model
        again (for ``load_from_checkpoint``), and a second spelling of one param would be
        refused by MLflow, whose params cannot change."""

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        # Everything up to a checkpoint is in the store before training goes on: a run
        # killed outright (SIGKILL) and resumed from it misses no step.
        self.flush()

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        self.flush()


def unsent_steps(path: Path) -> dict[str, int]:
    """The last step of each metric in an unsent file (``path``; {} when there is none):
    once sent, the run has those steps, and a resume must not log them again."""
    steps: dict[str, int] = {}
    for record in _unsent(path):
        steps[record.key] = max(record.step, steps.get(record.key, -1))
    return steps


def _unsent(path: Path) -> list[Metric]:
    """The metrics of an unsent file; a line cut short by a kill while it was written is
    skipped."""
    if not path.is_file():
        return []
    metrics = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        metrics.append(Metric(record["key"], record["value"], record["timestamp"], record["step"]))
    return metrics


def send_unsent(client: MlflowClient, run_id: str, path: Path) -> int:
    """Log the metrics a store that was down did not take (the file ``path``) into run
    ``run_id``, then remove the file; returns how many were sent.

    A batch can reach the store while its answer is lost (a server stopped mid-request), and
    a resume can be killed between sending and removing the file; so what the run already
    holds (same metric, step and timestamp) is left out, and sending twice logs nothing twice.
    """
    if not path.is_file():
        return 0
    metrics = _unsent(path)
    held = {
        (kept.key, kept.step, kept.timestamp)
        for key in {metric.key for metric in metrics}
        for kept in client.get_metric_history(run_id, key)
    }
    metrics = [m for m in metrics if (m.key, m.step, m.timestamp) not in held]
    for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])
    path.unlink()
    return len(metrics)
