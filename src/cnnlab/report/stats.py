"""The numbers of an ablation report: per-group and per-factor means with 95% confidence
intervals over seeds (Student's t), and Welch's t-test for "is this more than noise"."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 0.05  # Welch's t-test: p below this is reported as a real difference
SCORES = ("test_acc", "val_acc")


def describe(values: pd.Series) -> dict[str, float]:
    """n, mean, std and the 95% t-interval of the mean (NaN where n < 2)."""
    values = values.dropna()
    n = len(values)
    mean = float(values.mean()) if n else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    low, high = stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=stats.sem(values))
    std = float(values.std(ddof=1))
    if std == 0:  # identical repeats: the interval is the point
        low = high = mean
    return {"n": n, "mean": mean, "std": std, "ci_low": float(low), "ci_high": float(high)}


def welch(first: pd.Series, second: pd.Series) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances); NaN below two runs each."""
    first, second = first.dropna(), second.dropna()
    if len(first) < 2 or len(second) < 2:
        return math.nan
    if first.std(ddof=1) == 0 and second.std(ddof=1) == 0:
        return 1.0 if first.mean() == second.mean() else 0.0
    return float(stats.ttest_ind(first, second, equal_var=False).pvalue)


def score_of(jobs: pd.DataFrame) -> str:
    """The accuracy a report ranks by: the best validation accuracy, so that choosing the
    best group never looks at the test set (test accuracy is reported beside it)."""
    return "val_acc" if jobs["val_acc"].notna().any() else "test_acc"


def group_table(jobs: pd.DataFrame, score: str, baseline: str | None = None) -> pd.DataFrame:
    """One row per group (configuration without the seed), best first by mean ``score``.

    Only FINISHED runs are averaged; FAILED and RUNNING ones are counted. ``vs`` names the
    reference (the best group, or ``baseline``), ``p_welch`` and ``differs`` compare each
    group's ``score`` with it.
    """
    if baseline is not None and baseline not in set(jobs["group"]):
        valid = ", ".join(sorted(set(jobs["group"])))
        raise ValueError(f"baseline group {baseline!r} is not in this sweep; valid: {valid}")
    done = jobs[jobs["status"] == "FINISHED"]
    rows = []
    for group, runs in jobs.groupby("group", sort=False):
        finished = done[done["group"] == group]
        row: dict = {
            "group": group,
            "n": len(finished),
            "failed": int((runs["status"] == "FAILED").sum()),
            "running": int((runs["status"] == "RUNNING").sum()),
        }
        for name in SCORES:
            summary = describe(finished[name])
            row |= {f"{name}_{key}": value for key, value in summary.items() if key != "n"}
        row |= {
            "params": _first(finished["params"]),
            "flops": _first(finished["flops"]),
            "fit_s": finished["fit_s"].mean(),
            "images_per_s": finished["images_per_s"].mean(),
        }
        rows.append(row)
    table = pd.DataFrame(rows).sort_values(f"{score}_mean", ascending=False, na_position="last")
    table = table.reset_index(drop=True)
    if table.empty:
        return table
    reference = baseline if baseline is not None else table.loc[0, "group"]
    reference_runs = done.loc[done["group"] == reference, score]
    table["vs"] = reference
    table["p_welch"] = [
        math.nan if group == reference else welch(done.loc[done["group"] == group, score],
                                                   reference_runs)
        for group in table["group"]
    ]  # fmt: skip
    table["differs"] = [_verdict(group, reference, p) for group, p in
                        zip(table["group"], table["p_welch"], strict=True)]  # fmt: skip
    return table


def marginal_effects(jobs: pd.DataFrame, factor: str, score: str) -> pd.DataFrame:
    """Mean ``score`` per level of ``factor``, over all FINISHED runs of the other factors."""
    done = jobs[jobs["status"] == "FINISHED"]
    rows = [
        {factor: level, **describe(runs[score])} for level, runs in done.groupby(factor, sort=False)
    ]
    table = pd.DataFrame(rows, columns=[factor, "n", "mean", "std", "ci_low", "ci_high"])
    table = table.sort_values("mean", ascending=False).reset_index(drop=True)
    table["effect_vs_best"] = table["mean"] - table["mean"].max()
    return table


def verdict(jobs: pd.DataFrame, factor: str, score: str) -> str:
    """One sentence: which level of ``factor`` is best, by how much over the runner-up, and
    whether that is more than noise (Welch's t-test over the runs of each level)."""
    effects = marginal_effects(jobs, factor, score)
    if len(effects) < 2:
        return f"{factor}: only one level finished so far; nothing to compare."
    best, second = effects.iloc[0], effects.iloc[1]
    done = jobs[jobs["status"] == "FINISHED"]
    p = welch(done.loc[done[factor] == best[factor], score],
              done.loc[done[factor] == second[factor], score])  # fmt: skip
    gap = (best["mean"] - second["mean"]) * 100
    if np.isnan(p):
        noise = "too few runs per level to tell it from noise"
    elif p < ALPHA:
        noise = f"more than noise (Welch's t-test p = {p:.3g})"
    else:
        noise = f"within noise (Welch's t-test p = {p:.3g})"
    return (
        f"{factor}: {best[factor]} is best with {best['mean']:.2%} mean {score} "
        f"(n = {best['n']}), {gap:.2f} points above {second[factor]} "
        f"({second['mean']:.2%}); {noise}."
    )


def _verdict(group: str, reference: str, p: float) -> str:
    if group == reference:
        return "reference"
    if np.isnan(p):
        return "n < 2"
    return "yes" if p < ALPHA else "no"


def _first(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.iloc[0]) if len(values) else math.nan
