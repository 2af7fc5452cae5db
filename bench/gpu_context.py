"""Where the GPU check's steps (bench/gpu_steps.py) run their commands: the sizes of the
GPU run and of the tiny CPU run, a work folder holding the sqlite MLflow store, the data and
the runs' folders, and the log; each command bounded by its step's deadline.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

KILL_GRACE_S = 15  # after SIGTERM (cnnlab saves its state and ends the run KILLED), SIGKILL


class StepFailed(Exception):
    """A step could not give its result; the message is one line."""


@dataclass(frozen=True)
class Sizes:
    """What differs between the check on a GPU and its tiny run on a CPU."""

    mode: str  # "gpu" or "cpu-tiny": names the results file
    device: list[str]  # overrides that put a `trainer=gpu` run on this machine
    train: list[str]  # step 1's LeNet-5 run
    short: list[str]  # the LeNet-5 runs of steps 2 and 5
    speed: list[str]  # the speedrun's runs of steps 3 and 4
    images: int  # training images an epoch, steps 3 and 4
    held_out: int  # validation images beside them
    epochs: int  # of steps 3 and 4; the first is a warm-up, the others are timed
    bounds: dict[str, int]  # seconds, by step
    deadline_s: int  # the whole check, set-up included


@dataclass
class Context:
    """Where a step's commands run and what they share: the sizes, a work folder holding
    the MLflow store (sqlite), the data and the runs' folders, and the log."""

    sizes: Sizes
    work: Path
    log: Path
    deadline: float = 0.0  # time.monotonic() by which the current step must end
    started_ms: int = field(default_factory=lambda: int(time.time() * 1000))

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.work}/mlflow.db"

    @property
    def on_gpu(self) -> bool:
        return self.sizes.mode == "gpu"

    @property
    def device_type(self) -> str:
        """The ``trainer/device_type`` a `trainer=gpu` run records here."""
        return "cuda" if self.on_gpu else "cpu"

    def command(self, label: str, argv: list[str], experiment: str) -> str:
        """Run ``argv`` (a Python module and its arguments) from the checkout, its output
        appended to the log, until the step's deadline; returns its output.

        Raises:
            StepFailed: it exited non-zero (the last line of its output says why) or ran
                past the step's bound (stopped: SIGTERM, then SIGKILL).
        """
        env = os.environ | {
            "MLFLOW_TRACKING_URI": self.uri,
            "MLFLOW_EXPERIMENT_NAME": f"gpu-check-{experiment}",
            "CNNLAB_CACHE": str(self.work / "cache"),
            "PYTHONUNBUFFERED": "1",
        }
        command = [sys.executable, "-m", *argv]
        with self.log.open("ab") as out:
            out.write(f"\n=== {label}: {' '.join(command)}\n".encode())
            out.flush()
            start = out.tell()
            process = subprocess.Popen(
                command,
                cwd=Path(__file__).resolve().parents[1],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                process.wait(max(1.0, self.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stop(process)
                raise StepFailed(
                    f"{label}: still running at the step's time bound; stopped"
                ) from None
        output = self.log.read_bytes()[start:].decode(errors="replace")
        if process.returncode != 0:
            raise StepFailed(f"{label}: exit {process.returncode}: {last_line(output)}")
        return output

    def cnnlab(
        self, label: str, experiment: str, overrides: list[str], module: str = "cnnlab.train"
    ) -> str:
        """``python -m cnnlab.train`` (or ``module``) with ``overrides``, its folders and
        data under the work folder, recorded in MLflow experiment gpu-check-<experiment>."""
        return self.command(label, [module, *overrides, *self.where()], experiment)

    def where(self) -> list[str]:
        """The overrides that keep a run's folders and data under the work folder."""
        return [
            f"paths.log_dir={self.work}/logs",
            f"data.root={self.work}/data",
            "data.download=false",
        ]

    def runs(self, experiment: str) -> list:
        """The MLflow runs of gpu-check-<experiment> started by this check, oldest first."""
        from mlflow import MlflowClient  # after the set-up

        client = MlflowClient(self.uri)
        found = client.get_experiment_by_name(f"gpu-check-{experiment}")
        if found is None:
            raise StepFailed(f"no MLflow experiment gpu-check-{experiment} in {self.uri}")
        runs = client.search_runs(
            [found.experiment_id],
            f"attributes.start_time >= {self.started_ms}",
            order_by=["attributes.start_time ASC"],
        )
        return list(runs)

    def one_run(self, experiment: str):
        """The one run of the experiment, which must have FINISHED."""
        runs = self.runs(experiment)
        if len(runs) != 1:
            raise StepFailed(f"{len(runs)} runs in gpu-check-{experiment}, expected 1")
        return finished(runs[0])

    def probe(self, name: str) -> tuple[list[str], Path]:
        """The overrides that add the probe to a run, and the file it writes."""
        path = self.work / f"probe-{name}.json"
        return [
            "+callbacks.gpu_probe._target_=bench.gpu_probe.Probe",
            f"+callbacks.gpu_probe.out={path}",
        ], path

    def random_cifar(self) -> None:
        """CIFAR-10's files of random pixels under the work folder, once: ``images`` +
        ``held_out`` training images (steps 3 and 4 train on ``images`` an epoch)."""
        folder = self.work / "data" / "cifar-10-batches-py"
        if folder.exists():
            return
        folder.mkdir(parents=True)
        rng = np.random.default_rng(0)
        train = self.sizes.images + self.sizes.held_out
        test = max(self.sizes.held_out, 10)
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        counts = [train // 5 + (i < train % 5) for i in range(5)] + [test]
        for name, count in zip(names, counts, strict=True):
            batch = {
                "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                "labels": rng.integers(0, 10, count).tolist(),
            }
            (folder / name).write_bytes(pickle.dumps(batch))
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list("abcdefghij")}))


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the command's process group (its DDP or joblib workers too), then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
            process.wait(grace)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def last_line(output: str) -> str:
    """The line that says why a command failed: cnnlab's own error line, else the last."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no output"])[-1][:300]


def finished(run):
    if run.info.status != "FINISHED":
        raise StepFailed(f"run {run.info.run_name} ended {run.info.status}, not FINISHED")
    return run


def read_probe(path: Path) -> dict:
    if not path.exists():
        raise StepFailed(f"the probe wrote no {path.name}: did the fit end?")
    return json.loads(path.read_text())


def seconds_per_epoch(epochs: list[dict]) -> float:
    """Median seconds of the timed epochs: all but the first, a warm-up."""
    timed = epochs[1:]
    if not timed:
        raise StepFailed(f"{len(epochs)} epoch(s) timed; need 2 or more")
    return statistics.median(e["seconds"] for e in timed)


def expect(condition: bool, reason: str) -> None:
    if not condition:
        raise StepFailed(reason)
