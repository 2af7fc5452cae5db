"""Hydra multiruns as one MLflow parent run with a child run per job.

:class:`SweepCallback` (listed under ``hydra.callbacks`` in conf/hydra/default.yaml) opens
the store, the experiment and the parent run before the first job, and writes them to
``<sweep dir>/cnnlab_sweep.json``; each job reads that file (:func:`job_context`), also when
it runs in another process or on another machine sharing the folder. After the last job
the parent gets its summary and ends; an interrupted sweep leaves it KILLED.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import mlflow
import pandas as pd
from hydra import compose
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from cnnlab.checks import ConfigError, fail, one_line, redact_uri
from cnnlab.config import REPO_ROOT, SweepConfig, to_settings
from cnnlab.tracking import identity, retry
from cnnlab.tracking.continuation import SUPERSEDED_TAG, Action, Continuation, Decision, decide
from cnnlab.tracking.fluent import fluent_store
from cnnlab.tracking.groups import SCORE, log_group_table
from cnnlab.tracking.models import best_run_of, register_best
from cnnlab.tracking.runs import (
    MAX_TAG_CHARS,
    TrackedRun,
    connect,
    end_dead_runs,
    exit_on_sigterm,
    git_state,
    open_experiment,
    process_tags,
    run_link,
    sqlite_file,
)

SWEEP_FILE = "cnnlab_sweep.json"
OUTCOME_FILE = "cnnlab_job.json"  # in each job's folder: what the job did (Action's value)
RACING_FILE = "racing.json"  # hydra_plugins.cnnlab_racing writes it into the sweep folder
NOT_A_FACTOR = {"seed"}  # repeats of one configuration, not a factor under study


def write_outcome(output_dir: str, action: str) -> None:
    """What this sweep job did, for the sweep's closing line (also from another machine)."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OUTCOME_FILE).write_text(json.dumps({"action": action}))


def outcomes(sweep_dir: Path) -> Counter[str]:
    """How many of this start's jobs did what (trained, kept, resumed, retried, reused...)."""
    found: Counter[str] = Counter()
    for path in sweep_dir.rglob(OUTCOME_FILE):
        with contextlib.suppress(OSError, ValueError, KeyError):
            found[json.loads(path.read_text())["action"]] += 1
    return found


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
            "seed": self.seed,  # with the group, the job: what a later child of it supersedes
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
    return job_context_of(
        sweep["factors"], task_overrides, seed, sweep["parent_run_id"], sweep["experiment_id"]
    )


def job_context_of(
    factors: list[str],
    task_overrides: list[str],
    seed: int,
    parent_run_id: str = "",
    experiment_id: str = "",
) -> JobContext:
    values = {
        o.key_or_group: o.get_value_element_as_str()
        for o in OverridesParser.create().parse_overrides(list(task_overrides))
    }
    chosen = {key: values[key] for key in factors if key in values}
    return JobContext(parent_run_id, experiment_id, chosen, str(seed))


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


SAID = [action.value for action in Action]  # the closing line's counts, in this order
PARENT_ROLE = "tags.`cnnlab.role` = 'sweep'"


def is_sweep_parent(run: Run) -> bool:
    """The run is a sweep's parent (what PARENT_ROLE finds in a search)."""
    return run.data.tags.get("cnnlab.role") == "sweep"


def grid_of(config: DictConfig) -> tuple[dict[str, str], list[str]]:
    """The grid as it runs (:func:`effective_grid`) and its factors."""
    params = config.hydra.sweeper.get("params")
    grid = effective_grid(
        config.hydra.overrides.task, OmegaConf.to_container(params) if params else {}
    )
    return grid, factors_of(grid)


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


def check_sweeper(sweeper: DictConfig) -> None:
    """A sweeper of cnnlab's own (``hydra_plugins.cnnlab_*``) checks its settings here, with
    its ``check_settings``: Hydra makes the sweeper only after this callback has opened the
    store and the parent run, so a bad setting found there would leave a KILLED parent.

    Raises:
        ConfigError: a setting out of range, naming the value and the valid ones.
    """
    target = str(sweeper.get("_target_", ""))
    if not target.startswith("hydra_plugins.cnnlab_"):
        return
    module, _, name = target.rpartition(".")
    check = getattr(getattr(importlib.import_module(module), name), "check_settings", None)
    if check is not None:
        check(sweeper)


