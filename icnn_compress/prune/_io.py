"""Save and load pruned models as plain tensors + metadata (loads with ``weights_only=True``)."""

from __future__ import annotations

import json
import os

import torch
import torch_pruning as tp
from torch import nn

from icnn_compress._artefact import load_artefact, save_artefact
from icnn_compress.errors import DataError

__all__ = ["FORMAT", "load_pruned", "read_pruned_record", "rebuild_pruned", "save_pruned"]

FORMAT = "icnn-compress-pruned/1"


def save_pruned(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    arch: str,
    history: list,
    input_shape: tuple[int, ...],
    arch_kwargs: dict | None = None,
    icnn: dict | None = None,
    metadata: dict | None = None,
) -> None:
    """Write a pruned model: its state dict, torch-pruning's history and how to rebuild it.

    Args:
        arch, arch_kwargs: the registry name and arguments of the unpruned model
            (``models.create(arch, **arch_kwargs)``).
        history: ``PruneResult.history`` (torch-pruning's pruning history), replayed on load.
        input_shape: ``(C, H, W)`` of an input, to trace the dependency graph on load.
        icnn: ``{"layers": [...], "options": {...}}`` when frozen ICNN masks are part of the model
            (re-attached and frozen before the history is replayed).
    """
    record = {
        "format": FORMAT,
        "arch": arch,
        "arch_kwargs": json.dumps(arch_kwargs or {}),
        "history": json.dumps([[n, bool(o), [int(i) for i in idx]] for n, o, idx in history]),
        "input_shape": list(input_shape),
        "icnn": json.dumps(icnn) if icnn else "",
        "metadata": json.dumps(metadata or {}),
        "state_dict": model.state_dict(),
    }
    save_artefact(record, path, kind="pruned-model", model=arch)


def load_pruned(path: str | os.PathLike, *, map_location="cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model saved by ``save_pruned``; returns ``(model, metadata)``.

    The file's checksum is verified first; a missing, corrupt, tampered or non-weights file raises
    ``DataError`` (one line) and nothing in it is executed (``weights_only=True``).
    """
    record = read_pruned_record(path, map_location=map_location)
    return rebuild_pruned(record), json.loads(record["metadata"])


def read_pruned_record(path: str | os.PathLike, *, map_location="cpu") -> dict:
    """The verified record of a ``save_pruned`` file (``input_shape``, ``history``, ``icnn``, ...)."""
    record = load_artefact(path, kind="pruned-model", what="Pruned model file", map_location=map_location)
    if record.get("format") != FORMAT:
        raise DataError(
            f"{str(path)!r} is not a pruned model saved by icnn-compress (expected format {FORMAT})."
        )
    return record


def rebuild_pruned(record: dict) -> nn.Module:
    """The model of a verified ``read_pruned_record`` record (``load_pruned`` without reading twice).

    The full-size architecture is first built on PyTorch's ``meta`` device (shapes without memory),
    pruned by the recorded history, and only then given memory and the saved weights, so a reload
    never holds the unpruned weights (VGG-16: 0.55 GB). Architectures with buffers that the saved
    weights do not restore (non-persistent buffers) are built in memory as before.
    """
    model = _rebuild(record, torch.device("meta"))
    if model is None:
        model = _rebuild(record, torch.device("cpu"))
    state = record["state_dict"]
    modules = dict(model.named_modules())
    for key in state:  # compensation may have given a bias-free layer a bias
        owner, _, leaf = key.rpartition(".")
        m = modules.get(owner)
        if leaf == "bias" and isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is None:
            m.bias = nn.Parameter(torch.zeros_like(state[key], device=m.weight.device))
    if next(model.parameters()).is_meta:
        model = model.to_empty(device="cpu")
    model.load_state_dict(state)
    return model


def _rebuild(record: dict, device: torch.device) -> nn.Module | None:
    """The architecture on ``device``, pruned by the record's history; ``None`` on ``meta`` when
    that is not safe (non-persistent buffers, or an architecture that cannot run on ``meta``)."""
    from icnn_compress import models
    from icnn_compress.icnn import attach_icnn
    from icnn_compress.prune._engine import _dependency_graph

    meta = device.type == "meta"
    try:
        with device:
            model = models.create(record["arch"], **json.loads(record["arch_kwargs"]))
            if record["icnn"]:
                spec = json.loads(record["icnn"])
                handle = attach_icnn(model, spec["layers"], spec["num_classes"], **spec["options"])
                handle.freeze()
        if meta and any(m._non_persistent_buffers_set for m in model.modules()):
            return None
        example = torch.zeros(1, *record["input_shape"], device=device)
        model.eval()
        graph = _dependency_graph(
            lambda: tp.DependencyGraph().build_dependency(model, example_inputs=example), model
        )
        graph.load_pruning_history([(n, o, idx) for n, o, idx in json.loads(record["history"])])
    except Exception:
        if meta:  # an op without a meta kernel, or a model that reads its weights' values
            return None
        raise
    return model
