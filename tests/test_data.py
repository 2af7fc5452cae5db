"""Data: torchvision reads IDX files the tests write, the bundled fallback, splits, batches."""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from cnnlab.data import DataError, ImageDataModule
from cnnlab.data.augment import affine, crop_flip
from cnnlab.data.config import DataConfig
from cnnlab.data.datamodule import EpochBatchSampler
from cnnlab.data.sources import BUNDLED_TEST_SIZE, load_splits
from tests.conftest import FIXTURE_TEST, FIXTURE_TRAIN, write_cifar, write_idx, write_mnist


def setup_module() -> None:
    load_splits.cache_clear()


def test_torchvision_reads_the_idx_files(mnist_root: Path) -> None:
    splits = load_splits("mnist", str(mnist_root), "torchvision", False)
    assert splits.source == "torchvision"
    assert splits.train.images.shape == (FIXTURE_TRAIN, 1, 28, 28)
    assert splits.test.images.shape == (FIXTURE_TEST, 1, 28, 28)
    assert splits.train.images.dtype == torch.uint8
    assert splits.train.labels.dtype == torch.int64
    assert int(splits.train.images.max()) > 200  # real strokes, not an empty fixture
    assert set(splits.train.labels.tolist()) == set(range(10))


def test_auto_falls_back_to_the_bundled_digits_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        splits = load_splits("mnist", str(tmp_path / "empty"), "auto", True)
    assert splits.source == "bundled"
    assert len(splits.test) == BUNDLED_TEST_SIZE and len(splits.train) == 5000 - BUNDLED_TEST_SIZE
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "data.source=bundled" in warnings[0].getMessage()


