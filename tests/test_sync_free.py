"""A training step that does not log reads no value off the device: each read (``.item()``, a
blocking copy) makes the CPU wait for the GPU, so Python's time per step adds to the GPU's
instead of overlapping it.

``torch.cuda.set_sync_debug_mode`` cannot be used on the CPU: it reports the waits of CUDA
calls, and without CUDA nothing waits. So these tests count, in a real fit of the real
config, every call through which Python reads a tensor's value (``READS``); they check on
PyTorch's "meta" device (shapes without storage) that the data side copies nothing to the
device per batch; and where CUDA is, the last test runs the fit under
``set_sync_debug_mode`` itself, which also sees the waits made inside PyTorch (a CPU index
into GPU data, a blocking copy).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor

from cnnlab.data import ImageDataModule
from cnnlab.data.config import DataConfig
from cnnlab.data.datamodule import EpochBatchSampler, TensorBatches
from cnnlab.training.classifier import NonFiniteLossError
from cnnlab.training.job import Job, prepare

# Every way Python reads a tensor's value (the dunders: `if t:`, float(t), int(t), a[t],
# np.asarray(t); f"{t}" goes through item).
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__",
         "__array__")  # fmt: skip
# Reads by PyTorch of tensors it keeps on the CPU on every device, which wait for nothing:
# each parameter's step count (an optimizer that is not `capturable` keeps it there) and the
# seed a DataLoader draws from its CPU generator as an epoch begins.
ON_THE_CPU_BY_DESIGN = ("torch.optim.", "torch.utils.data.dataloader")
BATCHES = 7  # training batches an epoch
EPOCHS = 2
STEPS = range(BATCHES * EPOCHS)


def logging_steps(log_every: int) -> set[int]:
    """The steps whose metrics Lightning hands to the logger (``log_every_n_steps``)."""
    return {step for step in STEPS if (step + 1) % log_every == 0}


def checking_steps(log_every: int) -> set[int]:
    """The steps at whose end the Classifier reads its losses: the logging ones and each
    epoch's last."""
    return logging_steps(log_every) | {step for step in STEPS if (step + 1) % BATCHES == 0}


class ReadsPerStep(L.Callback):
    """Counts the reads of each training step in two spans: ``before`` it, from the end of
    the step before (whose metrics Lightning hands to the logger there, when it logs) to the
    step's start, which fetches, transfers and normalizes its batch and fetches the next;
    and ``during`` it: its ``training_step``, backward pass, optimizer step and batch-end
    hooks, the Classifier's last (``ended``). The reads of validation and of an epoch's end
    are no step's."""

    def __init__(self) -> None:
        self.counting = False
        self.reads: Counter[str] = Counter()
        self.before: list[Counter[str]] = []  # by global step
        self.during: list[Counter[str]] = []

    def read(self, name: str, caller: str) -> None:
        if self.counting and not caller.startswith(ON_THE_CPU_BY_DESIGN):
            self.reads[name] += 1

    def span(self) -> Counter[str]:
        """The reads since the last span ended; a new one begins."""
        reads, self.reads = self.reads, Counter()
        return reads

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.counting = True
        self.span()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before.append(self.span())

    def ended(self) -> None:
        self.during.append(self.span())

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.counting = False

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.counting = False


def count_reads(monkeypatch: pytest.MonkeyPatch, job: Job) -> ReadsPerStep:
    """Count the reads of each step of ``job``'s fit."""
    counter = ReadsPerStep()
    for name in READS:
        monkeypatch.setattr(Tensor, name, _counted(name, getattr(Tensor, name), counter))
    job.trainer.callbacks.append(counter)
    batch_end = job.module.on_train_batch_end  # Lightning calls it after every callback's

    def ended(*args) -> None:
        batch_end(*args)
        counter.ended()

    monkeypatch.setattr(job.module, "on_train_batch_end", ended)
    return counter


def _counted(name: str, original, counter: ReadsPerStep):
    def read(self: Tensor, *args, **kwargs):
        counter.read(name, sys._getframe(1).f_globals.get("__name__", ""))
        return original(self, *args, **kwargs)

    return read


def prepared(small_cfg, mnist_root: Path, *overrides: str) -> Job:
    """The real config, MNIST in torchvision's files, 2 epochs of 7 batches, logged to CSV."""
    cfg = small_cfg(
        [f"data.root={mnist_root}", "data.source=torchvision", f"trainer.limit_train_batches="
         f"{BATCHES}", f"trainer.max_epochs={EPOCHS}", "test=false", *overrides]
    )  # fmt: skip
    with warnings.catch_warnings():  # a logging interval longer than an epoch, on purpose
        warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
        return prepare(cfg, logger=CSVLogger(Path(cfg.paths.output_dir) / "csv"))


def fit(job: Job, *callbacks: L.Callback) -> None:
    """``job``'s fit, ``callbacks`` first (before its ModelCheckpoint)."""
    job.trainer.callbacks[:0] = callbacks
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
        job.trainer.fit(job.module, datamodule=job.datamodule)


