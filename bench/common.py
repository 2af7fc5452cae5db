"""Shared by the benchmarks: alternating timed repeats, the spread of their ratios, the
machine's load while they ran, and the results file that partial runs merge into."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
# The results file's layout: 2 keeps one record (when, environment, settings, results) per
# section, so that a run of some sections leaves the others as they were measured. Format 1
# (no "sections": one run's rows) is read as one section, ALL.
FORMAT = 2
ALL = "all"  # the section of a benchmark that has no sections, and of a format-1 file
# How far the 1-minute load average may rise above the cores before a ratio is refused.
# torch runs one thread a core, so the benchmark alone holds the load at about the core
# count; the load also counts threads waiting for a core, so what lies above it is other
# work taking turns with the timed code. Half a core covers the benchmark's own brief extras
# (MLflow's writer, a checkpoint); one other busy process (+1) does not pass.
SPARE_LOAD = 0.5
LOAD_EVERY_S = 5.0  # the kernel updates the load average every 5 s: faster repeats values


# A candidate returns how many images it processed, timed around the whole call, or
# (images, seconds) when it times the part that counts itself (a fit, not its set-up).
Candidate = Callable[[], int | tuple[int, float]]


def images_per_second(run: Candidate) -> float:
    """Time ``run`` (see Candidate)."""
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    if isinstance(result, tuple):
        result, seconds = result
    return result / seconds


@dataclass
class Measured:
    """Images/s of each candidate, one a repeat in the order measured, and the 1-minute
    load averages sampled from before the warm-up to after the last repeat."""

    samples: dict[str, list[float]]
    loads: list[float]

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])


def alternate(candidates: dict[str, Candidate], repeats: int) -> Measured:
    """Every candidate once a repeat, in alternation after one warm-up each, so that drift
    in the machine's speed hits every candidate alike, and repeat i of two candidates are a
    pair measured moments apart."""
    with load_samples() as loads:
        for run in candidates.values():
            run()
        samples: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(repeats):
            for name, run in candidates.items():
                samples[name].append(images_per_second(run))
    return Measured(samples, loads)


def side_by_side(candidates: dict[str, Candidate], repeats: int) -> dict[str, float]:
    """Median images/s of each candidate, measured by ``alternate``."""
    measured = alternate(candidates, repeats)
    return {name: measured.median(name) for name in candidates}


@contextlib.contextmanager
def load_samples(every: float = LOAD_EVERY_S) -> Iterator[list[float]]:
    """The 1-minute load average on entering, every ``every`` seconds in a thread, and on
    leaving: the list fills while the block runs."""
    loads = [os.getloadavg()[0]]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every):
            loads.append(os.getloadavg()[0])

    thread = threading.Thread(target=sample, name="load samples", daemon=True)
    thread.start()
    try:
        yield loads
    finally:
        done.set()
        thread.join()
        loads.append(os.getloadavg()[0])


def cores() -> int:
    """The cores this process may run on (a container or taskset may allow fewer)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def refusal(loads: list[float], cores: int, own_processes: int = 0) -> str | None:
    """Why a ratio measured under these load averages is not to be trusted, or None.

    The highest sample counts: the 1-minute average lags, so a machine busy shortly before
    or during the measurement shows in some sample. ``own_processes`` are busy processes the
    benchmark starts beside its one thread a core (DataLoader workers beside a training
    loop): load of its own, allowed above the cores.
    """
    highest, allowed = max(loads), cores + own_processes + SPARE_LOAD
    if highest <= allowed:
        return None
    own = f" + {own_processes} of its own" if own_processes else ""
    return f"load {highest:.1f} > {cores} cores{own} + {SPARE_LOAD}"


def compare(
    name: str,
    baseline: list[float],
    cnnlab: list[float],
    target: float,
    loads: list[float],
    unit: str = "img/s",
    own_processes: int = 0,
    **extra,
) -> dict:
    """A results row: cnnlab's advantage (higher is better) per repeat pair, its median as
    ``ratio`` and min/median/max as ``spread``; ``ratio`` is None and ``refused`` says why
    when the machine was oversubscribed (see ``refusal``). Speeds give cnnlab/baseline,
    times (unit "s") baseline/cnnlab."""
    pairs = zip(baseline, cnnlab, strict=True)
    if unit == "s":
        ratios = [b / c if c else float("inf") for b, c in pairs]
    else:
        ratios = [c / b if b else float("inf") for b, c in pairs]
    spread = {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)}
    machine_cores = cores()
    refused = refusal(loads, machine_cores, own_processes)
    row = {"name": name, "baseline": statistics.median(baseline),
           "cnnlab": statistics.median(cnnlab), "unit": unit,
           "ratio": None if refused else spread["median"], "spread": spread, "target": target,
           "samples": {"baseline": baseline, "cnnlab": cnnlab},
           "load": {"highest": max(loads), "cores": machine_cores,
                    "own_processes": own_processes}}  # fmt: skip
    if refused:
        row["refused"] = refused
    return row | extra


