"""The GPU check (bench/gpu_check.py) in its tiny CPU mode: its steps run for real (cnnlab's
commands, a real sqlite MLflow store) and record what they measured; a failing or overrunning
step is recorded in one line and the check goes on. The slow tier runs every step, here and
in a Python 3.12 environment that stands in for the GPU machine (torch and its neighbours,
no Hydra, no MLflow, no network), where the check installs the rest from the wheel folder
`make gpu-wheels` builds. No timing is asserted: the numbers are the GPU's to give.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from bench.gpu_check import STEPS
from tests.conftest import REPO, run_cli

TINY_LINE = "gpu-check: no CUDA on this machine: TINY MODE on the CPU"


def gpu_check(out: Path, work: Path, *args: str, timeout: float = 600):
    return run_cli(
        sys.executable,
        "-m",
        "bench.gpu_check",
        "--tiny",
        "--out",
        str(out),
        "--work",
        str(work),
        *args,
        timeout=timeout,
    )


def results(out: Path) -> dict:
    record = json.loads((out / "gpu-cpu-tiny.json").read_text())
    assert [step["name"] for step in record["steps"]] == list(STEPS)
    return record


def runs_of(work: Path, experiment: str) -> list:
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    found = client.get_experiment_by_name(f"gpu-check-{experiment}")
    assert found is not None, f"no experiment gpu-check-{experiment}"
    return client.search_runs([found.experiment_id])


def test_tiny_mode_trains_lenet_through_cnnlab_in_bf16_and_records_it(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    done = gpu_check(out, work, "--steps", "train")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.splitlines()[0].startswith("gpu-check: --tiny: TINY MODE on the CPU")
    record = results(out)
    train, *others = record["steps"]
    assert train["status"] == "ok" and {s["status"] for s in others} == {"not chosen"}
    found = train["results"]
    assert found["run_status"] == "FINISHED" and found["device_type"] == "cpu"
    assert found["precision"] == "bf16-mixed" and found["conv_output_dtype"] == "torch.bfloat16"
    assert found["printed"].startswith("test accuracy: ") and 0 <= found["test_accuracy"] <= 1
    (run,) = runs_of(work, "train")
    assert run.info.status == "FINISHED" and run.data.params["trainer/device_type"] == "cpu"
    assert run.data.params["data/source_resolved"] == "bundled"
    assert record["setup"]["installed"] is False  # cnnlab's .venv has every package
    assert record["environment"]["torch"] and record["mode"] == "cpu-tiny"
    log = (out / "gpu-cpu-tiny.log").read_text()
    assert "-m cnnlab.train trainer=gpu trainer.accelerator=cpu data.source=bundled" in log
    assert found["printed"] in log


def test_a_failing_or_overrunning_step_is_one_line_and_the_check_goes_on(tmp_path: Path) -> None:
    """train overruns a 3 s bound (stopped); speed and resident find damaged CIFAR files."""
    out, work = tmp_path / "out", tmp_path / "work"
    damaged = work / "data" / "cifar-10-batches-py"
    damaged.mkdir(parents=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]:
        (damaged / name).write_bytes(b"not a pickle")
    done = gpu_check(out, work, "--steps", "train,speed,resident", "--bounds", "train=3")
    assert done.returncode == 1
    assert "gpu-check: failed: train, speed, resident" in done.stderr
    train, _, speed, resident, _ = results(out)["steps"]
    assert train["bound_s"] == 3
    assert "still running at the step's time bound; stopped" in train["reason"]
    for step in (speed, resident):
        assert step["status"] == "failed" and "damaged cifar10 file" in step["reason"]
        assert "\n" not in step["reason"]
    assert speed["reason"].startswith("plain loop, eager: exit 1: ")
    assert resident["reason"].startswith("cnnlab, data.resident=true: exit 2: cnnlab: error:")
    for line in ("[1/5] train: FAILED", "[3/5] speed: FAILED", "[4/5] resident: FAILED"):
        assert line in done.stdout


def check_every_step(done: subprocess.CompletedProcess, out: Path, work: Path) -> dict:
    """Every step ran and recorded its numbers; every run of the store FINISHED."""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = results(out)
    assert all(step["status"] == "ok" for step in record["steps"]), record["steps"]
    train, syncs, speed, resident, sweep = (step["results"] for step in record["steps"])
    assert train["bf16_autocast"] and train["run_status"] == "FINISHED"
    assert syncs["measures"].startswith("host reads") and syncs["steps"] > 0
    for variant in ("eager", "compiled"):
        assert speed[variant]["cnnlab_s_per_epoch"] > 0 and speed[variant]["plain_s_per_epoch"] > 0
    assert speed["images_per_epoch"] == 128 and speed["precision"] == "32-true"
    assert resident["resident_images_per_s"] > 0 and resident["copied_images_per_s"] > 0
    assert sweep["sweep_jobs_finished"] == 2 and sweep["ddp_backend"] == "gloo"
    expected = {"train": 1, "syncs": 1, "speed": 2, "resident": 2, "sweep": 3, "ddp": 1}
    for experiment, count in expected.items():
        runs = runs_of(work, experiment)
        assert len(runs) == count and {r.info.status for r in runs} == {"FINISHED"}
    return record


# Every step in tiny mode runs in the clean Python 3.12 below (in the project's venv it is
# the same check, 3 more minutes of the slow tier): `make gpu-check` runs it by hand.


# The GPU machine, stood in for: Python 3.12 with what bench/gpu_base.txt lists, made once
# per version of that list (it is never written to: the check installs into --site).
BASE_LIST = REPO / "bench" / "gpu_base.txt"


def python312() -> str:
    """A Python 3.12 that runs (pyenv's shim names one it may not run)."""
    found = glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12"))
    for candidate in filter(None, [*sorted(found), shutil.which("python3.12")]):
        if subprocess.run([candidate, "-c", "import venv"], capture_output=True).returncode == 0:
            return candidate
    pytest.skip("needs a Python 3.12 to stand in for the GPU machine's")


def base_environment() -> Path:
    key = hashlib.sha256(BASE_LIST.read_bytes()).hexdigest()[:12]
    base = Path.home() / ".cache" / "cnnlab" / f"gpu-base-{key}"
    if not (base / ".complete").exists():
        shutil.rmtree(base, ignore_errors=True)
        subprocess.run([python312(), "-m", "venv", str(base)], check=True)
        subprocess.run(
            [base / "bin" / "python", "-m", "pip", "install", "--quiet", "-r", str(BASE_LIST)],
            check=True,
            timeout=1800,
        )
        (base / ".complete").touch()
    return base


def copied_checkout(folder: Path) -> Path:
    """The files the device run copies: tracked and untracked-not-ignored, no .git."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    )
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / name)
    return folder


def offline(command: list[str]) -> list[str]:
    """``command`` in a network namespace of its own, as on the GPU machine: no network but
    the loopback that DDP's rendezvous uses (where root may unshare and ip is there)."""
    if shutil.which("unshare") and shutil.which("ip") and os.geteuid() == 0:
        return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command]
    return command


