"""The progress bar: Lightning's tqdm bar on a terminal, one line per epoch anywhere else.

Written to a file or a pipe (a Slurm log, ``make train > log``, ``| tee``), tqdm's bar is a
carriage return and a redrawn line every ``refresh_rate`` steps, all of them kept: thousands
of lines nobody reads. There the bars stay off and each finished epoch prints one line.
"""

from __future__ import annotations

import math
import sys
import time

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

# What an epoch's line shows, when logged (train/loss only on logging steps, val/* only in
# epochs that validate).
EPOCH_METRICS = ("train/loss", "val/loss", "val/acc")


class LogFriendlyProgressBar(TQDMProgressBar):
    """Lightning's ``TQDMProgressBar`` when stdout is a terminal; otherwise one line an epoch:
    ``epoch 2/10: step 938, train/loss 0.1321, val/loss 0.09812, val/acc 0.9702, 14.2 s``.

    A subclass of Lightning's bar, so Lightning counts it as the run's progress bar (and
    disables it on every rank but the first) and ``trainer.enable_progress_bar=false`` drops it.
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False):
        super().__init__(refresh_rate, process_position, leave)
        self.on_terminal = sys.stdout.isatty()
        self._epoch_start = 0.0

    @property
    def is_enabled(self) -> bool:
        """Whether the tqdm bars draw: on a terminal only."""
        return self.on_terminal and super().is_enabled

    @property
    def prints_lines(self) -> bool:
        return not self.on_terminal and super().is_enabled

    def on_train_start(self, *args: object) -> None:
        super().on_train_start(*args)
        self._epoch_start = time.perf_counter()  # resumed mid-epoch, no epoch start comes

    def on_train_epoch_start(self, trainer: L.Trainer, *args: object) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.prints_lines:
            print(self.epoch_line(trainer, time.perf_counter() - self._epoch_start), flush=True)

    @staticmethod
    def epoch_line(trainer: L.Trainer, seconds: float) -> str:
        epochs = trainer.max_epochs
        of = f"/{epochs}" if epochs is not None and epochs > 0 else ""
        parts = [f"epoch {trainer.current_epoch + 1}{of}: step {trainer.global_step:,}"]
        for name in EPOCH_METRICS:
            value = trainer.callback_metrics.get(name)
            if value is not None and value.numel() == 1 and math.isfinite(value.item()):
                parts.append(f"{name} {value.item():.4g}")
        parts.append(f"{seconds:.1f} s")
        return ", ".join(parts)
