"""Speed settings (``perf.*``): memory format, ``torch.compile``, float32 matmul precision.

Which memory format is faster depends on the model and the machine: on this project's
2-core CPU channels_last made LeNet-5 without batchnorm 1.8x faster, with batchnorm 0.75x
(PyTorch's CPU batchnorm is slow in channels_last), and the CIFAR ``cnn`` 1.3x faster. So
``perf.memory_format=auto`` measures it, the way ``cudnn.benchmark`` picks convolution
algorithms: a few forward/backward passes of a copy of the model in each format, the faster
kept and remembered for that model, input shape and machine (in this process and in
``~/.cache/cnnlab/perf.json``). On a GPU channels_last is taken without measuring (tensor
cores want it under bf16); with ``trainer.deterministic=true``, contiguous (a choice made
by the clock would not repeat). Under DDP rank 0 decides and the other ranks take its choice:
DDP refuses a model whose strides differ between ranks.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from cnnlab.training import compat

log = logging.getLogger("cnnlab")

MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
PROBE_BATCH = 32  # images per timed pass: the ratio, not the time, is what is wanted
PROBE_PASSES = 3  # timed passes per format, after one warm-up
CACHE_ENV = "CNNLAB_CACHE"  # the folder of cnnlab's caches; default ~/.cache/cnnlab
_chosen: dict[str, str] = {}  # this process's choices, by model and input


def faster_format(net: nn.Module, images: Tensor, device: torch.device) -> str:
    """``"channels_last"`` or ``"contiguous"``, whichever trains ``net`` faster on
    ``images`` (one batch, as the model reads them) on ``device``."""
    if device.type == "cuda":
        return "channels_last"
    key = _key(net, images, device)  # measured on the CPU, where the model still is
    if key not in _chosen:
        _chosen[key] = _load_cache().get(key) or _measure(net, images, key)
    return _chosen[key]


def _measure(net: nn.Module, images: Tensor, key: str) -> str:
    probe = copy.deepcopy(net).train()  # the real model's weights and statistics stay as they are
    batch = images[:PROBE_BATCH].float()
    seconds = {}
    with torch.random.fork_rng():  # dropout draws here must not shift the run's own
        for name, memory_format in MEMORY_FORMATS.items():
            probe = probe.to(memory_format=memory_format)
            x = batch.contiguous(memory_format=memory_format)
            times = []
            for _ in range(PROBE_PASSES + 1):
                start = time.perf_counter()
                probe(x).sum().backward()
                times.append(time.perf_counter() - start)
                probe.zero_grad(set_to_none=True)
            seconds[name] = sorted(times[1:])[len(times[1:]) // 2]
    best = min(seconds, key=seconds.get)
    log.info(
        "memory format: %s (contiguous %.1f ms, channels_last %.1f ms a pass of %d images)",
        best, seconds["contiguous"] * 1e3, seconds["channels_last"] * 1e3, len(batch),
    )  # fmt: skip
    _save_cache(key, best)
    return best


def _key(net: nn.Module, images: Tensor, device: torch.device) -> str:
    described = f"{net}|{tuple(images.shape[1:])}|{device}|{torch.get_num_threads()}"
    described += f"|{torch.__version__}|{os.cpu_count()}"
    return hashlib.sha256(described.encode()).hexdigest()[:16]


def cache_file() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cnnlab") / "perf.json"


def _load_cache() -> dict[str, str]:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(key: str, choice: str) -> None:
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cached = _load_cache() | {key: choice}
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(cached, indent=1))
        temporary.replace(path)  # whole or not at all, with jobs writing at once
    except OSError as error:  # a read-only home: measured again next time, no harm
        log.debug("perf cache not written: %s", error)


class FastPath(L.Callback):
    """Applies ``perf.*`` before the strategy moves the model to its device (and wraps it
    for DDP): the memory format of the model and of its batches (``Classifier.forward``),
    ``torch.compile`` and, on a GPU, the float32 matmul precision."""

    def __init__(
        self,
        memory_format: str = "auto",
        compile: bool = False,
        compile_mode: str | None = None,
        matmul_precision: str = "high",
    ) -> None:
        self.requested, self.compile, self.compile_mode = memory_format, compile, compile_mode
        self.matmul_precision = matmul_precision
        self.memory_format = "contiguous"  # what was applied

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.set_float32_matmul_precision(self.matmul_precision)
        if self.requested == "auto" and torch.are_deterministic_algorithms_enabled():
            self.memory_format = "contiguous"  # a choice by the clock would not repeat
        elif self.requested == "auto":
            self.memory_format = _decided_by_rank_zero(trainer, pl_module.net, device)
        else:
            self.memory_format = self.requested
        pl_module.memory_format = MEMORY_FORMATS[self.memory_format]
        pl_module.net.to(memory_format=pl_module.memory_format)
        if self.compile and not compat.is_compiled(pl_module.net):
            pl_module.net.compile(mode=self.compile_mode)  # state_dict keys stay as they are


def _decided_by_rank_zero(trainer: L.Trainer, net: nn.Module, device: torch.device) -> str:
    """The faster format as rank 0 finds it, for every rank: each rank timing on its own
    clock can choose differently, and DDP then refuses the model (its parameters' strides
    must match across ranks). Runs after the process group is set up and before the
    strategy wraps the model; with one process the broadcast hands the choice back."""
    choice = None
    if trainer.global_rank == 0:  # the others neither measure nor write the cache
        choice = faster_format(net, _probe_batch(trainer), device)
    return trainer.strategy.broadcast(choice, src=0)


def _probe_batch(trainer: L.Trainer) -> Tensor:
    """Training images as the model reads them (normalized), on the CPU."""
    datamodule = trainer.datamodule
    return datamodule.normalize(datamodule.train_set.images[:PROBE_BATCH])
