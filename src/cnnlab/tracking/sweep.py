"""Hydra multiruns as one MLflow parent run with a child run per job.

:class:`SweepCallback` (listed under ``hydra.callbacks`` in conf/hydra/default.yaml) opens
the store, the experiment and the parent run before the first job, and writes them to
``<sweep dir>/cnnlab_sweep.json``; each job reads that file (``tracking.jobs.job_context``),
also when it runs in another process or on another machine sharing the folder. After the last job
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pandas as pd
from hydra.experimental.callback import Callback
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from cnnlab.checks import ConfigError, fail, one_line, redact_uri
from cnnlab.config import SweepConfig
from cnnlab.tracking.continuation import Action
from cnnlab.tracking.groups import SCORE, log_group_table
from cnnlab.tracking.jobs import SWEEP_FILE, dry_run, grid_of, outcomes
from cnnlab.tracking.liveness import end_dead_runs, process_tags
from cnnlab.tracking.models import best_run_of, register_best
from cnnlab.tracking.parents import children_frame, find_parent
from cnnlab.tracking.runs import MAX_TAG_CHARS, TrackedRun, exit_on_sigterm, git_state, run_link
from cnnlab.tracking.store import connect, open_experiment, require_store

RACING_FILE = "racing.json"  # hydra_plugins.cnnlab_racing writes it into the sweep folder


SAID = [action.value for action in Action]  # the closing line's counts, in this order


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
            require_store(
                logger.tracking_uri, f"sweep.resume={config.sweep.resume}",
                "point logger.tracking_uri (MLFLOW_TRACKING_URI) at the sweep's store",
            )  # fmt: skip
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
