"""Per-layer latency tables measured in ONNX Runtime: what one conv layer costs at each width.

A conv layer's run time does not fall smoothly with its channels: the vectorised kernels work on
blocks of channels, so latency is a staircase in both the output and the input width, and a width
just past a step costs as much as the next block. ``conv_latency_table`` times one conv (+ ReLU)
alone, as a one-node ONNX model with the layer's kernel, stride, padding and input size, at several
output widths (``vary="out"``, input width full) or input widths (``vary="in"``, output width full),
on the machine, provider, thread count and batch that will run the model.

Tables are cached per machine (host, CPU model, instruction sets, CPU count), ONNX Runtime
version, provider, threads, batch and layer shape in ``~/.cache/icnn_compress/latency_tables.json``
(``ICNN_COMPRESS_CACHE`` moves it; a file lock keeps parallel processes from losing each other's
entries), so a model is measured once per machine.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from icnn_compress._io import atomic_write_json, cpu_identity
from icnn_compress.measure._latency import ort_latency, ort_session

log = logging.getLogger(__name__)

__all__ = [
    "conv_input_sizes",
    "conv_io_sizes",
    "conv_latency_table",
    "latency_table_cache",
    "layer_io_shapes",
    "machine_key",
    "read_cached",
    "table_widths",
    "write_cached",
]

_MEMORY: dict[str, dict[int, float]] = {}
TIMING_METHOD = "settled"  # part of every cache key: change it when the way latency is timed changes
VARY = ("out", "in")


def latency_table_cache() -> Path:
    """Where measured tables are kept (``$ICNN_COMPRESS_CACHE/latency_tables.json``)."""
    root = Path(os.environ.get("ICNN_COMPRESS_CACHE", Path.home() / ".cache" / "icnn_compress"))
    return root / "latency_tables.json"


def layer_io_shapes(
    model: nn.Module, example: Tensor, types: tuple[type, ...] = (nn.Conv2d,)
) -> dict[nn.Module, tuple[tuple[int, ...], tuple[int, ...]]]:
    """``{layer: (input shape, output shape)}`` of every module of ``types`` for one forward pass
    of ``example`` in eval mode (a layer called twice keeps its first call)."""
    shapes: dict = {}

    def record(module, args, output) -> None:
        shapes.setdefault(module, (tuple(args[0].shape), tuple(output.shape)))

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, types)]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return shapes


def conv_io_sizes(
    model: nn.Module, example: Tensor
) -> dict[nn.Conv2d, tuple[tuple[int, int], tuple[int, int]]]:
    """``{conv: (input (H, W), output (H, W))}`` of every ``Conv2d`` for one forward pass of
    ``example`` ``(1, C, H, W)`` in eval mode."""
    return {conv: (i[-2:], o[-2:]) for conv, (i, o) in layer_io_shapes(model, example).items()}


def conv_input_sizes(model: nn.Module, example: Tensor) -> dict[nn.Conv2d, tuple[int, int]]:
    """The input ``(H, W)`` of every ``Conv2d`` for one forward pass of ``example`` ``(1, C, H, W)``."""
    return {conv: io[0] for conv, io in conv_io_sizes(model, example).items()}


def _one_conv_model(conv: nn.Conv2d, cin: int, cout: int, hw: tuple[int, int]) -> bytes:
    """A one-conv (+ ReLU) ONNX model with ``conv``'s kernel, stride, padding and dilation."""
    from onnx import TensorProto, helper, numpy_helper

    k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    if isinstance(p, str):  # "same"
        p = tuple(kk // 2 * dd for kk, dd in zip(k, d))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((cout, cin, *k), dtype=np.float32)
    b = np.zeros(cout, dtype=np.float32)
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "w", "b"],
            ["y"],
            kernel_shape=list(k),
            strides=list(s),
            pads=[*p, *p],
            dilations=list(d),
        ),
        helper.make_node("Relu", ["y"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", cin, *hw])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # read by every ONNX Runtime since 1.10
    return model.SerializeToString()


def machine_key() -> list[str]:
    """What any measured latency depends on besides the model: host name, CPU model, the
    instruction sets the kernels dispatch on, logical CPU count, ONNX Runtime version and how it
    was timed (``TIMING_METHOD``: entries timed before ``ort_latency`` waited for other sessions'
    spinning workers are noise and are measured again, not read).

    A virtual machine's host name (often just ``vm``) and ``platform.processor()`` (empty on
    Linux) do not tell one CPU from another; tables measured on one host must not be read on
    another, so the CPU itself is part of the key."""
    import onnxruntime as ort

    name, flags = cpu_identity()
    return [platform.node(), name, flags, f"{os.cpu_count()} cpus", ort.__version__, TIMING_METHOD]


def _key(conv: nn.Conv2d, hw, vary: str, batch: int, threads: int, provider: str) -> str:
    return json.dumps(
        [
            *machine_key(),
            provider,
            threads,
            batch,
            vary,
            conv.in_channels,
            conv.out_channels,
            list(conv.kernel_size),
            list(conv.stride),
            str(conv.padding),
            list(conv.dilation),
            list(hw),
        ]
    )


def read_cached(key: str) -> dict | None:
    """The entry stored under ``key`` in the latency cache file, or ``None``."""
    return _read_disk().get(key)


def write_cached(key: str, entry: dict) -> None:
    """Store ``entry`` (string keys, JSON values) under ``key`` in the latency cache file."""
    _save(key, entry)


def _read_disk() -> dict:
    try:
        return json.loads(latency_table_cache().read_text())
    except (OSError, ValueError):
        return {}


def table_widths(full: int) -> list[int]:
    """The widths a latency table times by default for a layer ``full`` channels wide: every
    multiple of 4 up to 256, of 16 up to 1024 and of 32 beyond, and ``full`` itself.

    Fine steps where a kernel's channel block (4-16 channels) is a large share of the layer;
    coarse ones where one block moves the latency by a few percent at most (at 256 channels, 16
    more are 6%), which the planner interpolates. A 2048-channel layer times 144 widths instead
    of 512 (each width is a session, timed twice, 0.1 s apart)."""
    steps = [*range(4, min(full, 256) + 1, 4), *range(272, min(full, 1024) + 1, 16)]
    steps += range(1056, full + 1, 32)
    return sorted({*steps, full})


def conv_latency_table(
    conv: nn.Conv2d,
    input_hw: tuple[int, int],
    *,
    vary: str = "out",
    batch: int = 32,
    threads: int = 2,
    provider: str = "cpu",
    widths: list[int] | None = None,
    repeats: int = 7,
) -> dict[int, float]:
    """Median ONNX Runtime latency (ms) of ``conv`` (+ ReLU) alone at each width.

    Args:
        conv: an ungrouped ``Conv2d`` (only its shape is used).
        input_hw: its input's ``(H, W)``.
        vary: ``"out"``: output widths at the full input width; ``"in"``: input widths at the
            full output width.
        batch, threads, provider: where the model will run.
        widths: the widths to time (default ``table_widths``: every multiple of 4 up to 256, then
            coarser, and the width itself).
        repeats: timed runs per width and pass (two passes, in opposite orders; the faster median
            of the two is kept, so a background hiccup does not make a width look slow).

    Returns:
        ``{width: median ms}``, cached per machine and layer shape.
    """
    if vary not in VARY:
        raise ValueError(f"vary must be one of {VARY}. Got {vary!r} instead.")
    full = conv.out_channels if vary == "out" else conv.in_channels
    widths = sorted(set(widths or table_widths(full)))
    key = _key(conv, input_hw, vary, batch, threads, provider)
    table = dict(_MEMORY.get(key) or {int(w): float(v) for w, v in _read_disk().get(key, {}).items()})
    missing = [w for w in widths if w not in table]
    if missing:
        log.info(
            "timing %s %s widths of a %s conv at batch %d",
            len(missing),
            vary,
            tuple(conv.weight.shape),
            batch,
        )
        with tempfile.TemporaryDirectory() as tmp:
            sessions = {}
            for w in missing:
                cin, cout = (conv.in_channels, w) if vary == "out" else (w, conv.out_channels)
                path = Path(tmp) / f"conv{w}.onnx"
                path.write_bytes(_one_conv_model(conv, cin, cout, input_hw))
                sessions[w] = (path, cin, ort_session(path, provider=provider, threads=threads))
            for order in (missing, missing[::-1]):
                for w in order:
                    path, cin, sess = sessions[w]
                    stats = ort_latency(
                        path,
                        batch,
                        input_shape=(cin, *input_hw),
                        session=sess,
                        threads=threads,
                        warmup=2,
                        repeats=repeats,
                    )
                    table[w] = min(table.get(w, float("inf")), stats.median_ms)
        _save(key, table)
    _MEMORY[key] = table
    return {w: table[w] for w in widths}


def _save(key: str, table: dict) -> None:
    """Merge one table (or entry) into the disk cache (under a file lock; a read-only home is only
    logged)."""
    from filelock import FileLock

    path = latency_table_cache()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=60):
            disk = _read_disk()
            disk[key] = {str(w): v for w, v in sorted(table.items())}
            atomic_write_json(disk, path)
    except OSError as exc:
        log.debug("latency table cache not written: %s", exc)
