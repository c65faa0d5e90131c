"""Synthetic parts: objects made of parts from a shared vocabulary, in category-specific layouts.

Every item is generated on the fly from ``(seed, split, index)``, so the dataset needs no files and
is identical on every machine. Categories come in pairs that use the same three parts in different
layouts, so telling categories apart needs both the parts and where they are. Each item carries
per-part landmarks ``(x, y, visible)`` and per-part masks over the whole vocabulary.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from icnn_compress.errors import DataError

__all__ = ["PART_NAMES", "SyntheticParts"]

PART_NAMES = ("disk", "square", "triangle", "cross", "ellipse", "stripes", "checker", "diamond")
_SPLITS = {"train": 0, "val": 1, "test": 2}
_PART_COLOURS = np.array(
    [
        [0.9, 0.2, 0.2],
        [0.2, 0.8, 0.2],
        [0.2, 0.3, 0.9],
        [0.9, 0.8, 0.1],
        [0.8, 0.2, 0.8],
        [0.1, 0.8, 0.8],
        [0.95, 0.55, 0.1],
        [0.6, 0.6, 0.95],
    ]
)


def _shape_mask(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean region of part ``kind`` in local coordinates (the part spans about [-1, 1])."""
    r2 = u * u + v * v
    if kind in (0, 5):  # disk, striped disk
        return r2 <= 1.0
    if kind in (1, 6):  # square, checker square
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if kind == 2:  # triangle pointing up, centre inside
        return (v >= -0.8) & (v <= 0.8) & (np.abs(u) <= 0.55 * (0.8 - v))
    if kind == 3:  # cross
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    if kind == 4:  # ellipse
        return u * u + v * v / 0.35 <= 1.0
    return np.abs(u) + np.abs(v) <= 1.0  # diamond


