"""Hydra multiruns as one MLflow parent run with a child run per job.

:class:`SweepCallback` (listed under ``hydra.callbacks`` in conf/hydra/default.yaml) opens
the store, the experiment and the parent run before the first job, and writes them to
``<sweep dir>/cnnlab_sweep.json``; each job reads that file (:func:`job_context`), also when
it runs in another process or on another machine sharing the folder. After the last job
the parent gets its summary and ends; an interrupted sweep leaves it KILLED.
"""

from __future__ import annotations

import atexit
import json
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

from cnnlab.tracking.runs import connect, exit_on_sigterm, git_state, open_experiment, redact_uri

SWEEP_FILE = "cnnlab_sweep.json"
NOT_A_FACTOR = {"seed"}  # repeats of one configuration, not a factor under study


@dataclass(frozen=True)
class JobContext:
    """What a sweep job needs to record itself as a child of the sweep's parent run."""

    parent_run_id: str
    experiment_id: str
    factors: dict[str, str]  # swept setting -> this job's value
    seed: str

    @property
    def group(self) -> str:
        """The configuration without the seed: runs that differ only by seed share it."""
        return ",".join(f"{key}={value}" for key, value in self.factors.items())

    @property
    def run_name(self) -> str:
        parts = [f"{key.rsplit('.', 1)[-1]}={short(value)}" for key, value in self.factors.items()]
        return "-".join([*parts, f"s{self.seed}"])

    def tags(self) -> dict[str, str]:
        return {
            "mlflow.parentRunId": self.parent_run_id,
            "group": self.group,
            **{f"factor.{key}": value for key, value in self.factors.items()},
        }


def short(value: str) -> str:
    """A searched float (Optuna's 0.0016505274986537953) as 4 significant digits in names."""
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.4g}" if "." in value or "e" in value.lower() else value


def effective_grid(task_overrides: list[str], grid: dict[str, Any]) -> dict[str, str]:
    """The grid as it runs: the experiment's ``hydra.sweeper.params`` with the command
    line's overrides of the same keys, and its own sweeps, taking precedence (as in Hydra)."""
    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    effective = {key: str(value) for key, value in grid.items()}
    for override in parsed:
        if override.is_sweep_override() or override.key_or_group in effective:
            effective[override.key_or_group] = override.input_line.partition("=")[2]
    return effective


def factors_of(grid: dict[str, str]) -> list[str]:
    """The settings under study: those that take several values in ``grid``, but the seed."""
    parser = OverridesParser.create()
    return [
        key
        for key, value in grid.items()
        if key not in NOT_A_FACTOR and parser.parse_override(f"{key}={value}").is_sweep_override()
    ]


def job_context(sweep_dir: str, task_overrides: list[str], seed: int) -> JobContext | None:
    """The sweep this job (its overrides, its resolved seed) belongs to; None outside one."""
    path = Path(sweep_dir) / SWEEP_FILE
    if not path.exists():
        return None
    sweep = json.loads(path.read_text())
    values = {
        o.key_or_group: o.get_value_element_as_str()
        for o in OverridesParser.create().parse_overrides(list(task_overrides))
    }
    factors = {key: values[key] for key in sweep["factors"] if key in values}
    return JobContext(sweep["parent_run_id"], sweep["experiment_id"], factors, str(seed))


def children_frame(client: MlflowClient, experiment_id: str, parent_run_id: str) -> pd.DataFrame:
    """The parent's child runs as ``mlflow.search_runs`` frames them, oldest first, from
    ``client``'s store; the caller's global tracking URI is left as it was."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        return mlflow.search_runs(
            [experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
            order_by=["attributes.start_time ASC"],
        )
    finally:
        mlflow.set_tracking_uri(previous)


class SweepCallback(Callback):
    def __init__(self) -> None:
        self.client: MlflowClient | None = None
        self.parent_run_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        logger = config.logger
        self.client = connect(logger.tracking_uri)
        # The store and the experiment are created here, once: several processes migrating
        # a fresh sqlite store at the same time crash and leave it broken.
        experiment_id = open_experiment(
            self.client, logger.experiment_name, logger.artifact_location
        )
        params = config.hydra.sweeper.get("params")
        grid = effective_grid(
            config.hydra.overrides.task, OmegaConf.to_container(params) if params else {}
        )
        factors = factors_of(grid)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        tags = {
            "cnnlab.role": "sweep",
            "cnnlab.sweep_dir": str(sweep_dir),
            "cnnlab.grid": json.dumps(grid),
            "cnnlab.factors": ",".join(factors),
            "cnnlab.launcher": str(config.hydra.launcher.get("_target_")),
            "cnnlab.command": redact_uri(" ".join(["python -m cnnlab.train", *sys.argv[1:]])),
            **git_state(Path(config.paths.root_dir)),
        }
        name = f"sweep-{logger.experiment_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        parent = self.client.create_run(experiment_id, run_name=name, tags=tags)
        self.parent_run_id = parent.info.run_id
        (sweep_dir / SWEEP_FILE).write_text(
            json.dumps(
                {
                    "parent_run_id": self.parent_run_id,
                    "experiment_id": experiment_id,
                    "factors": factors,
                }
            )
        )
        atexit.register(self._end, "KILLED")  # interrupted: never left RUNNING
        signal.signal(signal.SIGTERM, exit_on_sigterm)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed = self._summarize(Path(config.hydra.sweep.dir))
        self._end("FINISHED")
        if failed:
            print(
                f"cnnlab: {failed} sweep job(s) FAILED; see the parent run "
                f"{self.parent_run_id} and its jobs.csv",
                file=sys.stderr,
            )
            sys.exit(1)

    def _summarize(self, sweep_dir: Path) -> int:
        """Tag the parent with the jobs' outcome and the best group; attach jobs.csv."""
        client, parent = self.client, self.parent_run_id
        experiment_id = client.get_run(parent).info.experiment_id
        jobs = children_frame(client, experiment_id, parent)
        finished = int((jobs["status"] == "FINISHED").sum()) if len(jobs) else 0
        failed = len(jobs) - finished
        summary = {
            "jobs.total": str(len(jobs)),
            "jobs.finished": str(finished),
            "jobs.failed": str(failed),
        }
        score = "metrics.val/acc_best"
        done = jobs[jobs["status"] == "FINISHED"] if score in jobs else jobs.iloc[:0]
        scores = done.dropna(subset=[score])  # a finished run without it is not compared
        if len(scores):
            means = scores.groupby("tags.group")[score].agg(["mean", "count"])
            best = means["mean"].idxmax()
            summary |= {
                "best.group": best,
                "best.val_acc_mean": f"{means.loc[best, 'mean']:.4f}",
                "best.n": str(int(means.loc[best, "count"])),
            }
        for key, value in summary.items():
            client.set_tag(parent, key, value)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "jobs.csv"
            jobs.to_csv(path, index=False)
            client.log_artifact(parent, str(path))
        # Optimizing sweepers (Optuna) write their best parameters here.
        optimized = sweep_dir / "optimization_results.yaml"
        if optimized.exists():
            client.log_artifact(parent, str(optimized))
        return failed

    def _end(self, status: str) -> None:
        if self.client is None or self.parent_run_id is None:
            return
        if self.client.get_run(self.parent_run_id).info.status == "RUNNING":
            self.client.set_terminated(self.parent_run_id, status)
        atexit.unregister(self._end)