@pytest.mark.parametrize("log_every", [3, 1000])
def test_a_training_step_reads_nothing_off_the_device_but_its_check_of_the_losses(
    small_cfg, mnist_root: Path, monkeypatch: pytest.MonkeyPatch, log_every: int
) -> None:
    """Augmented, with dropout: every part of the step the project writes. The losses are
    checked in one read at the end of the logging steps and of each epoch's last."""
    job = prepared(
        small_cfg, mnist_root, f"trainer.log_every_n_steps={log_every}", "data.augment=true",
        "model.dropout=0.2",
    )  # fmt: skip
    counter = count_reads(monkeypatch, job)
    fit(job)
    checks, logs = checking_steps(log_every), logging_steps(log_every)
    assert counter.during == [Counter(tolist=1) if s in checks else Counter() for s in STEPS]
    for step in STEPS:
        if step - 1 not in logs:  # where it logs, Lightning reads the values handed over
            assert not counter.before[step], f"step {step}: {dict(counter.before[step])}"


def test_the_constants_of_normalize_are_copied_to_a_device_once(
    mnist_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On "meta", where a ``.to(device)`` makes a new tensor each time, as it does on a GPU
    (on the CPU it hands back the same one, and would hide a copy a batch)."""
    datamodule = ImageDataModule(DataConfig(root=str(mnist_root), source="torchvision"))
    datamodule.setup("fit")
    handed: list[tuple[Tensor, Tensor]] = []
    addcmul = torch.addcmul

    def recorded(shift: Tensor, images: Tensor, scale: Tensor) -> Tensor:
        handed.append((shift, scale))
        return addcmul(shift, images, scale)

    monkeypatch.setattr(torch, "addcmul", recorded)
    images = datamodule.train_set.images[:8].to("meta")
    for _ in range(3):
        assert datamodule.normalize(images).device == images.device
    (shift, scale), *later = handed
    assert shift.device == scale.device == images.device
    assert all(s is shift and c is scale for s, c in later)


@pytest.mark.parametrize(
    ("rank", "world", "resume_at"),
    [(0, 1, (0, 0)), (1, 2, (0, 3))],
    ids=["one process", "rank 1 of 2, resumed mid-epoch"],
)
def test_a_resident_dataset_is_indexed_on_its_device(
    mnist_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    rank: int,
    world: int,
    resume_at: tuple[int, int],
) -> None:
    """The index reaches the data on its device (here "meta"), for this rank's share and
    from the batch a resumed run goes on with: the batches the CPU's index makes."""
    config = DataConfig(root=str(mnist_root), source="torchvision", batch_size=32)
    datamodule = ImageDataModule(config, shuffle_seed=4, resume_at=resume_at)
    datamodule.setup("fit")
    meta = torch.device("meta")
    datamodule.trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=meta), global_rank=rank, world_size=world
    )
    indexes: list[Tensor] = []
    getitem = TensorBatches.__getitem__

    def recorded(self: TensorBatches, index: Tensor):
        indexes.append(index)
        return getitem(self, index)

    monkeypatch.setattr(TensorBatches, "__getitem__", recorded)
    for images, labels in datamodule.train_dataloader():
        assert images.device == labels.device == meta
    on_cpu = EpochBatchSampler(
        len(datamodule.train_set), 32, shuffle=True, seed=4, rank=rank, world_size=world,
        resume_at=resume_at,
    )  # fmt: skip
    assert [index.shape for index in indexes] == [index.shape for index in on_cpu]
    assert all(index.device == meta for index in indexes)
    indexes.clear()
    next(iter(datamodule.val_dataloader()))
    assert indexes[0].device == meta


def test_the_sampler_draws_the_same_batches_for_any_device() -> None:
    """The order is drawn on the CPU and copied: a run on a GPU trains on the batches of
    the same run on the CPU (the copy itself is checked on "meta", above)."""
    common = dict(shuffle=True, seed=9, rank=1, world_size=2, resume_at=(0, 1))
    on_cpu = list(EpochBatchSampler(103, 10, **common))
    placed = list(EpochBatchSampler(103, 10, **common, device=torch.device("cpu")))
    assert len(on_cpu) == 5 and all(map(torch.equal, on_cpu, placed))


