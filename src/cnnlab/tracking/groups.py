"""The sweep's group table: one row per group (a configuration, over its seeds) of the
finished children, logged to the parent as an MLflow table (``groups.json``): the UI shows
it in the parent's artifacts, and ``mlflow.load_table("groups.json", run_ids=[parent])``
reads it back. The report's statistics stay in ``cnnlab.report``; this is the overview."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient

GROUPS_TABLE = "groups.json"
SCORE = "metrics.val/acc_best"  # what a sweep compares: the tested checkpoint's accuracy
TEST = "metrics.test/acc"


def group_table(jobs: pd.DataFrame) -> pd.DataFrame:
    """Of ``jobs`` (the children as ``mlflow.search_runs`` frames them): per group, its
    factors' values, how many finished runs have a score, and the score's mean, standard
    deviation (NaN for one run), minimum and maximum, with the mean test accuracy where
    tested; best mean first. Empty when no finished job has a score."""
    if not len(jobs) or SCORE not in jobs or "tags.group" not in jobs:
        return pd.DataFrame()
    done = jobs[jobs["status"] == "FINISHED"].dropna(subset=[SCORE])
    factors = [column for column in done if column.startswith("tags.factor.")]
    grouped = done.groupby("tags.group", sort=False)
    table = grouped[SCORE].agg(["count", "mean", "std", "min", "max"])
    table.columns = ["runs", "val_acc_mean", "val_acc_std", "val_acc_min", "val_acc_max"]
    if TEST in done:
        table["test_acc_mean"] = grouped[TEST].mean()
    first = grouped[factors].first().rename(columns=lambda c: c.removeprefix("tags."))
    table = first.join(table).reset_index(names="group")
    return table.sort_values("val_acc_mean", ascending=False, ignore_index=True)


def log_group_table(client: MlflowClient, run_id: str, jobs: pd.DataFrame) -> None:
    """The group table of ``jobs`` as run ``run_id``'s table ``groups.json`` (none when no
    job has a score). MLflow's ``log_table`` appends to a table the run has already (a
    resumed sweep's earlier summary): that one is replaced, in the format it wrote."""
    table = group_table(jobs)
    if not len(table):
        return
    if GROUPS_TABLE not in {artifact.path for artifact in client.list_artifacts(run_id)}:
        client.log_table(run_id, data=table, artifact_file=GROUPS_TABLE)
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / GROUPS_TABLE
        table.to_json(path, orient="split", index=False, date_format="iso")
        client.log_artifact(run_id, str(path))
