"""Measure a deployed model in one call (accuracy per class, latency, MACs); the latency guard."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from icnn_compress.measure._accuracy import class_accuracy, model_stats, ort_confusion
from icnn_compress.measure._latency import ort_latency, ort_session, torch_latency

__all__ = ["latency_guard", "measure"]


def latency_guard(macs_reduction: float | None, speedup: float | None) -> str | None:
    """A plain warning when a model claims >= 1.5x fewer MACs but runs < 5% faster; else ``None``."""
    if macs_reduction is None or speedup is None or macs_reduction < 1.5 or speedup >= 1.05:
        return None
    return (
        f"This model has {macs_reduction:.2f}x fewer MACs but runs only {speedup:.2f}x as fast as the "
        "unpruned one in ONNX Runtime: the MACs saving does not reach the hardware here. Try round_to=8 "
        "(or 16), a larger batch, or another execution provider."
    )


def measure(
    onnx_path: str | os.PathLike,
    loader: DataLoader | None = None,
    *,
    name: str | None = None,
    batch_sizes: tuple[int, ...] = (1, 32),
    threads: int | None = 2,
    provider: str = "auto",
    torch_model: nn.Module | None = None,
    example: torch.Tensor | None = None,
    warmup: int = 10,
    repeats: int = 50,
    class_names: list[str] | None = None,
) -> dict:
    """Accuracy and per-class accuracy (on every batch of ``loader``; ``class_names`` label the
    classes), ONNX Runtime latency per batch size, and, with ``torch_model`` and ``example``, eager
    latency, MACs and params. Returns a report entry."""
    path = Path(onnx_path)
    sess = ort_session(path, provider=provider, threads=threads)
    entry: dict = {
        "name": name or path.stem,
        "onnx": str(path),
        "file_bytes": path.stat().st_size,
        "provider": sess.get_providers()[0],
        "threads": threads,
        "latency": {},
        "eager_latency": {},
    }
    shape = tuple(example.shape[1:]) if example is not None else None
    for b in batch_sizes:
        entry["latency"][str(b)] = ort_latency(
            path, b, session=sess, input_shape=shape, threads=threads, warmup=warmup, repeats=repeats
        ).to_dict()
    if loader is not None:
        counts = ort_confusion(sess, loader)
        entry["accuracy"] = float(np.trace(counts) / counts.sum())
        entry["per_class_accuracy"] = class_accuracy(counts)
        names = list(class_names or [])
        entry["class_names"] = names if len(names) == len(counts) else [str(i) for i in range(len(counts))]
    if torch_model is not None and example is not None:
        entry.update(model_stats(torch_model, example[:1]))
        for b in batch_sizes:
            x = example[:1].expand(b, *example.shape[1:]).contiguous()
            entry["eager_latency"][str(b)] = torch_latency(
                torch_model, x, threads=threads, warmup=warmup, repeats=repeats
            ).to_dict()
    return entry
