"""A dataset restricted to some of its classes, with the labels renumbered 0..len(classes)-1."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from icnn_compress.errors import ConfigError

__all__ = ["ClassSubset"]


class ClassSubset(Dataset):
    """The items of ``dataset`` whose label is in ``classes``, relabelled by rank: the smallest kept
    class -> 0, the next -> 1, ... (the outputs of a model specialised with
    ``prune_model(..., keep_classes=classes)``).

    Labels are read from ``dataset.targets`` when it has them (Fashion-MNIST, torchvision
    folders), else from each item. Other fields of an item (landmarks, masks) pass through.
    """

    def __init__(self, dataset: Dataset, classes) -> None:
        items = sorted(int(c) for c in classes)
        if len(set(items)) != len(items) or not items:
            raise ConfigError(f"classes must be distinct class indices. Got {list(classes)!r}.")
        self.dataset, self.classes_kept = dataset, items
        targets = getattr(dataset, "targets", None)
        if targets is None:
            targets = [dataset[i][1] for i in range(len(dataset))]
        targets = torch.as_tensor(targets)
        self.indices = torch.nonzero(torch.isin(targets, torch.as_tensor(items))).flatten().tolist()
        if not self.indices:
            raise ConfigError(f"No item of the dataset has a label in {items}.")
        self._map = {c: i for i, c in enumerate(items)}
        names = getattr(dataset, "classes", None)
        if names is not None and len(names) > max(items):
            self.classes = [names[c] for c in items]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        item = self.dataset[self.indices[index]]
        return (item[0], self._map[int(item[1])], *item[2:])
