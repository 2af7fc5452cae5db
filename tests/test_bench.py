"""The benchmark scripts run (at a tiny size) and write their results: no timing is asserted
here, the ratios are `make bench`'s to print."""

from __future__ import annotations

import json
import sys

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
