"""Accuracy of an ONNX model over a whole evaluation set, and MACs/params of a PyTorch model."""

from __future__ import annotations

import copy
import os

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from icnn_compress._progress import progress_bar
from icnn_compress.errors import DataError

__all__ = ["class_accuracy", "meta_copy", "model_stats", "ort_accuracy", "ort_confusion"]


def ort_confusion(
    path_or_session,
    loader: DataLoader,
    *,
    provider: str = "auto",
    threads: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Confusion matrix ``(K, K)`` of the ONNX model on every batch of ``loader``: row = true class,
    column = predicted class, counts of images (K = the model's number of outputs)."""
    from icnn_compress.measure._latency import ort_session

    sess = path_or_session
    if isinstance(path_or_session, (str, os.PathLike)):
        sess = ort_session(path_or_session, provider=provider, threads=threads)
    name = sess.get_inputs()[0].name
    counts: np.ndarray | None = None
    for batch in progress_bar(loader, progress=progress, desc="onnx eval", leave=False):
        x, y = batch[0], batch[1].numpy()
        logits = sess.run(None, {name: x.numpy().astype(np.float32, copy=False)})[0]
        k = logits.shape[1]
        if counts is None:
            counts = np.zeros((k, k), dtype=np.int64)
        if y.size and (y.min() < 0 or y.max() >= k):
            raise DataError(f"labels must be in 0..{k - 1} for a model with {k} outputs; got {int(y.max())}.")
        np.add.at(counts, (y, logits.argmax(1)), 1)
    if counts is None or counts.sum() == 0:
        raise DataError("ort_accuracy got an empty loader (no images): accuracy is undefined.")
    return counts


def class_accuracy(confusion: np.ndarray) -> list[float | None]:
    """Top-1 of each true class from a confusion matrix (``None`` for a class with no image)."""
    rows = confusion.sum(1)
    return [float(confusion[i, i] / rows[i]) if rows[i] else None for i in range(len(rows))]


def ort_accuracy(
    path_or_session,
    loader: DataLoader,
    *,
    provider: str = "auto",
    threads: int | None = None,
    progress: bool = False,
) -> float:
    """Top-1 accuracy (0..1) of the ONNX model on every batch of ``loader``."""
    counts = ort_confusion(path_or_session, loader, provider=provider, threads=threads, progress=progress)
    return float(np.trace(counts) / counts.sum())


def meta_copy(model: nn.Module) -> nn.Module:
    """A structural copy whose tensors live on the meta device (free to copy and to run)."""
    memo: dict = {}
    for t in list(model.parameters()) + list(model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = (
            nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
        )
    return copy.deepcopy(model, memo)


def model_stats(model: nn.Module, example: torch.Tensor, *, where: str = "meta") -> dict:
    """MACs (multiply-accumulates of one forward of ``example``) and parameter count, counted by
    torch-pruning (which deep-copies what it counts).

    ``where="meta"``: on a meta-device copy (no memory, but about a millisecond of Python per layer:
    0.2 s for MobileNet v2, whatever the input size); ``"model"``: on a copy of the model where it
    is, one real forward (15 ms for MobileNet v2 at 64x64, 0.3 s for VGG-16 at 224x224, and a
    copy of the weights). The same numbers either way."""
    import torch_pruning as tp

    if where not in ("meta", "model"):
        raise ValueError(f"where must be 'meta' or 'model'. Got {where!r} instead.")
    if where == "meta":
        model, example = meta_copy(model).eval(), example.to("meta")
    with torch.no_grad():  # torch-pruning counts on an eval-mode copy: the model is left as it was
        macs, params = tp.utils.count_ops_and_params(model, example)
    return {"macs": int(macs), "params": int(params)}
