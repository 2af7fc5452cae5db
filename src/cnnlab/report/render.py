"""Pictures and pages of an ablation report: PNG plots, one self-contained HTML page that
shows them with the tables, and Markdown tables for papers and READMEs."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from cnnlab.report import stats
from cnnlab.report.verdicts import short

PLOTS = {
    "accuracy_by_group.png": "Accuracy per group (mean, 95% interval, each run a dot)",
    "val_acc_per_epoch.png": "Validation accuracy per epoch (mean over seeds, band: ± 1 std)",
    "accuracy_vs_params.png": "Accuracy against parameter count (mean, 95% interval)",
}


def accuracy_by_group(table: pd.DataFrame, jobs: pd.DataFrame, score: str) -> Figure:
    groups = list(table["group"])[::-1]  # best at the top
    figure = Figure(figsize=(8, 1 + 0.45 * max(len(groups), 1)), layout="tight")
    axes = figure.subplots()
    for row, group in enumerate(groups):
        line = table[table["group"] == group].iloc[0]
        runs = jobs[(jobs["group"] == group) & (jobs["status"] == "FINISHED")][score]
        axes.scatter(runs * 100, [row] * len(runs), color="0.6", s=12, zorder=2)
        mean = line[f"{score}_mean"] * 100
        axes.errorbar(mean, row, xerr=_error(line, score, mean), fmt="o", color="C0", capsize=4,
                      zorder=3)  # fmt: skip
    axes.set_yticks(range(len(groups)), [short(g) for g in groups])
    axes.set_xlabel(f"{score.replace('_', ' ')} (%)")
    low, high = axes.get_xlim()
    axes.set_xlim(max(low, 0), min(high, 100.5))  # accuracy lives in [0, 100]
    axes.grid(axis="x", alpha=0.3)
    return figure


def _error(line: pd.Series, score: str, mean: float) -> list[list[float]] | None:
    """The interval around ``mean`` as errorbar wants it (the logit interval is not
    symmetric), or None without one."""
    low, high = line[f"{score}_ci_low"], line[f"{score}_ci_high"]
    if math.isnan(low):
        return None
    return [[max(mean - low * 100, 0.0)], [max(high * 100 - mean, 0.0)]]


def val_acc_per_epoch(curves: pd.DataFrame, order: list[str]) -> Figure:
    """The legend beside the axes (inside, it hid the curves of a 12-group factorial), and a
    line style per ten groups, so that no two groups share a colour and a style."""
    figure = Figure(figsize=(9, 4.5), layout="constrained")
    axes = figure.subplots()
    for index, group in enumerate(order):
        runs = curves[curves["group"] == group]
        if runs.empty:
            continue
        per_epoch = runs.groupby("epoch")["val_acc"].agg(["mean", "std"]).fillna(0) * 100
        color, style = f"C{index % 10}", LINE_STYLES[index // 10 % len(LINE_STYLES)]
        axes.plot(per_epoch.index + 1, per_epoch["mean"], color=color, linestyle=style,
                  marker=".", label=short(group))  # fmt: skip
        axes.fill_between(per_epoch.index + 1, per_epoch["mean"] - per_epoch["std"],
                          per_epoch["mean"] + per_epoch["std"], color=color,
                          alpha=0.15)  # fmt: skip
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("validation accuracy (%)")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:  # runs that logged validation curves
        axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure


LINE_STYLES = ("-", "--", ":", "-.")


def accuracy_vs_params(table: pd.DataFrame, score: str) -> Figure:
    """Each group a marker named in the legend (labels beside points overlapped where
    parameter counts are alike, as in a pooling ablation); groups of alike counts spread a
    little apart so that each is seen (its count is in the group table); a log axis only
    where the counts span a decade, and plain counts as tick labels (a log axis labelled
    its minor ticks on top of each other)."""
    figure = Figure(figsize=(9, 4.5), layout="constrained")
    axes = figure.subplots()
    shown = table[table["params"].notna() & table[f"{score}_mean"].notna()]
    spread = _spread(shown["params"])
    for index, (_, line) in enumerate(shown.iterrows()):
        mean = line[f"{score}_mean"] * 100
        axes.errorbar(spread.iloc[index], mean, yerr=_error(line, score, mean), capsize=4,
                      fmt=MARKERS[index // 10 % len(MARKERS)], color=f"C{index % 10}",
                      label=short(line["group"]))  # fmt: skip
    if len(shown) and shown["params"].max() >= 10 * shown["params"].min():
        axes.set_xscale("log")
        axes.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        axes.xaxis.set_minor_formatter(NullFormatter())
    else:
        axes.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    axes.set_xlabel("parameters (groups of alike counts drawn a little apart)")
    axes.set_ylabel(f"{score.replace('_', ' ')} (%)")
    axes.grid(alpha=0.3)
    if len(shown):
        axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure


def _spread(params: pd.Series, step: float = 0.02) -> pd.Series:
    """Parameter counts within 5% of each other moved apart by ``step`` of their size."""
    order = params.sort_values()
    placed = params.astype(float).copy()
    cluster: list = []
    for index, value in order.items():
        if cluster and value > 1.05 * order[cluster[0]]:
            _place(placed, order, cluster, step)
            cluster = []
        cluster.append(index)
    _place(placed, order, cluster, step)
    return placed


def _place(placed: pd.Series, order: pd.Series, cluster: list, step: float) -> None:
    middle = (len(cluster) - 1) / 2
    for rank, index in enumerate(cluster):
        placed[index] = order[index] * (1 + step * (rank - middle))


MARKERS = ("o", "s", "^", "D", "v")


def group_display(table: pd.DataFrame) -> pd.DataFrame:
    """The group table as people read it: percentages, mean ± std, the CI as [low, high]."""
    shown = pd.DataFrame({"group": table["group"], "n": table["n"], "failed": table["failed"]})
    if table["running"].any():
        shown["running"] = table["running"]
    for score in stats.SCORES:
        label = score.replace("_", " ")
        shown[f"{label} (%)"] = [
            _mean_std(m, s)
            for m, s in zip(table[f"{score}_mean"], table[f"{score}_std"], strict=True)
        ]
        shown[f"{label} 95% CI"] = [
            _interval(lo, hi)
            for lo, hi in zip(table[f"{score}_ci_low"], table[f"{score}_ci_high"], strict=True)
        ]
    shown["params"] = table["params"].map(_count)
    shown["FLOPs"] = table["flops"].map(_count)
    shown["fit (s)"] = table["fit_s"].map(lambda v: "" if math.isnan(v) else f"{v:.1f}")
    shown["images/s"] = table["images_per_s"].map(_count)
    reference = short(table["vs"].iloc[0])
    shown[f"vs {reference} (points)"] = table["diff"].map(lambda v: _points(v, "+.2f"))
    shown["95% CI (points)"] = [
        "" if math.isnan(lo) else f"[{lo * 100:+.2f}, {hi * 100:+.2f}]"
        for lo, hi in zip(_column(table, "diff_low"), _column(table, "diff_high"), strict=True)
    ]
    shown["test"] = table["test"]
    shown["p"] = _column(table, "p").map(_p)
    shown["p (Holm)"] = _column(table, "p_holm").map(_p)
    shown[f"differs from {reference}"] = table["differs"]
    shown["detectable (points)"] = _column(table, "detectable").map(
        lambda v: "> 100" if v > 1 else _points(v)  # no difference of accuracies is that big
    )
    return shown


def anova_display(terms: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "term": terms["term"],
            "df": terms["df"],
            "F": terms["F"].map(lambda v: f"{v:.2f}"),
            "p": terms["p"].map(_p),
            "p (Holm)": terms["p_holm"].map(_p),
            "partial η²": terms["eta_p2"].map(lambda v: f"{v:.3f}"),
        }
    )


def effects_display(effects: pd.DataFrame, factor: str) -> pd.DataFrame:
    return pd.DataFrame(
        {
            factor: effects[factor],
            "n": effects["n"],
            "mean (%)": [
                _mean_std(m, s) for m, s in zip(effects["mean"], effects["std"], strict=True)
            ],
            "95% CI": [
                _interval(lo, hi)
                for lo, hi in zip(effects["ci_low"], effects["ci_high"], strict=True)
            ],
            "vs best (points)": effects["effect_vs_best"].map(lambda v: f"{v * 100:+.2f}"),
        }
    )


def markdown(
    title: str, facts: list[str], verdicts: list[str], tables: dict[str, pd.DataFrame]
) -> str:
    parts = [f"# {title}", "", *[f"- {fact}" for fact in facts], ""]
    parts += [*[f"- {line}" for line in verdicts], ""]
    for heading, table in tables.items():
        parts += [f"## {heading}", "", table.to_markdown(index=False), ""]
    parts.append(METHOD)
    return "\n".join(parts) + "\n"


def html_page(
    title: str,
    facts: list[str],
    verdicts: list[str],
    tables: dict[str, pd.DataFrame],
    plots: dict[str, Path],
) -> str:
    """One file with everything inside (the PNGs as data URIs), to open, mail or attach."""
    body = [f"<h1>{html.escape(title)}</h1>", "<ul class='facts'>"]
    body += [f"<li>{html.escape(fact)}</li>" for fact in facts]
    body += ["</ul>", "<h2>Answer</h2>", "<ul class='verdicts'>"]
    body += [f"<li>{html.escape(line)}</li>" for line in verdicts]
    body.append("</ul>")
    for name, path in plots.items():
        data = base64.b64encode(path.read_bytes()).decode()
        body += [f"<h2>{html.escape(PLOTS[name])}</h2>",
                 f"<img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>"]  # fmt: skip
    for heading, table in tables.items():
        body += [f"<h2>{html.escape(heading)}</h2>", table.to_html(index=False, border=0)]
    body.append(f"<p class='method'>{html.escape(METHOD)}</p>")
    return PAGE.format(title=html.escape(title), body="\n".join(body))


METHOD = (
    "Method: only FINISHED runs are averaged (FAILED and RUNNING ones are counted). Mean ± "
    "sample standard deviation over seeds; the 95% interval of a mean is Student's t on the "
    "logit of the accuracies, mapped back, so it stays inside [0, 100]%. Groups are ranked, "
    "and the reference chosen, by validation accuracy, so that picking the best never looks "
    "at the test set. Each group is compared with the reference by a t-test in one linear "
    "model of every group with the seed as a block (a seed fixes initialisation and batch "
    "order, so runs of one seed share their luck; the block takes it out, and the residual "
    "spread is pooled over the groups, assumed alike); Welch's t-test where runs do not "
    "record their seed. p-values are Holm-"
    "adjusted across every pair of groups when the reference is the best (choosing it "
    "compared them all), across the groups against it when it is a named baseline; a "
    f"difference is claimed at adjusted p < {stats.ALPHA}. Where none is claimed, "
    "'detectable' is the difference the same test would find with 80% power at the "
    "strictest Holm level. Factors: a type-II ANOVA of the score on every factor and their "
    "interactions, the seed a block where every group ran the same seeds, Holm across its "
    "terms; partial η² per term. A factor's levels are compared, once the factor matters, "
    "by t-tests on the ANOVA's residual spread (Holm across the factor's pairs); 'tied' "
    "levels are not separated from the best. Power and seeds needed are statsmodels' "
    "solvers for that F-test, with the residual spread measured here. Marginal effects "
    "average a factor's runs over the other factors' levels."
)

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; display: block;
  overflow-x: auto; }}
th, td {{ padding: 0.3rem 0.7rem; border-bottom: 1px solid #ddd; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
img {{ max-width: 100%; }}
.verdicts li {{ margin: 0.4rem 0; font-weight: 600; }}
.method {{ color: #555; font-size: 0.85rem; }}
</style></head>
<body>
{body}
</body></html>
"""


def _mean_std(mean: float, std: float) -> str:
    if math.isnan(mean):
        return ""
    return f"{mean * 100:.2f}" if math.isnan(std) else f"{mean * 100:.2f} ± {std * 100:.2f}"


def _interval(low: float, high: float) -> str:
    return "" if math.isnan(low) else f"[{low * 100:.2f}, {high * 100:.2f}]"


def _column(table: pd.DataFrame, name: str) -> pd.Series:
    """``table[name]``, or NaN where the table has no such column (no row had it)."""
    return table[name] if name in table else pd.Series(math.nan, index=table.index)


def _p(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.3g}"


def _points(value: float, spec: str = ".2f") -> str:
    return "" if math.isnan(value) else f"{value * 100:{spec}}"


def _count(value: float) -> str:
    return "" if math.isnan(value) else f"{value:,.0f}"
