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
from cnnlab.tracking.continuation import REUSED_TAG
from cnnlab.tracking.identity import CODE_TAG, GROUP_TAG, HASH_TAG
from cnnlab.tracking.jobs import NOT_A_FACTOR
from cnnlab.tracking.liveness import end_dead_runs
from cnnlab.tracking.parents import PARENT_ROLE, children_frame, is_sweep_parent

# What a report compares per job, as MLflow columns -> short names.
METRICS = {
    "metrics.test/acc": "test_acc",
    "metrics.val/acc_best": "val_acc",
    "metrics.time/fit_s": "fit_s",
    "metrics.time/images_per_s": "images_per_s",
}
PARAMS = {"params.model/params_total": "params", "params.model/flops": "flops"}
# What the runs were trained on and how long, for the report's context header.
SETTINGS = (
    "data/name",
    "data/source_resolved",
    "data/train_images",
    "data/val_images",
    "data/test_images",
    "model/name",
    "trainer/max_epochs",
)
UNSWEPT = "(unswept)"  # a pooled sweep's factor that a run's params do not name (a config group)


@dataclass
class Sweep:
    """One sweep, or several pooled (``--parent a,b``): their jobs as one study."""

    experiment_name: str
    parents: list[Run]
    factors: list[str]  # swept settings, as in the jobs' factor.<setting> tags
    jobs: pd.DataFrame  # one row per job: run_id, run_name, status, group, factors, metrics
    curves: pd.DataFrame  # run_id, group, epoch, val_acc: validation accuracy per epoch
    settings: dict[str, list[str]]  # SETTINGS -> the distinct values of the FINISHED runs

    @property
    def parent(self) -> Run:
        """The sweep the report is attached to: the first one named."""
        return self.parents[0]

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
        if not is_sweep_parent(run):
            raise ConfigError(
                f"--parent {parent}: run {run.info.run_name!r} is not a sweep's parent run "
                "(the MLflow UI shows a sweep's parent with its jobs nested under it)"
            )
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
    """The sweep ``parent`` names (a run id or ``latest``), or the sweeps of a comma-separated
    list of ids pooled into one study (:func:`pooled`)."""
    found = [find_parent(client, experiment, which) for which in _named(parent)]
    parents = _ended_if_dead(client, [run for _, run in found])
    frames = [children_frame(client, p.info.experiment_id, p.info.run_id) for p in parents]
    factors = list(dict.fromkeys(factor for p in parents for factor in _factors_of(p)))
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if len(parents) > 1:
        frame = pooled(frame, factors)
    jobs = _jobs(frame, factors)
    name = "+".join(dict.fromkeys(experiment_name for experiment_name, _ in found))
    return Sweep(name, parents, factors, jobs, _curves(client, jobs), _settings(frame))


def _named(parent: str) -> list[str]:
    named = [which.strip() for which in parent.split(",")]
    if "" in named or len(set(named)) < len(named) or (len(named) > 1 and "latest" in named):
        raise ConfigError(
            f"--parent {parent!r}: give one run id, latest, or several distinct run ids a,b"
        )
    return named


def _ended_if_dead(client: MlflowClient, parents: list[Run]) -> list[Run]:
    """The parents as the store has them once the dead runs of their experiments are ended
    (their sweep, or some of its jobs, died here): one search per experiment."""
    running = {p.info.experiment_id for p in parents if p.info.status == "RUNNING"}
    ended = {experiment for experiment in running if end_dead_runs(client, experiment)}
    return [
        client.get_run(p.info.run_id)
        if p.info.status == "RUNNING" and p.info.experiment_id in ended
        else p
        for p in parents
    ]


def _factors_of(parent: Run) -> list[str]:
    tagged = parent.data.tags.get("cnnlab.factors", "").split(",")
    return [factor for factor in tagged if factor and factor not in NOT_A_FACTOR]