@pytest.mark.slow
def test_the_set_up_installs_from_the_wheel_folder_alone_into_python_312(tmp_path: Path) -> None:
    """make gpu-wheels' folder, carried with a copy of the checkout to a Python 3.12 that has
    only the GPU machine's packages: the check installs from it, offline, and every step
    runs. The stand-in environment itself is left as it was."""
    tree = copied_checkout(tmp_path / "tree")
    built = run_cli(
        sys.executable,
        "-m",
        "bench.gpu_wheels",
        "--out",
        str(tree / "bench" / "gpu_wheels"),
        timeout=900,
    )
    if built.returncode != 0 and "Failed to establish a new connection" in built.stderr:
        pytest.skip("needs PyPI to download the wheels")
    assert built.returncode == 0, built.stderr[-3000:]
    assert "MiB  in " in built.stdout
    base = base_environment()
    packages = sorted(p.name for p in base.glob("lib/python3.12/site-packages/*"))
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV", "MLFLOW_"))
    }
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p)
    out, work = tmp_path / "out", tmp_path / "work"
    command = [
        str(base / "bin" / "python"),
        "-m",
        "bench.gpu_check",
        "--out",
        str(out),
        "--work",
        str(work),
        "--site",
        str(tmp_path / "site"),
    ]
    done = subprocess.run(
        offline(command), cwd=tree, env=env, capture_output=True, text=True, timeout=3600
    )
    assert done.stdout.startswith(TINY_LINE), done.stdout[-3000:] + done.stderr[-3000:]
    record = check_every_step(done, out, work)
    setup = record["setup"]
    wheels = len(list((tree / "bench" / "gpu_wheels").glob("*.whl")))
    assert setup["installed"] and setup["wheels"] == wheels and "hydra" in setup["missing"]
    assert record["environment"]["python"].startswith("3.12")
    assert packages == sorted(p.name for p in base.glob("lib/python3.12/site-packages/*"))
