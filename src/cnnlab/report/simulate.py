"""Simulated sweeps with a known truth, to measure the report's error rates (the calibration
tests and ``make bench-report``): accuracies drawn as a base, plus each factor level's true
effect, plus a seed effect shared by every group of that seed, plus the run's own noise.

``jobs`` is shaped as :func:`cnnlab.report.collect.load_sweep` reads a sweep back;
:func:`record` writes one into an MLflow store as cnnlab records a sweep, so a test can show
that the store's round trip changes nothing the analysis sees."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from mlflow import MlflowClient

from cnnlab.report import anova, stats

POOLING = "model.pooling"
POOLING_LEVELS = ("max", "avg", "lp", "gem", "mixed", "stride")  # experiment=pooling_ablation


def pooling_gaps(*gaps: float) -> dict[tuple[str, str], float]:
    """True effects of a pooling study: each level after ``max``, ``gap`` below it."""
    return {(POOLING, level): -gap for level, gap in zip(POOLING_LEVELS[1:], gaps, strict=True)}


@dataclass(frozen=True)
class Truth:
    """A study's design and its true accuracies (fractions of 1)."""

    levels: Mapping[str, tuple[str, ...]]  # factor -> its levels
    seeds: int = 3
    base: float = 0.97
    effects: Mapping[tuple[str, str], float] = field(default_factory=dict)  # (factor, level)
    # A combination's own effect beyond its levels': ((factor, level), (factor, level)) -> shift
    interactions: Mapping[tuple[tuple[str, str], ...], float] = field(default_factory=dict)
    seed_sd: float = 0.004  # shared by the runs of one seed
    noise_sd: float = 0.002  # each run's own

    def groups(self) -> list[dict[str, str]]:
        factors = list(self.levels)
        return [dict(zip(factors, combo, strict=True)) for combo in self.combinations()]

    def combinations(self) -> list[tuple[str, ...]]:
        return list(itertools.product(*self.levels.values()))

    def mean_of(self, group: Mapping[str, str]) -> float:
        items = set(group.items())
        mean = self.base + sum(self.effects.get(item, 0.0) for item in items)
        return mean + sum(v for combo, v in self.interactions.items() if set(combo) <= items)


def jobs(truth: Truth, rng: np.random.Generator) -> pd.DataFrame:
    """One simulated sweep: a FINISHED run per group and seed."""
    seed_effects = rng.normal(0, truth.seed_sd, truth.seeds)
    rows = []
    for group in truth.groups():
        name = ",".join(f"{factor}={level}" for factor, level in group.items())
        for seed in range(truth.seeds):
            accuracy = truth.mean_of(group) + seed_effects[seed] + rng.normal(0, truth.noise_sd)
            rows.append(
                {
                    "run_id": f"{name}-s{seed}",
                    "run_name": f"{name}-s{seed}",
                    "status": "FINISHED",
                    "group": name,
                    "seed": str(seed),
                    **group,
                    "test_acc": float(np.clip(accuracy, 0, 1)),
                    "val_acc": float(np.clip(accuracy, 0, 1)),
                    "fit_s": 1.0,
                    "images_per_s": 1000.0,
                    "params": 1000.0,
                    "flops": 1000.0,
                }
            )
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Rates:
    """How often simulated sweeps of one truth made the report claim a difference."""

    sims: int
    table: float  # the group table: some group differs from the best (two groups: they differ)
    factors: float  # the factor verdicts: some ANOVA term (a factor or an interaction)
    terms: dict[str, float]  # each ANOVA term's share of claims


def measure(truth: Truth, sims: int, seed: int = 0, score: str = "val_acc") -> Rates:
    """Run the report's analysis on ``sims`` simulated sweeps of ``truth``."""
    rng = np.random.default_rng(seed)
    factors = list(truth.levels)
    table_claims = factor_claims = 0
    terms: dict[str, int] = {}
    for _ in range(sims):
        sweep = jobs(truth, rng)
        table = stats.group_table(sweep, score)
        table_claims += bool((table["differs"] == "yes").any())
        model = anova.fit(sweep, factors, score)
        if isinstance(model, anova.Anova):
            claimed = model.terms.loc[model.terms["p_holm"] < stats.ALPHA, "term"]
            factor_claims += bool(len(claimed))
            for term in claimed:
                terms[term] = terms.get(term, 0) + 1
    shares = {term: count / sims for term, count in terms.items()}
    return Rates(sims, table_claims / sims, factor_claims / sims, shares)


def record(client: MlflowClient, experiment: str, sweep: pd.DataFrame) -> str:
    """Write ``sweep`` into the store as cnnlab records a sweep; returns the parent's id."""
    factors = [c for c in sweep.columns if c not in NOT_FACTORS]
    experiment_id = client.create_experiment(experiment)
    tags = {
        "cnnlab.role": "sweep",
        "cnnlab.factors": ",".join(factors),
        "cnnlab.grid": json.dumps({f: ",".join(sweep[f].unique()) for f in factors}),
    }
    parent = client.create_run(experiment_id, run_name=f"sweep-{experiment}", tags=tags)
    parent_id = parent.info.run_id
    for job in sweep.to_dict("records"):
        child_tags = {"mlflow.parentRunId": parent_id, "group": job["group"], "seed": job["seed"]}
        child_tags |= {f"factor.{factor}": job[factor] for factor in factors}
        run_id = client.create_run(experiment_id, run_name=job["run_name"], tags=child_tags)
        run_id = run_id.info.run_id
        client.log_metric(run_id, "val/acc_best", job["val_acc"])
        client.log_metric(run_id, "test/acc", job["test_acc"])
        client.set_terminated(run_id, job["status"])
    client.set_terminated(parent_id, "FINISHED")
    return parent_id


NOT_FACTORS = {
    "run_id",
    "run_name",
    "status",
    "group",
    "seed",
    "test_acc",
    "val_acc",
    "fit_s",
    "images_per_s",
    "params",
    "flops",
}
