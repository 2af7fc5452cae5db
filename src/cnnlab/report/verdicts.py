"""The report's answer in sentences: per factor, which level is best (or which are tied), by
how much, with its interval, adjusted p and partial eta squared; where nothing is shown, how
small a difference the design could have found and how many seeds a given one needs; one
sentence per interaction the ANOVA finds; and the best configuration with its ties."""

from __future__ import annotations

import math

import pandas as pd

from cnnlab.report import anova as factorial
from cnnlab.report.stats import ALPHA

ONE_POINT = 0.01


def factor_verdict(
    done: pd.DataFrame, factor: str, score: str, model: factorial.Anova | str
) -> str:
    means = factorial.level_means(done, factor, score)
    if len(means) < 2:
        return f"{factor}: only one level finished so far; nothing to compare."
    best, runner_up = means.index[0], means.index[1]
    if isinstance(model, str):
        return (
            f"{factor}: {best} has the highest mean {score} ({means.loc[best, 'mean']:.2%}); "
            f"no test: {model}."
        )
    term = model.term(factor)
    comparisons = factorial.level_comparisons(done, factor, score, model)
    anova_text = _anova_text(term, model)
    if not term["p_holm"] < ALPHA:
        comparison, _ = comparisons[(best, runner_up)]
        return (
            f"{factor}: no difference shown: {best} ({means.loc[best, 'mean']:.2%}) is "
            f"{_points(comparison.diff)} points above {runner_up} "
            f"({means.loc[runner_up, 'mean']:.2%}; 95% CI {_interval(comparison)} points); "
            f"{anova_text}. {_power(model, len(means), comparison.diff)}"
        )
    tied = [] if len(means) == 2 else factorial.tied_with_best(comparisons, best)
    below = [level for level in means.index if level != best and level not in tied]
    first = below[0] if below else runner_up
    comparison, p_holm = comparisons[(best, first)]
    if len(means) == 2:
        p_holm = term["p_holm"]  # two levels: the F-test is this comparison
    gap = (
        f"{_points(comparison.diff)} points above {first} ({means.loc[first, 'mean']:.2%}; "
        f"95% CI {_interval(comparison)} points, Holm-adjusted p = {p_holm:.3g})"
    )
    if not tied:
        lead = f"{best} is best ({means.loc[best, 'mean']:.2%}), {gap}"
    else:
        named = ", ".join(f"{level} ({means.loc[level, 'mean']:.2%})" for level in tied)
        lead = (
            f"{best} ({means.loc[best, 'mean']:.2%}) is tied for best with {named}; {best} is {gap}"
        )
    detects = _power(model, len(means), comparison.diff, seeds_needed=False)
    return f"{factor}: {lead}; the factor matters ({anova_text}). {detects}"


def interaction_verdicts(done: pd.DataFrame, score: str, model: factorial.Anova | str) -> list[str]:
    if isinstance(model, str) or not model.interactions:
        return []
    terms = model.terms[model.terms["factors"].map(len) > 1]
    if terms.empty:
        return []
    found = terms[terms["p_holm"] < ALPHA]
    if found.empty:
        return [
            f"No interaction shown: each of the {len(terms)} tested has Holm-adjusted "
            f"p >= {ALPHA} (smallest {terms['p_holm'].min():.3g})."
        ]
    return [_interaction(done, score, term, model) for _, term in found.iterrows()]


def _interaction(done: pd.DataFrame, score: str, term: pd.Series, model: factorial.Anova) -> str:
    head = f"{term['term']} interact ({_anova_text(term, model)})"
    if len(term["factors"]) > 2:
        return f"{head}: how each acts depends on the others; the group table shows every one."
    # Read it as the effect of the factor with more levels (or the first named) at each
    # level of the other: "gap is best with batchnorm, fc without".
    factors = list(term["factors"])
    second, first = sorted(factors, key=lambda f: (done[f].nunique(), -factors.index(f)))
    means = factorial.cell_means(done, first, second, score)
    parts = []
    for level, row in means.iterrows():
        ranked = row.dropna().sort_values(ascending=False)
        parts.append(
            f"with {second}={level}, {ranked.index[0]} is best "
            f"(+{_points(ranked.iloc[0] - ranked.iloc[1])} points over {ranked.index[1]})"
        )
    return f"{head}: " + "; ".join(parts) + "."


def best_configuration(table: pd.DataFrame) -> str:
    """The best group and the groups not separated from it in the pairwise table."""
    best = table.iloc[0]
    score = "val_acc" if not math.isnan(best["val_acc_mean"]) else "test_acc"
    tied = list(table.loc[table["differs"] == "no", "group"])
    others = len(table) - 1
    if not tied:
        rest = "separated from every other group"
    elif len(tied) == others:
        rest = f"not separated from any of the other {others} groups"
    else:
        named = ", ".join(short(group) for group in tied[:MAX_NAMED])
        more = f" and {len(tied) - MAX_NAMED} more" if len(tied) > MAX_NAMED else ""
        rest = f"tied with {named}{more}"
    return (
        f"Best configuration: {short(best['group'])} ({best[f'{score}_mean']:.2%} mean "
        f"{score}); {rest} (pairwise tests, Holm across {int(best['family'])} comparisons)."
    )


MAX_NAMED = 5  # ties named in a sentence; the group table lists them all


def short(group: str) -> str:
    """``model.pooling=max,model.head=gap`` as ``pooling=max head=gap``."""
    parts = [part.split("=", 1) for part in group.split(",") if "=" in part]
    return " ".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in parts) or group


def _power(model: factorial.Anova, levels: int, diff: float, seeds_needed: bool = True) -> str:
    """What the design detects with 80% power; where nothing was shown (``seeds_needed``),
    also the seeds per group that 1 point and the observed difference would take."""
    design = model.design_of(levels)
    alpha = ALPHA / model.family  # Holm's strictest step: what the first claim must pass
    detectable = design.detectable(model.seeds, alpha)
    if math.isnan(detectable):
        return "The runs agree exactly; there is no spread to judge power from."
    if detectable > 1:  # past any difference of two accuracies
        text = (
            f"With {model.seeds} seeds per group this design finds no possible difference "
            "(up to 100 points) with 80% power"
        )
    else:
        text = (
            f"With {model.seeds} seeds per group this design detects a difference of "
            f"{_points(detectable)} points with 80% power"
        )
    if not seeds_needed:
        return text + "."
    one, observed = design.seeds_needed(ONE_POINT, alpha), design.seeds_needed(abs(diff), alpha)
    text += f"; 1 point would take {_seeds(one)}"
    if abs(diff) >= 0.00005:
        text += f", the observed {_points(abs(diff))} points {_seeds(observed)}"
    return text + "."


def _anova_text(term: pd.Series, model: factorial.Anova) -> str:
    kind = "blocked ANOVA" if model.blocked else "ANOVA"
    return (
        f"{kind} F({term['df']}, {model.df_resid}) = {term['F']:.2f}, "
        f"Holm-adjusted p = {term['p_holm']:.3g} (raw {term['p']:.3g}), "
        f"partial η² = {term['eta_p2']:.2f}"
    )


def _seeds(count: int | None) -> str:
    return "more seeds than anyone will run" if count is None else f"{count} seeds per group"


def _points(diff: float) -> str:
    return f"{diff * 100:.2f}"


def _interval(comparison) -> str:
    return f"{_points(comparison.low)} to {_points(comparison.high)}"
