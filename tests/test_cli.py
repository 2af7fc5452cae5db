"""The command line tells what it can do: ``make help``, the console scripts and their tab
completion, ``make notebook``, and output that reads well in a log file."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, SMALL, run_cli

BIN = Path(sys.executable).parent  # the console scripts sit beside the interpreter
ESCAPE = "\x1b["


# script(1) (util-linux) runs a command on a terminal of its own and copies what it writes.
needs_script = pytest.mark.skipif(shutil.which("script") is None, reason="needs script(1)")


def test_make_help_in_a_pipe_is_plain_text() -> None:
    piped = run_cli("make", "--no-print-directory", "help")
    assert piped.returncode == 0, piped.stderr
    assert ESCAPE not in piped.stdout
    listed = re.findall(r"^  (\S+) +\S", piped.stdout, re.MULTILINE)
    assert {"train", "sweep", "eval", "summary", "report", "notebook", "test"} <= set(listed)
    assert "run=<run id>" in piped.stdout


@needs_script
def test_make_help_on_a_terminal_is_coloured() -> None:
    shown = run_cli("script", "-qec", "env -u NO_COLOR make --no-print-directory help", "/dev/null")
    assert shown.returncode == 0, shown.stderr
    assert f"{ESCAPE}36mtrain" in shown.stdout


@pytest.mark.parametrize("name", ["cnnlab-train", "cnnlab-eval", "cnnlab-summary"])
def test_hydra_console_scripts_show_their_help(name: str) -> None:
    helped = run_cli(str(BIN / name), "--help")
    assert helped.returncode == 0, helped.stderr
    assert "Configuration groups" in helped.stdout and "Powered by Hydra" in helped.stdout


def test_console_scripts_run_as_their_python_m_forms(tmp_path: Path) -> None:
    shown = run_cli(str(BIN / "cnnlab-train"), "--cfg", "job", "model.pooling=avg")
    assert shown.returncode == 0, shown.stderr
    assert "pooling: avg" in shown.stdout and "_target_: torch.optim.AdamW" in shown.stdout
    # The flags check of ``python -m cnnlab.train``: one line, exit 2, no Hydra traceback.
    refused = run_cli(str(BIN / "cnnlab-train"), "-m", "--cfg", "job")
    assert refused.returncode == 2
    assert refused.stderr.startswith("cnnlab: error: --cfg and --info show one job's config")

    report = run_cli(str(BIN / "cnnlab-report"), "--help")
    assert report.returncode == 0, report.stderr
    assert "--parent" in report.stdout and "--experiment" in report.stdout

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/never.db"}
    summary = run_cli(str(BIN / "cnnlab-summary"), "model=cnn", env=env)
    assert summary.returncode == 0, summary.stderr
    assert summary.stdout.startswith("cnn on mnist")
    assert "FLOPs per image: 36.6 M" in summary.stdout


def test_bash_completion_of_a_console_script() -> None:
    """Hydra's bash script, installed as a user would (``eval "$(cnnlab-train -sc
    install=bash)"``), then asked for the words after ``model.poo`` as bash asks at <Tab>."""
    complete = """
        eval "$(cnnlab-train -sc install=bash)"
        complete -p cnnlab-train
        COMP_LINE="cnnlab-train model.poo"; COMP_POINT=${#COMP_LINE}
        COMP_WORDS=(cnnlab-train model.poo); COMP_CWORD=1
        hydra_bash_completion
        printf 'reply: %s\\n' "${COMPREPLY[@]}"
    """
    env = {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = run_cli("bash", "-c", complete, env=env)
    assert result.returncode == 0, result.stderr
    assert "-F hydra_bash_completion cnnlab-train" in result.stdout
    replies = set(re.findall(r"^reply: (\S+)$", result.stdout, re.MULTILINE))
    assert {"model.pooling=", "model.pooling_p="} <= replies
    assert all(reply.startswith("model.poo") for reply in replies)


def test_completion_query_of_the_summary_script() -> None:
    query = run_cli(
        str(BIN / "cnnlab-summary"), "-sc", "query=bash", env={"COMP_LINE": "cnnlab-summary mod"}
    )
    assert query.returncode == 0, query.stderr
    assert {"model=", "model."} <= set(query.stdout.split())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on ``port`` (Linux's /proc/net)."""
    found = set()
    for table in ("tcp", "tcp6"):
        path = Path("/proc/net") / table
        for row in path.read_text().splitlines()[1:] if path.exists() else []:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net")
def test_make_notebook_serves_jupyterlab_on_localhost_only(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    # -o: take the installed .venv as it is (a newer pyproject.toml would reinstall it).
    server = subprocess.Popen(
        ["make", "--no-print-directory", "-o", ".venv/.installed", "notebook",
         f"NOTEBOOK_PORT={port}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300  # JupyterLab's start-up on a loaded machine
        version = None
        while version is None and time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api", timeout=5) as reply:
                    version = reply.read().decode()
            except OSError:
                time.sleep(1)
        assert version is not None and '"version"' in version, server.poll()
        assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1 only
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/lab", timeout=30) as page:
            assert page.status == 200
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            output, _ = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            output, _ = server.communicate()
    assert "Serving notebooks from local directory" in output
    assert str(REPO / "notebooks") in output
    assert not listening_addresses(port)


def train_tiny(tmp_path: Path, mnist_root: Path, *, stdout: Path) -> subprocess.CompletedProcess:
    """A shrunk ``python -m cnnlab.train`` with its progress bar on, redrawn every step."""
    overrides = [o for o in SMALL if not o.startswith("trainer.enable_progress_bar")]
    args = [
        *overrides,
        "trainer.enable_progress_bar=true",
        "callbacks.progress_bar.refresh_rate=1",
        f"data.root={mnist_root}",
        "data.source=torchvision",
        f"paths.log_dir={tmp_path}/logs",
    ]
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "MLFLOW_EXPERIMENT_NAME": "tests",
    }
    with stdout.open("w") as log:
        return subprocess.run(
            [sys.executable, "-m", "cnnlab.train", *args],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.PIPE, text=True, timeout=600,
        )  # fmt: skip


EPOCH_LINE = re.compile(r"^epoch (\d)/2: step (\d+), train/loss \S+, val/loss \S+, val/acc \S+, ")


def test_progress_in_a_log_file_is_one_line_per_epoch(tmp_path: Path, mnist_root: Path) -> None:
    log = tmp_path / "train.log"
    result = train_tiny(tmp_path, mnist_root, stdout=log)
    assert result.returncode == 0, result.stderr[-3000:]
    text = log.read_bytes().decode()  # read_text would turn \r into \n
    epochs = [EPOCH_LINE.match(line) for line in text.splitlines() if line.startswith("epoch ")]
    assert [(m.group(1), m.group(2)) for m in epochs if m] == [("1", "4"), ("2", "8")], text
    assert len(epochs) == 2
    assert text.count("\r") <= 2, text  # tqdm's redraws would be one per step and bar
    assert "Epoch 0:" not in text and "it/s" not in text


@needs_script
def test_progress_on_a_terminal_is_lightnings_bar(tmp_path: Path, mnist_root: Path) -> None:
    overrides = [o for o in SMALL if not o.startswith("trainer.enable_progress_bar")]
    command = " ".join(
        [
            sys.executable, "-m", "cnnlab.train", *overrides,
            f"data.root={mnist_root}", "data.source=torchvision", f"paths.log_dir={tmp_path}/logs",
        ]
    )  # fmt: skip
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    # A terminal of 0 columns (script's, with no terminal above it) gets no bar from tqdm.
    sized = f"stty cols 120 rows 40; {command}"
    result = run_cli("script", "-qec", sized, str(tmp_path / "typescript"), env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    screen = (tmp_path / "typescript").read_bytes().decode()  # read_text would turn \r into \n
    assert "Epoch 1: 100%" in screen and screen.count("\r") > 2 * 4  # a redraw every step
    assert not re.search(r"^epoch \d/2: step", screen, re.MULTILINE)
