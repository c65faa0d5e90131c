"""Datasets users bring: an ImageFolder tree, and CUB-200-2011 in its own layout."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from icnn_compress.errors import DataError

__all__ = ["CUB200", "image_transforms"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def image_transforms(image_size: int, train: bool):
    """Standard ImageNet-style transforms from a PIL image to a normalised float tensor."""
    ops = (
        [v2.RandomResizedCrop(image_size, scale=(0.5, 1.0)), v2.RandomHorizontalFlip()]
        if train
        else [v2.Resize(int(image_size * 1.14)), v2.CenterCrop(image_size)]
    )
    return v2.Compose(
        [v2.ToImage(), *ops, v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


def _read_table(path: Path, ncols: int) -> list[list[str]]:
    if not path.is_file():
        raise DataError(
            f"CUB-200-2011: missing {path}. Expected the official layout (images.txt, "
            "image_class_labels.txt, train_test_split.txt, bounding_boxes.txt, parts/part_locs.txt)."
        )
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) < ncols:
            raise DataError(f"{path}:{lineno}: expected {ncols} columns, got {len(parts)}: {line!r}")
        rows.append(parts)
    return rows


class CUB200(Dataset):
    """CUB-200-2011 with bounding boxes and the 15 part landmarks.

    Args:
        root: the ``CUB_200_2011`` folder.
        split: ``"train"`` or ``"test"`` (from train_test_split.txt).
        image_size: output side in pixels; the (cropped) image is resized to a square, and the
            landmarks are mapped through the same crop and resize.
        crop_to_box: crop each image to its bounding box first.
        annotations: return ``(image, label, landmarks)``; landmarks ``float32 (15, 3)`` with
            ``x, y`` in output pixels and ``visible``.
        normalize: apply the ImageNet mean/std.
    """

    num_parts = 15

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        image_size: int = 224,
        crop_to_box: bool = True,
        annotations: bool = False,
        normalize: bool = True,
    ) -> None:
        if split not in ("train", "test"):
            raise DataError(f"The 'split' parameter of CUB200 must be 'train' or 'test'. Got {split!r}.")
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"CUB-200-2011 folder {str(root)!r} does not exist.")
        images = {int(r[0]): r[1] for r in _read_table(root / "images.txt", 2)}
        labels = {int(r[0]): int(r[1]) - 1 for r in _read_table(root / "image_class_labels.txt", 2)}
        is_train = {int(r[0]): r[1] == "1" for r in _read_table(root / "train_test_split.txt", 2)}
        boxes = {int(r[0]): tuple(map(float, r[1:5])) for r in _read_table(root / "bounding_boxes.txt", 5)}
        parts: dict[int, torch.Tensor] = {}
        for r in _read_table(root / "parts" / "part_locs.txt", 5):
            img_id, part = int(r[0]), int(r[1]) - 1
            parts.setdefault(img_id, torch.zeros(self.num_parts, 3))[part] = torch.tensor(
                [float(r[2]), float(r[3]), float(r[4])]
            )
        want = split == "train"
        self.ids = sorted(i for i in images if is_train.get(i) == want)
        missing = [i for i in self.ids if i not in labels or i not in boxes]
        if missing:
            raise DataError(f"CUB-200-2011: images {missing[:5]} have no label or bounding box.")
        self.root, self.images, self.labels, self.boxes = root, images, labels, boxes
        self.parts = parts
        self.image_size, self.crop_to_box = image_size, crop_to_box
        self.annotations, self.normalize = annotations, normalize
        self.classes = sorted({images[i].split("/")[0] for i in images})

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        img_id = self.ids[index]
        path = self.root / "images" / self.images[img_id]
        try:
            img = Image.open(path).convert("RGB")
        except OSError as exc:
            raise DataError(f"CUB-200-2011: cannot read {path}: {exc}") from exc
        landmarks = self.parts.get(img_id, torch.zeros(self.num_parts, 3)).clone()
        x0, y0, w, h = (0.0, 0.0, float(img.width), float(img.height))
        if self.crop_to_box:
            x0, y0, w, h = self.boxes[img_id]
            img = img.crop((int(x0), int(y0), int(x0 + w), int(y0 + h)))
            x0, y0 = float(int(x0)), float(int(y0))
            w, h = float(img.width), float(img.height)
        img = img.resize((self.image_size, self.image_size), Image.BILINEAR)
        tensor = v2.functional.to_dtype(v2.functional.to_image(img), torch.float32, scale=True)
        if self.normalize:
            tensor = v2.functional.normalize(tensor, IMAGENET_MEAN, IMAGENET_STD)
        label = self.labels[img_id]
        if not self.annotations:
            return tensor, label
        landmarks[:, 0] = (landmarks[:, 0] - x0) * self.image_size / w
        landmarks[:, 1] = (landmarks[:, 1] - y0) * self.image_size / h
        outside = (landmarks[:, 0] < 0) | (landmarks[:, 0] >= self.image_size)
        outside |= (landmarks[:, 1] < 0) | (landmarks[:, 1] >= self.image_size)
        landmarks[outside, 2] = 0.0
        return tensor, label, landmarks
