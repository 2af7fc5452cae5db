"""The data's settings (``data.*``), typed: the schema Hydra composes ``conf/data/*.yaml``
into, and what :class:`cnnlab.data.ImageDataModule` takes whole."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cnnlab.checks import check_choice, check_range, lookup

CROP_FILLS = ("reflect", "zeros")
FLIPS = ("alternating", "none", "random")


class DataSource(enum.Enum):
    """Where images come from: ``auto`` tries the torchvision files, then the bundled digits."""

    auto = "auto"
    torchvision = "torchvision"
    bundled = "bundled"


@dataclass
class DataConfig:
    name: str = "mnist"
    root: str = "data"
    source: DataSource = DataSource.auto
    download: bool = True  # fetch the torchvision files when missing (needs network)
    batch_size: int = 128
    eval_batch_size: int = 1024
    # Validation images split off the training set: a count if >= 1, else a fraction.
    val_size: float = 0.1
    split_seed: int = 0  # fixes the train/val split independently of the training seed
    # Per-batch augmentation on the model's device (training batches only): random crop with
    # 4 px padding and horizontal flip for CIFAR, small random affine for MNIST.
    augment: bool = False
    # Of CIFAR's crop-and-flip augmentation: the crop's padding (px), how the padding is
    # filled (zeros | reflect), and the flip: random (a coin per image and batch) |
    # alternating (each image mirrored every other epoch, which half first drawn once by the
    # seed: airbench) | none. airbench94: 2, reflect, alternating.
    crop_padding: int = 4
    crop_fill: str = "zeros"
    flip: str = "random"
    # Drop each epoch's last, smaller training batch: every step then has one shape (what
    # airbench and torch.compile want); its images wait for the next epoch's order.
    drop_last: bool = False
    # On a GPU: the whole dataset (uint8) lives there and batches are gathered there;
    # false: each batch is copied from pinned host memory. No effect on the CPU.
    resident: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.source, DataSource):  # built in Python: "bundled" will do
            sources = {source.value: source for source in DataSource}
            self.source = lookup("data.source", str(self.source), sources)
        check_range("data.batch_size", self.batch_size, low=0, low_open=True)
        check_range("data.eval_batch_size", self.eval_batch_size, low=0, low_open=True)
        check_range("data.val_size", self.val_size, low=0, low_open=True)
        check_range("data.crop_padding", self.crop_padding, low=0)
        check_choice("data.crop_fill", self.crop_fill, CROP_FILLS)
        check_choice("data.flip", self.flip, FLIPS)
