"""Accuracy of an ONNX model over a whole evaluation set, and MACs/params of a PyTorch model."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

__all__ = ["model_stats", "ort_accuracy"]


def ort_accuracy(path_or_session, loader: DataLoader, *, provider: str = "auto", threads: int | None = None,
                 progress: bool = False) -> float:  # fmt: skip
    """Top-1 accuracy (0..1) of the ONNX model on every batch of ``loader``."""
    from icnn_compress.measure._latency import ort_session

    sess = path_or_session
    if isinstance(path_or_session, (str, os.PathLike)):
        sess = ort_session(path_or_session, provider=provider, threads=threads)
    name = sess.get_inputs()[0].name
    correct = seen = 0
    for batch in tqdm(loader, desc="onnx eval", disable=not progress, leave=False):
        x, y = batch[0], batch[1]
        logits = sess.run(None, {name: x.numpy().astype(np.float32, copy=False)})[0]
        correct += int((logits.argmax(1) == y.numpy()).sum())
        seen += len(y)
    return correct / max(seen, 1)


def model_stats(model: nn.Module, example: torch.Tensor) -> dict:
    """MACs (multiply-accumulates of one forward of ``example``) and parameter count (torch-pruning)."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example)
    model.train(was_training)
    return {"macs": int(macs), "params": int(params)}
