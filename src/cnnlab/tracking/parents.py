"""A sweep's parent run read back: found by id or as the latest, told apart from its
children, and its children framed as ``mlflow.search_runs`` frames them."""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from cnnlab.checks import ConfigError, redact_uri
from cnnlab.tracking import retry
from cnnlab.tracking.continuation import SUPERSEDED_TAG
from cnnlab.tracking.fluent import fluent_store

PARENT_ROLE = "tags.`cnnlab.role` = 'sweep'"


def is_sweep_parent(run: Run) -> bool:
    """The run is a sweep's parent (what PARENT_ROLE finds in a search)."""
    return run.data.tags.get("cnnlab.role") == "sweep"


def children_frame(client: MlflowClient, experiment_id: str, parent_run_id: str) -> pd.DataFrame:
    """The parent's child runs as ``mlflow.search_runs`` frames them, oldest first, from
    ``client``'s store; the caller's global tracking URI is left as it was."""
    retry_s, where = retry.bound_of(client)
    with fluent_store(client.tracking_uri):
        frame = retry.call(
            mlflow.search_runs,
            [experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
            order_by=["attributes.start_time ASC"],
            retry_s=retry_s,
            where=where,
        )
    superseded = f"tags.{SUPERSEDED_TAG}"  # a job run again counts once, as its newest child
    return frame[frame[superseded].isna()] if superseded in frame else frame


def find_parent(client: MlflowClient, experiment_id: str, which: str) -> Run:
    """The parent run ``sweep.resume=which`` names in the experiment: an id, or ``latest``."""
    if which == "latest":
        found = client.search_runs(
            [experiment_id], PARENT_ROLE, order_by=["attributes.start_time DESC"], max_results=1
        )
        if not found:
            raise ConfigError(
                "sweep.resume=latest: this experiment has no sweep to continue; "
                "run the sweep without sweep.resume"
            )
        return found[0]
    try:
        run = client.get_run(which)
    except MlflowException:
        run = None
    if run is None or not is_sweep_parent(run) or (run.info.experiment_id != experiment_id):
        raise ConfigError(
            f"sweep.resume={which}: not the parent run of a sweep in experiment {experiment_id} "
            f"of {redact_uri(client.tracking_uri)}; valid: a sweep's parent run id, or latest"
        )
    return run
