"""Save a pruned ``resnet_cifar8`` (5 classes, 1 channel, 16 px) and load it back."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from icnn_compress.prune import load_pruned, save_pruned


def save_and_reload_resnet_cifar8(res, path: Path, metadata: dict | None = None) -> tuple[nn.Module, dict]:
    """``save_pruned`` the ``PruneResult`` of a ``resnet_cifar8`` to ``path``; returns ``load_pruned``."""
    save_pruned(
        res.model,
        path,
        arch="resnet_cifar8",
        arch_kwargs={"num_classes": 5, "in_channels": 1},
        history=res.history,
        input_shape=(1, 16, 16),
        metadata=metadata,
    )
    return load_pruned(path)
