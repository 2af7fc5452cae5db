"""The numbers of an ablation report's group table: each group's mean with a 95% interval
that stays inside [0, 100]%, and each group against a reference (the best, or
``--baseline``): the difference in accuracy points with its interval, a paired t-test by
seed where both groups ran the same seeds (Welch's otherwise), Holm-adjusted p-values, and
for every difference not shown the smallest one this design detects."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
from scipy import special, stats

from cnnlab.report import power
from cnnlab.report.pairs import ALPHA, CONFIDENCE, blocked, holm, welch

SCORES = ("test_acc", "val_acc")
# Accuracies of exactly 0 or 1 are moved this far inside before the logit (a finite
# interval that still reaches the bound).
LOGIT_EPS = 1e-6


def describe(values: pd.Series) -> dict[str, float]:
    """n, mean, std and a 95% interval of the mean (NaN where n < 2).

    The interval is Student's t on the logit of the accuracies, mapped back: it never
    leaves [0, 1] (a t-interval on the accuracies themselves gave 85% to 104% for two
    seeds). Bootstrapping over seeds is no better here: with 2 seeds it is [min, max].
    """
    values = values.dropna()
    n = len(values)
    mean = float(values.mean()) if n else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    std = float(values.std(ddof=1))
    if std == 0:  # identical repeats: the interval is the point
        return {"n": n, "mean": mean, "std": 0.0, "ci_low": mean, "ci_high": mean}
    logits = special.logit(np.clip(values.to_numpy(dtype=float), LOGIT_EPS, 1 - LOGIT_EPS))
    half = stats.t.ppf((1 + CONFIDENCE) / 2, n - 1) * logits.std(ddof=1) / math.sqrt(n)
    low, high = special.expit([logits.mean() - half, logits.mean() + half])
    return {"n": n, "mean": mean, "std": std, "ci_low": float(low), "ci_high": float(high)}


def seeds_shared(done: pd.DataFrame, by: str = "group") -> tuple[bool, str]:
    """Whether the runs are paired by seed: every ``by`` ran the same seeds, each once, at
    least two. The seed fixes initialisation and batch order, so runs of one seed share
    their luck; pairing removes it. Returns the answer and the reason, for the report."""
    if "seed" not in done or done["seed"].isna().any():
        return False, "some runs do not record their seed"
    per_group = done.groupby(by)["seed"]
    if (per_group.nunique() != per_group.size()).any():
        return False, "a group ran a seed twice"
    seeds = {frozenset(values) for _, values in per_group}
    if len(seeds) > 1:
        return False, "the groups did not all run the same seeds"
    (common,) = seeds
    if len(common) < 2:
        return False, "fewer than two seeds"
    return True, f"every group ran seeds {', '.join(sorted(common, key=_seed_order))}"


def seeds_recorded(done: pd.DataFrame) -> bool:
    """Every run names its seed and no group ran one twice: two groups are then paired over
    the seeds both ran (all of them, unless a race stopped one early or a job failed)."""
    if "seed" not in done or done["seed"].isna().any():
        return False
    return not done.duplicated(["group", "seed"]).any()


def _seed_order(seed: str) -> tuple[int, str]:
    return (int(seed), "") if str(seed).lstrip("-").isdigit() else (0, str(seed))


def score_of(jobs: pd.DataFrame) -> str:
    """The accuracy a report ranks by: the best validation accuracy, so that choosing the
    best group never looks at the test set (test accuracy is reported beside it)."""
    return "val_acc" if jobs["val_acc"].notna().any() else "test_acc"


def group_table(jobs: pd.DataFrame, score: str, baseline: str | None = None) -> pd.DataFrame:
    """One row per group (configuration without the seed), best first by mean ``score``.

    Only FINISHED runs are averaged; FAILED and RUNNING ones are counted. Each group is
    compared with the reference (``vs``: the best group, or ``baseline``). With the best as
    reference the family Holm corrects is every pair of groups, since picking the best
    already looked at all of them; with a baseline named up front, the groups against it.
    """
    if baseline is not None and baseline not in set(jobs["group"]):
        valid = ", ".join(sorted(set(jobs["group"])))
        raise ValueError(f"baseline group {baseline!r} is not in this sweep; valid: {valid}")
    table = _summaries(jobs)
    if table.empty:
        return table
    table = table.sort_values(f"{score}_mean", ascending=False, na_position="last")
    table = table.reset_index(drop=True)
    reference = baseline if baseline is not None else table.loc[0, "group"]
    done = jobs[jobs["status"] == "FINISHED"]
    groups = list(table["group"])
    pairs = (
        list(itertools.combinations(groups, 2))
        if baseline is None
        else [(g, reference) for g in groups if g != reference]
    )
    if seeds_recorded(done):
        tested = blocked(done, score, pairs)
    else:
        runs = {group: values[score] for group, values in done.groupby("group")}
        empty = pd.Series(dtype=float)
        tested = {(a, b): welch(runs.get(a, empty), runs.get(b, empty)) for a, b in pairs}
    adjusted = dict(zip(tested, holm([c.p for c in tested.values()]), strict=True))
    rows = [_against(group, reference, tested, adjusted, len(tested)) for group in groups]
    return pd.concat([table, pd.DataFrame(rows)], axis=1)


def _summaries(jobs: pd.DataFrame) -> pd.DataFrame:
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
    return pd.DataFrame(rows)


def _against(group, reference, tested, adjusted, family: int) -> dict:
    """The row of ``group``'s comparison with the reference: group minus reference."""
    row = {"vs": reference, "family": family}
    if group == reference:
        return row | {"diff": 0.0, "differs": "reference", "test": ""}
    pair = (group, reference) if (group, reference) in tested else (reference, group)
    found, sign = tested[pair], 1 if pair[0] == group else -1
    p_holm = adjusted[pair]
    row |= {
        "diff": sign * found.diff,
        "diff_low": min(sign * found.low, sign * found.high),
        "diff_high": max(sign * found.low, sign * found.high),
        "p": found.p,
        "p_holm": p_holm,
        "test": found.test,
    }
    if math.isnan(found.p):
        return row | {"differs": "n < 2"}
    if p_holm < ALPHA:
        return row | {"differs": "yes"}
    # The design's own yardstick: what it would have found with 80% power, at the
    # strictest level Holm applies in this family (Bonferroni's).
    detectable = power.detectable(found.se, found.df, ALPHA / family)
    return row | {"differs": "no", "detectable": detectable}


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


def _first(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.iloc[0]) if len(values) else math.nan
