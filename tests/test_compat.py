"""Every Lightning internal cnnlab reads (cnnlab.training.compat), checked against the
installed Lightning: an upgrade that moves or changes one fails here, by name."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from cnnlab.training import compat


class StepLogger(Logger):
    """Remembers the steps whose metrics Lightning handed over."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[int] = []

    @property
    def name(self) -> str:
        return "steps"

    @property
    def version(self) -> str:
        return "0"

    @property
    @rank_zero_experiment
    def experiment(self) -> None:
        return None

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        if "loss" in metrics:
            self.steps.append(step)


class Probe(BoringModel):
    """Reads the internals at every training step, as cnnlab's code does."""

    def __init__(self, stop_at: int | None = None) -> None:
        super().__init__()
        self.stop_at = stop_at
        self.updates: list[int] = []  # steps at which should_update_logs said yes
        # batches_done at each batch's end hook, where Lightning has yet to count that batch
        self.done: list[int] = []

    def training_step(self, batch, batch_idx):
        output = super().training_step(batch, batch_idx)
        if compat.should_update_logs(self.trainer):
            self.updates.append(self.trainer.global_step)
        self.log("loss", output["loss"])
        return output

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.done.append(compat.batches_done(self.trainer))
        if batch_idx == self.stop_at:
            assert compat.stop_after_batch(self.trainer)


def trainer(**options) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=9, limit_val_batches=0,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        **options,
    )  # fmt: skip


def test_should_update_logs_is_when_lightning_hands_metrics_to_the_logger() -> None:
    logger, probe = StepLogger(), Probe()
    trainer(logger=logger, log_every_n_steps=3).fit(probe)
    assert probe.updates and probe.updates == logger.steps  # cnnlab logs exactly those steps


def test_batches_done_counts_the_epochs_completed_batches() -> None:
    probe = Probe()
    trainer(logger=False).fit(probe)
    assert probe.done == list(range(9))


def test_stop_after_batch_stops_at_the_end_of_that_batch() -> None:
    probe = Probe(stop_at=3)
    fit = trainer(logger=False)
    with pytest.raises(SIGTERMException):
        fit.fit(probe)
    assert fit.global_step == 4 and probe.done == [0, 1, 2, 3]
    assert not compat.stop_after_batch(None)  # no Trainer: nothing to ask


@pytest.mark.parametrize(
    ("strategy", "by_script", "by_multiprocessing"),
    [("auto", False, False), ("ddp", True, False), ("ddp_spawn", False, True)],
)
def test_how_lightning_starts_a_strategys_processes(
    strategy: str, by_script: bool, by_multiprocessing: bool
) -> None:
    devices = 1 if strategy == "auto" else 2
    built = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False)
    assert compat.starts_by_script(built.strategy) is by_script
    assert compat.starts_by_multiprocessing(built.strategy) is by_multiprocessing


def test_is_compiled_sees_module_compile() -> None:
    layer = nn.Linear(2, 2)
    assert not compat.is_compiled(layer)
    layer.compile()
    assert compat.is_compiled(layer)