def meets_target(row: dict) -> bool:
    """A refused row (ratio None) meets no target."""
    return row.get("ratio") is not None and row["ratio"] >= row["target"]


def environment() -> dict[str, str]:
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cores": str(cores()),
        "threads": str(torch.get_num_threads()),
        "torch": version("torch"),
        "torchvision": version("torchvision"),
        "lightning": version("lightning"),
        "python": platform.python_version(),
    }


def results_path(out: str | Path) -> Path:
    """``out``: a name under bench/results/, or a path ending in .json (a test's folder)."""
    if str(out).endswith(".json"):
        return Path(out)
    return RESULTS / f"{out}.json"


def load(path: Path) -> dict:
    """The results file at ``path`` in format 2 (empty if there is none)."""
    if not path.exists():
        return {"format": FORMAT, "sections": {}}
    record = json.loads(path.read_text())
    if "sections" in record:
        return record
    rows = [{"section": ALL} | row for row in record.pop("results")]
    return {"format": FORMAT, "sections": {ALL: record | {"results": rows}}}


def merge(record: dict, rows: list[dict], settings: dict, section: str = ALL) -> dict:
    """``record`` with the sections ``rows`` belong to (each row's "section", else
    ``section``) measured now: their earlier rows replaced, every other section kept with
    the time, environment and settings it was measured with."""
    measured: dict[str, list[dict]] = {}
    for row in rows:
        row = {"section": section} | row
        measured.setdefault(row["section"], []).append(row)
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    sections = dict(record["sections"])
    for name, section_rows in measured.items():
        sections[name] = {"when": when, "environment": environment(), "settings": settings,
                          "results": section_rows}  # fmt: skip
    return {"format": FORMAT, "sections": sections}


def save(name: str | Path, rows: list[dict], settings: dict, section: str = ALL) -> Path:
    """Merge ``rows`` into the results file ``name`` (see results_path and merge). Written
    whole to a side file first, so a run that dies midway leaves the old file intact."""
    path = results_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = merge(load(path), rows, settings, section)
    side = path.with_name(path.name + ".tmp")
    side.write_text(json.dumps(record, indent=2) + "\n")
    side.replace(path)
    return path


def rows_of(path: Path) -> list[dict]:
    """Every section's rows of the results file at ``path``, each with its "section"."""
    return [row for record in load(path)["sections"].values() for row in record["results"]]


def print_saved(path: Path, measured_now: set[str]) -> None:
    """Where the rows went, and which sections of that file are older, and how old."""
    print(f"\nwritten to {path}")
    for name, record in load(path)["sections"].items():
        if name not in measured_now:
            print(f"  kept from an earlier run: {name} (measured {record['when']})")


def print_table(title: str, rows: list[dict]) -> None:
    """One line per comparison; ``ratio`` is cnnlab's advantage (higher is better), the
    median over repeat pairs with their min-max beside it, and ``unit`` says what baseline
    and cnnlab are measured in (images/s unless given). A refused row says why."""
    print(f"\n{title}")
    header = f"{'baseline':>12}{'cnnlab':>12}{'unit':>7}{'ratio':>8}{'min-max':>13}{'target':>8}"
    print(f"{'comparison':<52}{header}  ok")
    for row in rows:
        spread = row.get("spread")
        span = f"{spread['min']:.2f}-{spread['max']:.2f}" if spread else "-"
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        if "refused" in row:
            ok = f"refused: {row['refused']}"
        else:
            ok = "yes" if meets_target(row) else "NO"
        print(
            f"{row['name']:<52}{row['baseline']:>12,.2f}{row['cnnlab']:>12,.2f}"
            f"{row.get('unit', 'img/s'):>7}{ratio:>8}{span:>13}{row['target']:>7.2f}x  {ok}"
        )
