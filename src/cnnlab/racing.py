"""Seeds spent where they decide: a race over a sweep's groups (F-Race, Birattari et al.
2002; irace). Every group runs ``n0`` seeds; then, round by round, only the groups not yet
separated from the leader get one more seed, until one group is left, ``max_seeds`` is
reached, or the next round would pass ``max_jobs``. A group is separated when its t-test
against the leader (the groups still racing in one model with the seed as a block),
Holm-adjusted across every pair of them (the leader is chosen by looking at them all), says
so at ``alpha``: the test the report's group table uses.

The race only decides which jobs to run next from the scores it is given; Hydra's racing
sweeper (``hydra_plugins/cnnlab_racing``) runs them, and the bench and tests run it on
simulated scores. Everything here is plain data."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cnnlab.checks import ConfigError
from cnnlab.report import simulate
from cnnlab.report.pairs import blocked, holm
from cnnlab.report.stats import group_table


@dataclass(frozen=True)
class RaceSettings:
    n0: int = 3  # seeds every group runs before any is dropped
    max_seeds: int = 10  # seeds a group runs at most
    max_jobs: int | None = None  # jobs in all, or None for groups x max_seeds
    alpha: float = 0.05
    first_seed: int = 0  # seeds are first_seed, first_seed + 1, ...

    def __post_init__(self) -> None:
        if not 2 <= self.n0 <= self.max_seeds:
            raise ConfigError(
                f"racing: n0={self.n0}, max_seeds={self.max_seeds}; valid: 2 <= n0 <= "
                "max_seeds (a paired test needs two seeds)"
            )
        if not 0 < self.alpha < 1:
            raise ConfigError(f"racing: alpha={self.alpha}; valid: 0 < alpha < 1")
        if self.max_jobs is not None and self.max_jobs < 1:
            raise ConfigError(f"racing: max_jobs={self.max_jobs}; valid: a positive count")


@dataclass
class Race:
    groups: list[str]
    settings: RaceSettings = field(default_factory=RaceSettings)
    scores: dict[str, dict[int, float]] = field(default_factory=dict)  # group -> seed -> score
    alive: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)  # group -> seeds it ran
    asked: dict[str, int] = field(default_factory=dict)  # group -> seeds asked for
    jobs: int = 0  # asked for so far
    rounds: int = 0

    def __post_init__(self) -> None:
        if not self.groups:
            raise ConfigError("racing: the grid has no group to race")
        self.alive = list(self.groups)
        for group in self.groups:
            self.scores.setdefault(group, {})
            self.asked.setdefault(group, 0)

    @property
    def full_grid(self) -> int:
        """Jobs of the same study without the race: every group at ``max_seeds``."""
        return len(self.groups) * self.settings.max_seeds

    def next_round(self) -> list[tuple[str, int]]:
        """The (group, seed) jobs to run now; empty when the race is over."""
        first, settings = self.settings.first_seed, self.settings
        if self.rounds == 0:
            jobs = [(g, s) for g in self.alive for s in range(first, first + settings.n0)]
        else:
            self._drop_separated()
            if len(self.alive) < 2:
                return []
            jobs = [
                (g, first + self.asked[g]) for g in self.alive if self.asked[g] < settings.max_seeds
            ]
        if not jobs or (
            settings.max_jobs is not None and self.jobs + len(jobs) > settings.max_jobs
        ):
            return []
        for group, _ in jobs:
            self.asked[group] += 1
        self.jobs += len(jobs)
        self.rounds += 1
        return jobs

    def record(self, group: str, seed: int, score: float | None) -> None:
        """A job's score; None or NaN (a failed job) counts as no run of that seed."""
        if score is not None and not math.isnan(score):
            self.scores[group][seed] = float(score)

    @property
    def leader(self) -> str:
        means = {g: _mean(self.scores[g]) for g in self.alive}
        return max(self.alive, key=lambda g: (means[g], -self.alive.index(g)))

    def _drop_separated(self) -> None:
        leader = self.leader
        runs = pd.DataFrame(
            [(g, str(seed), score) for g in self.alive for seed, score in self.scores[g].items()],
            columns=["group", "seed", "score"],
        )
        pairs = list(itertools.combinations(self.alive, 2))
        found = blocked(runs, "score", pairs)
        adjusted = dict(zip(found, holm([c.p for c in found.values()]), strict=True))
        for pair, comparison in found.items():
            if leader not in pair or not adjusted[pair] < self.settings.alpha:
                continue
            other = pair[1] if pair[0] == leader else pair[0]
            if comparison.diff * (1 if pair[0] == leader else -1) > 0:
                self.dropped[other] = self.asked[other]
        self.alive = [g for g in self.alive if g not in self.dropped]

    def summary(self) -> dict[str, str]:
        """What the race did, as the sweep's parent run records it."""
        return {
            "racing.jobs": str(self.jobs),
            "racing.full_grid_jobs": str(self.full_grid),
            "racing.leader": self.leader,
            "racing.still_racing": ";".join(self.alive),
            "racing.dropped": ";".join(f"{g}@{n}" for g, n in self.dropped.items()),
        }


def _mean(scores: dict[int, float]) -> float:
    return sum(scores.values()) / len(scores) if scores else -math.inf


@dataclass(frozen=True)
class RaceRates:
    """How a race compared with the full grid on the same simulated scores."""

    sims: int
    same_winner: float  # the race's leader is the full grid's best, or tied with it
    dropped_a_best: float  # the race dropped a group the full grid calls tied for best
    jobs: float  # the race's jobs as a share of the full grid's


def race_against_grid(
    truth: simulate.Truth, settings: RaceSettings, sims: int, seed: int = 0
) -> RaceRates:
    """Simulate the full grid at ``max_seeds`` seeds; the race asks for its jobs' scores
    from it, so both decide on the same runs."""
    rng = np.random.default_rng(seed)
    full = simulate.Truth(**{**vars(truth), "seeds": settings.max_seeds})
    same = dropped_best = 0
    spent = 0.0
    for _ in range(sims):
        sweep = simulate.jobs(full, rng)
        table = group_table(sweep, "val_acc")
        tied = set(table.loc[table["differs"].isin(["reference", "no"]), "group"])
        scores = sweep.set_index(["group", "seed"])["val_acc"]
        race = Race(list(dict.fromkeys(sweep["group"])), settings)
        while batch := race.next_round():
            for group, job_seed in batch:
                race.record(group, job_seed, scores[(group, str(job_seed))])
        same += race.leader in tied
        dropped_best += bool(tied & set(race.dropped))
        spent += race.jobs / race.full_grid
    return RaceRates(sims, same / sims, dropped_best / sims, spent / sims)
