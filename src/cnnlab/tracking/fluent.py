"""MLflow's fluent API (``mlflow.search_runs``, ``mlflow.pytorch.log_model``,
``mlflow.register_model``) pointed at one store and experiment for a block, and the
process's own setting put back after it.

The fluent API reads a process-wide tracking URI and experiment, and setting them also
writes ``MLFLOW_TRACKING_URI`` and ``MLFLOW_EXPERIMENT_ID`` into the environment; left
behind, they would outlive the block (a later job of an in-process sweep, a test) and win
over the environment a user sets. MLflow has no public way to unset them, so this is the
one place that touches its private globals.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import mlflow
import mlflow.tracking._tracking_service.utils as tracking_service
import mlflow.tracking.fluent as fluent

ENVIRONMENT = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")


@contextlib.contextmanager
def fluent_store(tracking_uri: str, experiment_id: str | None = None) -> Iterator[None]:
    """The fluent API on ``tracking_uri`` (and ``experiment_id``) inside the block only."""
    saved_uri = tracking_service._tracking_uri
    saved_experiment = fluent._active_experiment_id
    saved_environment = {name: os.environ.get(name) for name in ENVIRONMENT}
    try:
        mlflow.set_tracking_uri(tracking_uri)
        if experiment_id is not None:
            mlflow.set_experiment(experiment_id=experiment_id)
        yield
    finally:
        tracking_service._tracking_uri = saved_uri
        fluent._active_experiment_id = saved_experiment
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
