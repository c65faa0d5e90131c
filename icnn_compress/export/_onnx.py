"""ONNX export with checks: onnx.checker, parity against PyTorch in ONNX Runtime, metadata."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from icnn_compress._version import __version__
from icnn_compress.errors import ConfigError, IcnnCompressError

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_OPSET", "ExportError", "ExportResult", "export_onnx", "read_metadata"]

DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 11, 20  # what the TorchScript exporter of torch 2.4-2.14 writes


class ExportError(IcnnCompressError, RuntimeError):
    """The exported model failed the checker or does not match PyTorch."""


@dataclass
class ExportResult:
    """What ``export_onnx`` wrote and how well it matches PyTorch."""

    path: str
    opset: int
    input_names: list[str]
    output_names: list[str]
    max_abs_diff: float  # over the parity inputs, ONNX Runtime (CPU) vs PyTorch
    top1_agreement: float  # fraction of rows whose argmax agrees
    file_bytes: int
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _as_tuple(example_inputs) -> tuple[Tensor, ...]:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


class _native_output:
    """Capture what native code writes to file descriptors 1 and 2 during a block (torch's ONNX
    exporter prints the whole IR graph to stdout on a failure, whatever its verbosity); replayed
    after the block unless ``drop()`` was called."""

    def __enter__(self) -> _native_output:
        import sys

        self.keep = True
        self.saved: dict[int, tuple[int, object]] = {}
        for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
            stream.flush()
            buffer = tempfile.TemporaryFile()
            self.saved[fd] = (os.dup(fd), buffer)
            os.dup2(buffer.fileno(), fd)
        return self

    def drop(self) -> None:
        self.keep = False

    def __exit__(self, *exc) -> None:
        import sys

        for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
            stream.flush()
            saved, buffer = self.saved[fd]
            os.dup2(saved, fd)
            os.close(saved)
            if self.keep:
                buffer.seek(0)
                data = buffer.read()
                if data:
                    stream.write(data.decode(errors="replace"))
            buffer.close()


def _export_failure(exc: Exception, inputs) -> str:
    """One line for a failure inside ``torch.onnx.export``."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    hint = ""
    if "adaptive_avg_pool2d" in str(exc) or "adaptive_max_pool2d" in str(exc):
        shape = tuple(inputs[0].shape) if inputs else "?"
        hint = (
            f" An adaptive pooling layer cannot be exported when its output size does not divide its "
            f"input at this example size {shape} (torchvision's VGG/AlexNet pool to 7x7 and need "
            "224 px inputs or more); export with a larger example, or set the pool to a divisor."
        )
    return f"torch.onnx could not export the model ({type(exc).__name__}: {text[:200]}).{hint}"


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Tensor | tuple[Tensor, ...],
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    check: bool = True,
    metadata: dict | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    parity_inputs: list[Tensor] | None = None,
) -> ExportResult:
    """Export ``model`` (in eval mode) to ONNX, check it, and write it atomically.

    Args:
        model: the network; its training/eval mode is restored afterwards.
        path: output file; written only when every check passes.
        example_inputs: a tensor ``(N, C, H, W)`` (or a tuple) to trace with.
        opset: ONNX opset (default 17).
        dynamic_batch: make the batch axis of inputs and outputs dynamic.
        check: run ``onnx.checker`` and the parity check (ONNX Runtime on the CPU vs PyTorch).
        metadata: extra ``metadata_props`` (values are JSON-encoded unless strings), e.g.
            ``{"classes": [...], "preprocessing": {...}, "recipe": "..."}``.
        atol, rtol: parity tolerance: ``max|onnx - torch| <= atol + rtol * max|torch|``. Beyond
            it the export still passes when ONNX Runtime is within 4x of what float32 rounding
            moves a float64 run of the model by (an ill-conditioned model with huge activations;
            measured on the CPU, only then).
        parity_inputs: inputs for the parity check (default: the example, its negation, zeros
            and, with a dynamic batch, a random batch of another size in the example's range).

    Returns:
        ``ExportResult``. Raises ``ExportError`` when the checker or the parity check fails.

    Example:
        >>> res = export_onnx(model, "model.onnx", torch.rand(1, 1, 28, 28))
        >>> res.max_abs_diff < 1e-4
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    opset = DEFAULT_OPSET if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(f"opset must be an int in [{MIN_OPSET}, {MAX_OPSET}]. Got {opset!r} instead.")
    inputs = _as_tuple(example_inputs)
    input_names = ["input"] if len(inputs) == 1 else [f"input{i}" for i in range(len(inputs))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(*inputs)
        outs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        output_names = ["logits"] if len(outs) == 1 else [f"output{i}" for i in range(len(outs))]
        axes = {n: {0: "batch"} for n in input_names + output_names} if dynamic_batch else None
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with _native_output() as native:
                    try:
                        torch.onnx.export(
                            model,
                            inputs,
                            tmp,
                            input_names=input_names,
                            output_names=output_names,
                            dynamic_axes=axes,
                            opset_version=opset,
                            dynamo=False,
                        )
                    except Exception as exc:  # the exporter's errors span pages: one line names the op
                        native.drop()  # and the IR graph torch's C++ side printed goes too
                        raise ExportError(_export_failure(exc, inputs)) from None
            _forward_tracer_warnings(caught)
            proto = onnx.load(tmp)
            props = {"producer": f"icnn-compress {__version__}"}
            for k, v in (metadata or {}).items():
                props[str(k)] = v if isinstance(v, str) else json.dumps(v)
            del proto.metadata_props[:]
            for k, v in props.items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = k, v
            onnx.save(proto, tmp)
            del proto  # a copy of every weight: not kept through the checker and ONNX Runtime's session
            max_diff, agree = float("nan"), float("nan")
            if check:
                try:
                    onnx.checker.check_model(tmp, full_check=True)
                except Exception as exc:
                    raise ExportError(f"onnx.checker rejected the exported model: {exc}") from exc
                if parity_inputs is None:
                    parity_inputs = default_parity_inputs(inputs[0], dynamic_batch and len(inputs) == 1)
                max_diff, agree = _parity(model, tmp, parity_inputs, input_names[0], atol, rtol, ort)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    finally:
        model.train(was_training)
    return ExportResult(
        str(path), opset, input_names, output_names, max_diff, agree, path.stat().st_size, props
    )


def default_parity_inputs(example: Tensor, other_batch: bool = True) -> list[Tensor]:
    """The caller's example, its negation and zeros (data-dependent control flow shows up on one of
    them), and with ``other_batch`` a random batch of another size drawn from the example's range."""
    out = [example, -example, torch.zeros_like(example)]
    if other_batch:
        n = 3 if example.shape[0] != 3 else 2
        g = torch.Generator().manual_seed(0)
        lo, hi = float(example.min()), float(example.max())
        if hi <= lo:
            lo, hi = 0.0, 1.0
        x = torch.rand(n, *example.shape[1:], generator=g) * (hi - lo) + lo
        out.append(x.to(device=example.device, dtype=example.dtype))
    return out


