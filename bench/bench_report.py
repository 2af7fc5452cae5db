"""The ablation report's error rates, measured on simulated sweeps with a known truth.

``make bench-report``. Each study is the report's own analysis (the group table, the blocked
ANOVA) on a sweep drawn from a known truth (cnnlab.report.simulate: a base accuracy, each
level's true effect, a seed effect shared by the groups of one seed, the run's own noise);
the racing sweeper's race runs on the same scores as the full grid. Prints each measured
share with its Monte Carlo standard error beside what the report promises, then the time to
write a whole report (a simulated sweep in a real MLflow store, read back, plots, HTML), and
writes results/report.json.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
from mlflow import MlflowClient

from bench.common import save
from cnnlab.racing import RaceSettings, race_against_grid
from cnnlab.report import build_report, power, simulate
from cnnlab.report.pairs import ALPHA

FACTORIAL = {
    "model.pooling": ("max", "avg", "lp"),
    "model.head": ("fc", "gap"),
    "model.batchnorm": ("true", "false"),
}
POOLING = {simulate.POOLING: simulate.POOLING_LEVELS}
RACES = {
    "clear winner": simulate.pooling_gaps(0.004, 0.006, 0.008, 0.012, 0.03),
    "close calls": simulate.pooling_gaps(0.002, 0.004, 0.006, 0.01, 0.02),
    "no difference": {},
}


def row(name: str, measured: float, promise: str, target: float, sims: int, ok: bool) -> dict:
    """A share of ``sims`` studies, with its binomial Monte Carlo error."""
    error = math.sqrt(measured * (1 - measured) / sims)
    return {"name": name, "measured": measured, "mc_error": error, "promise": promise,
            "target": target, "sims": sims, "ok": ok}  # fmt: skip


def null_rows(sims: int) -> list[dict]:
    rows = []
    for name, levels in (("pooling x head x batchnorm", FACTORIAL), ("pooling, 6 levels", POOLING)):
        rates = simulate.measure(simulate.Truth(levels, seeds=3), sims, seed=1)
        for what, share in (("group table", rates.table), ("factor verdicts", rates.factors)):
            ok = share <= ALPHA + 2 * math.sqrt(ALPHA * (1 - ALPHA) / sims)
            rows.append(row(f"no true difference, {name}: {what} claims one", share,
                            f"<= {ALPHA}", ALPHA, sims, ok))  # fmt: skip
    return rows


def power_rows(sims: int) -> list[dict]:
    noise = 0.002
    two = power.FactorDesign(levels=2, cells=2, params=2, blocked=True, mse=noise**2)
    detectable = two.detectable(4, ALPHA)
    truth = simulate.Truth({"model.head": ("fc", "gap")}, seeds=4, noise_sd=noise,
                           effects={("model.head", "gap"): detectable})  # fmt: skip
    rates = simulate.measure(truth, sims, seed=3)
    rows = [_matched(f"2 heads, 4 seeds, the stated {detectable * 100:.2f} points: found",
                     rates.terms.get("model.head", 0.0), power.POWER, sims)]  # fmt: skip
    factorial = power.FactorDesign(levels=2, cells=12, params=12, blocked=True, mse=noise**2)
    predicted = factorial.power(0.0015, 3, ALPHA / 7)
    truth = simulate.Truth(FACTORIAL, seeds=3, noise_sd=noise,
                           effects={("model.head", "gap"): 0.0015})  # fmt: skip
    rates = simulate.measure(truth, sims, seed=4)
    rows.append(_matched("factorial, head 0.15 points, 3 seeds: found",
                         rates.terms.get("model.head", 0.0), predicted, sims))  # fmt: skip
    return rows


def _matched(name: str, measured: float, predicted: float, sims: int) -> dict:
    ok = abs(measured - predicted) <= max(0.03, 3 * math.sqrt(predicted * (1 - predicted) / sims))
    return row(name, measured, f"= {predicted:.3f}", predicted, sims, ok)


def race_rows(sims: int) -> list[dict]:
    rows = []
    for name, effects in RACES.items():
        truth = simulate.Truth(POOLING, effects=effects)
        rates = race_against_grid(truth, RaceSettings(n0=3, max_seeds=10), sims, seed=8)
        rows.append(row(f"race vs full grid (10 seeds), {name}: same winner",
                        rates.same_winner, ">= 0.95", 0.95, sims,
                        rates.same_winner >= 0.95))  # fmt: skip
        saving = f"jobs used (saving {1 - rates.jobs:.0%})"
        if effects:  # a race saves where some groups are worse; under none it runs them all
            rows.append(row(f"race vs full grid, {name}: {saving}", rates.jobs, "< 1", 1.0,
                            sims, rates.jobs < 1) | {"mc_error": math.nan})  # fmt: skip
        else:
            rows.append(row(f"race vs full grid, {name}: {saving}", rates.jobs, "(said)",
                            math.nan, sims, True) | {"mc_error": math.nan})  # fmt: skip
        rows.append(row(f"race vs full grid, {name}: dropped a group tied for best",
                        rates.dropped_a_best, "(said)", math.nan, sims, True))  # fmt: skip
    return rows


def report_seconds() -> dict:
    """The whole report on a simulated 36-run factorial in a real sqlite store."""
    truth = simulate.Truth(FACTORIAL, seeds=3, effects={("model.head", "gap"): 0.01})
    with tempfile.TemporaryDirectory() as folder:
        client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
        simulate.record(client, "bench", simulate.jobs(truth, np.random.default_rng(0)))
        start = time.perf_counter()
        build_report(client, "bench", out=Path(folder) / "report")
        seconds = time.perf_counter() - start
    return {"name": "make report on a 36-run factorial (read, test, plot, write)",
            "seconds": seconds}  # fmt: skip


def print_rows(rows: list[dict]) -> None:
    print(f"\n{'what is measured':<78}{'measured':>9}{'± MC':>7}  {'promise':<9}ok")
    for line in rows:
        ok = "yes" if line["ok"] else "NO"
        error = "" if math.isnan(line["mc_error"]) else f"{line['mc_error']:.3f}"
        print(f"{line['name']:<78}{line['measured']:>9.3f}{error:>7}  {line['promise']:<9}{ok}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sims", type=int, default=1000, help="studies per row (race: 1/4)")
    parser.add_argument("--out", default="report", help="results/<out>.json, or a .json path")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = null_rows(args.sims) + power_rows(args.sims) + race_rows(max(args.sims // 4, 10))
    print_rows(rows)
    timing = report_seconds()
    print(f"\n{timing['name']}: {timing['seconds']:.1f} s")
    print(f"(all of it in {time.perf_counter() - started:.0f} s)")
    path = save(args.out, [*rows, timing], {"sims": args.sims, "alpha": ALPHA})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
