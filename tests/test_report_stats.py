"""The report's statistics checked against scipy and statsmodels called by hand: bounded
intervals, paired and Welch tests, Holm over the right family, the blocked ANOVA with partial
eta squared, ties, power and seeds needed, and the sentences a new user reads."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import special
from scipy import stats as scipy_stats
from statsmodels.formula.api import ols
from statsmodels.stats.anova import anova_lm
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

from cnnlab.report import anova, power, simulate, stats, verdicts

HEADS = {"model.head": ("fc", "gap", "nin")}


def sweep(accuracies: dict[str, list[float]], factor: str = "model.head") -> pd.DataFrame:
    """Jobs of a one-factor sweep, seed i being the i-th accuracy of each level."""
    rows = [
        {
            "status": "FINISHED",
            "group": f"{factor}={level}",
            "seed": str(seed),
            factor: level,
            "val_acc": accuracy,
            "test_acc": accuracy,
            "params": 1.0,
            "flops": 1.0,
            "fit_s": 1.0,
            "images_per_s": 1.0,
        }
        for level, values in accuracies.items()
        for seed, accuracy in enumerate(values)
    ]
    return pd.DataFrame(rows)


def test_a_mean_interval_is_t_on_the_logit_and_stays_inside_0_and_1() -> None:
    values = pd.Series([0.85, 0.99])  # a plain t-interval gave 85% to 104% here
    found = stats.describe(values)
    logits = special.logit(values)
    low, high = special.expit(
        scipy_stats.t.interval(0.95, 1, loc=logits.mean(), scale=scipy_stats.sem(logits))
    )
    assert (found["ci_low"], found["ci_high"]) == pytest.approx((low, high))
    assert 0 <= found["ci_low"] < found["mean"] < found["ci_high"] <= 1
    wild = stats.describe(pd.Series([0.05, 1.0, 0.6]))  # -44% to 70% before
    assert wild["ci_low"] >= 0 and wild["ci_high"] <= 1
    same = stats.describe(pd.Series([0.9, 0.9, 0.9]))
    assert same["ci_low"] == same["ci_high"] == pytest.approx(0.9)


def by_hand(jobs: pd.DataFrame, first: str, second: str):
    """``first`` minus ``second`` in ``val_acc ~ C(group) + C(seed)``, fitted here."""
    model = ols("val_acc ~ C(group) + C(seed)", jobs).fit()
    names = list(model.params.index)
    contrast = np.zeros(len(names))
    for group, sign in ((first, 1), (second, -1)):
        if f"C(group)[T.{group}]" in names:
            contrast[names.index(f"C(group)[T.{group}]")] = sign
    return model.t_test(contrast), model.df_resid


def test_groups_with_recorded_seeds_are_compared_with_the_seed_a_block() -> None:
    """One model for every group, the seed a block: the seed's luck is taken out and the
    residual spread pooled (4 df here, not the 2 of one paired t-test); Holm across every
    pair, since choosing the best compared them all."""
    accuracies = {"fc": [0.97, 0.95, 0.98], "gap": [0.96, 0.93, 0.975], "nin": [0.90, 0.91, 0.89]}
    jobs = sweep(accuracies)
    table = stats.group_table(jobs, "val_acc").set_index("group")
    assert table.index[0] == "model.head=fc" and set(table["family"]) == {3}
    names = {level: f"model.head={level}" for level in accuracies}
    pairs = list(itertools.combinations(accuracies, 2))
    raw = [float(by_hand(jobs, names[a], names[b])[0].pvalue) for a, b in pairs]
    adjusted = dict(zip(pairs, multipletests(raw, method="holm")[1], strict=True))
    gap = table.loc["model.head=gap"]
    test, df = by_hand(jobs, names["gap"], names["fc"])
    assert (gap["test"], df) == ("blocked t", 4)
    assert gap["diff"] == pytest.approx(np.mean(accuracies["gap"]) - np.mean(accuracies["fc"]))
    assert gap["p"] == pytest.approx(float(test.pvalue))
    assert (gap["diff_low"], gap["diff_high"]) == pytest.approx(tuple(test.conf_int()[0]))
    assert gap["p_holm"] == pytest.approx(adjusted[("fc", "gap")])
    assert table.loc["model.head=nin", "p_holm"] == pytest.approx(adjusted[("fc", "nin")])


def test_two_groups_blocked_by_seed_are_the_paired_t_test() -> None:
    accuracies = {"fc": [0.97, 0.95, 0.98, 0.96], "gap": [0.96, 0.93, 0.975, 0.95]}
    gap = stats.group_table(sweep(accuracies), "val_acc").set_index("group").loc["model.head=gap"]
    paired = scipy_stats.ttest_rel(accuracies["gap"], accuracies["fc"])
    assert gap["p"] == pytest.approx(paired.pvalue)
    assert (gap["diff_low"], gap["diff_high"]) == pytest.approx(
        tuple(paired.confidence_interval(0.95))
    )


def test_a_named_baseline_makes_the_family_the_groups_against_it() -> None:
    accuracies = {"fc": [0.97, 0.95, 0.98], "gap": [0.96, 0.93, 0.975], "nin": [0.90, 0.91, 0.89]}
    jobs = sweep(accuracies)
    table = stats.group_table(jobs, "val_acc", baseline="model.head=nin")
    raw = [
        float(by_hand(jobs, f"model.head={g}", "model.head=nin")[0].pvalue) for g in ("fc", "gap")
    ]
    assert set(table["family"]) == {2}
    found = table.set_index("group").loc[["model.head=fc", "model.head=gap"], "p_holm"]
    assert list(found) == pytest.approx(list(multipletests(raw, method="holm")[1]))


def test_groups_of_different_seeds_are_compared_in_the_same_blocked_model() -> None:
    """As after a race, or a failed job: gap ran seeds 0 and 1, fc 0, 1 and 2."""
    jobs = sweep({"fc": [0.97, 0.95, 0.98], "gap": [0.90, 0.91]})
    gap = stats.group_table(jobs, "val_acc").set_index("group").loc["model.head=gap"]
    test, _ = by_hand(jobs, "model.head=gap", "model.head=fc")
    assert gap["test"] == "blocked t" and gap["p"] == pytest.approx(float(test.pvalue))
    assert stats.seeds_shared(jobs) == (False, "the groups did not all run the same seeds")
    model = anova.fit(jobs, ["model.head"], "val_acc")
    assert not model.blocked  # the ANOVA's block needs every group on every seed


def test_runs_without_their_seed_get_welchs_test() -> None:
    jobs = sweep({"fc": [0.97, 0.95, 0.98], "gap": [0.90, 0.91]}).assign(seed=None)
    gap = stats.group_table(jobs, "val_acc").set_index("group").loc["model.head=gap"]
    by_hand = scipy_stats.ttest_ind([0.90, 0.91], [0.97, 0.95, 0.98], equal_var=False)
    assert gap["test"] == "Welch t" and gap["p"] == pytest.approx(by_hand.pvalue)
    assert stats.seeds_shared(jobs) == (False, "some runs do not record their seed")


def test_a_difference_not_shown_says_what_the_design_would_detect() -> None:
    accuracies = {"fc": [0.97, 0.95, 0.98], "gap": [0.96, 0.955, 0.975]}
    gap = stats.group_table(sweep(accuracies), "val_acc").set_index("group").loc["model.head=gap"]
    assert gap["differs"] == "no"
    sd = np.std(np.subtract(accuracies["gap"], accuracies["fc"]), ddof=1)
    d = TTestPower().solve_power(None, nobs=3, alpha=0.05, power=0.8)  # two groups: paired
    assert gap["detectable"] == pytest.approx(d * sd, rel=1e-3)


def test_seeds_that_agree_exactly_are_an_exact_comparison() -> None:
    table = stats.group_table(sweep({"fc": [0.9, 0.8], "gap": [0.9, 0.8]}), "val_acc")
    row = table.set_index("group").loc["model.head=gap"]
    assert (row["p"], row["diff"], row["differs"]) == (1.0, 0.0, "no")


def test_the_blocked_anova_is_statsmodels_type_ii_with_partial_eta_squared() -> None:
    truth = simulate.Truth({"a": ("x", "y", "z"), "b": ("u", "v")}, seeds=3,
                           effects={("a", "y"): 0.01})  # fmt: skip
    jobs = simulate.jobs(truth, np.random.default_rng(5))
    model = anova.fit(jobs, ["a", "b"], "val_acc")
    assert isinstance(model, anova.Anova) and model.blocked and model.interactions
    data = jobs.rename(columns={"val_acc": "y"})
    by_hand = anova_lm(ols("y ~ C(a)*C(b) + C(seed)", data).fit(), typ=2)
    residual = by_hand.loc["Residual", "sum_sq"]
    terms = model.terms.set_index("term")
    for term, row in (("a", "C(a)"), ("b", "C(b)"), ("a × b", "C(a):C(b)")):  # noqa: RUF001
        assert terms.loc[term, "F"] == pytest.approx(by_hand.loc[row, "F"])
        assert terms.loc[term, "p"] == pytest.approx(by_hand.loc[row, "PR(>F)"])
        eta = by_hand.loc[row, "sum_sq"] / (by_hand.loc[row, "sum_sq"] + residual)
        assert terms.loc[term, "eta_p2"] == pytest.approx(eta)
    holm = multipletests(by_hand.loc[["C(a)", "C(b)", "C(a):C(b)"], "PR(>F)"], method="holm")[1]
    assert list(terms["p_holm"]) == pytest.approx(list(holm))
    assert model.df_resid == by_hand.loc["Residual", "df"] and model.seeds == 3


def test_an_incomplete_grid_is_fitted_without_interactions() -> None:
    truth = simulate.Truth({"a": ("x", "y"), "b": ("u", "v")}, seeds=3)
    jobs = simulate.jobs(truth, np.random.default_rng(1))
    jobs = jobs[jobs["group"] != "a=y,b=v"]
    model = anova.fit(jobs, ["a", "b"], "val_acc")
    assert not model.interactions and list(model.terms["term"]) == ["a", "b"]
    assert anova.fit(jobs[jobs["seed"] == "0"], ["a", "b"], "val_acc").startswith("too few runs")


def test_two_equal_best_levels_are_reported_tied() -> None:
    truth = simulate.Truth({"model.pooling": ("max", "gem", "lp")}, seeds=5, noise_sd=0.001,
                           effects={("model.pooling", "lp"): -0.03})  # fmt: skip
    jobs = simulate.jobs(truth, np.random.default_rng(2))
    model = anova.fit(jobs, ["model.pooling"], "val_acc")
    text = verdicts.factor_verdict(jobs, "model.pooling", "val_acc", model)
    best = "max" if text.startswith("model.pooling: max") else "gem"
    other = {"max", "gem"} - {best}
    assert f"is tied for best with {other.pop()}" in text
    assert "points above lp" in text and "the factor matters" in text
    assert text.endswith("points with 80% power.")  # how sensitive, also when it found one


def test_a_big_gap_with_two_seeds_says_how_little_two_seeds_can_tell() -> None:
    """A new user's case: 33 points between heads called 'within noise' with no word on
    power. Now the verdict says what two seeds could have detected."""
    jobs = sweep({"fc": [0.94, 0.95], "gap": [0.30, 0.92]})
    model = anova.fit(jobs, ["model.head"], "val_acc")
    text = verdicts.factor_verdict(jobs, "model.head", "val_acc", model)
    assert text.startswith("model.head: no difference shown: fc (94.50%) is 33.50 points above gap")
    assert "this design finds no possible difference (up to 100 points) with 80% power" in text
    assert "the observed 33.50 points 16 seeds per group." in text
    table = stats.group_table(jobs, "val_acc").set_index("group")
    assert table.loc["model.head=gap", "differs"] == "no"
    assert table.loc["model.head=gap", "detectable"] > 1  # shown as "> 100"


def test_an_interaction_is_told_as_where_each_level_wins() -> None:
    truth = simulate.Truth(
        {"model.head": ("fc", "gap"), "model.batchnorm": ("true", "false")},
        seeds=4,
        noise_sd=0.001,
        effects={("model.head", "gap"): -0.02},
        interactions={(("model.head", "gap"), ("model.batchnorm", "true")): 0.04},
    )
    jobs = simulate.jobs(truth, np.random.default_rng(3))
    model = anova.fit(jobs, ["model.head", "model.batchnorm"], "val_acc")
    (sentence,) = verdicts.interaction_verdicts(jobs, "val_acc", model)
    assert sentence.startswith("model.head × model.batchnorm interact (blocked ANOVA F(1, ")  # noqa: RUF001
    assert "with model.batchnorm=true, gap is best" in sentence
    assert "with model.batchnorm=false, fc is best" in sentence


def test_no_interaction_is_said_once_with_the_smallest_adjusted_p() -> None:
    truth = simulate.Truth({"a": ("x", "y"), "b": ("u", "v")}, seeds=3)
    jobs = simulate.jobs(truth, np.random.default_rng(4))
    model = anova.fit(jobs, ["a", "b"], "val_acc")
    (sentence,) = verdicts.interaction_verdicts(jobs, "val_acc", model)
    assert sentence.startswith("No interaction shown: each of the 1 tested has Holm-adjusted p")


def test_the_f_tests_power_for_two_levels_is_the_paired_t_tests() -> None:
    """Two levels blocked by seed: F is the paired t squared, so statsmodels' F power with
    noncentrality n d^2 / 2 sigma^2 must equal its paired-t power with d_z = d / (sigma
    sqrt 2)."""
    sigma, diff = 0.002, 0.003
    design = power.FactorDesign(levels=2, cells=2, params=2, blocked=True, mse=sigma**2)
    for seeds in (2, 3, 5, 10):
        expected = TTestPower().power(diff / (sigma * math.sqrt(2)), seeds, 0.05)
        assert design.power(diff, seeds, 0.05) == pytest.approx(expected, rel=1e-6)
    detectable = design.detectable(4, 0.05)
    assert design.power(detectable, 4, 0.05) == pytest.approx(0.8, abs=1e-4)


def test_seeds_needed_is_the_fewest_that_reach_80_percent() -> None:
    design = power.FactorDesign(levels=3, cells=6, params=6, blocked=True, mse=0.002**2)
    needed = design.seeds_needed(0.002, 0.05 / 3)
    assert design.power(0.002, needed, 0.05 / 3) >= 0.8 > design.power(0.002, needed - 1, 0.05 / 3)
    assert design.seeds_needed(1e-9, 0.05) is None  # past any study
    assert design.seeds_needed(0.5, 0.05) == 2


def test_the_best_configuration_names_its_ties_shortly() -> None:
    table = pd.DataFrame(
        {
            "group": [
                "model.pooling=max,model.head=fc",
                "model.pooling=avg,model.head=fc",
                "model.pooling=max,model.head=gap",
            ],
            "val_acc_mean": [0.98, 0.975, 0.9],
            "differs": ["reference", "no", "yes"],
            "family": [3, 3, 3],
        }
    )
    assert verdicts.best_configuration(table) == (
        "Best configuration: pooling=max head=fc (98.00% mean val_acc); tied with pooling=avg "
        "head=fc (pairwise tests, Holm across 3 comparisons)."
    )
