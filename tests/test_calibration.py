"""The report's error rates, measured on simulated sweeps with a known truth rather than
assumed: under no true difference it claims one at most ALPHA of the time, and the power
it states is the share of studies that find a difference of that size.

Each study is the report's own analysis (group table, ANOVA) on a simulated sweep shaped
as ``load_sweep`` reads one back; the last test shows that writing such a sweep into a real
MLflow store and reading it back changes nothing the analysis sees. The random streams are
fixed, so the measured shares are the same on every run; the bounds are binomial tests at
1%, so a correct report would fail them by chance once in a hundred seeds, not every time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from scipy.stats import binomtest

from cnnlab.report import anova, load_sweep, power, simulate, stats

FACTORIAL = {
    "model.pooling": ("max", "avg", "lp"),
    "model.head": ("fc", "gap"),
    "model.batchnorm": ("true", "false"),
}
POOLING = {"model.pooling": ("max", "avg", "lp", "gem", "mixed", "stride")}
SIMS = 300


def no_more_than(share: float, sims: int, rate: float) -> bool:
    """``share`` of ``sims`` is not significantly above ``rate`` (one-sided, 1%)."""
    return binomtest(round(share * sims), sims, rate, alternative="greater").pvalue > 0.01


def matches(share: float, sims: int, rate: float) -> bool:
    return binomtest(round(share * sims), sims, rate).pvalue > 0.01 and abs(share - rate) < 0.06


@pytest.fixture(scope="module")
def null_studies() -> dict[str, simulate.Rates]:
    """No true difference anywhere, a seed effect twice the run's own noise."""
    return {
        "factorial": simulate.measure(simulate.Truth(FACTORIAL, seeds=3), SIMS, seed=1),
        "pooling": simulate.measure(simulate.Truth(POOLING, seeds=3), SIMS, seed=2),
    }


@pytest.mark.parametrize("design", ["factorial", "pooling"])
@pytest.mark.parametrize("claims", ["table", "factors"])
def test_under_no_true_difference_the_report_claims_one_at_most_alpha(
    null_studies, design, claims
) -> None:
    """The group table (some group differs from the best), and the factor verdicts (some
    main effect or interaction: Holm across the ANOVA's terms)."""
    rates = null_studies[design]
    assert no_more_than(getattr(rates, claims), rates.sims, stats.ALPHA), rates


def test_the_difference_the_report_says_it_detects_is_found_80_percent_of_the_time() -> None:
    """Two heads, 4 seeds: the true difference is the one the report's sentence names for
    this design ('detects a difference of D points with 80% power'), with the true noise."""
    noise = 0.002
    design = power.FactorDesign(levels=2, cells=2, params=2, blocked=True, mse=noise**2)
    detectable = design.detectable(4, stats.ALPHA)
    truth = simulate.Truth(
        {"model.head": ("fc", "gap")}, seeds=4, noise_sd=noise,
        effects={("model.head", "gap"): detectable},
    )  # fmt: skip
    rates = simulate.measure(truth, 400, seed=3)
    assert matches(rates.terms.get("model.head", 0.0), rates.sims, power.POWER), rates
    assert matches(rates.table, rates.sims, power.POWER), rates  # the paired t: the same test


def test_a_factors_power_in_a_factorial_matches_the_share_it_finds() -> None:
    """One true main effect among three factors and four interactions; the stated power
    uses Holm's strictest level (alpha / 7), which Holm reaches when the rest are null."""
    noise, diff = 0.002, 0.0015
    truth = simulate.Truth(FACTORIAL, seeds=3, noise_sd=noise,
                           effects={("model.head", "gap"): diff})  # fmt: skip
    design = power.FactorDesign(levels=2, cells=12, params=12, blocked=True, mse=noise**2)
    predicted = design.power(diff, 3, stats.ALPHA / 7)
    rates = simulate.measure(truth, SIMS, seed=4)
    assert 0.2 < predicted < 0.5  # a case where the rate can be told from 0 and from 1
    assert matches(rates.terms.get("model.head", 0.0), rates.sims, predicted), rates


def test_a_simulated_sweep_reads_back_from_a_real_store_unchanged(tmp_path: Path) -> None:
    truth = simulate.Truth(FACTORIAL, seeds=2, effects={("model.head", "gap"): 0.01})
    jobs = simulate.jobs(truth, np.random.default_rng(5))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    simulate.record(client, "simulated", jobs)
    sweep = load_sweep(client, "simulated")
    assert sweep.factors == list(FACTORIAL)
    columns = ["group", "seed", *FACTORIAL, "val_acc"]
    read = sweep.finished[columns].sort_values(["group", "seed"]).reset_index(drop=True)
    made = jobs[columns].sort_values(["group", "seed"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(read, made, check_dtype=False)
    for frame in (read, made):
        frame["status"] = "FINISHED"
    pd.testing.assert_frame_equal(
        anova.fit(read, list(FACTORIAL), "val_acc").terms,
        anova.fit(made, list(FACTORIAL), "val_acc").terms,
    )
