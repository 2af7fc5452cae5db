"""Main effects and interactions of a sweep's factors: a type-II ANOVA (statsmodels) of
``score ~ C(a)*C(b)*... + C(seed)``, the seed a block where every group ran the same seeds;
Holm across the model's terms, so the report's factor verdicts together claim a difference
under no true one at most ``ALPHA`` of the time; partial eta squared per term; and, for a
factor that matters, which of its levels differ (t-tests on the model's residual spread,
Holm across the factor's pairs)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pandas as pd
from scipy import stats
from statsmodels.formula.api import ols
from statsmodels.stats.anova import anova_lm

from cnnlab.report.pairs import ALPHA, CONFIDENCE, Comparison, holm
from cnnlab.report.power import FactorDesign
from cnnlab.report.stats import seeds_shared

INTERACTION = " \N{MULTIPLICATION SIGN} "  # as a paper writes an interaction


@dataclass(frozen=True)
class Anova:
    terms: pd.DataFrame  # one row per term: term, factors, df, F, p, p_holm, eta_p2
    mse: float  # residual mean square
    df_resid: int
    blocked: bool  # the seed is a block
    interactions: bool  # the model has them (every combination of levels ran)
    seeds: int  # runs of each group (its seeds)
    cells: int  # groups (configurations) in the model
    params: int  # the model's parameters besides the seed block
    why: str  # why blocked or not, for the report

    def term(self, factor: str) -> pd.Series:
        return self.terms.set_index("term").loc[factor]

    def design_of(self, levels: int) -> FactorDesign:
        """The F-test of a factor with ``levels`` levels in this model, for power."""
        return FactorDesign(levels, self.cells, self.params, self.blocked, self.mse)

    @property
    def family(self) -> int:
        return len(self.terms)


def fit(done: pd.DataFrame, factors: list[str], score: str) -> Anova | str:
    """The ANOVA of the FINISHED runs ``done``, or one line saying why there is none."""
    factors = [f for f in factors if f in done and done[f].nunique() > 1]
    if not factors:
        return "no factor has two levels that finished"
    names = {factor: f"f{i}" for i, factor in enumerate(factors)}  # formula-safe names
    data = pd.DataFrame({name: done[f].astype(str) for f, name in names.items()})
    data["y"] = done[score].astype(float).to_numpy()
    blocked, why = seeds_shared(done)
    if blocked:
        data["seed"] = done["seed"].astype(str).to_numpy()
    cells = done.groupby(factors).ngroups
    interactions = cells == math.prod(done[f].nunique() for f in factors)
    joined = ("*" if interactions else " + ").join(f"C({name})" for name in names.values())
    model = ols(f"y ~ {joined}" + (" + C(seed)" if blocked else ""), data).fit()
    if model.df_resid < 1:
        return f"too few runs for an ANOVA ({len(data)} runs, {cells} groups)"
    table = anova_lm(model, typ=2)
    residual = table.loc["Residual", "sum_sq"]
    labels = {f"C({name})": factor for factor, name in names.items()}
    rows = []
    for index, line in table.iterrows():
        parts = str(index).split(":")
        if not all(part in labels for part in parts):
            continue  # the seed block and the residual
        rows.append(
            {
                "term": INTERACTION.join(labels[part] for part in parts),
                "factors": tuple(labels[part] for part in parts),
                "df": int(line["df"]),
                "F": line["F"],
                "p": line["PR(>F)"],
                "eta_p2": line["sum_sq"] / (line["sum_sq"] + residual),
            }
        )
    terms = pd.DataFrame(rows)
    terms["p_holm"] = holm(list(terms["p"]))
    seeds = int(done.groupby(factors).size().min())
    params = int(model.df_model) + 1 - (seeds - 1 if blocked else 0)
    return Anova(terms, float(model.mse_resid), int(model.df_resid), blocked, interactions,
                 seeds, cells, params, why)  # fmt: skip


def level_means(done: pd.DataFrame, factor: str, score: str) -> pd.DataFrame:
    """Mean ``score`` and run count per level of ``factor``, best first."""
    means = done.groupby(factor)[score].agg(["mean", "count"])
    return means.sort_values("mean", ascending=False)


def level_comparisons(
    done: pd.DataFrame, factor: str, score: str, anova: Anova
) -> dict[tuple[str, str], tuple[Comparison, float]]:
    """Every pair of the factor's levels (higher mean first): the difference of their means
    tested against the ANOVA's residual spread (Fisher's least significant difference, the
    same test as the factor's F for two levels), with its Holm-adjusted p."""
    means = level_means(done, factor, score)
    found = {}
    t_critical = stats.t.ppf((1 + CONFIDENCE) / 2, anova.df_resid)
    for first, second in itertools.combinations(means.index, 2):
        a, b = means.loc[first], means.loc[second]
        diff = a["mean"] - b["mean"]
        se = math.sqrt(anova.mse * (1 / a["count"] + 1 / b["count"]))
        p = 2 * stats.t.sf(abs(diff) / se, anova.df_resid) if se > 0 else float(diff == 0)
        low, high = max(diff - t_critical * se, -1.0), min(diff + t_critical * se, 1.0)
        found[(first, second)] = Comparison(diff, low, high, p, "LSD", se, anova.df_resid)
    adjusted = holm([c.p for c in found.values()])
    return {pair: (c, p) for (pair, c), p in zip(found.items(), adjusted, strict=True)}


def tied_with_best(
    comparisons: dict[tuple[str, str], tuple[Comparison, float]], best: str
) -> list[str]:
    """The levels not separated from ``best`` (Holm-adjusted p at or above ALPHA)."""
    return [
        (second if first == best else first)
        for (first, second), (_, p_holm) in comparisons.items()
        if best in (first, second) and not p_holm < ALPHA
    ]


def cell_means(done: pd.DataFrame, first: str, second: str, score: str) -> pd.DataFrame:
    """Mean ``score`` of each level of ``first`` (columns) at each level of ``second``."""
    return done.groupby([second, first])[score].mean().unstack(first)
