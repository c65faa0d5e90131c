"""One loader factory by dataset name."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from icnn_compress._dist import is_distributed
from icnn_compress._registry import Registry
from icnn_compress.errors import ConfigError

__all__ = ["build_datasets", "list_datasets", "loaders", "register_dataset"]

_DATASETS: Registry[Callable[..., tuple[Dataset, Dataset]]] = Registry("dataset")


def register_dataset(name: str):
    """Decorator: register ``fn(**options) -> (train_dataset, val_dataset)``."""

    return _DATASETS.register(name)


def list_datasets() -> list[str]:
    return _DATASETS.names()


@register_dataset("synthetic-parts")
def _synthetic(
    *,
    train_size: int = 6000,
    val_size: int = 1200,
    num_classes: int = 6,
    image_size: int = 64,
    seed: int = 0,
    annotations: bool = False,
    difficulty: str = "easy",
    **_,
):
    from icnn_compress.data._synthetic import SyntheticParts

    kw = dict(num_classes=num_classes, image_size=image_size, seed=seed, difficulty=difficulty)
    return (
        SyntheticParts("train", train_size, **kw),
        SyntheticParts("val", val_size, annotations=annotations, **kw),
    )


@register_dataset("fashion-mnist")
def _fashion(*, root: str | None = None, augment: bool = True, limit: int | None = None, **_):
    from icnn_compress.data._fashion import FASHION_MNIST_ROOT, FashionMNIST, fashion_transforms

    root = root or FASHION_MNIST_ROOT
    return (
        FashionMNIST("train", root=root, transform=fashion_transforms(augment), limit=limit),
        FashionMNIST("test", root=root, transform=fashion_transforms(False), limit=limit),
    )


@register_dataset("imagefolder")
def _imagefolder(*, root: str | None = None, image_size: int = 224, **_):
    from pathlib import Path

    from torchvision.datasets import ImageFolder

    from icnn_compress.data._folder import image_transforms

    if root is None:
        raise ConfigError("The 'imagefolder' dataset needs root= (a folder with train/ and val/ subfolders).")
    base = Path(root)
    for sub in ("train", "val"):
        if not (base / sub).is_dir():
            raise ConfigError(
                f"ImageFolder root {root!r} has no {sub}/ subfolder (expected {sub}/<class>/<image>)."
            )
    return (
        ImageFolder(str(base / "train"), transform=image_transforms(image_size, True)),
        ImageFolder(str(base / "val"), transform=image_transforms(image_size, False)),
    )


@register_dataset("cub200")
def _cub(
    *,
    root: str | None = None,
    image_size: int = 224,
    crop_to_box: bool = True,
    annotations: bool = False,
    **_,
):
    from icnn_compress.data._folder import CUB200

    if root is None:
        raise ConfigError("The 'cub200' dataset needs root= (the CUB_200_2011 folder).")
    kw = dict(image_size=image_size, crop_to_box=crop_to_box)
    return CUB200(root, "train", **kw), CUB200(root, "test", annotations=annotations, **kw)


def build_datasets(name: str, **options) -> tuple[Dataset, Dataset]:
    """``(train, val)`` datasets of a registered name (see ``list_datasets()``)."""
    return _DATASETS.get(name)(**options)


def loaders(
    name: str,
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    seed: int = 0,
    train_subset: int | None = None,
    val_batch_size: int | None = None,
    distributed: bool | None = None,
    **options,
) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, val_loader)`` for a dataset name.

    Shuffling is driven by a seeded generator (or, under torch.distributed, a DistributedSampler
    seeded with ``seed``; call ``sampler.set_epoch``, which the Trainer does), so runs and resumed
    runs see the same order. ``distributed``: each rank reads its shard of both splits (``None``:
    when a process group with several ranks is initialised; ``False``: every rank reads all of
    it, for work done on one rank). ``options`` go to the dataset (``root``, ``image_size``, ...).

    Example:
        >>> train_dl, val_dl = loaders("synthetic-parts", batch_size=64)
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1. Got {batch_size!r} instead.")
    train, val = build_datasets(name, seed=seed, **options)
    if train_subset is not None:
        train = Subset(train, range(min(train_subset, len(train))))
    common = dict(
        num_workers=num_workers, persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available()
    )
    if is_distributed() if distributed is None else distributed:
        train_dl = DataLoader(
            train,
            batch_size=batch_size,
            sampler=DistributedSampler(train, seed=seed),
            drop_last=True,
            **common,
        )
        val_sampler = DistributedSampler(val, shuffle=False)
    else:
        g = torch.Generator().manual_seed(seed)
        train_dl = DataLoader(
            train, batch_size=batch_size, shuffle=True, generator=g, drop_last=True, **common
        )
        val_sampler = None
    val_dl = DataLoader(val, batch_size=val_batch_size or batch_size, sampler=val_sampler, **common)
    return train_dl, val_dl
