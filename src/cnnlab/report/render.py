"""Pictures and pages of an ablation report: PNG plots, one self-contained HTML page that
shows them with the tables, and Markdown tables for papers and READMEs."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state
from matplotlib.ticker import MaxNLocator

from cnnlab.report import stats

PLOTS = {
    "accuracy_by_group.png": "Accuracy per group (mean, 95% CI, each run a dot)",
    "val_acc_per_epoch.png": "Validation accuracy per epoch (mean over seeds, band: ± 1 std)",
    "accuracy_vs_params.png": "Accuracy against parameter count (mean, 95% CI)",
}


def accuracy_by_group(table: pd.DataFrame, jobs: pd.DataFrame, score: str) -> Figure:
    groups = list(table["group"])[::-1]  # best at the top
    figure = Figure(figsize=(8, 1 + 0.45 * max(len(groups), 1)), layout="tight")
    axes = figure.subplots()
    for row, group in enumerate(groups):
        line = table[table["group"] == group].iloc[0]
        runs = jobs[(jobs["group"] == group) & (jobs["status"] == "FINISHED")][score]
        axes.scatter(runs * 100, [row] * len(runs), color="0.6", s=12, zorder=2)
        low, high = line[f"{score}_ci_low"], line[f"{score}_ci_high"]
        mean = line[f"{score}_mean"] * 100
        if not math.isnan(low):
            axes.errorbar(mean, row, xerr=[[mean - low * 100], [high * 100 - mean]],
                          fmt="o", color="C0", capsize=4, zorder=3)  # fmt: skip
        else:
            axes.plot(mean, row, "o", color="C0", zorder=3)
    axes.set_yticks(range(len(groups)), [_short(g) for g in groups])
    axes.set_xlabel(f"{score.replace('_', ' ')} (%)")
    axes.grid(axis="x", alpha=0.3)
    return figure


def val_acc_per_epoch(curves: pd.DataFrame, order: list[str]) -> Figure:
    figure = Figure(figsize=(8, 4.5), layout="tight")
    axes = figure.subplots()
    for color, group in enumerate(order):
        runs = curves[curves["group"] == group]
        if runs.empty:
            continue
        per_epoch = runs.groupby("epoch")["val_acc"].agg(["mean", "std"]).fillna(0) * 100
        axes.plot(per_epoch.index + 1, per_epoch["mean"], color=f"C{color % 10}", marker=".",
                  label=_short(group))  # fmt: skip
        axes.fill_between(per_epoch.index + 1, per_epoch["mean"] - per_epoch["std"],
                          per_epoch["mean"] + per_epoch["std"], color=f"C{color % 10}",
                          alpha=0.2)  # fmt: skip
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("validation accuracy (%)")
    axes.grid(alpha=0.3)
    if order:
        axes.legend(fontsize="small", loc="lower right")
    return figure


def accuracy_vs_params(table: pd.DataFrame, score: str) -> Figure:
    figure = Figure(figsize=(8, 4.5), layout="tight")
    axes = figure.subplots()
    for _, line in table.iterrows():
        if math.isnan(line["params"]) or math.isnan(line[f"{score}_mean"]):
            continue
        mean = line[f"{score}_mean"] * 100
        error = (
            0.0 if math.isnan(line[f"{score}_ci_high"]) else line[f"{score}_ci_high"] * 100 - mean
        )
        axes.errorbar(line["params"], mean, yerr=error, fmt="o", capsize=4)
        axes.annotate(_short(line["group"]), (line["params"], mean), fontsize="small",
                      textcoords="offset points", xytext=(5, 5))  # fmt: skip
    axes.set_xscale("log")
    axes.set_xlabel("parameters")
    axes.set_ylabel(f"{score.replace('_', ' ')} (%)")
    axes.grid(alpha=0.3)
    return figure


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
    shown["p (Welch)"] = table["p_welch"].map(lambda v: "" if math.isnan(v) else f"{v:.3g}")
    shown[f"differs from {_short(table['vs'].iloc[0])}"] = table["differs"]
    return shown


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
    "sample standard deviation over seeds; 95% confidence interval of the mean from "
    "Student's t-distribution. Groups are ranked, and the reference chosen, by validation "
    "accuracy, so that picking the best never looks at the test set. 'differs' compares "
    "each group with the reference by Welch's t-test (unequal variances), two-sided, at "
    f"alpha = {stats.ALPHA}, not corrected for the number of comparisons. Marginal effects "
    "average a factor's runs over the other factors' levels."
)

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }}
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


def _short(group: str) -> str:
    """``model.pooling=max,model.head=gap`` as ``pooling=max head=gap`` for labels."""
    parts = [part.split("=", 1) for part in group.split(",") if "=" in part]
    return " ".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in parts) or group


def _mean_std(mean: float, std: float) -> str:
    if math.isnan(mean):
        return ""
    return f"{mean * 100:.2f}" if math.isnan(std) else f"{mean * 100:.2f} ± {std * 100:.2f}"


def _interval(low: float, high: float) -> str:
    return "" if math.isnan(low) else f"[{low * 100:.2f}, {high * 100:.2f}]"


def _count(value: float) -> str:
    return "" if math.isnan(value) else f"{value:,.0f}"
