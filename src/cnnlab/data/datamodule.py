"""Batches served straight from uint8 tensors: split once, indexed a whole batch at a time,
normalized on the model's device after transfer."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from cnnlab.checks import ConfigError
from cnnlab.data.augment import AUGMENTATIONS, AlternatingFlip, crop_flip
from cnnlab.data.config import DataConfig
from cnnlab.data.sources import ImageSet, dataset_info, load_splits


class TensorBatches(Dataset):
    """Indexed by a tensor of indices, so a batch is one gather, not N Python calls;
    ``flip`` (an :class:`~cnnlab.data.augment.AlternatingFlip`) mirrors images by index."""

    def __init__(self, data: ImageSet, flip: AlternatingFlip | None = None) -> None:
        self.data, self.flip = data, flip

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: Tensor) -> tuple[Tensor, Tensor]:
        images = self.data.images[index]
        if self.flip is not None:
            images = self.flip(images, index)
        return images, self.data.labels[index]


class EpochBatchSampler:
    """Yields index tensors of one batch each: a fresh permutation per epoch, sharded by rank.

    Written here rather than DistributedSampler + BatchSampler because those yield Python
    lists of ints per sample; this yields tensor slices. The permutation depends only on
    ``seed`` and the epoch, so every rank draws the same one and takes a disjoint share.
    Lightning calls ``set_epoch`` before each epoch.

    The order is drawn on the CPU (the same on every device) and each rank's share copied
    to ``device`` once an epoch, without waiting: indexing data on a GPU with a CPU index
    copies the index there first, a copy that makes the CPU wait for the GPU, twice a batch
    (images, labels).
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        resume_at: tuple[int, int] = (0, 0),
        device: torch.device | None = None,
    ) -> None:
        """``resume_at``: (epoch, batches of it already trained) of a run resumed mid-epoch;
        the first pass over that epoch starts after them. Lightning may build the loader
        before it restores the epoch (to count the run's steps), so the epoch is compared
        when the pass begins, after ``set_epoch``. ``device``: where the indexed data lies
        (None: the CPU)."""
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.resume_at, self.device = 0, resume_at, device

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def shard_size(self) -> int:
        return math.ceil(self.size / self.world_size)

    def __len__(self) -> int:
        rounding = math.floor if self.drop_last else math.ceil
        return rounding(self.shard_size / self.batch_size)

    def __iter__(self) -> Iterator[Tensor]:
        if self.shuffle:
            # Mixed so that (seed, epoch) pairs never share an order: seed + epoch would
            # give seed 1 the orders of seed 0 shifted by one epoch.
            mixed = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]
            generator = torch.Generator().manual_seed(int(mixed))
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.arange(self.size)
        padding = self.shard_size * self.world_size - self.size  # equal shares on every rank
        if padding:
            order = torch.cat([order, order[:padding]])
        shard = order[self.rank :: self.world_size]
        if self.device is not None and self.device.type == "cuda":
            shard = shard.pin_memory()  # copied from page-locked memory, the CPU goes on
        shard = shard.to(self.device, non_blocking=True)
        resume_epoch, done = self.resume_at
        start = done if self.epoch == resume_epoch else 0
        self.resume_at = (0, 0)  # one pass only: the next epochs start at their beginning
        for batch in range(start, len(self)):
            yield shard[batch * self.batch_size : (batch + 1) * self.batch_size]


