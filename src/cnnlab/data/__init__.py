"""Data: sources decode dataset files to tensors; the datamodule batches them."""

from cnnlab.data.config import DataConfig, DataSource
from cnnlab.data.datamodule import ImageDataModule
from cnnlab.data.sources import DATASETS, DataError, dataset_info

__all__ = [
    "DATASETS",
    "DataConfig",
    "DataError",
    "DataSource",
    "ImageDataModule",
    "dataset_info",
]