def test_forcing_torchvision_without_files_names_the_folder_and_files(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        load_splits("mnist", str(tmp_path / "none"), "torchvision", True)
    message = str(error.value)
    assert str(tmp_path / "none" / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert "download failed" in message


def test_labels_out_of_range_are_refused(tmp_path: Path) -> None:
    root = write_mnist(tmp_path, train=50, test=20)
    labels = torch.full((50,), 12, dtype=torch.uint8).numpy()
    write_idx(root / "MNIST" / "raw" / "train-labels-idx1-ubyte", labels)
    with pytest.raises(DataError, match=r"labels span 12\.\.\.12, valid: 0\.\.9"):
        load_splits("mnist", str(root), "torchvision", False)


def test_unknown_dataset_lists_the_valid_ones() -> None:
    with pytest.raises(
        DataError, match="unknown dataset 'svhn'; valid: cifar10, cifar100, fashion_mnist, mnist"
    ):
        ImageDataModule(DataConfig(name="svhn"))


def make_datamodule(root: Path, shuffle_seed: int = 0, **options) -> ImageDataModule:
    data = DataConfig(
        root=str(root),
        source="torchvision",
        download=False,
        batch_size=32,
        eval_batch_size=64,
        **options,
    )
    datamodule = ImageDataModule(data, shuffle_seed=shuffle_seed)
    datamodule.setup("fit")
    return datamodule


def test_validation_split_is_fixed_and_disjoint(mnist_root: Path) -> None:
    first = make_datamodule(mnist_root, val_size=100, shuffle_seed=1)
    second = make_datamodule(mnist_root, val_size=100, shuffle_seed=2)  # training seed differs
    assert len(first.val_set) == 100 and len(first.train_set) == FIXTURE_TRAIN - 100
    assert torch.equal(first.val_set.images, second.val_set.images)
    train_rows = {row.tobytes() for row in first.train_set.images.flatten(1).numpy()}
    assert not any(row.tobytes() in train_rows for row in first.val_set.images.flatten(1).numpy())
    fraction = make_datamodule(mnist_root, val_size=0.25)
    assert len(fraction.val_set) == FIXTURE_TRAIN // 4


def test_val_size_that_leaves_no_training_images_is_refused(mnist_root: Path) -> None:
    with pytest.raises(ValueError, match=r"data.val_size=600 leaves 0 of 600 .* \[1, 599\]"):
        make_datamodule(mnist_root, val_size=600)


def test_batches_are_normalized_after_transfer(mnist_root: Path) -> None:
    datamodule = make_datamodule(mnist_root)
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (32, 1, 28, 28)
    normalized, same_labels = datamodule.on_after_batch_transfer((images, labels), 0)
    expected = (images.float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(normalized, expected, atol=1e-5)
    assert torch.equal(same_labels, labels)
    assert normalized.min() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)


def test_train_batches_cover_every_image_once_per_epoch_and_reshuffle(mnist_root: Path) -> None:
    datamodule = make_datamodule(mnist_root)
    loader = datamodule.train_dataloader()
    first = torch.cat([labels for _, labels in loader])
    loader.sampler.set_epoch(1)
    second = torch.cat([labels for _, labels in loader])
    assert len(first) == len(datamodule.train_set)
    assert torch.equal(first.sort().values, datamodule.train_set.labels.sort().values)
    assert not torch.equal(first, second)


def test_sampler_shards_are_disjoint_and_cover_the_epoch() -> None:
    shards = [
        torch.cat(list(EpochBatchSampler(103, 10, shuffle=True, seed=3, rank=rank, world_size=2)))
        for rank in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 52  # 103 padded to 104
    together = torch.cat(shards)
    assert set(together.tolist()) == set(range(103))
    assert len(set(shards[0].tolist()) & set(shards[1].tolist())) <= 1  # only the padding


def test_seeds_draw_different_batch_orders_not_shifted_copies() -> None:
    def order(seed: int, epoch: int) -> torch.Tensor:
        sampler = EpochBatchSampler(100, 100, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return next(iter(sampler))

    assert torch.equal(order(0, 1), order(0, 1))  # reproducible
    assert not torch.equal(order(1, 0), order(0, 1))
    assert not torch.equal(order(0, 0), order(1, 0))


# -- CIFAR-10 and the other datasets -------------------------------------------------------


def test_cifar10_pickles_are_read_by_torchvision(tmp_path: Path, skip_cifar_checksums) -> None:
    root = write_cifar(tmp_path, train=500, test=100)
    splits = load_splits("cifar10", str(root), "torchvision", False)
    assert splits.train.images.shape == (500, 3, 32, 32)
    assert splits.test.images.shape == (100, 3, 32, 32)
    assert splits.train.images.dtype == torch.uint8
    raw = pickle.loads((root / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    first = torch.from_numpy(raw["data"][0]).view(3, 32, 32)  # rows are R, G, B planes
    assert torch.equal(splits.train.images[0], first)
    assert splits.train.labels[:100].tolist() == raw["labels"]


def test_missing_cifar10_names_the_folder_files_and_where_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        load_splits("cifar10", str(tmp_path), "auto", True)
    message = str(error.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "data_batch_1" in message and "test_batch" in message and "batches.meta" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message
    assert "download failed" in message


def test_cifar_files_that_fail_the_published_md5_are_named(tmp_path: Path) -> None:
    root = write_cifar(tmp_path)
    with pytest.raises(DataError, match=r"data_batch_1: its md5 sum is not c99cafc152244af7"):
        load_splits("cifar10", str(root), "torchvision", False)


def test_bundled_source_has_only_mnist() -> None:
    with pytest.raises(DataError, match=r"data.source=bundled has only MNIST digits"):
        load_splits("cifar10", "unused", "bundled", False)


# -- damaged files -------------------------------------------------------------------------


def damage(path: Path, how) -> None:
    path.write_bytes(how(path.read_bytes()))


@pytest.mark.parametrize(
    ("file", "how", "problem"),
    [
        ("train-images-idx3-ubyte", lambda b: b[:-100], r"but its header \[50, 28, 28\] needs"),
        (
            "train-labels-idx1-ubyte",
            lambda b: b"\x00\x00\x0b\x01" + b[4:],
            "magic number 00000b01, expected 00000801",
        ),
        ("t10k-images-idx3-ubyte", lambda b: b[:10], "10 bytes, shorter than an IDX header"),
    ],
)
def test_damaged_idx_files_are_named_with_the_problem(
    file: str, how, problem: str, tmp_path: Path
) -> None:
    root = write_mnist(tmp_path, train=50, test=20)
    path = root / "MNIST" / "raw" / file
    damage(path, how)
    with pytest.raises(DataError) as error:
        load_splits("mnist", str(root), "torchvision", False)
    assert str(path) in str(error.value)
    assert re.search(problem, str(error.value))


def test_idx_images_of_the_wrong_size_are_refused(tmp_path: Path) -> None:
    root = write_mnist(tmp_path, train=50, test=20)
    write_idx(root / "MNIST" / "raw" / "train-images-idx3-ubyte", np.zeros((50, 32, 32)))
    with pytest.raises(DataError, match=r"images of shape \(1, 32, 32\), expected \(1, 28, 28\)"):
        load_splits("mnist", str(root), "torchvision", False)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"data": np.zeros((10, 3072), np.uint8)}, "no 'labels' (or 'fine_labels') entry"),
        ({"labels": [0] * 10}, "no 'data' entry"),
        (
            {"data": np.zeros((10, 1024), np.uint8), "labels": [0] * 10},
            "images of (1024,) values, expected 3072 (3x32x32)",
        ),
    ],
)
def test_damaged_cifar_batches_are_named_with_the_problem(
    entry: dict, problem: str, tmp_path: Path, skip_cifar_checksums
) -> None:
    root = write_cifar(tmp_path)
    path = root / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(pickle.dumps(entry))
    with pytest.raises(DataError) as error:
        load_splits("cifar10", str(root), "torchvision", False)
    assert f"damaged cifar10 file {path}: {problem}" == str(error.value)


def test_cifar_labels_out_of_range_are_refused(tmp_path: Path, skip_cifar_checksums) -> None:
    root = write_cifar(tmp_path, classes=12)
    with pytest.raises(DataError, match=r"labels span 0\.\.\.11, valid: 0\.\.9"):
        load_splits("cifar10", str(root), "torchvision", False)


# -- augmentation --------------------------------------------------------------------------


def test_crop_flip_takes_a_window_of_the_padded_image_per_sample() -> None:
    torch.manual_seed(0)
    images = torch.arange(64 * 3 * 8 * 8, dtype=torch.float32).view(64, 3, 8, 8)
    out = crop_flip(images, padding=2)
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (2,) * 4)
    offsets = set()
    for i in range(64):
        matches = [
            (dy, dx, flip)
            for dy in range(5)
            for dx in range(5)
            for flip in (False, True)
            if torch.equal(out[i], _window(padded[i], dy, dx, flip))
        ]
        assert len(matches) == 1, i
        offsets.add(matches[0])
    assert len(offsets) > 20  # each image its own crop and flip


def _window(image: torch.Tensor, dy: int, dx: int, flip: bool) -> torch.Tensor:
    window = image[:, dy : dy + 8, dx : dx + 8]
    return window.flip(-1) if flip else window


def test_affine_keeps_shape_and_moves_each_digit_differently() -> None:
    torch.manual_seed(0)
    images = torch.zeros(16, 1, 28, 28)
    images[:, :, 10:18, 12:16] = 255.0
    out = affine(images)
    assert out.shape == images.shape and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])
    assert float(out.sum()) == pytest.approx(float(images.sum()), rel=0.1)  # moved, not erased


