"""Two groups (or two levels) compared: the difference of their mean accuracies, its 95%
interval, the p-value, and the standard error and degrees of freedom a power analysis needs.

Where runs record their seed, pairs are compared in one linear model with the seed as a
block (``score ~ C(group) + C(seed)``, statsmodels' pairwise contrasts): runs of one seed
share their luck (initialisation, batch order), the block takes it out, and the residual
spread is pooled over every group, so 3 seeds give 2 (k - 1) degrees of freedom rather
than the 2 of a lone paired t-test. Runs without a seed get Welch's t-test. Holm's
adjustment is statsmodels'."""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.formula.api import ols
from statsmodels.stats.multitest import multipletests

CONFIDENCE = 0.95
ALPHA = 0.05  # a Holm-adjusted p below this is reported as a difference


@dataclass(frozen=True)
class Comparison:
    """``first`` minus ``second`` (a fraction of 1), its 95% interval, the two-sided p."""

    diff: float
    low: float
    high: float
    p: float
    test: str  # "blocked t", "Welch t", "LSD" (a factor's levels in the ANOVA)
    se: float  # standard error of ``diff``
    df: float  # the test's degrees of freedom


NO_COMPARISON = Comparison(math.nan, math.nan, math.nan, math.nan, "n < 2", math.nan, math.nan)


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """statsmodels' Holm ends with gc.collect(), a full collection that costs 0.3 s in a
    process holding MLflow (a calibration study runs thousands); frozen objects are left
    out of it."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values, NaN left as NaN and out of the family."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p, math.nan)
    tested = ~np.isnan(p)
    if tested.any():
        with frozen_gc():
            adjusted[tested] = multipletests(p[tested], alpha=ALPHA, method="holm")[1]
    return adjusted.tolist()


def blocked(
    runs: pd.DataFrame, score: str, pairs: list[tuple[str, str]]
) -> dict[tuple[str, str], Comparison]:
    """Each pair of ``runs["group"]`` compared in ``score ~ C(group) + C(seed)`` (OLS); the
    seed term is left out when the runs all share one seed."""
    codes = {group: str(i) for i, group in enumerate(dict.fromkeys(runs["group"]))}
    data = pd.DataFrame({"y": runs[score].astype(float).to_numpy(),
                         "g": runs["group"].map(codes).to_numpy(),
                         "seed": runs["seed"].astype(str).to_numpy()})  # fmt: skip
    formula = "y ~ C(g)" + (" + C(seed)" if data["seed"].nunique() > 1 else "")
    model = ols(formula, data).fit()
    if model.df_resid < 1 or len(codes) < 2:
        return dict.fromkeys(pairs, NO_COMPARISON)
    with frozen_gc():
        frame = model.t_test_pairwise("C(g)", method="holm").result_frame
    contrasts = {tuple(label.split("-")): row for label, row in frame.iterrows()}
    found = {}
    for first, second in pairs:
        a, b = codes.get(first), codes.get(second)
        row, sign = contrasts.get((a, b)), 1.0
        if row is None:
            row, sign = contrasts.get((b, a)), -1.0
        if row is None:  # a group with no run
            found[(first, second)] = NO_COMPARISON
            continue
        low, high = sorted((sign * row["Conf. Int. Low"], sign * row["Conf. Int. Upp."]))
        found[(first, second)] = Comparison(sign * row["coef"], max(low, -1.0), min(high, 1.0),
                                            row["P>|t|"], "blocked t", row["std err"],
                                            model.df_resid)  # fmt: skip
    return found


def welch(first: pd.Series, second: pd.Series) -> Comparison:
    """Welch's t-test (unequal variances), for runs that do not record their seed."""
    first, second = first.dropna(), second.dropna()
    if min(len(first), len(second)) < 2:
        return NO_COMPARISON
    diff = float(first.mean() - second.mean())
    se = math.sqrt(first.var(ddof=1) / len(first) + second.var(ddof=1) / len(second))
    if se == 0:  # every run of both the same: nothing to test against
        p = 1.0 if diff == 0 else 0.0
        return Comparison(diff, diff, diff, p, "Welch t", 0.0, len(first) + len(second) - 2)
    result = stats.ttest_ind(first, second, equal_var=False)
    low, high = result.confidence_interval(CONFIDENCE)
    # A difference of two accuracies lies in [-1, 1]; t can reach past it with 2 seeds.
    return Comparison(diff, max(float(low), -1.0), min(float(high), 1.0), float(result.pvalue),
                      "Welch t", se, float(result.df))  # fmt: skip
