"""Lightning callbacks of cnnlab's own."""

from __future__ import annotations

import random
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from cnnlab.training import compat


class EpochSpeed(L.Callback):
    """Logs each epoch's training time (``time/epoch_s``) and ``time/images_per_s``.

    The clock stops at the last training batch, so the validation pass is not counted.
    """

    def __init__(self) -> None:
        self._start = self._end = 0.0
        self._images = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Resumed mid-epoch, Lightning calls no on_train_epoch_start: the clock starts here.
        self.on_train_epoch_start(trainer, pl_module)

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


class TrainTimer(L.Callback):
    """The time airbench reports: training and its set-up (the whitening fit) on the device,
    not validation, checkpoints or the test, logged once at the end as ``time/train_s``.

    On a GPU it is timed with CUDA events, recorded without waiting and read once at the end:
    the time the GPU took, not when Python queued the work. The clock runs from the start of
    the fit to the first validation (the sanity check), and from each epoch's first training
    batch to its validation or end; a resumed run adds to the seconds its checkpoint saved.
    """

    def __init__(self) -> None:
        self.seconds_before = 0.0  # of the run's earlier starts
        self._spans: list[tuple[Any, Any]] = []  # (start, end) marks: events or perf_counter
        self._open: Any = None

    def _mark(self, device: torch.device) -> Any:
        if device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _start(self, pl_module: L.LightningModule) -> None:
        if self._open is None:
            self._open = self._mark(pl_module.device)

    def _stop(self, pl_module: L.LightningModule) -> None:
        if self._open is not None:
            self._spans.append((self._open, self._mark(pl_module.device)))
            self._open = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module)  # before WhiteningFit's: the callbacks run in list order

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start(pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop(pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop(pl_module)

    @property
    def seconds(self) -> float:
        """The time so far; on a GPU this waits for the device (read it at the end)."""
        total = self.seconds_before
        for start, end in self._spans:
            if isinstance(start, float):
                total += end - start
            else:
                end.synchronize()
                total += start.elapsed_time(end) / 1000
        return total

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop(pl_module)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"time/train_s": self.seconds}, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seconds_before = float(state_dict["seconds"])


class ResumeState(L.Callback):
    """Saved in every checkpoint: the MLflow run it belongs to (its logger's run), where in
    the epoch training stood, the fit's time so far, and the random number generators'
    states, so that a resumed run continues in the same MLflow run with the next batch and
    the same dropout masks as an uninterrupted one (the data order is seeded per epoch).

    What a resume starts from is read from the checkpoint before anything is built
    (:func:`cnnlab.training.job.start_from`) and handed to the builders; loading the
    checkpoint here restores only the random number generators.
    """

    def __init__(self, fit_seconds_before: float = 0.0) -> None:
        # Seconds of trainer.fit in the run's earlier starts, up to the checkpoint this one
        # resumes from: time/fit_s is the whole fit's time across resumes.
        self.fit_seconds_before = fit_seconds_before
        self._fit_start: float | None = None
        self._trainer: L.Trainer | None = None
        self._batch_start_rng: Tensor | None = None  # set while a training batch runs

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage == "fit":  # before the checkpoint is loaded
            self._fit_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # A checkpoint taken inside this batch (an interruption) redoes it from its start.
        self._batch_start_rng = torch.get_rng_state()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batch_start_rng = None

    def state_dict(self) -> dict[str, Any]:
        _, keys, position, has_gauss, gauss = np.random.get_state()
        state = {
            "mlflow_run_id": self._run_id(),
            "batches_done": self._batches_done(),
            "fit_seconds": self.fit_seconds,
            "torch": self._batch_start_rng if self._batch_start_rng is not None
            else torch.get_rng_state(),
            "python": random.getstate(),
            # as tensors and numbers: checkpoints are loaded with weights_only=True
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                      "has_gauss": has_gauss, "gauss": gauss},
        }  # fmt: skip
        if torch.cuda.is_initialized():  # this process's device (each rank drives one)
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def _run_id(self) -> str:
        logger = self._trainer.logger if self._trainer is not None else None
        return str(logger.run_id or "") if isinstance(logger, MLFlowLogger) else ""

    @property
    def fit_seconds(self) -> float:
        """trainer.fit's time in all the run's starts, up to now."""
        return self.fit_seconds_before + self._seconds_fitting()

    def _seconds_fitting(self) -> float:
        return 0.0 if self._fit_start is None else time.perf_counter() - self._fit_start

    def _batches_done(self) -> int:
        """Training batches done in the current epoch; 0 once the epoch is complete."""
        trainer = self._trainer
        if trainer is None:
            return 0
        done = compat.batches_done(trainer)
        return done if done < trainer.num_training_batches else 0

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        random.setstate(state_dict["python"])
        numpy = state_dict["numpy"]
        keys = numpy["keys"].numpy().astype(np.uint32)
        np.random.set_state(
            ("MT19937", keys, numpy["position"], numpy["has_gauss"], numpy["gauss"])
        )
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_dict["cuda"])


class InterruptCheckpoint(L.Callback):
    """Stops training cleanly on Ctrl-C or SIGTERM (a Slurm preemption) and checkpoints the
    state as it stands, for ``resume=``.

    The first signal is handed to Lightning's own SIGTERM handling, which stops at the end
    of the batch (all DDP ranks together), where the model, optimizer, progress counters
    and random state agree; a stop inside a batch would save half of it. A second signal
    stops at once. Errors are not checkpointed: a failed run is not worth resuming.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, dirpath: str, filename: str = "interrupted") -> None:
        # Not Lightning's OnExceptionCheckpoint: with one present, fit(ckpt_path=None) turns
        # into ckpt_path="last" and a new run silently resumes an old one from its folder.
        self.dirpath, self.filename = dirpath, filename
        self.saved = False
        self.received: int | None = None  # the signal that stopped training
        self._trainer: L.Trainer | None = None
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer = trainer
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Asked twice, or no way to ask Lightning to stop after the batch: stop now.
        if self.received is not None or not compat.stop_after_batch(self._trainer):
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        self.received = signum  # Lightning raises SIGTERMException after the batch
        print(f"\n{signal.Signals(signum).name}: stopping after this batch "
              "(again to stop at once)", file=sys.stderr, flush=True)  # fmt: skip

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()
        if self.received is not None:  # arrived in the last batch: a stop all the same
            raise SIGTERMException()

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        self._restore()
        if isinstance(exception, KeyboardInterrupt | SystemExit):  # SIGTERMException too
            trainer.save_checkpoint(self.ckpt_path)
            self.saved = True

    @property
    def ckpt_path(self) -> str:
        return str(Path(self.dirpath) / f"{self.filename}.ckpt")

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
