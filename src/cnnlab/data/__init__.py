"""Data: sources decode dataset files to tensors; the datamodule batches them."""

from cnnlab.data.datamodule import ImageDataModule
from cnnlab.data.sources import DATASETS, DataError, dataset_info

__all__ = ["DATASETS", "DataError", "ImageDataModule", "dataset_info"]
