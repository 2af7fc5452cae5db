"""Shared by the benchmarks: alternating timed repeats, medians, and the results file."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


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


def side_by_side(candidates: dict[str, Candidate], repeats: int) -> dict[str, float]:
    """Median images/s of each candidate, measured in alternation after one warm-up each,
    so that drift in the machine's speed hits every candidate alike."""
    for run in candidates.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            samples[name].append(images_per_second(run))
    return {name: statistics.median(values) for name, values in samples.items()}


def environment() -> dict[str, str]:
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": str(torch.get_num_threads()),
        "torch": version("torch"),
        "torchvision": version("torchvision"),
        "lightning": version("lightning"),
        "python": platform.python_version(),
    }


def save(name: str, rows: list[dict], settings: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": environment(),
        "settings": settings,
        "results": rows,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def print_table(title: str, rows: list[dict]) -> None:
    """One line per comparison; ``ratio`` is cnnlab's advantage (higher is better) and
    ``unit`` says what baseline and cnnlab are measured in (images/s unless given)."""
    print(f"\n{title}")
    header = f"{'baseline':>12}{'cnnlab':>12}{'unit':>7}{'ratio':>8}{'target':>8}  ok"
    print(f"{'comparison':<52}{header}")
    for row in rows:
        ok = "yes" if row["ratio"] >= row["target"] else "NO"
        print(
            f"{row['name']:<52}{row['baseline']:>12,.2f}{row['cnnlab']:>12,.2f}"
            f"{row.get('unit', 'img/s'):>7}{row['ratio']:>7.2f}x{row['target']:>7.2f}x  {ok}"
        )
