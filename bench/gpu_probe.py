"""What the GPU check reads off cnnlab's own runs that MLflow does not record: a Lightning
callback added through the config, so the run is still ``python -m cnnlab.train``'s own:

    python -m cnnlab.train trainer=gpu +callbacks.gpu_probe._target_=bench.gpu_probe.Probe \\
        +callbacks.gpu_probe.out=probe.json [+callbacks.gpu_probe.conv_dtype=true] \\
        [+callbacks.gpu_probe.count_syncs=true]

It writes ``out`` (JSON) at the end of the fit, on global rank 0:

- ``device``, ``precision`` and the DDP ``backend`` (nccl, gloo; null without a process group);
- with ``conv_dtype``, ``conv_output_dtypes``: the dtype of the first convolution's output
  in the first training step, ``torch.bfloat16`` only when bf16 autocast really ran it (a
  forward hook: off by default, since torch.compile would trace it into the timed runs);
- ``epochs``: training images and seconds per epoch, from the epoch's start to its last
  batch with the GPU synchronized at both ends (cnnlab's own ``time/epoch_s`` stops the
  clock at the last batch without waiting for the GPU), and when it started (``start``,
  ``time.perf_counter``: from one to the next counts validation and checkpoints too); not
  measured with ``count_syncs``;
- with ``count_syncs``, ``steps``: per training step, whether it logged (or checked the
  losses at an epoch's end) and how many times it waited: CUDA syncs, each a warning of
  ``torch.cuda.set_sync_debug_mode("warn")``; on the CPU, where nothing waits, the reads of
  a tensor's value that would wait on a GPU (``Tensor.item``, ``tolist``...: the count of
  tests/test_sync_free.py). Validation is no step's.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from cnnlab.training import compat

# The ways Python reads a tensor's value (tests/test_sync_free.py's READS), and the callers
# whose reads are of tensors kept on the CPU on every device (the optimizer's step count, the
# DataLoader's seed).
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__",
         "__array__")  # fmt: skip
ON_THE_CPU_BY_DESIGN = ("torch.optim.", "torch.utils.data.dataloader")


class Probe(L.Callback):
    def __init__(self, out: str, conv_dtype: bool = False, count_syncs: bool = False) -> None:
        self.out, self.conv_dtype, self.count_syncs = Path(out), conv_dtype, count_syncs
        self.facts: dict = {"epochs": [], "steps": [], "conv_output_dtypes": []}
        self._cuda = False
        self._start = 0.0
        self._images = 0
        self._waits = 0  # waits counted since the current span began
        self._where: Counter[str] = Counter()  # the waits of the counted steps, by line
        self._counting = False
        self._caught: list[warnings.WarningMessage] | None = None
        self._restore: list[tuple[str, object]] = []
        self._hook = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = trainer.strategy.root_device
        self._cuda = device.type == "cuda"
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.facts |= {
            "device": torch.cuda.get_device_name(device) if self._cuda else device.type,
            "precision": str(trainer.precision),
            "backend": torch.distributed.get_backend() if distributed else None,
            "log_every_n_steps": trainer.log_every_n_steps,
            "measures": None,
        }
        conv = next((m for m in pl_module.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is not None and self.conv_dtype:
            self._hook = conv.register_forward_hook(self._record_dtype)

    def _record_dtype(self, module: nn.Module, inputs, output: Tensor) -> None:
        if module.training and not self.facts["conv_output_dtypes"]:
            self.facts["conv_output_dtypes"].append(str(output.dtype))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.count_syncs:
            return
        if self._cuda:
            self.facts["measures"] = "CUDA syncs (torch.cuda.set_sync_debug_mode warnings)"
            catcher = warnings.catch_warnings(record=True)
            self._caught = catcher.__enter__()
            self._restore.append(("catcher", catcher))
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        else:
            self.facts["measures"] = "host reads of tensor values (CPU: CUDA syncs not measurable)"
            for name in READS:
                original = getattr(Tensor, name)
                self._restore.append((name, original))
                setattr(Tensor, name, self._counted(original))

    def _counted(self, original):
        def read(tensor: Tensor, *args, **kwargs):
            frame = sys._getframe(1)
            caller = frame.f_globals.get("__name__", "")
            if self._counting and not caller.startswith(ON_THE_CPU_BY_DESIGN):
                self._waits += 1
                self._where[f"Tensor.{original.__name__} in {caller}:{frame.f_lineno}"] += 1
            return original(tensor, *args, **kwargs)

        return read

    def _span(self) -> int:
        """The waits since the last span ended; a new span begins."""
        if self._caught is not None:
            syncs = [w for w in self._caught if "synchroniz" in str(w.message)]
            self._waits += len(syncs)
            if self._counting:
                self._where.update(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
            self._caught.clear()
        waits, self._waits = self._waits, 0
        return waits

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.count_syncs:  # a sync here would be counted as one of the run's
            self._synchronize()
        self._start, self._images = time.perf_counter(), 0
        self._span()  # what waited outside the training steps is no step's
        self._counting = self.count_syncs

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.count_syncs:
            return
        self._end_step()  # the step before ends as this one starts
        logs = compat.should_update_logs(trainer)  # the Classifier reads its losses then
        self.facts["steps"].append({"step": trainer.global_step, "logs": logs, "waits": 0})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += len(batch[1])
        if not trainer.is_last_batch:
            return
        if self.count_syncs:
            self.facts["steps"][-1]["logs"] = True  # the epoch's last step checks the losses
        else:
            self._synchronize()
            seconds = time.perf_counter() - self._start
            epoch = {"images": self._images, "seconds": seconds, "start": self._start}
            self.facts["epochs"].append(epoch)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end_step()  # the epoch's last step ends where validation begins
        self._counting = False

    def _end_step(self) -> None:
        if self._counting and self.facts["steps"]:
            self.facts["steps"][-1]["waits"] += self._span()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end_step()
        self._counting = False
        for name, original in reversed(self._restore):
            if name == "catcher":
                torch.cuda.set_sync_debug_mode("default")
                original.__exit__(None, None, None)
            else:
                setattr(Tensor, name, original)
        self._restore.clear()
        if self._hook is not None:
            self._hook.remove()
        self.facts["where"] = dict(self._where.most_common(10))
        self._write()

    def _synchronize(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()

    @rank_zero_only
    def _write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.facts, indent=1) + "\n")
