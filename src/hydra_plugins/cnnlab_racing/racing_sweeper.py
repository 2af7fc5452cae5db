"""``hydra/sweeper=racing``: an ablation grid that spends seeds where they decide.

Every group of the grid (its configuration without the seed) runs ``n0`` seeds; then, round
by round, only the groups not yet separated from the leader run one more seed
(:class:`cnnlab.racing.Race`), until one is left, ``max_seeds`` is reached or the next round
would pass ``max_jobs``. It is one Hydra multirun: one sweep, one parent run, every round's
jobs its children, so ``sweep.resume=latest`` continues a race that was stopped (the jobs
that finished are kept with their scores, and the race takes the same turns again).
(Hydra takes sweepers only from the ``hydra_plugins`` package, hence this module's home;
it imports plugin modules outside sys.modules, so no ``from __future__ import annotations``:
a dataclass with string annotations cannot be made there.)

    python -m cnnlab.train -m experiment=pooling_ablation hydra/sweeper=racing \\
        hydra.sweeper.max_seeds=10
"""

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
RESULT_FILE = "racing.json"  # what the race did: cnnlab.tracking.sweep tags the parent with it


@dataclass
class RacingSweeperConf:
    _target_: str = "hydra_plugins.cnnlab_racing.racing_sweeper.RacingSweeper"
    n0: int = 3  # seeds every group runs before any is dropped
    max_seeds: int = 10  # seeds a group runs at most
    max_jobs: int | None = None  # jobs in all (None: groups x max_seeds)
    alpha: float = 0.05  # Holm-adjusted level at which a group is separated from the leader
    first_seed: int = 0
    params: dict[str, str] = field(default_factory=dict)  # the grid, as the basic sweeper's


ConfigStore.instance().store(group="hydra/sweeper", name="racing", node=RacingSweeperConf,
                             provider="cnnlab")  # fmt: skip


class RacingSweeper(Sweeper):
    def __init__(self, n0, max_seeds, max_jobs, alpha, first_seed, params) -> None:
        from cnnlab.racing import RaceSettings

        self.settings = RaceSettings(n0, max_seeds, max_jobs, alpha, first_seed)
        self.params = dict(params or {})
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher = None

    @staticmethod
    def check_settings(config: DictConfig) -> None:
        """The race's settings, checked by cnnlab's sweep callback before the store opens
        (one line, exit 2; Hydra makes the sweeper only after the sweep's parent run)."""
        from cnnlab.racing import RaceSettings

        names = ("n0", "max_seeds", "max_jobs", "alpha", "first_seed")
        RaceSettings(**{name: config[name] for name in names})

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[list[JobReturn]]:
        from cnnlab.racing import Race

        groups = self._groups(arguments)
        race = Race(list(groups), self.settings)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns, done = [], 0
        while jobs := race.next_round():
            log.info("racing: round %d, %d groups still racing, %d jobs", race.rounds,
                     len(race.alive), len(jobs))  # fmt: skip
            batch = [[*groups[group], f"seed={seed}"] for group, seed in jobs]
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=done)
            for (group, seed), result in zip(jobs, results, strict=True):
                race.record(group, seed, _score(result))
            done += len(batch)
            returns.append(results)
        summary = race.summary() | {"racing.settings": json.dumps(vars(self.settings))}
        (sweep_dir / RESULT_FILE).write_text(json.dumps(summary, indent=2))
        log.info("racing: %d jobs against %d for the full grid; leader %s", race.jobs,
                 race.full_grid, race.leader)  # fmt: skip
        return returns

    def _groups(self, arguments: list[str]) -> dict[str, list[str]]:
        """Each group's overrides by its name: the grid of ``params`` and the command line,
        as the basic sweeper makes it, without the seed (the race chooses the seeds)."""
        lines = [f"{key}={value}" for key, value in self.params.items()]
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        parsed = [
            o for o in parser.parse_overrides([*lines, *arguments]) if o.key_or_group != "seed"
        ]
        if len(parsed) < len(lines) + len(arguments):
            log.info("racing: the grid's seeds are left out; the race runs seeds %d, %d, ...",
                     self.settings.first_seed, self.settings.first_seed + 1)  # fmt: skip
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
        swept = {override.key_or_group for override in parsed if override.is_sweep_override()}
        return {
            ",".join(o for o in job if o.partition("=")[0] in swept) or "all": job for job in jobs
        }


def _score(result: JobReturn) -> float | None:
    """The job's best validation accuracy; None for a job that failed (its seed then counts
    as not run in the race)."""
    if result.status != JobStatus.COMPLETED:
        return None
    value: Any = result.return_value
    return None if value is None or math.isnan(float(value)) else float(value)
