"""Read a sweep back from MLflow: its parent run, one row per job, validation curves.

Everything comes from the tracking store (never from training logs), so a report can be made
on any machine that reaches the store, also while the sweep is still running.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run

from cnnlab.checks import ConfigError
from cnnlab.tracking.runs import end_dead_runs
from cnnlab.tracking.sweep import NOT_A_FACTOR, PARENT_ROLE, children_frame

# What a report compares per job, as MLflow columns -> short names.
METRICS = {
    "metrics.test/acc": "test_acc",
    "metrics.val/acc_best": "val_acc",
    "metrics.time/fit_s": "fit_s",
    "metrics.time/images_per_s": "images_per_s",
}
PARAMS = {"params.model/params_total": "params", "params.model/flops": "flops"}


@dataclass
class Sweep:
    experiment_name: str
    parent: Run
    factors: list[str]  # swept settings, as in the jobs' factor.<setting> tags
    jobs: pd.DataFrame  # one row per job: run_id, run_name, status, group, factors, metrics
    curves: pd.DataFrame  # run_id, group, epoch, val_acc: validation accuracy per epoch

    @property
    def finished(self) -> pd.DataFrame:
        return self.jobs[self.jobs["status"] == "FINISHED"]


def find_parent(client: MlflowClient, experiment: str | None, parent: str) -> tuple[str, Run]:
    """The sweep's parent run: ``parent`` is a run id or ``latest`` (the newest sweep of
    ``experiment``, or of all experiments when it is None)."""
    if parent != "latest":
        try:
            run = client.get_run(parent)
        except mlflow.exceptions.MlflowException as error:
            raise ConfigError(f"--parent {parent}: no such run in the store") from error
        return client.get_experiment(run.info.experiment_id).name, run
    experiments = client.search_experiments()
    if experiment is not None:
        names = sorted(e.name for e in experiments)
        experiments = [e for e in experiments if e.name == experiment]
        if not experiments:
            raise ConfigError(
                f"--experiment {experiment!r} is not in the store; valid: {', '.join(names)}"
            )
    ids = [e.experiment_id for e in experiments]
    found = client.search_runs(ids, PARENT_ROLE, order_by=["attributes.start_time DESC"])
    if not found:
        where = f"experiment {experiment!r}" if experiment else "the store"
        raise ConfigError(f"no sweep in {where}: run one with python -m cnnlab.train -m ...")
    run = found[0]
    return client.get_experiment(run.info.experiment_id).name, run


def load_sweep(client: MlflowClient, experiment: str | None, parent: str = "latest") -> Sweep:
    name, parent_run = find_parent(client, experiment, parent)
    parent_id = parent_run.info.run_id
    if parent_run.info.status == "RUNNING" and end_dead_runs(client, parent_run.info.experiment_id):
        parent_run = client.get_run(parent_id)  # its sweep, or some of its jobs, died here
    frame = children_frame(client, parent_run.info.experiment_id, parent_id)
    tagged = parent_run.data.tags.get("cnnlab.factors", "").split(",")
    factors = [factor for factor in tagged if factor and factor not in NOT_A_FACTOR]
    jobs = _jobs(frame, factors)
    return Sweep(name, parent_run, factors, jobs, _curves(client, jobs))


def _jobs(frame: pd.DataFrame, factors: list[str]) -> pd.DataFrame:
    columns = ["run_id", "run_name", "status", "group", *factors, *METRICS.values()]
    columns += list(PARAMS.values())
    if frame.empty:
        return pd.DataFrame(columns=columns)
    jobs = pd.DataFrame(
        {
            "run_id": frame["run_id"],
            "run_name": frame.get("tags.mlflow.runName"),
            "status": frame["status"],
            "group": frame.get("tags.group", pd.Series("", index=frame.index)).fillna(""),
        }
    )
    for factor in factors:
        jobs[factor] = frame.get(f"tags.factor.{factor}")
    for source, target in METRICS.items():
        jobs[target] = pd.to_numeric(frame.get(source), errors="coerce")
    for source, target in PARAMS.items():
        jobs[target] = pd.to_numeric(frame.get(source), errors="coerce")
    return jobs[columns].reset_index(drop=True)


def _curves(client: MlflowClient, jobs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for job in jobs.itertuples():
        history = sorted(client.get_metric_history(job.run_id, "val/acc"), key=lambda m: m.step)
        rows += [(job.run_id, job.group, epoch, m.value) for epoch, m in enumerate(history)]
    return pd.DataFrame(rows, columns=["run_id", "group", "epoch", "val_acc"])
