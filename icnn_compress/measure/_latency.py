"""Latency of ONNX models in ONNX Runtime and of PyTorch models in eager mode."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from icnn_compress.errors import ConfigError, DataError

__all__ = [
    "SPIN_SETTLE_S",
    "LatencyStats",
    "ort_latency",
    "ort_session",
    "pick_providers",
    "time_callable",
    "torch_latency",
]

PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")

# ONNX Runtime's intra-op worker threads keep spinning for tens of milliseconds after a run. A
# session timed while another session's workers still spin shares the cores with them: on the
# 2-core benchmark VM, a conv timed within 30 ms of another session's run took up to 3x as long,
# after 50 ms it did not. ``ort_latency`` therefore waits until SPIN_SETTLE_S have passed since a
# different session last ran before it times one (only when the session changes).
SPIN_SETTLE_S = 0.1
_last_run: dict = {"session": None, "end": 0.0}


@dataclass
class LatencyStats:
    """Per-call latency in milliseconds over ``repeats`` timed calls after ``warmup`` calls."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    batch_size: int
    threads: int | None
    provider: str
    warmup: int
    repeats: int
    io_binding: bool = False  # input and outputs bound on the provider's device (no host copies timed)

    def to_dict(self) -> dict:
        return asdict(self)


def time_callable(fn: Callable[[], object], *, warmup: int = 10, repeats: int = 50, sync=None) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    if warmup < 0 or repeats < 1:
        raise ConfigError(f"warmup must be >= 0 and repeats >= 1. Got warmup={warmup}, repeats={repeats}.")
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        out.append(time.perf_counter() - t)
    return out


def _stats(
    times: list[float], batch: int, threads, provider: str, warmup: int, io_binding: bool = False
) -> LatencyStats:
    ms = sorted(t * 1e3 for t in times)
    p90 = float(np.percentile(ms, 90))
    return LatencyStats(
        median_ms=statistics.median(ms),
        p90_ms=max(p90, statistics.median(ms)),
        mean_ms=statistics.fmean(ms),
        std_ms=statistics.pstdev(ms),
        min_ms=ms[0],
        max_ms=ms[-1],
        batch_size=batch,
        threads=threads,
        provider=provider,
        warmup=warmup,
        repeats=len(ms),
        io_binding=io_binding,
    )


def pick_providers(provider: str = "auto") -> list[str]:
    """ONNX Runtime providers to ask for: ``"auto"`` = TensorRT/CUDA when a GPU is usable, else CPU."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise ConfigError(f"The 'provider' parameter must be one of {PROVIDERS}. Got {provider!r} instead.")
    available = ort.get_available_providers()
    gpu = torch.cuda.is_available()
    cpu, cuda, trt = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
    names = {"cpu": [cpu], "cuda": [cuda, cpu], "tensorrt": [trt, cuda, cpu]}
    if provider == "auto":
        wanted = names["tensorrt"] if gpu else names["cpu"]
        return [p for p in wanted if p in available] or ["CPUExecutionProvider"]
    missing = [p for p in names[provider][:-1] if p not in available]
    if missing or (provider != "cpu" and not gpu):
        raise ConfigError(
            f"ONNX Runtime provider {provider!r} is not usable here (available: {available}, "
            f"CUDA visible to torch: {gpu}). Use provider='cpu' or 'auto'."
        )
    return names[provider]


def ort_session(
    path: str | os.PathLike, *, provider: str = "auto", threads: int | None = None, optimization: str = "all"
):
    """An ONNX Runtime session with graph optimisations, ``threads`` intra-op threads, one inter-op.

    The providers actually used are ``session.get_providers()`` (a provider that fails to load is
    dropped by ONNX Runtime; report what it says, not what was asked).
    """
    import onnxruntime as ort

    levels = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    if optimization not in levels:
        raise ConfigError(f"optimization must be one of {tuple(levels)}. Got {optimization!r} instead.")
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[optimization]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be an int >= 1. Got {threads!r} instead.")
    if not Path(path).is_file():
        raise DataError(f"ONNX file {str(path)!r} does not exist or is not a file.")
    providers = pick_providers(provider)
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as exc:  # ONNX Runtime raises its own Fail/InvalidGraph/InvalidProtobuf
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(f"ONNX file {str(path)!r} cannot be loaded by ONNX Runtime: {first}") from None


def ort_latency(
    path: str | os.PathLike,
    batch_size: int,
    *,
    input_shape: tuple[int, ...] | None = None,
    provider: str = "auto",
    threads: int | None = None,
    warmup: int = 10,
    repeats: int = 50,
    session=None,
    io_binding: bool | None = None,
    settle_s: float = SPIN_SETTLE_S,
) -> LatencyStats:
    """Latency of one run on a random batch; ``input_shape`` (without batch) is read from the model
    when it is static.

    When another session ran less than ``settle_s`` seconds ago, the timing waits for the rest of
    that time first, so that the other session's spinning worker threads do not share the cores
    (``SPIN_SETTLE_S``; 0 does not wait).

    ``io_binding`` (default: on for the CUDA and TensorRT providers) places the input once on the
    provider's device and binds the outputs there, so a GPU timing measures the model and not the
    host-device copies around it (``LatencyStats.io_binding`` records which was used)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1. Got {batch_size!r} instead.")
    sess = session or ort_session(path, provider=provider, threads=threads)
    inp = sess.get_inputs()[0]
    shape = input_shape or tuple(inp.shape[1:])
    if any(not isinstance(d, int) for d in shape):
        raise ConfigError(f"The model's input shape {inp.shape} is not static: pass input_shape=(C, H, W).")
    x = np.random.default_rng(0).random((batch_size, *shape), dtype=np.float32)
    used = sess.get_providers()[0]
    on_gpu = used in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    bind = on_gpu if io_binding is None else bool(io_binding)
    if bind:
        import onnxruntime as ort

        device = "cuda" if on_gpu else "cpu"
        binding = sess.io_binding()
        binding.bind_ortvalue_input(inp.name, ort.OrtValue.ortvalue_from_numpy(x, device, 0))
        for out in sess.get_outputs():
            binding.bind_output(out.name, device)

        def call() -> None:
            sess.run_with_iobinding(binding)
            binding.synchronize_outputs()

    else:

        def call() -> None:
            sess.run(None, {inp.name: x})

    _settle(sess, settle_s)
    try:
        times = time_callable(call, warmup=warmup, repeats=repeats)
    finally:
        _last_run.update(session=id(sess), end=time.perf_counter())
    return _stats(times, batch_size, threads, used, warmup, bind)


def _settle(sess, settle_s: float) -> None:
    """Wait until another session's spinning workers have gone idle (see ``SPIN_SETTLE_S``)."""
    if _last_run["session"] not in (None, id(sess)):
        wait = settle_s - (time.perf_counter() - _last_run["end"])
        if wait > 0:
            time.sleep(wait)


def torch_latency(
    model: nn.Module,
    example: torch.Tensor,
    *,
    threads: int | None = None,
    warmup: int = 10,
    repeats: int = 50,
) -> LatencyStats:
    """Eager PyTorch latency of ``model(example)`` under ``torch.inference_mode`` (eval mode)."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    was_training = model.training
    model.eval()
    sync = torch.cuda.synchronize if example.is_cuda else None
    try:
        with torch.inference_mode():
            times = time_callable(lambda: model(example), warmup=warmup, repeats=repeats, sync=sync)
    finally:
        torch.set_num_threads(old)
        model.train(was_training)
    device = "cuda" if example.is_cuda else "cpu"
    return _stats(times, example.shape[0], threads or old, f"torch-eager-{device}", warmup)