def test_augmentation_changes_training_batches_only(tmp_path: Path, skip_cifar_checksums) -> None:
    root = write_cifar(tmp_path)
    datamodule = ImageDataModule(
        DataConfig(
            name="cifar10",
            root=str(root),
            source="torchvision",
            download=False,
            val_size=100,
            augment=True,
        )
    )
    datamodule.setup("fit")
    datamodule.trainer = L.Trainer(logger=False, enable_progress_bar=False)
    batch = next(iter(datamodule.val_dataloader()))
    datamodule.trainer.validating = True
    assert torch.equal(*[datamodule.on_after_batch_transfer(batch, 0)[0] for _ in range(2)])
    datamodule.trainer.training = True
    first, second = (datamodule.on_after_batch_transfer(batch, 0)[0] for _ in range(2))
    assert not torch.equal(first, second)


def test_on_an_accelerator_the_dataset_is_copied_there_once(mnist_root: Path) -> None:
    """The GPU path's data side, on PyTorch's "meta" device (shapes without storage): the
    whole split moves once, batches are gathered there, nothing is pinned."""
    datamodule = ImageDataModule(
        DataConfig(root=str(mnist_root), source="torchvision", batch_size=32)
    )
    datamodule.setup("fit")
    meta = torch.device("meta")
    datamodule.trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=meta), global_rank=0, world_size=1
    )
    loader = datamodule.train_dataloader()
    images, labels = next(iter(loader))
    assert images.device == meta and labels.device == meta
    assert images.shape == (32, 1, 28, 28) and images.dtype == torch.uint8
    assert not loader.pin_memory
    datamodule.train_dataloader()
    assert len(datamodule._on_device) == 1  # copied once, not per loader
    datamodule.config.resident = False
    assert datamodule.train_dataloader().pin_memory  # copied per batch, from pinned memory