def grid_jobs(config: DictConfig) -> list[list[str]]:
    """Each job's overrides, as Hydra's basic sweeper makes them (the grid's product)."""
    target = str(config.hydra.sweeper.get("_target_", ""))
    if not target.endswith("BasicSweeper"):
        raise ConfigError(
            f"sweep.dry_run=true lists the jobs of a grid (hydra/sweeper=grid); {target} "
            "chooses its jobs as it goes"
        )
    params = config.hydra.sweeper.get("params") or {}
    lines = [f"{key}={value}" for key, value in params.items()]
    parsed = OverridesParser.create().parse_overrides([*lines, *config.hydra.overrides.task])
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def dry_run(client: MlflowClient, config: DictConfig) -> NoReturn:
    """``sweep.dry_run=true``: each job and what it would do (tracking.continuation),
    counted; nothing is created and nothing trains. Exits 0."""
    experiment = client.get_experiment_by_name(config.logger.experiment_name)
    parent = None
    if config.sweep.resume and experiment is not None:
        parent = find_parent(client, experiment.experiment_id, str(config.sweep.resume))
    _, factors = grid_of(config)
    code = identity.code_version(REPO_ROOT, dirty_is_commit=config.sweep.ignore_dirty)
    said: Counter[str] = Counter()
    for overrides in grid_jobs(config):
        cfg = compose(config.hydra.job.config_name, overrides=overrides)
        cfg.paths.output_dir = "(dry run)"  # Hydra's runtime gives each job its folder
        name = job_context_of(factors, overrides, cfg.seed).run_name
        try:
            to_settings(cfg)
        except ConfigError as error:
            said["refused"] += 1
            print(f"refused   {name}: {one_line(error)}")
            continue
        decision = Decision(Action.train)
        if experiment is not None:
            how = Continuation.of(parent.info.run_id if parent else None, cfg.sweep, cfg.trainer)
            config_hash = identity.of_job(cfg, code).config_hash
            decision = decide(client, experiment.experiment_id, config_hash, how)
        said[decision.action.value] += 1
        run = f" (run {decision.run.info.run_id})" if decision.run is not None else ""
        print(f"{decision.action.value:9} {name}{run}")
    counts = ", ".join(f"{count} {action}" for action, count in said.items())
    print(f"dry run: {sum(said.values())} jobs would be: {counts}; nothing was trained", flush=True)
    sys.exit(0)


def _store_to_continue(tracking_uri: str, which: str) -> None:
    """Refuses ``sweep.resume`` on a sqlite store that does not exist, before opening it
    would create an empty one."""
    database = sqlite_file(tracking_uri)
    if database is not None and not database.exists():
        raise ConfigError(
            f"sweep.resume={which}: no MLflow store at {database}, so no sweep to continue; "
            "point logger.tracking_uri (MLFLOW_TRACKING_URI) at the sweep's store"
        )


def _experiment_to_continue(client: MlflowClient, config: DictConfig) -> str:
    """The id of the experiment whose sweep ``sweep.resume`` continues; never creates one."""
    name = config.logger.experiment_name
    if client.get_experiment_by_name(name) is not None:  # in the trash: open says so
        return open_experiment(client, name, config.logger.artifact_location)
    names = sorted(e.name for e in client.search_experiments())
    raise ConfigError(
        f"sweep.resume={config.sweep.resume}: no experiment {name!r} in "
        f"{redact_uri(client.tracking_uri)}; valid (logger.experiment_name, "
        f"MLFLOW_EXPERIMENT_NAME): {', '.join(names) or 'none'}"
    )