class ImageDataModule(L.LightningDataModule):
    """Train/val/test of one dataset; ``val_size`` is a count (>= 1) or a fraction (< 1)."""

    def __init__(
        self,
        config: DataConfig | None = None,
        *,
        shuffle_seed: int = 0,
        resume_at: tuple[int, int] = (0, 0),
    ) -> None:
        """``shuffle_seed``: the training order's seed (the run's seed); ``resume_at``: the
        (epoch, batches done in it) of the checkpoint a resumed run continues from, so that
        the epoch goes on with the next batch."""
        super().__init__()
        config = config or DataConfig()
        self.config = config
        self._on_device: dict[tuple[int, str], ImageSet] = {}
        self._constants_on: dict[torch.device, tuple[Tensor, Tensor]] = {}  # of normalize
        self.info = dataset_info(config.name)
        self.name, self.root, self.source = config.name, config.root, config.source.value
        self.batch_size, self.eval_batch_size = config.batch_size, config.eval_batch_size
        self.shuffle_seed, self.resume_at = shuffle_seed, resume_at
        self.augment = augmentation(config, self.info.augmentation, self.info.size)
        self.source_used: str | None = None
        self.train_set: ImageSet | None = None
        self.val_set: ImageSet | None = None
        self.test_set: ImageSet | None = None
        std = torch.tensor(self.info.std).view(1, -1, 1, 1)
        mean = torch.tensor(self.info.mean).view(1, -1, 1, 1)
        # x_norm = x_uint8 * scale + shift, fused: (x / 255 - mean) / std
        self._scale, self._shift = 1 / (255 * std), -mean / std

    def prepare_data(self) -> None:
        load_splits(self.name, self.root, self.source, self.config.download)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        splits = load_splits(self.name, self.root, self.source, self.config.download)
        self.source_used = splits.source
        train_size = len(splits.train)
        val_size = self.config.val_size
        val_count = int(val_size) if val_size >= 1 else round(val_size * train_size)
        if not 0 < val_count < train_size:
            raise ConfigError(
                f"data.val_size={val_size:g} leaves {train_size - val_count} "
                f"of {train_size} training images; valid: a count in "
                f"[1, {train_size - 1}] or a fraction in (0, 1)"
            )
        order = torch.randperm(
            train_size, generator=torch.Generator().manual_seed(self.config.split_seed)
        )
        self.val_set = _subset(splits.train, order[:val_count])
        self.train_set = _subset(splits.train, order[val_count:])
        self.test_set = splits.test

    def train_dataloader(self) -> DataLoader:
        return self._loader(
            self.train_set,
            self.batch_size,
            shuffle=True,
            resume_at=self.resume_at,
            drop_last=self.config.drop_last,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def _loader(
        self,
        data: ImageSet,
        batch_size: int,
        *,
        shuffle: bool,
        resume_at: tuple[int, int] = (0, 0),
        drop_last: bool = False,
    ) -> DataLoader:
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        accelerated = device is not None and device.type != "cpu"
        if accelerated and self.config.resident:
            data = self._resident(data, device)
        sampler = EpochBatchSampler(
            len(data),
            batch_size,
            shuffle=shuffle,
            seed=self.shuffle_seed,
            rank=rank,
            world_size=world,
            resume_at=resume_at,
            drop_last=drop_last,
            device=data.images.device,  # the index where the data is: no copy per batch
        )
        flip = None
        if shuffle and self.augment is not None and self.config.flip == "alternating":
            flip = AlternatingFlip(len(data), self.shuffle_seed, data.images.device, sampler)
        # Its own generator: a DataLoader draws a worker seed from the global one each time it
        # is iterated, which would shift the dropout masks of a run resumed mid-epoch.
        return DataLoader(
            TensorBatches(data, flip),
            batch_size=None,
            sampler=sampler,
            pin_memory=accelerated and not self.config.resident,
            generator=torch.Generator(),
        )

    def _resident(self, data: ImageSet, device: torch.device) -> ImageSet:
        """``data`` on ``device``, copied once (MNIST: 47 MB, CIFAR-10: 150 MB as uint8)."""
        key = (id(data), str(device))
        if key not in self._on_device:
            self._on_device[key] = ImageSet(data.images.to(device), data.labels.to(device))
        return self._on_device[key]

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int):
        """Augment (training batches only) and normalize on the model's device."""
        images, labels = batch
        images = images.float()  # (B, C, H, W), 0..255
        if self.augment is not None and self.trainer is not None and self.trainer.training:
            images = self.augment(images)
        return self.normalize(images), labels

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (or 0..255 float) images as the model reads them: per-channel standardized."""
        scale, shift = self._constants(images.device)
        return torch.addcmul(shift, images.float(), scale)

    def _constants(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``normalize``'s scale and shift on ``device``, copied there once: a copy a batch
        would make the CPU wait for the GPU. float32, as the images are when normalized."""
        if device not in self._constants_on:
            self._constants_on[device] = (self._scale.to(device), self._shift.to(device))
        return self._constants_on[device]


def augmentation(config: DataConfig, name: str, size: int) -> Callable[[Tensor], Tensor] | None:
    """The batch augmentation ``config`` asks for, of the dataset's kind ``name``.

    Raises:
        ConfigError: crop or flip settings that the dataset's augmentation does not take, or
            that do nothing because ``data.augment`` is off.
    """
    defaults = DataConfig()
    changed = [
        f"data.{key}={getattr(config, key)}"
        for key in CROP_FLIP_SETTINGS
        if getattr(config, key) != getattr(defaults, key)
    ]
    if changed and not (config.augment and name == "crop_flip"):
        why = (
            "data.augment is false" if not config.augment else f"{config.name} augments with {name}"
        )
        raise ConfigError(
            f"{', '.join(changed)}: a setting of the crop-and-flip augmentation, but {why}; "
            "valid: data.augment=true on cifar10 or cifar100"
        )
    if not config.augment:
        return None
    if name != "crop_flip":
        return AUGMENTATIONS[name]
    if config.crop_fill == "reflect" and config.crop_padding >= size:
        raise ConfigError(
            f"data.crop_padding={config.crop_padding} with data.crop_fill=reflect: reflection "
            f"pads less than the image's {size} px; valid: 0 to {size - 1}"
        )
    return functools.partial(
        crop_flip,
        padding=config.crop_padding,
        fill=config.crop_fill,
        flip=config.flip == "random",  # alternating: mirrored where batches are gathered
    )


# The crop-and-flip settings of DataConfig: other datasets leave them at their defaults.
CROP_FLIP_SETTINGS = ("crop_padding", "crop_fill", "flip")


def _subset(data: ImageSet, index: Tensor) -> ImageSet:
    return ImageSet(data.images[index].contiguous(), data.labels[index])
