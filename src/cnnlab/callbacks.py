"""Lightning callbacks of cnnlab's own."""

from __future__ import annotations

import time

import lightning as L


class EpochSpeed(L.Callback):
    """Logs each epoch's training time (``time/epoch_s``) and ``time/images_per_s``.

    The clock stops at the last training batch, so the validation pass is not counted.
    """

    def __init__(self) -> None:
        self._start = self._end = 0.0
        self._images = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += len(batch[1])
        self._end = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = max(self._end - self._start, 1e-9)
        images = self._images * trainer.world_size
        pl_module.log_dict(
            {"time/epoch_s": seconds, "time/images_per_s": images / seconds},
            on_epoch=True,
            on_step=False,
            rank_zero_only=True,
        )
