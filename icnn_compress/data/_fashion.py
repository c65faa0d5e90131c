"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``; never downloaded."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.datasets.mnist import read_image_file, read_label_file

from icnn_compress._io import atomic_write_bytes
from icnn_compress.errors import DataError

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_ROOT", "FashionMNIST"]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MEAN, STD = 0.2860, 0.3530
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _cache_dir() -> Path:
    return Path(os.environ.get("ICNN_COMPRESS_CACHE", Path.home() / ".cache" / "icnn_compress"))


def _resolve(root: Path, stem: str) -> Path:
    """The uncompressed IDX file: as is, or the ``.gz`` unpacked once into the cache."""
    plain, packed = root / stem, root / f"{stem}.gz"
    if plain.is_file():
        return plain
    if not packed.is_file():
        raise DataError(
            f"Fashion-MNIST not found under {root}: missing {stem}(.gz). Install the Debian package "
            "(apt-get install -y dataset-fashion-mnist) or pass root= to a folder with the IDX files."
        )
    st = packed.stat()
    target = _cache_dir() / "fashion-mnist" / f"{stem}.{st.st_size}.{int(st.st_mtime)}"
    if not target.is_file():
        with gzip.open(packed, "rb") as f:
            atomic_write_bytes(f.read(), target)
    return target


class FashionMNIST(Dataset):
    """Fashion-MNIST read with torchvision's IDX reader.

    Args:
        split: ``"train"`` (60k) or ``"test"`` (10k).
        root: folder with the four IDX files (``.gz`` or not).
        transform: applied to the ``float32 (1, 28, 28)`` image in [0, 1].
        limit: keep only the first ``limit`` items (quick runs).
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(
        self,
        split: str = "train",
        *,
        root: str | os.PathLike = FASHION_MNIST_ROOT,
        transform=None,
        limit: int | None = None,
    ) -> None:
        if split not in _FILES:
            raise DataError(
                f"The 'split' parameter of FashionMNIST must be 'train' or 'test'. Got {split!r}."
            )
        root = Path(root)
        images, labels = (_resolve(root, stem) for stem in _FILES[split])
        try:
            self.data = read_image_file(str(images))
            self.targets = read_label_file(str(labels)).long()
        except Exception as exc:
            raise DataError(f"Could not read Fashion-MNIST IDX files in {root}: {exc}") from exc
        if len(self.data) != len(self.targets):
            raise DataError(f"Fashion-MNIST {split}: {len(self.data)} images but {len(self.targets)} labels.")
        if limit is not None:
            self.data, self.targets = self.data[:limit], self.targets[:limit]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = self.data[index].unsqueeze(0).float().div_(255.0)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])


def fashion_transforms(train: bool):
    """Normalisation (and for training a 2-px random crop and horizontal flip) on tensors."""
    from torchvision.transforms import v2

    ops = [v2.RandomCrop(28, padding=2), v2.RandomHorizontalFlip()] if train else []
    return v2.Compose([*ops, v2.Normalize([MEAN], [STD])])


def write_idx(
    images: torch.Tensor,
    labels: torch.Tensor,
    folder: str | os.PathLike,
    split: str = "train",
    gz: bool = True,
) -> None:
    """Write uint8 images ``(N, H, W)`` and labels ``(N,)`` as IDX files (fixtures, exports)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    img = b"\x00\x00\x08\x03" + n.to_bytes(4, "big") + h.to_bytes(4, "big") + w.to_bytes(4, "big")
    img += images.to(torch.uint8).numpy().tobytes()
    lab = b"\x00\x00\x08\x01" + n.to_bytes(4, "big") + labels.to(torch.uint8).numpy().tobytes()
    for stem, data in zip(_FILES[split], (img, lab)):
        path = folder / (stem + (".gz" if gz else ""))
        atomic_write_bytes(gzip.compress(data) if gz else data, path)
