"""The benchmark scripts run (at a tiny size) and write their results: no timing is asserted
here, the ratios are `make bench`'s to print."""

from __future__ import annotations

import json
import sys

import pytest

from bench.common import RESULTS
from tests.conftest import run_cli


def test_data_benchmark_runs_and_records_its_settings() -> None:
    result = run_cli(
        sys.executable,
        "-m",
        "bench.bench_data",
        "--repeats",
        "1",
        "--batches",
        "2",
        "--out",
        "test-smoke",
    )
    path = RESULTS / "test-smoke.json"
    try:
        assert result.returncode == 0, result.stderr[-3000:]
        assert "LeNet-5 training, MNIST, batch 256" in result.stdout
        record = json.loads(path.read_text())
        assert record["environment"]["torch"] and record["settings"]["batch_size"] == 256
        assert [row["target"] for row in record["results"]] == [30.0, 5.0, 1.5]
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.slow
def test_training_benchmark_runs_every_section_and_records_its_settings() -> None:
    result = run_cli(
        sys.executable, "-m", "bench.bench_train", "--quick", "--repeats", "1",
        "--sweep-jobs", "3", "--seeds", "1", "--sections", "throughput,mlflow,sweep,cpu",
        "--out", "test-smoke-train", timeout=900,
    )  # fmt: skip
    path = RESULTS / "test-smoke-train.json"
    try:
        assert result.returncode == 0, result.stderr[-3000:]
        for name in ("LeNet-5, MNIST: vs plain loop", "cnn, CIFAR-10 (crop/flip): vs classic loop",
                     "MLflow logging vs none", "sweep job fixed cost"):  # fmt: skip
            assert name in result.stdout
        record = json.loads(path.read_text())
        assert record["settings"]["batch_size"] == 256
        assert {row["threads"] for row in record["settings"]["cpu_settings"] if "threads" in row}
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.slow
def test_report_benchmark_measures_every_promise_and_records_it() -> None:
    result = run_cli(
        sys.executable, "-m", "bench.bench_report", "--sims", "8", "--out", "test-smoke-report",
        timeout=900,
    )  # fmt: skip
    path = RESULTS / "test-smoke-report.json"
    try:
        assert result.returncode == 0, result.stderr[-3000:]
        for name in ("group table claims one", "factor verdicts claims one", "same winner",
                     "jobs used (saving", "make report on a 36-run factorial"):  # fmt: skip
            assert name in result.stdout
        record = json.loads(path.read_text())
        assert record["settings"] == {"sims": 8, "alpha": 0.05}
        assert len(record["results"]) == 4 + 2 + 3 * 3 + 1
    finally:
        path.unlink(missing_ok=True)
