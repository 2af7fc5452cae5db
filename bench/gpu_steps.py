"""The GPU check's five steps (bench/gpu_check.py), each a few commands as a user types them,
run under the step's time bound (bench/gpu_context.py), then judged from what they
recorded: the MLflow store, the probe's file (bench/gpu_probe.py) and the commands' output.

Each step returns its numbers and one line that says them; a step that cannot give them
raises :class:`StepFailed` with one line that says why.
"""

from __future__ import annotations

import itertools
import json
import re
import statistics

from bench.common import cores, load_samples, refusal
from bench.gpu_context import (
    Context,
    expect,
    finished,
    read_probe,
    seconds_per_epoch,
)

# The CIFAR-10 experiment of steps 3 and 4 (conf/experiment/<name>.yaml).
EXPERIMENT = "speedrun"
TARGET_RATIO = 1.15  # cnnlab's time per epoch over the plain loop's, at most


def train(ctx: Context) -> tuple[dict, str]:
    """LeNet-5 on the bundled digits through python -m cnnlab.train trainer=gpu."""
    probe, path = ctx.probe("train")
    output = ctx.cnnlab(
        "cnnlab.train trainer=gpu",
        "train",
        [
            "trainer=gpu",
            *ctx.sizes.device,
            "data.source=bundled",
            *ctx.sizes.train,
            *probe,
            "+callbacks.gpu_probe.conv_dtype=true",
        ],
    )
    run = ctx.one_run("train")
    facts = read_probe(path)
    printed = re.search(r"test accuracy: ([\d.]+)%", output)
    device_type = run.data.params.get("trainer/device_type")
    dtypes = facts["conv_output_dtypes"]
    result = {
        "run_status": run.info.status,
        "device_type": device_type,
        "precision": run.data.params.get("trainer/precision"),
        "conv_output_dtype": dtypes[0] if dtypes else None,
        "bf16_autocast": dtypes == ["torch.bfloat16"],
        "test_accuracy": run.data.metrics.get("test/acc"),
        "printed": printed.group(0) if printed else None,
        "data_source": run.data.params.get("data/source_resolved"),
        "device": facts["device"],
    }
    expect(device_type == ctx.device_type, f"trainer/device_type={device_type}")
    expect(result["bf16_autocast"], f"the first conv's output was {dtypes}, not bf16")
    expect(printed is not None, "no 'test accuracy: N%' line in the output")
    return result, (
        f"{result['printed']}, run FINISHED, trainer/device_type={device_type}, bf16 "
        f"autocast (first conv's output {result['conv_output_dtype']})"
    )


def syncs(ctx: Context) -> tuple[dict, str]:
    """Host-device syncs per training step of a short cnnlab run."""
    probe, path = ctx.probe("syncs")
    ctx.cnnlab(
        "cnnlab.train, syncs counted",
        "syncs",
        [
            "trainer=gpu",
            *ctx.sizes.device,
            "data.source=bundled",
            *ctx.sizes.short,
            "test=false",
            *probe,
            "+callbacks.gpu_probe.count_syncs=true",
        ],
    )
    ctx.one_run("syncs")
    facts = read_probe(path)
    steps = facts["steps"][1:]  # the first copies normalize's constants and tunes cuDNN
    logged = [s["waits"] for s in steps if s["logs"]]
    quiet = [s["waits"] for s in steps if not s["logs"]]
    expect(bool(steps), "the probe counted no training step")
    result = {
        "measures": facts["measures"],
        "steps": len(steps),
        "per_step": sum(s["waits"] for s in steps) / len(steps),
        "unlogged_steps": len(quiet),
        "waits_on_unlogged_steps": sum(quiet),
        "logged_steps": len(logged),
        "per_logged_step": sum(logged) / len(logged) if logged else 0.0,
        "most_on_a_logged_step": max(logged, default=0),
        "target": "none, or one per logged step",
        "where": facts["where"],  # the lines that waited most, over every training step
    }
    result["met"] = result["waits_on_unlogged_steps"] == 0 and result["most_on_a_logged_step"] <= 1
    what = "syncs" if ctx.on_gpu else "host reads (CUDA syncs not measurable on CPU)"
    return result, (
        f"{result['per_step']:.2f} {what} per step over {len(steps)} steps: "
        f"{sum(quiet)} on {len(quiet)} unlogged steps, {result['per_logged_step']:.2f} per "
        f"logged step (target: none, or one per logged step: {yes(result['met'])})"
    )