def _forward_tracer_warnings(caught: list) -> None:
    """Re-emit the tracer's warnings (they flag Python control flow or constants baked into the
    graph, which parity on a few inputs may not catch); drop the exporter's own deprecation notices."""
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, FutureWarning)):
            continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _within_rounding(
    model: nn.Module, x: Tensor, got: np.ndarray, ref: np.ndarray, factor: float = 4.0, runs: int = 3
) -> bool:
    """Whether ONNX Runtime's output ``got`` is as close to a float64 run of the model as float32
    rounding allows: an ill-conditioned model (huge activations, BatchNorm variances near zero)
    amplifies rounding in every runtime, and that is not a wrong graph. What rounding allows is
    measured: PyTorch's own float32 error, and the float64 run again with every layer's output
    moved by up to one float32 unit in the last place (``runs`` times, fixed seed); ``got`` may be
    off by ``factor`` times the larger. The float64 copy is made on the CPU only when the plain
    tolerance fails; ``False`` when it cannot run."""
    import copy

    try:
        exact_model = copy.deepcopy(model).cpu().double()
        xd = x.detach().cpu().double()
        gen = torch.Generator().manual_seed(0)

        def nudge(_module, _inputs, out):
            if torch.is_tensor(out) and out.is_floating_point():
                return out * (1 + (torch.rand(out.shape, generator=gen, dtype=out.dtype) * 2 - 1) * 2.0**-23)
            return None

        def first(out) -> np.ndarray:
            return (out[0] if isinstance(out, (tuple, list)) else out).numpy()

        with torch.no_grad():
            exact = first(exact_model(xd))
            hooks = [m.register_forward_hook(nudge) for m in exact_model.modules() if not list(m.children())]
            spread = max(float(np.abs(first(exact_model(xd)) - exact).max()) for _ in range(runs))
            for h in hooks:
                h.remove()
    except Exception:  # an op without float64 support: keep the plain verdict
        return False
    torch_err = float(np.abs(ref.astype(np.float64) - exact).max())
    onnx_err = float(np.abs(got.astype(np.float64) - exact).max())
    noise = max(torch_err, spread)
    return np.isfinite(onnx_err) and noise > 0 and onnx_err <= factor * noise


def _parity(model, file, inputs, input_name, atol, rtol, ort) -> tuple[float, float]:
    sess = ort.InferenceSession(file, providers=["CPUExecutionProvider"])
    worst, agree, rows = 0.0, 0.0, 0
    for i, x in enumerate(inputs):
        with torch.no_grad():
            ref = model(x)
        ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).float().cpu().numpy()
        got = sess.run(None, {input_name: x.cpu().numpy()})[0]
        if got.shape != ref.shape:
            raise ExportError(f"ONNX output shape {got.shape} differs from PyTorch's {ref.shape}.")
        diff = float(np.abs(got - ref).max())
        peak = float(np.abs(ref).max())
        if np.isfinite(diff) and diff > atol + rtol * peak and _within_rounding(model, x, got, ref):
            log.info(
                "parity input %d: max |onnx - torch| = %.3g exceeds %.3g, but both are as close to a "
                "float64 run of the model as float32 rounding allows (outputs up to %.3g): accepted",
                i + 1,
                diff,
                atol + rtol * peak,
                peak,
            )
        elif not np.isfinite(diff) or diff > atol + rtol * peak:
            why = (
                "the exported graph computes something else than the PyTorch model (data-dependent "
                "Python control flow, or an operator exported differently)"
            )
            if peak >= 1e3:  # rounding grows with the activations: say so, it is often the reason
                why += (
                    f"; or, as its outputs reach {peak:.3g} on this input, an ill-conditioned model "
                    "(e.g. BatchNorm variances near zero) amplifies float32 rounding: check parity "
                    "on inputs like your data with parity_inputs=[...]"
                )
            raise ExportError(
                f"Parity check failed: max |onnx - torch| = {diff:.3g} on parity input {i + 1} of "
                f"{len(inputs)} (a batch of {x.shape[0]}; allowed {atol:g} + {rtol:g} * max|torch| = "
                f"{atol + rtol * peak:.3g}); {why}."
            )
        worst = max(worst, diff)
        if ref.ndim == 2:
            agree += float((got.argmax(1) == ref.argmax(1)).sum())
            rows += ref.shape[0]
    return worst, (agree / rows if rows else float("nan"))
