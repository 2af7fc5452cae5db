"""The GPU check's plain PyTorch loop (step 3): what cnnlab's run of the same config does
in a training epoch, written by hand, with no Lightning, Hydra at run time or MLflow.

    python -m bench.gpu_plain --out plain.json --epochs 3 [--compiled] -- <cnnlab overrides>

The config is composed and built by cnnlab (``prepare``: the same data, net, optimizer,
schedule, label smoothing and augmentation); then each epoch trains on every training image
once in batches of ``data.batch_size`` (the last one short, as cnnlab's sampler does), with
the images resident on the device as uint8, gathered, augmented and normalized there, in the
memory format cnnlab picks (channels_last on a GPU), under the trainer's precision (bf16
autocast for ``bf16-mixed``), with ``cudnn.benchmark`` and the float32 matmul precision as
the config sets them, and ``torch.compile`` of the net as ``perf.compile=true`` does it. The
clock runs from the epoch's start to its last step with the GPU synchronized at both ends.
Nothing is read off the device until the end (the final loss, as a sanity check).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from bench.gpu_train import accept_random_cifar
from cnnlab import compose
from cnnlab.training import perf
from cnnlab.training.job import prepare

AUTOCAST = {"bf16-mixed": torch.bfloat16, "32-true": None, "32": None}


def measure(overrides: list[str], epochs: int, compiled: bool, folder: Path) -> dict:
    job = prepare(compose.compose(overrides, folder))
    settings, data = job.settings, job.datamodule
    precision = str(settings.trainer.get("precision"))
    if precision not in AUTOCAST:
        raise SystemExit(
            f"gpu_plain: precision {precision} not written here; valid: {list(AUTOCAST)}"
        )
    device = job.trainer.strategy.root_device
    torch.backends.cudnn.benchmark = bool(settings.trainer.get("benchmark"))
    if device.type == "cuda":
        torch.set_float32_matmul_precision(settings.perf.matmul_precision)
    probe = data.normalize(data.train_set.images[: perf.PROBE_BATCH])
    memory_format = perf.MEMORY_FORMATS[perf.faster_format(job.net, probe, device)]
    net = job.net.to(device, memory_format=memory_format).train()
    if compiled:
        net.compile(mode=settings.perf.compile_mode)
    images = data.train_set.images.to(device)  # uint8, resident
    labels = data.train_set.labels.to(device)
    batch, count = data.batch_size, len(labels)
    steps_per_epoch = math.ceil(count / batch)
    optimization = job.module.optimization(total_steps=epochs * steps_per_epoch)
    optimizer = optimization["optimizer"]
    scheduler = optimization.get("lr_scheduler", {}).get("scheduler")
    criterion = job.module.criterion  # with the config's label smoothing
    dtype = AUTOCAST[precision]
    seconds = []
    for _ in range(epochs):
        synchronize(device)
        start = time.perf_counter()
        order = torch.randperm(count, device=device)
        for first in range(0, count, batch):
            index = order[first : first + batch]
            x = images[index].float()  # (B, C, H, W), 0..255
            if data.augment is not None:
                x = data.augment(x)
            x = data.normalize(x).contiguous(memory_format=memory_format)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = criterion(net(x), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return {
        "epochs": [{"images": count, "seconds": s} for s in seconds],
        "device": device.type,
        "precision": precision,
        "memory_format": str(memory_format).removeprefix("torch."),
        "batch_size": batch,
        "final_loss": float(loss),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--compiled", action="store_true", help="torch.compile the net")
    parser.add_argument("overrides", nargs="*", help="cnnlab's overrides (after --)")
    args = parser.parse_args()
    accept_random_cifar()
    with tempfile.TemporaryDirectory() as folder:
        result = measure(args.overrides, args.epochs, args.compiled, Path(folder))
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
