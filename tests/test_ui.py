"""``make ui``: the MLflow UI for the project's store, bound to 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil
from mlflow import MlflowClient

from tests.conftest import REPO
from tests.servers import assert_loopback_only, free_port


def search_runs(port: int) -> list[dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search",
        data=json.dumps({"experiment_ids": ["1"]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response).get("runs", [])


def test_make_ui_serves_the_store_on_loopback_only(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("ui", artifact_location=str(tmp_path / "art"))
    run = client.create_run(experiment_id, run_name="lenet5-bn-max-fc-s0")
    client.set_terminated(run.info.run_id)
    port = free_port()
    server = subprocess.Popen(
        ["make", "--no-print-directory", "ui", f"UI_PORT={port}"],
        cwd=REPO,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        runs, deadline = [], time.monotonic() + 300
        while not runs and time.monotonic() < deadline:
            try:
                runs = search_runs(port)
            except OSError:
                time.sleep(1)
        assert [r["info"]["run_name"] for r in runs] == ["lenet5-bn-max-fc-s0"]
        assert_loopback_only(port)
        # MLflow's GenAI job workers are not started (make ui turns job execution off)
        processes = psutil.Process(server.pid).children(recursive=True)
        assert not [p for p in processes if "huey" in " ".join(p.cmdline())]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
