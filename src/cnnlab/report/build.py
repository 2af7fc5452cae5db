"""Write a sweep's report into a folder and attach it to the sweep's parent run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run

from cnnlab.checks import ConfigError
from cnnlab.report import anova, render, stats, verdicts
from cnnlab.report.collect import Sweep, load_sweep
from cnnlab.report.context import context_lines
from cnnlab.report.verdicts import short


def build_report(
    client: MlflowClient,
    experiment: str | None = None,
    parent: str = "latest",
    out: Path | None = None,
    baseline: str | None = None,
    attach: bool = True,
) -> Path:
    """Write report.html, report.md, the PNG plots and groups.csv into ``out`` (default
    ``reports/<experiment>``) and, with ``attach``, under ``report/`` in the parent run's
    artifacts. Returns the HTML page's path."""
    sweep = load_sweep(client, experiment, parent)
    if sweep.finished.empty:
        raise ConfigError(
            f"sweep {sweep.parent.info.run_id} has no FINISHED job yet; {_counts(sweep)}"
        )
    jobs = sweep.jobs
    score = stats.score_of(sweep.finished)
    try:
        table = stats.group_table(jobs, score, baseline)
    except ValueError as error:
        raise ConfigError(f"--baseline: {error}") from error
    out = Path(out) if out is not None else Path("reports") / sweep.experiment_name
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "accuracy_by_group.png": render.accuracy_by_group(table, jobs, score),
        "val_acc_per_epoch.png": render.val_acc_per_epoch(sweep.curves, list(table["group"])),
        "accuracy_vs_params.png": render.accuracy_vs_params(table, score),
    }
    plots = {}
    for name, figure in figures.items():
        plots[name] = out / name
        figure.savefig(plots[name], dpi=120)
    answer, tables = _answer(sweep, score, table)
    title = f"Ablation report: {sweep.experiment_name}"
    facts = [*context_lines(sweep.parents, sweep.settings), *_facts(sweep, score)]
    table.to_csv(out / "groups.csv", index=False)
    (out / "report.md").write_text(render.markdown(title, facts, answer, tables))
    page = out / "report.html"
    page.write_text(render.html_page(title, facts, answer, tables, plots))
    if attach:  # a pooled report beside the first sweep's own
        client.log_artifacts(sweep.parent.info.run_id, str(out), _artifact_path(sweep))
    return page


def _answer(
    sweep: Sweep, score: str, table: pd.DataFrame
) -> tuple[list[str], dict[str, pd.DataFrame]]:
    """The verdicts, the design's line (which tests ran, and why) and the tables."""
    done, factors = sweep.finished, sweep.factors
    model = anova.fit(done, factors, score)
    answer = [verdicts.factor_verdict(done, factor, score, model) for factor in factors]
    answer += verdicts.interaction_verdicts(done, score, model)
    if len(factors) > 1:
        answer.append(verdicts.best_configuration(table))
    answer.append(_design(done))
    tables = {"Groups": render.group_display(table)}
    if isinstance(model, anova.Anova):
        kind = "blocked by seed" if model.blocked else "no blocks"
        tables[f"ANOVA (type II, {kind})"] = render.anova_display(model.terms)
    for factor in factors:
        effects = stats.marginal_effects(sweep.jobs, factor, score)
        tables[f"Marginal effect of {factor}"] = render.effects_display(effects, factor)
    return answer, tables


def _design(done: pd.DataFrame) -> str:
    """Which tests ran, and why."""
    if not stats.seeds_recorded(done):
        return (
            "Tests: runs do not record their seed (or a group ran one twice): Welch's t-test "
            "between groups, an ANOVA without blocks."
        )
    blocked, why = stats.seeds_shared(done)
    anova_line = "the seed a block of the ANOVA" if blocked else f"an ANOVA without blocks ({why})"
    return (
        "Tests: runs of one seed compared with each other (a seed fixes initialisation and "
        "batch order, so its runs share their luck): groups by t-tests in one model with the "
        f"seed as a block (score ~ group + seed), {anova_line}."
    )


def _artifact_path(sweep: Sweep) -> str:
    return "report" if len(sweep.parents) == 1 else "report/pooled"


def _facts(sweep: Sweep, score: str) -> list[str]:
    facts = [_about(parent) for parent in sweep.parents]
    if len(sweep.parents) > 1:
        facts.append(
            f"Pooled: {len(sweep.parents)} sweeps as one study, grouped by configuration "
            "(cnnlab.group_hash); a configuration and seed trained twice counts once."
        )
    facts.append(f"Jobs: {_counts(sweep)}; groups ranked by mean {score.replace('_', ' ')}.")
    facts += [_raced(parent) for parent in sweep.parents if "racing.jobs" in parent.data.tags]
    statuses = {parent.info.status for parent in sweep.parents}
    which = "the sweep" if len(sweep.parents) == 1 else "a sweep"
    if "RUNNING" in statuses:
        facts.append(f"Partial: {which} is still running; this report shows the jobs so far.")
    if "KILLED" in statuses:
        facts.append(
            f"Stopped: {which} ended before its last job (interrupted, or its process died); "
            "this report shows the jobs it recorded."
        )
    return facts


def _raced(parent: Run) -> str:
    """What a racing sweep (hydra/sweeper=racing) spent against the full grid."""
    tags = parent.data.tags
    jobs, full = int(tags["racing.jobs"]), int(tags["racing.full_grid_jobs"])
    max_seeds = json.loads(tags.get("racing.settings", "{}")).get("max_seeds", "?")
    dropped = [item.rpartition("@") for item in tags.get("racing.dropped", "").split(";") if item]
    text = (
        f"Raced: {jobs} jobs against {full} for the full grid at {max_seeds} seeds per group "
        f"({jobs / full:.0%}); still racing at the end: "
        f"{', '.join(short(g) for g in tags.get('racing.still_racing', '').split(';') if g)}"
    )
    if dropped:
        text += "; dropped early: " + ", ".join(
            f"{short(g)} after {n} seeds" for g, _, n in dropped
        )
    return text + "."


def _about(parent: Run) -> str:
    grid = json.loads(parent.data.tags.get("cnnlab.grid", "{}"))
    return f"Sweep {parent.info.run_name} ({parent.info.run_id}); grid: " + "; ".join(
        f"{key} = {values}" for key, values in grid.items()
    )


def _counts(sweep: Sweep) -> str:
    status = sweep.jobs["status"].value_counts()
    parts = [f"{status.get(s, 0)} {s.lower()}" for s in ("FINISHED", "FAILED", "RUNNING", "KILLED")]
    return ", ".join(parts)
