"""Datasets: synthetic parts, Fashion-MNIST (Debian package), ImageFolder, CUB-200-2011.

Example:
    >>> from icnn_compress import data
    >>> train_dl, val_dl = data.loaders("fashion-mnist", batch_size=128)
"""

from icnn_compress.data._classes import ClassSubset
from icnn_compress.data._fashion import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    FashionMNIST,
    fashion_transforms,
    write_idx,
)
from icnn_compress.data._folder import CUB200, image_transforms
from icnn_compress.data._loaders import build_datasets, list_datasets, loaders, register_dataset
from icnn_compress.data._synthetic import PART_NAMES, SyntheticParts

__all__ = [
    "CUB200",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "PART_NAMES",
    "ClassSubset",
    "FashionMNIST",
    "SyntheticParts",
    "build_datasets",
    "fashion_transforms",
    "image_transforms",
    "list_datasets",
    "loaders",
    "register_dataset",
    "write_idx",
]
