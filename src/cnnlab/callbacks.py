"""Lightning callbacks of cnnlab's own."""

from __future__ import annotations

import random
import time
from typing import Any

import lightning as L
import numpy as np
import torch


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


class ResumeState(L.Callback):
    """Saved in every checkpoint: the MLflow run it belongs to, and the states of the random
    number generators, so that a resumed run continues in the same MLflow run and draws the
    same dropout masks as an uninterrupted one (data order is seeded per epoch already)."""

    def __init__(self) -> None:
        self.run_id = ""  # set once the run exists

    def state_dict(self) -> dict[str, Any]:
        _, keys, position, has_gauss, gauss = np.random.get_state()
        state = {
            "mlflow_run_id": self.run_id,
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            # as tensors and numbers: checkpoints are loaded with weights_only=True
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                      "has_gauss": has_gauss, "gauss": gauss},
        }  # fmt: skip
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.run_id = state_dict["mlflow_run_id"]
        torch.set_rng_state(state_dict["torch"])
        random.setstate(state_dict["python"])
        numpy = state_dict["numpy"]
        keys = numpy["keys"].numpy().astype(np.uint32)
        np.random.set_state(
            ("MT19937", keys, numpy["position"], numpy["has_gauss"], numpy["gauss"])
        )
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