class SweepCallback(Callback):
    """The sweep's parent run, from before the first job to its summary after the last.

    Hydra reports a callback's exception only as a warning and goes on (the sweep would exit
    0 with its parent left unsummarized), so every error here ends the process in one line:
    exit 2 for a store or setting the user must fix, 1 for anything else.
    """

    def __init__(self) -> None:
        self.client: MlflowClient | None = None
        self.parent_run_id: str | None = None
        self.experiment_id = ""
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self._open(config)
        except (ConfigError, MlflowException) as error:  # a store or setting to fix
            fail(error)
        except Exception as error:
            self._abort("setting up the sweep", error)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            counts = self._summarize()
            registered = self._register_best(config.sweep.get("register_best"), counts)
            # A sweep none of whose jobs finished produced nothing to compare: it failed.
            self._end("FAILED" if counts.total and not counts.finished else "FINISHED")
        except Exception as error:
            self._abort("summarizing the sweep", error)
        print(self._closing_lines(counts), flush=True)
        if registered:
            print(f"best model: {registered}", flush=True)
        if counts.failed:
            print(
                f"cnnlab: {counts.failed} sweep job(s) FAILED; see the parent run "
                f"{self.parent_run_id} and its jobs.csv",
                file=sys.stderr,
            )
        if counts.failed or registered is None:
            sys.exit(1)

    def _register_best(self, name: str | None, counts: JobCounts) -> str | None:
        """``sweep.register_best=<name>``: the best group's best run's model becomes a new
        version of ``name`` with the alias ``best`` (tag ``best.model`` on the parent).
        Returns what was registered, "" when nothing was asked, None (and one line) when
        it could not be."""
        if not name or counts.best_group is None:
            return ""
        try:
            jobs = children_frame(self.client, self.experiment_id, self.parent_run_id)
            run_id = best_run_of(jobs, counts.best_group, SCORE)
            uri, version = register_best(self.client, run_id, name)
        except (ConfigError, MlflowException) as error:
            print(f"cnnlab: error: {redact_uri(one_line(error))}", file=sys.stderr)
            self.client.set_tag(self.parent_run_id, "best.model", f"not registered: {error}")
            return None
        registered = f"{uri} (version {version} of run {run_id})"
        self.client.set_tag(self.parent_run_id, "best.model", registered)
        return registered

    def _open(self, config: DictConfig) -> None:
        check_sweeper(config.hydra.sweeper)
        SweepConfig(**OmegaConf.to_container(config.sweep, resolve=True))  # its checks, first
        logger = config.logger
        if config.sweep.resume:  # a sweep to continue is in a store that exists
            _store_to_continue(logger.tracking_uri, str(config.sweep.resume))
        self.client = connect(logger.tracking_uri, logger.retry_s)
        if config.sweep.dry_run:
            dry_run(self.client, config)  # lists the jobs and exits
        if config.sweep.resume:
            self.experiment_id = _experiment_to_continue(self.client, config)
        else:
            # The store and the experiment are created here, once: several processes
            # migrating a fresh sqlite store at the same time crash and leave it broken.
            self.experiment_id = open_experiment(
                self.client, logger.experiment_name, logger.artifact_location
            )
        end_dead_runs(self.client, self.experiment_id)  # earlier sweeps killed outright
        grid, factors = grid_of(config)
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        tags = {
            "cnnlab.role": "sweep",
            "cnnlab.sweep_dir": str(self.sweep_dir),
            "cnnlab.grid": json.dumps(grid),
            "cnnlab.factors": ",".join(factors),
            "cnnlab.launcher": str(config.hydra.launcher.get("_target_")),
            "cnnlab.command": redact_uri(" ".join(["python -m cnnlab.train", *sys.argv[1:]])),
            **process_tags(),
            **git_state(Path(config.paths.root_dir)),
        }
        if config.sweep.resume:
            self.parent_run_id = self._reopen(str(config.sweep.resume), tags)
        else:
            name = f"sweep-{logger.experiment_name}-{time.strftime('%Y%m%d-%H%M%S')}"
            parent = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
            self.parent_run_id = parent.info.run_id
        sweep = {"parent_run_id": self.parent_run_id, "experiment_id": self.experiment_id}
        (self.sweep_dir / SWEEP_FILE).write_text(json.dumps(sweep | {"factors": factors}))
        atexit.register(self._interrupted)  # never left RUNNING
        signal.signal(signal.SIGTERM, exit_on_sigterm)

    def _reopen(self, which: str, tags: dict[str, str]) -> str:
        """``sweep.resume=<parent | latest>``: that parent, RUNNING again with this start's
        grid, folder and process; its old summary is replaced at the end."""
        parent = find_parent(self.client, self.experiment_id, which)
        run_id = parent.info.run_id
        if parent.info.status == "RUNNING":  # end_dead_runs left it: it lives, or elsewhere
            host, pid = parent.data.tags.get("cnnlab.host"), parent.data.tags.get("cnnlab.pid")
            if host == socket.gethostname():
                raise ConfigError(
                    f"sweep.resume={which}: sweep {run_id} is still running (pid {pid})"
                )
            raise ConfigError(
                f"sweep.resume={which}: sweep {run_id} is RUNNING on host {host} (pid {pid}); "
                "continue it there, where cnnlab can tell whether its process still lives"
            )
        TrackedRun.reopen(self.client, run_id, tags)  # as a resumed run: error tag gone
        print(f"continuing sweep {parent.info.run_name} (parent run {run_id}, "
              f"{parent.info.status} until now)", flush=True)  # fmt: skip
        return run_id

    def _summarize(self) -> JobCounts:
        """Tag the parent with the jobs' outcome and the best group; attach jobs.csv and
        the group table (groups.json)."""
        client, parent = self.client, self.parent_run_id
        jobs = children_frame(client, self.experiment_id, parent)
        counts = JobCounts.of(jobs)
        summary = {
            "jobs.total": str(counts.total),
            "jobs.finished": str(counts.finished),
            "jobs.failed": str(counts.failed),
        }
        if counts.best_group is not None:
            summary |= {
                "best.group": counts.best_group,
                "best.val_acc_mean": f"{counts.best_mean:.4f}",
                "best.n": str(counts.best_n),
            }
        for key, value in summary.items():
            client.set_tag(parent, key, value)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "jobs.csv"
            jobs.to_csv(path, index=False)
            client.log_artifact(parent, str(path))
        log_group_table(client, parent, jobs)
        # Optimizing sweepers (Optuna) write their best parameters here.
        optimized = self.sweep_dir / "optimization_results.yaml"
        if optimized.exists():
            client.log_artifact(parent, str(optimized))
        raced = self.sweep_dir / RACING_FILE  # hydra/sweeper=racing: what the race did
        if raced.exists():
            for key, value in json.loads(raced.read_text()).items():
                client.set_tag(parent, key, value[:MAX_TAG_CHARS])
            client.log_artifact(parent, str(raced))
        return counts

    def _closing_lines(self, counts: JobCounts) -> str:
        did = outcomes(self.sweep_dir)
        lines = [
            f"sweep done: parent run {self.parent_run_id}: {counts.total} jobs, "
            f"{counts.finished} finished, {counts.failed} failed",
            "this start: "
            + ", ".join(f"{did[action]} {action}" for action in SAID[:5])
            + "".join(f", {did[action]} {action}" for action in SAID[5:] if did[action]),
        ]
        if counts.best_group is not None:
            lines.append(
                f"best group: {counts.best_group or '(one configuration)'}, mean val/acc_best "
                f"{counts.best_mean:.2%} over {counts.best_n} run(s)"
            )
        link = run_link(self.client.tracking_uri, self.experiment_id, self.parent_run_id)
        lines += [f'report: make report ARGS="--parent {self.parent_run_id}"', f"open it: {link}"]
        return "\n".join(lines)

    def _interrupted(self) -> None:
        """At exit before the sweep's end (Ctrl-C, SIGTERM, a job's error under fail_fast):
        the summary of the jobs so far, as far as the store allows, and KILLED."""
        with contextlib.suppress(Exception):
            self._summarize()
        with contextlib.suppress(Exception):
            self._end("KILLED")

    def _abort(self, doing: str, error: Exception) -> NoReturn:
        """One line and exit 1: the parent ends FAILED with the error, where it exists."""
        message = f"{doing} failed: {type(error).__name__}: {one_line(error)}"
        if self.client is not None and self.parent_run_id is not None:
            with contextlib.suppress(Exception):
                self.client.set_tag(self.parent_run_id, "error", redact_uri(message)[:5000])
                self._end("FAILED")
        print(f"cnnlab: error: {redact_uri(message)}", file=sys.stderr)
        sys.exit(1)

    def _end(self, status: str) -> None:
        if self.client is None or self.parent_run_id is None:
            return
        if self.client.get_run(self.parent_run_id).info.status == "RUNNING":
            self.client.set_terminated(self.parent_run_id, status)
        atexit.unregister(self._interrupted)


@dataclass(frozen=True)
class JobCounts:
    """The jobs' outcome, and the group of the best mean score among the finished ones."""

    total: int
    finished: int
    best_group: str | None = None
    best_mean: float = float("nan")
    best_n: int = 0

    @property
    def failed(self) -> int:
        return self.total - self.finished

    @classmethod
    def of(cls, jobs: pd.DataFrame) -> JobCounts:
        if not len(jobs):
            return cls(0, 0)
        done = jobs[jobs["status"] == "FINISHED"]
        finished = len(done)
        if SCORE not in done or "tags.group" not in done:  # no job got as far as a score
            return cls(len(jobs), finished)
        scores = done.dropna(subset=[SCORE])  # a finished run without it is not compared
        if not len(scores):
            return cls(len(jobs), finished)
        means = scores.groupby("tags.group")[SCORE].agg(["mean", "count"])
        best = means["mean"].idxmax()
        return cls(
            len(jobs), finished, best, float(means.loc[best, "mean"]), int(means.loc[best, "count"])
        )