def loss_history() -> tuple[L.Callback, list[float]]:
    """A callback recording each step's loss (read here, for the test's own use), before the
    Classifier checks it."""
    losses: list[float] = []

    class History(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(outputs["loss"].item())

    return History(), losses


@pytest.mark.parametrize(
    ("log_every", "save_every"),
    [(3, None), (1000, None), (1000, 2)],
    ids=["logging every 3 steps", "checked at the epoch's end", "a checkpoint every 2 steps"],
)
def test_a_nan_loss_stops_the_run_within_log_every_n_steps_naming_its_first_step(
    small_cfg, mnist_root: Path, log_every: int, save_every: int | None
) -> None:
    saving = []
    if save_every:  # not waiting for a validation score: a checkpoint every save_every steps
        saving = [f"+callbacks.model_checkpoint.every_n_train_steps={save_every}",
                  "callbacks.model_checkpoint.monitor=null"]  # fmt: skip
    job = prepared(
        small_cfg, mnist_root, "optimizer.lr=1e12", "~scheduler",
        f"trainer.log_every_n_steps={log_every}", *saving,
    )  # fmt: skip
    history, losses = loss_history()
    with pytest.raises(NonFiniteLossError) as raised:
        fit(job, history)
    first_bad = next(step for step, loss in enumerate(losses) if not math.isfinite(loss))
    stopped_at = len(losses) - 1
    checks = checking_steps(log_every)
    if save_every:  # each checkpoint checks the losses before it is written
        checks |= {step for step in STEPS if (step + 1) % save_every == 0}
    assert stopped_at == min(step for step in checks if step >= first_bad)
    message = str(raised.value)
    named = f"training loss is nan at step {first_bad} (epoch 0, batch {first_bad}), "
    assert message.startswith(named + "learning rate 1e+12; lower optimizer.lr")
    assert "\n" not in message
    if log_every == 1000 and not save_every:  # checked at the epoch's end, it still names
        assert first_bad < stopped_at == BATCHES - 1  # the first bad step
    checkpoints = Path(job.settings.paths.output_dir) / "checkpoints"
    assert not list(checkpoints.glob("*.ckpt"))  # no weights trained on a NaN were kept


def test_under_ddp_every_rank_stops_at_the_step_where_any_rank_went_bad(
    small_cfg, mnist_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DDP path without DDP: the strategy's all-reduce sums this process's losses with
    those of a simulated second rank whose loss went NaN at step 4. This rank's losses stay
    finite, yet it stops at the next check naming step 4; the ranks meet only at checks."""
    job = prepared(small_cfg, mnist_root, "trainer.log_every_n_steps=1000")
    reduce = job.trainer.strategy.reduce
    meetings: list[int] = []  # the losses summed at each

    def all_reduce(tensor: Tensor, group=None, reduce_op="mean"):
        if sys._getframe(1).f_code.co_name != "_stop_if_non_finite":  # Lightning's own
            return reduce(tensor, group, reduce_op)
        assert reduce_op == "sum"
        meetings.append(len(tensor))
        other_rank = torch.full_like(tensor, 2.0)
        other_rank[4] = math.nan  # the ranks take their steps together: entry 4 is step 4
        return tensor + other_rank

    monkeypatch.setattr(job.trainer.strategy, "reduce", all_reduce)
    history, losses = loss_history()
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 4 \(epoch 0, batch 4\)"):
        fit(job, history)
    assert len(losses) == BATCHES and all(map(math.isfinite, losses))
    assert meetings == [BATCHES]  # once, at the end of the epoch, for all its steps


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_a_step_that_does_not_log_never_waits_for_it(
    small_cfg, mnist_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PyTorch's own check, on the GPU path (``trainer=gpu``: bf16, the data resident on
    the GPU, augmented there): a warning at each wait, counted per span as reads are."""
    job = prepared(
        small_cfg, mnist_root, "trainer=gpu", "trainer.log_every_n_steps=1000",
        "data.augment=true",
    )  # fmt: skip
    counter = count_reads(monkeypatch, job)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        span = counter.span

        def waits() -> Counter[str]:
            span()
            syncs = sum("synchronizing" in str(w.message) for w in caught)
            caught.clear()
            return Counter(sync=syncs) if syncs and counter.counting else Counter()

        monkeypatch.setattr(counter, "span", waits)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fit(job)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    checks = checking_steps(1000)
    # The first step copies normalize's constants to the GPU and tunes cuDNN: not counted.
    assert not any(counter.before[1:]), counter.before
    assert not any(c for s, c in enumerate(counter.during) if s and s not in checks)


def test_the_speedrun_recipes_steps_read_nothing_off_the_device_either(
    small_cfg, mnist_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """airbench's pieces (experiment=speedrun) in the step: the grouped optimizer, its
    schedule, lookahead's pulls every 5 steps, the timer, the whitening's frozen filters and
    the bias frozen after its epoch, drop_last; MNIST's files, so not its CIFAR crops."""
    job = prepared(
        small_cfg, mnist_root, "trainer.log_every_n_steps=1000", "model=speedrun",
        "model.channels=[4,8,8]", "model.whiten_images=64", "model.whiten_bias_epochs=1",
        "optimizer._target_=cnnlab.training.optim.grouped_sgd", "+optimizer.momentum=0.85",
        "+optimizer.nesterov=true", "+optimizer.decoupled_weight_decay=true",
        "+optimizer.norm_bias_lr_scale=64", "scheduler=piecewise_linear", "data.drop_last=true",
        "+callbacks.lookahead._target_=cnnlab.training.lookahead.Lookahead", "tta=flip_translate",
    )  # fmt: skip
    counter = count_reads(monkeypatch, job)
    fit(job)
    checks = checking_steps(1000)
    assert counter.during == [Counter(tolist=1) if s in checks else Counter() for s in STEPS]
    assert not any(counter.before[step] for step in STEPS)
