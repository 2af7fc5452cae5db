"""The LightningModule: cross-entropy, torchmetrics accuracy, optimizer and schedule from config."""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from cnnlab.checks import lookup
from cnnlab.models import InputSpec, ModelConfig, build_model
from cnnlab.models.tta import TTA
from cnnlab.training import compat

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]
# Steps whose losses wait on the device at most, where logging is rare or off
# (log_every_n_steps=0) and epochs are long: a bound on what they hold.
UNREAD_AT_MOST = 1000


class NonFiniteLossError(ArithmeticError):
    """The training loss became NaN or infinite: the run stops and is recorded FAILED."""


class UnreadStep(NamedTuple):
    """A training step whose loss is still on the device, with what an error would name."""

    loss: Tensor
    step: int
    epoch: int
    batch: int
    lr: float


class Classifier(L.LightningModule):
    """Trains any ``nn.Module`` that maps images to class logits.

    ``optimizer`` and ``scheduler`` are partials (Hydra ``_partial_: true``) completed in
    :meth:`configure_optimizers`. A scheduler that takes ``total_steps`` (OneCycleLR) is given
    the run's length and stepped every batch; any other is stepped every epoch.

    ``model`` and ``input_spec`` describe ``net`` as plain data (the knobs of
    :class:`cnnlab.models.ModelConfig` and the :class:`cnnlab.models.InputSpec` it was built
    for). They are saved in each checkpoint's hyperparameters, so that
    ``Classifier.load_from_checkpoint(path)`` rebuilds the net alone (``net=None``), from a
    file that ``torch.load(weights_only=True)`` reads.

    ``tta``: test-time augmentation of validation and test predictions (see :data:`TTA`).
    An optimizer factory that takes ``net`` (cnnlab.training.optim.grouped_sgd) is given
    the net, to group its parameters; any other is given ``params``.
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        num_classes: int | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        label_smoothing: float = 0.0,
        model: dict[str, Any] | None = None,
        input_spec: dict[str, int] | None = None,
        tta: str = "none",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        if net is None:
            if model is None or input_spec is None:
                raise ValueError("Classifier needs a net, or its model and input_spec to build it")
            net = build_model(ModelConfig(**model), InputSpec(**input_spec))
        if num_classes is None:
            if input_spec is None:
                raise ValueError("Classifier needs num_classes, or the input_spec that has it")
            num_classes = input_spec["classes"]
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.eval_criterion = nn.CrossEntropyLoss()  # validation and test losses stay plain
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        self.test_confusion_matrix: Tensor | None = None  # of the last test, all ranks summed
        self.predict_views = lookup("tta", tta, TTA)  # validation and test predictions
        self.memory_format = torch.contiguous_format  # of the net and its batches (perf.FastPath)
        self._unread: list[UnreadStep] = []  # losses not checked yet (_stop_if_non_finite)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images.contiguous(memory_format=self.memory_format))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = self.criterion(logits, labels)
        self._unread.append(
            UnreadStep(loss.detach(), self.global_step, self.current_epoch, batch_idx, self._lr())
        )
        if self._logs_this_step():
            accuracy = (logits.argmax(dim=1) == labels).float().mean()
            self.log("train/loss", loss, batch_size=len(labels))
            self.log("train/acc", accuracy, batch_size=len(labels))
        return loss

    def _logs_this_step(self) -> bool:
        """Whether Lightning hands this step's metrics to the logger (every
        ``log_every_n_steps``). ``self.log`` costs ~1.3 ms a call on this project's CPU, 10%
        of a LeNet-5 step when called every step for values that are then dropped, so the
        step metrics are computed and logged only when they are kept (Lightning's own rule,
        read from its logger connector: there is no public one)."""
        if self._trainer is None:
            return True
        return compat.should_update_logs(self.trainer)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After the optimizer step: where Lightning reads this step's logged values anyway.
        if (
            self._logs_this_step()
            or self.trainer.is_last_batch
            or len(self._unread) >= UNREAD_AT_MOST
        ):
            self._stop_if_non_finite()

    def _stop_if_non_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` naming the first unread step whose loss was NaN
        or infinite, here or under DDP on any rank: every rank reads at the same steps, the
        same sum of all ranks' losses, so all stop together.

        Reading a loss makes the CPU wait for the device, which then idles while Python
        prepares the next step. So the losses wait on the device and are read together, in
        one transfer, only at the end of the steps that log (where Lightning reads the
        logged values anyway), of an epoch's last batch, before validation, before any
        checkpoint and at the end of training (and every ``UNREAD_AT_MOST`` steps): a run
        stops within ``trainer.log_every_n_steps`` steps of its loss going bad, and no
        checkpoint keeps weights trained on it.
        """
        unread, self._unread = self._unread, []
        if not unread:  # the same on every rank: they take the same steps
            return
        losses = torch.stack([step.loss for step in unread]).float()
        if self._trainer is not None:  # a sum is NaN or infinite when one of its terms is
            losses = self.trainer.strategy.reduce(losses, reduce_op="sum")
        for step, loss in zip(unread, losses.tolist(), strict=True):
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"training loss is {loss} at step {step.step} (epoch {step.epoch}, batch "
                    f"{step.batch}), learning rate {step.lr:.3g}; lower optimizer.lr, or clip "
                    "gradients with trainer.gradient_clip_val"
                )

    def _lr(self) -> float:
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        return optimizers[0].param_groups[0]["lr"] if optimizers else float("nan")

    def on_validation_start(self) -> None:
        self._stop_if_non_finite()  # a checkpoint may follow (val_check_interval < 1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._stop_if_non_finite()  # any checkpoint: every_n_train_steps, an interruption

    def on_train_end(self) -> None:
        self._stop_if_non_finite()  # the steps after the last read (a stop at max_steps)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.test_confusion(self._evaluate(batch, "test", self.test_acc), batch[1])

    def on_test_epoch_end(self) -> None:
        # Computed here, where every DDP rank takes part in the sum.
        self.test_confusion_matrix = self.test_confusion.compute()
        self.test_confusion.reset()

    def _evaluate(
        self, batch: tuple[Tensor, Tensor], stage: str, accuracy: MulticlassAccuracy
    ) -> Tensor:
        images, labels = batch
        logits = self.predict_views(self, images)
        accuracy(logits, labels)
        loss = self.eval_criterion(logits, labels)
        self.log(f"{stage}/loss", loss, batch_size=len(labels), sync_dist=True)
        self.log(f"{stage}/acc", accuracy, batch_size=len(labels), prog_bar=True)
        return logits

    def _scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int | None):
        if total_steps is None:
            return self.scheduler_factory(optimizer)
        return self.scheduler_factory(optimizer, total_steps=total_steps)

    def on_train_start(self) -> None:
        """A run resumed to train longer (a larger ``trainer.max_epochs``) restored a schedule
        planned for its first length, which OneCycleLR refuses to step past: plan it again
        for the whole new length, at the step the run has reached."""
        self._unread = []  # left by a fit of this module that was interrupted
        planned = int(self.trainer.estimated_stepping_batches)
        for scheduler_config in self.trainer.lr_scheduler_configs:
            restored = scheduler_config.scheduler
            if getattr(restored, "total_steps", planned) < planned:
                scheduler_config.scheduler = self._replanned(restored, planned)

    def _replanned(self, restored, total_steps: int):
        optimizer = restored.optimizer
        with warnings.catch_warnings():  # stepped here without an optimizer step, on purpose
            warnings.simplefilter("ignore", UserWarning)
            scheduler = self._scheduler(optimizer, total_steps)
            for _ in range(restored.last_epoch):
                scheduler.step()
        return scheduler

    def configure_optimizers(self):
        if self.optimizer_factory is None:  # rebuilt from a checkpoint to evaluate, not train
            raise ValueError("this Classifier was built without an optimizer; it cannot train")
        return self.optimization(int(self.trainer.estimated_stepping_batches))

    def optimization(self, total_steps: int) -> dict:
        """Complete the optimizer and scheduler partials for a run of ``total_steps``.

        A scheduler that monitors a metric (ReduceLROnPlateau) watches ``val/loss``.
        """
        if "net" in inspect.signature(self.optimizer_factory).parameters:
            optimizer = self.optimizer_factory(net=self.net)
        else:
            optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        wants_length = "total_steps" in inspect.signature(self.scheduler_factory).parameters
        try:
            scheduler = self._scheduler(optimizer, total_steps if wants_length else None)
        except ZeroDivisionError:
            # OneCycleLR divides by its warm-up's length, which is zero when pct_start *
            # total_steps is exactly 1 (a 4-step smoke test at the default 0.25). Planned one
            # step longer, the run ends a step short of the cycle's end: harmless on a run
            # that short, and better than a crash.
            try:
                scheduler = self._scheduler(optimizer, total_steps + 1)
            except ZeroDivisionError as error:
                raise ValueError(
                    f"the scheduler cannot plan a run of {total_steps} steps ({error}); "
                    "train for more steps or change its pct_start"
                ) from error
        interval = "step" if wants_length else "epoch"
        schedule = {"scheduler": scheduler, "interval": interval, "monitor": "val/loss"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}


def describing(knobs: ModelConfig, spec: InputSpec) -> dict[str, Any]:
    """The Classifier arguments that describe a net built from ``knobs`` for ``spec``, as the
    plain data a checkpoint keeps (see :class:`Classifier`)."""
    return {"model": dataclasses.asdict(knobs), "input_spec": dataclasses.asdict(spec)}
