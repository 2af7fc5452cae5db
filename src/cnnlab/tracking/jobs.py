"""A sweep's jobs: the grid as it runs and its factors, each job's context (its group,
name and tags, read from the sweep's file by the job), what each job did (its outcome file),
and the dry run that lists them (``sweep.dry_run=true``)."""

from __future__ import annotations

import contextlib
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from hydra import compose
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

from cnnlab.checks import ConfigError, one_line
from cnnlab.config import REPO_ROOT, to_settings
from cnnlab.tracking import identity
from cnnlab.tracking.continuation import Action, Continuation, Decision, decide
from cnnlab.tracking.parents import find_parent

SWEEP_FILE = "cnnlab_sweep.json"
OUTCOME_FILE = "cnnlab_job.json"  # in each job's folder: what the job did (Action's value)
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


def grid_of(config: DictConfig) -> tuple[dict[str, str], list[str]]:
    """The grid as it runs (:func:`effective_grid`) and its factors."""
    params = config.hydra.sweeper.get("params")
    grid = effective_grid(
        config.hydra.overrides.task, OmegaConf.to_container(params) if params else {}
    )
    return grid, factors_of(grid)


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