def pooled(frame: pd.DataFrame, factors: list[str]) -> pd.DataFrame:
    """The children of several sweeps as one study. A group is a ``cnnlab.group_hash`` (the
    configuration and code but the seed), named by the factors of all the sweeps: a factor a
    sweep did not sweep takes its run's setting, from its params. One configuration and seed
    (one ``cnnlab.config_hash``) counts once, as the run that trained it: a copy a sweep
    reused, or a repeat, is left out. Two groups with one name are refused: their runs differ
    in a setting that is not a factor, or in code."""
    missing = frame[_column(frame, f"tags.{GROUP_TAG}").isna()]
    if not missing.empty:
        raise ConfigError(
            f"run {missing['run_id'].iloc[0]} has no {GROUP_TAG} tag (it predates run "
            "identities), so it cannot be pooled by configuration; report its sweep alone"
        )
    frame = frame.copy()
    for factor in factors:
        column = f"tags.factor.{factor}"
        setting = _column(frame, f"params.{factor.replace('.', '/')}")
        frame[column] = _column(frame, column).fillna(setting)
    values = frame[[f"tags.factor.{factor}" for factor in factors]].fillna(UNSWEPT).astype(str)
    rows = values.itertuples(index=False)
    named = [",".join(f"{f}={v}" for f, v in zip(factors, row, strict=True)) for row in rows]
    names = pd.Series(named, index=frame.index)
    frame["tags.group"] = names.groupby(frame[f"tags.{GROUP_TAG}"]).transform("first")
    _refuse_mixed_groups(frame)
    return _trained_once(frame)


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    """``frame[name]``, or an empty column where no run has that tag or param."""
    return frame[name] if name in frame else pd.Series(index=frame.index, dtype=object)


def _refuse_mixed_groups(frame: pd.DataFrame) -> None:
    for group, runs in frame.groupby("tags.group"):
        if runs[f"tags.{GROUP_TAG}"].nunique() < 2:
            continue
        differ = [
            column.removeprefix("params.").removeprefix("tags.")
            for column in [
                *frame.columns[frame.columns.str.startswith("params.")],
                f"tags.{CODE_TAG}",
            ]
            if column in runs and runs[column].astype(str).nunique() > 1
        ]
        raise ConfigError(
            f"the sweeps cannot be pooled: group {group or '(one configuration)'} holds runs of "
            f"different configurations (they differ in {', '.join(differ) or 'settings'}); "
            "report each sweep alone"
        )


def _trained_once(frame: pd.DataFrame) -> pd.DataFrame:
    done = frame["status"] == "FINISHED"
    origin = _column(frame, f"tags.{REUSED_TAG}").isna()
    finished = frame[done].assign(_copy=~origin[done]).sort_values(["_copy", "start_time"])
    kept = finished.drop_duplicates(f"tags.{HASH_TAG}").drop(columns="_copy")
    return pd.concat([kept, frame[~done]]).sort_values("start_time").reset_index(drop=True)


def _jobs(frame: pd.DataFrame, factors: list[str]) -> pd.DataFrame:
    columns = ["run_id", "run_name", "status", "group", "seed", *factors, *METRICS.values()]
    columns += list(PARAMS.values())
    if frame.empty:
        return pd.DataFrame(columns=columns)
    jobs = pd.DataFrame(
        {
            "run_id": frame["run_id"],
            "run_name": frame.get("tags.mlflow.runName"),
            "status": frame["status"],
            "group": frame.get("tags.group", pd.Series("", index=frame.index)).fillna(""),
            "seed": frame.get("tags.seed", pd.Series(index=frame.index, dtype=object)),
        }
    )
    for factor in factors:
        jobs[factor] = frame.get(f"tags.factor.{factor}")
    for source, target in METRICS.items():
        jobs[target] = pd.to_numeric(frame.get(source), errors="coerce")
    for source, target in PARAMS.items():
        jobs[target] = pd.to_numeric(frame.get(source), errors="coerce")
    return jobs[columns].reset_index(drop=True)


def _settings(frame: pd.DataFrame) -> dict[str, list[str]]:
    finished = frame[frame["status"] == "FINISHED"] if "status" in frame else frame
    found = {}
    for name in SETTINGS:
        column = finished.get(f"params.{name}")
        found[name] = [] if column is None else sorted(column.dropna().astype(str).unique())
    return found


def _curves(client: MlflowClient, jobs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for job in jobs.itertuples():
        history = sorted(client.get_metric_history(job.run_id, "val/acc"), key=lambda m: m.step)
        rows += [(job.run_id, job.group, epoch, m.value) for epoch, m in enumerate(history)]
    return pd.DataFrame(rows, columns=["run_id", "group", "epoch", "val_acc"])