def speed(ctx: Context) -> tuple[dict, str]:
    """Time per epoch of the speedrun, cnnlab against the plain loop, eager and compiled.

    On random uint8 images of CIFAR-10's shape (speed does not depend on what they show).
    Timed: an epoch's training steps, the GPU synchronized at both ends, median of the
    epochs after the first; cnnlab's validation pass and checkpoints between epochs are not
    counted (``cnnlab_s_epoch_to_epoch`` counts them)."""
    ctx.random_cifar()
    result: dict = {"images_per_epoch": ctx.sizes.images, "target_ratio": TARGET_RATIO}
    with load_samples() as loads:
        for variant, compiled in (("eager", "false"), ("compiled", "true")):
            plain = plain_loop(ctx, variant, compiled == "true")
            epochs, run_id = cnnlab_epochs(ctx, "speed", variant, [f"perf.compile={compiled}"])
            cnnlab_s, plain_s = seconds_per_epoch(epochs), seconds_per_epoch(plain["epochs"])
            ratio = cnnlab_s / plain_s
            result[variant] = {"cnnlab_s_per_epoch": cnnlab_s, "plain_s_per_epoch": plain_s,
                               "ratio": ratio, "met": ratio <= TARGET_RATIO,
                               "cnnlab_s_epoch_to_epoch": epoch_to_epoch(epochs),
                               "cnnlab_time_epoch_s_metric": epoch_metric(ctx, run_id)}  # fmt: skip
            result |= {k: plain[k] for k in ("precision", "memory_format", "batch_size", "device")}
    result["load"] = machine_load(loads, result)
    line = "; ".join(
        f"{v}: cnnlab {result[v]['cnnlab_s_per_epoch']:.3f} s vs plain "
        f"{result[v]['plain_s_per_epoch']:.3f} s an epoch of {ctx.sizes.images:,} images = "
        f"{result[v]['ratio']:.2f}x (target <= {TARGET_RATIO}x: {yes(result[v]['met'])})"
        for v in ("eager", "compiled")
    )
    return result, line + refused(result)


def plain_loop(ctx: Context, variant: str, compiled: bool) -> dict:
    """bench/gpu_plain.py's epochs of the speedrun's settings (eager or compiled)."""
    out = ctx.work / f"plain-{variant}.json"
    argv = ["bench.gpu_plain", "--out", str(out), "--epochs", str(ctx.sizes.epochs),
            *(["--compiled"] * compiled), "--", *speed_settings(ctx), *ctx.where()]  # fmt: skip
    ctx.command(f"plain loop, {variant}", argv, "speed")
    plain = json.loads(out.read_text())
    expect_images(plain["epochs"], "the plain loop", ctx.sizes.images)
    return plain


def cnnlab_epochs(ctx: Context, step: str, name: str, overrides: list[str]) -> tuple[list, str]:
    """The probe's epochs of cnnlab's own run of the speedrun's settings with ``overrides``,
    and the run's id; the run must FINISH."""
    probe, path = ctx.probe(f"{step}-{name}")
    ctx.cnnlab(f"cnnlab, {' '.join(overrides)}", step, [*speed_settings(ctx), *overrides, *probe],
               module="bench.gpu_train")  # fmt: skip
    run = finished(ctx.runs(step)[-1])
    epochs = read_probe(path)["epochs"]
    expect_images(epochs, "cnnlab", ctx.sizes.images)
    return epochs, run.info.run_id


def expect_images(epochs: list[dict], who: str, images: int) -> None:
    trained = epochs[-1]["images"]
    expect(trained == images, f"{who} trained {trained} images an epoch, not {images}")


def machine_load(loads: list[float], result: dict) -> dict:
    """The 1-minute load average while the step measured (bench.common's rule): over the
    cores, other work took turns with the timed code, and no target is judged."""
    reason = refusal(loads, cores())
    if reason:
        for value in result.values():
            if isinstance(value, dict) and "met" in value:
                value["met"] = None
    return {"highest": max(loads), "cores": cores(), "refused": reason}


def refused(result: dict) -> str:
    reason = result["load"]["refused"]
    return f" [not judged: {reason}]" if reason else ""


def speed_settings(ctx: Context) -> list[str]:
    return [
        f"experiment={EXPERIMENT}",
        *ctx.sizes.device,
        f"data.val_size={ctx.sizes.held_out}",
        f"trainer.max_epochs={ctx.sizes.epochs}",
        "test=false",
        *ctx.sizes.speed,
    ]