def _texture(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Multiplicative texture in [0.35, 1]."""
    if kind == 5:
        return np.where(np.sin(7.0 * u) > 0, 1.0, 0.35)
    if kind == 6:
        return np.where((np.floor(2.5 * (u + 2)) + np.floor(2.5 * (v + 2))) % 2 == 0, 1.0, 0.35)
    return np.ones_like(u)


def _class_layouts(
    num_classes: int, parts_per_class: int = 3, share: int = 2
) -> list[list[tuple[int, float, float]]]:
    """Fixed layouts (independent of the dataset seed): [(part, x, y) in [-1, 1]] per class; every
    ``share`` consecutive classes use the same parts in different places."""
    rng = np.random.default_rng(12345)
    anchors = [(-0.55, -0.5), (0.55, -0.5), (0.0, 0.55), (-0.55, 0.5), (0.55, 0.5), (0.0, -0.55)]
    layouts = []
    for k in range(num_classes):
        if k % share == 0:  # a new set of parts for every group of classes
            parts = rng.choice(len(PART_NAMES), size=parts_per_class, replace=False).tolist()
        order = rng.permutation(len(anchors))[:parts_per_class]
        layouts.append([(p, *anchors[a]) for p, a in zip(parts, order)])
    # the classes of a group must differ in where their parts are
    if share == 2:  # the original rule (the easy setting's layouts never change)
        for k in range(1, num_classes, 2):
            if [(x, y) for _, x, y in layouts[k]] == [(x, y) for _, x, y in layouts[k - 1]]:
                layouts[k] = [(p, -x, y) for p, x, y in layouts[k]]
        return layouts
    for k in range(num_classes):
        for j in range(k - k % share, k):
            if sorted(layouts[k]) == sorted(layouts[j]):
                layouts[k] = [(p, -x, -y) for p, x, y in layouts[k]]
    return layouts


# what changes with ``difficulty``: classes per shared part set, distractors, object scale range,
# rotation (radians), centre jitter (fraction of the side), chance that a part is missing, occluders
_DIFFICULTY = {
    "easy": dict(share=2, clutter=3, scale=(0.8, 1.15), rot=0.25, shift=0.12, drop=0.0, occluders=0),
    "hard": dict(share=4, clutter=6, scale=(0.6, 1.25), rot=0.8, shift=0.18, drop=0.15, occluders=2),
}


class SyntheticParts(Dataset):
    """Procedural parts dataset.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        length: number of items.
        num_classes: categories (even numbers pair categories that share parts).
        image_size: side in pixels (default 64).
        seed: dataset seed; items are a pure function of ``(seed, split, index)``.
        annotations: return ``(image, label, landmarks, masks)`` instead of ``(image, label)``.
        clutter: maximum number of distractor parts drawn behind the object (default: 3 easy,
            6 hard).
        noise: standard deviation of the pixel noise.
        difficulty: ``"easy"`` (pairs of classes share their parts; small pose changes) or
            ``"hard"``: four classes share each set of parts in different layouts, larger scale
            (0.6-1.25x) and rotation (+-0.8 rad) changes, up to 6 distractors, each part missing
            with probability 0.15, and up to 2 occluders drawn in front of the object (they
            cut the part masks; a landmark they cover is invisible).
        cache_mb: items are drawn once and kept in memory up to this many MiB (then drawn on each
            access, as with 0); exact, since an item depends only on ``(seed, split, index)``.

    Items:
        image ``float32 (3, S, S)`` in [0, 1]; label ``int``; landmarks ``float32 (P, 3)`` with
        ``x, y`` in pixels (column, row) and ``visible`` in {0, 1}; masks ``bool (P, S, S)``;
        ``P = len(PART_NAMES)`` (parts absent from the object are invisible with empty masks).
    """

    num_parts = len(PART_NAMES)

    def __init__(
        self,
        split: str = "train",
        length: int = 6000,
        *,
        num_classes: int = 6,
        image_size: int = 64,
        seed: int = 0,
        annotations: bool = False,
        clutter: int | None = None,
        noise: float = 0.05,
        difficulty: str = "easy",
        cache_mb: float = 256.0,
    ) -> None:
        if split not in _SPLITS:
            raise DataError(
                f"The 'split' parameter of SyntheticParts must be one of {tuple(_SPLITS)}. Got {split!r}."
            )
        if not 2 <= num_classes <= 16:
            raise DataError(f"num_classes of SyntheticParts must be in [2, 16]. Got {num_classes!r} instead.")
        if image_size < 16:
            raise DataError(f"image_size of SyntheticParts must be >= 16. Got {image_size!r} instead.")
        if length < 1:
            raise DataError(f"length of SyntheticParts must be >= 1. Got {length!r} instead.")
        if difficulty not in _DIFFICULTY:
            raise DataError(
                f"difficulty of SyntheticParts must be one of {', '.join(_DIFFICULTY)}. Got {difficulty!r}."
            )
        self.difficulty, self._d = difficulty, _DIFFICULTY[difficulty]
        clutter = self._d["clutter"] if clutter is None else clutter
        self.split, self.length, self.num_classes = split, length, num_classes
        self.image_size, self.seed, self.annotations = image_size, seed, annotations
        self.clutter, self.noise = clutter, noise
        self.layouts = _class_layouts(num_classes, share=self._d["share"])
        self.classes = [f"class{k}" for k in range(num_classes)]
        if not cache_mb >= 0:
            raise DataError(f"cache_mb of SyntheticParts must be >= 0. Got {cache_mb!r} instead.")
        yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float64)
        self._grid = (xx, yy)
        self._cache: dict[int, tuple] = {}
        self._cache_left = int(cache_mb * 2**20)  # bytes

    def __len__(self) -> int:
        return self.length

    def _draw(self, img, rng, kind, cx, cy, size, angle, colour):
        xx, yy = self._grid
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = xx - cx, yy - cy
        u = (c * dx + s * dy) / size
        v = (-s * dx + c * dy) / size
        region = _shape_mask(kind, u, v)
        shade = _texture(kind, u, v)[..., None] * colour
        img[region] = shade[region]
        return region

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for SyntheticParts of length {self.length}")
        item = self._cache.get(index)
        if item is None:
            item = self._item(index)
            size = sum(t.nbytes for t in item if isinstance(t, torch.Tensor))
            if size <= self._cache_left:
                self._cache[index], self._cache_left = item, self._cache_left - size
        # copies, so that a caller that changes an item in place cannot change the cached one
        return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in item)

    def _item(self, index: int) -> tuple:
        """Item ``index``, drawn from its own generator."""
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], index])
        s = self.image_size
        label = int(rng.integers(self.num_classes))
        # background: a random linear gradient
        g0, g1 = rng.uniform(0.0, 0.45, size=(2, 3))
        t = (self._grid[0] * rng.uniform(-1, 1) + self._grid[1] * rng.uniform(-1, 1)) / (2 * s) + 0.5
        img = g0 + (g1 - g0) * np.clip(t, 0, 1)[..., None]
        for _ in range(int(rng.integers(0, self.clutter + 1))):  # distractors behind the object
            kind = int(rng.integers(len(PART_NAMES)))
            colour = np.clip(_PART_COLOURS[kind] * rng.uniform(0.5, 0.9), 0, 1)
            self._draw(
                img,
                rng,
                kind,
                *rng.uniform(0, s, 2),
                rng.uniform(0.05, 0.09) * s,
                rng.uniform(0, np.pi),
                colour,
            )
        d = self._d
        scale = rng.uniform(*d["scale"]) * s * 0.3  # object half-extent
        cx, cy = s / 2 + rng.uniform(-d["shift"], d["shift"], 2) * s
        rot = rng.uniform(-d["rot"], d["rot"])  # radians
        c, sn = np.cos(rot), np.sin(rot)
        landmarks = np.zeros((self.num_parts, 3), dtype=np.float32)
        masks = np.zeros((self.num_parts, s, s), dtype=bool)
        drawn = []
        for part, px, py in self.layouts[label]:
            x = cx + scale * (c * px - sn * py)
            y = cy + scale * (sn * px + c * py)
            colour = np.clip(_PART_COLOURS[part] * rng.uniform(0.8, 1.2, 3), 0, 1)
            angle = rot + rng.uniform(-0.2, 0.2)
            if d["drop"] and rng.uniform() < d["drop"]:
                continue  # this part is missing from this object
            region = self._draw(img, rng, part, x, y, scale * 0.42, angle, colour)
            masks[:, region] = False  # later parts occlude earlier ones
            masks[part] = region
            landmarks[part, :2] = (x, y)
            drawn.append(part)
        for _ in range(int(rng.integers(0, d["occluders"] + 1)) if d["occluders"] else 0):  # in front
            ox, oy = np.array([cx, cy]) + rng.uniform(-1, 1, 2) * scale
            grey = np.full(3, rng.uniform(0.2, 0.6))
            region = self._draw(img, rng, 0, ox, oy, rng.uniform(0.15, 0.3) * scale * 2, 0.0, grey)
            masks[:, region] = False
        for part in drawn:
            col, row = int(round(landmarks[part, 0])), int(round(landmarks[part, 1]))
            inside = 0 <= row < s and 0 <= col < s and masks[part, row, col]
            landmarks[part, 2] = 1.0 if inside else 0.0
        img = np.clip(img + rng.normal(0, self.noise, img.shape), 0, 1)
        image = torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32))
        if not self.annotations:
            return image, label
        return image, label, torch.from_numpy(landmarks), torch.from_numpy(masks)