def epoch_to_epoch(epochs: list[dict]) -> float | None:
    """Median seconds from a timed epoch's start to the next one's: cnnlab's validation pass
    and checkpoints between them counted too."""
    starts = [epoch["start"] for epoch in epochs[1:]]
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    return statistics.median(gaps) if gaps else None


def epoch_metric(ctx: Context, run_id: str) -> float | None:
    """cnnlab's own time/epoch_s (its clock stops at the last batch without waiting for the
    GPU), median of the timed epochs: for reference beside the probe's."""
    from mlflow import MlflowClient

    history = MlflowClient(ctx.uri).get_metric_history(run_id, "time/epoch_s")
    values = [m.value for m in sorted(history, key=lambda m: m.step)][1:]
    return statistics.median(values) if values else None


def resident(ctx: Context) -> tuple[dict, str]:
    """The speedrun's images/s with data.resident=true and false."""
    ctx.random_cifar()
    speeds = {}
    with load_samples() as loads:
        for value in ("true", "false"):
            epochs, _ = cnnlab_epochs(ctx, "resident", value, [f"data.resident={value}"])
            speeds[value] = ctx.sizes.images / seconds_per_epoch(epochs)
    result = {"resident_images_per_s": speeds["true"], "copied_images_per_s": speeds["false"],
              "ratio": speeds["true"] / speeds["false"]}  # fmt: skip
    result["load"] = machine_load(loads, result)
    note = "" if ctx.on_gpu else " (data.resident has no effect on a CPU: the same path twice)"
    return result, (
        f"data.resident=true {speeds['true']:,.0f} images/s, false {speeds['false']:,.0f} "
        f"images/s ({result['ratio']:.2f}x){note}{refused(result)}"
    )


def sweep(ctx: Context) -> tuple[dict, str]:
    """A two-job joblib sweep sharing the device, and a trainer=ddp trainer.devices=1 run."""
    lenet = ["data.source=bundled", *ctx.sizes.short]
    ctx.cnnlab(
        "joblib sweep of 2 jobs",
        "sweep",
        [
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "seed=0,1",
            "trainer=gpu",
            *ctx.sizes.device,
            *lenet,
        ],
    )
    runs = ctx.runs("sweep")
    jobs = [finished(r) for r in runs if r.data.tags.get("cnnlab.role") != "sweep"]
    parents = [finished(r) for r in runs if r.data.tags.get("cnnlab.role") == "sweep"]
    expect(len(jobs) == 2 and len(parents) == 1, f"{len(jobs)} jobs and {len(parents)} parents")
    together = (min(r.info.end_time for r in jobs) - max(r.info.start_time for r in jobs)) / 1000
    devices = sorted({r.data.params.get("trainer/device_type") for r in jobs})
    device_ids = sorted({r.data.params.get("trainer/device_ids") for r in jobs})
    expect(devices == [ctx.device_type], f"the sweep's jobs ran on {devices}")
    accelerator = ["trainer.accelerator=gpu", "trainer.precision=bf16-mixed"] if ctx.on_gpu else []
    probe, path = ctx.probe("ddp")
    ctx.cnnlab(
        "trainer=ddp trainer.devices=1",
        "ddp",
        ["trainer=ddp", "trainer.devices=1", *accelerator, *ctx.sizes.device, *lenet, *probe],
    )
    run = ctx.one_run("ddp")
    backend = read_probe(path)["backend"]
    result = {
        "sweep_jobs_finished": len(jobs),
        "sweep_parent": parents[0].info.status,
        "jobs_ran_together_s": together,
        "job_device_types": devices,
        "job_device_ids": device_ids,  # one id: the jobs shared that device
        "ddp_status": run.info.status,
        "ddp_backend": backend,
        "ddp_strategy": run.data.params.get("trainer/strategy"),
    }
    expect(backend == ("nccl" if ctx.on_gpu else "gloo"), f"DDP's backend is {backend}")
    return result, (
        f"joblib sweep: 2 jobs FINISHED on {'/'.join(devices)} {'/'.join(device_ids)}, "
        f"{together:.1f} s side by side; "
        f"trainer=ddp trainer.devices=1: FINISHED, backend {backend}"
    )


def yes(met: bool | None) -> str:
    return "not judged" if met is None else "met" if met else "MISSED"


STEPS = {"train": train, "syncs": syncs, "speed": speed, "resident": resident, "sweep": sweep}
