"""INT8 post-training quantization of an exported ONNX model with ONNX Runtime's quantization tools.

The float model is pre-processed (shape inference and ONNX Runtime's basic graph optimisations,
which fold any BatchNormalization left into the preceding Conv), calibrated on a few batches of
real inputs and rewritten in the QDQ format (QuantizeLinear/DequantizeLinear pairs that ONNX
Runtime fuses into integer kernels): weights signed 8-bit, per output channel by default;
activations unsigned 8-bit, one scale per tensor. On x86 CPUs without VNNI the weights use 7 bits
(``reduce_range``): their 8-bit kernels add products pairwise in 16 bits, which saturates on
full-range weights and costs accuracy (measured on a 2-core AVX2 EPYC: vgg_small's top-1 agreement
with float 0.970 with 8-bit weights, 0.998 with 7). By default the stages whose convolutions INT8
does not make faster on this machine (narrow pruned layers; whole models timed, see
``float_stages``; the choice is cached per model file, machine, batch and threads) stay in float.
A guard then runs the float and the INT8 model on validation inputs and refuses the INT8 model
when their top-1 predictions agree on fewer than ``min_agreement`` of the rows: the file is then
not written, and the result says why.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from icnn_compress._progress import progress_bar
from icnn_compress._version import __version__
from icnn_compress.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["CALIBRATION_METHODS", "QuantizeOptions", "QuantizeResult", "quantize_onnx", "reduce_range_needed"]

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
_VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")  # x86 instruction sets with 8-bit dot products in 32 bits


def reduce_range_needed(machine: str | None = None, flags: str | None = None) -> bool:
    """Whether INT8 weights should use 7 bits on this CPU: ``True`` on x86 without VNNI (or whose
    instruction sets cannot be read), where ONNX Runtime's u8 x s8 kernels add products pairwise
    in 16-bit registers that full-range weights can saturate; ``False`` elsewhere (Arm, VNNI).
    ``machine`` (e.g. ``"x86_64"``) and ``flags`` (``"avx2+fma"``) default to this host's."""
    import platform

    from icnn_compress._io import cpu_identity

    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    present = set((cpu_identity()[1] if flags is None else flags).split("+"))
    return not present.intersection(_VNNI)


@dataclass(frozen=True)
class QuantizeOptions:
    """How to quantize.

    Attributes:
        method: how activation ranges are chosen from the calibration batches: ``minmax`` (the
            observed range), ``entropy`` (the range that keeps the histogram's KL divergence lowest)
            or ``percentile`` (the 99.999th percentile of the absolute values).
        per_channel: one weight scale per output channel (else one per tensor).
        calibration_batches: batches of the calibration data used to observe activations.
        validation_batches: batches of the validation data the guard compares on (``None``: all).
        min_agreement: the guard's threshold on the share of rows (0..1) where the INT8 model's
            top-1 class equals the float model's.
        keep_float: which convolutions stay in float: ``"auto"`` (the stages - convolutions at one
            input resolution - that make the whole INT8 model faster here when left in float,
            timed at ``timing_batch`` and ``timing_threads``), ``"none"`` (quantize all), or ONNX
            Conv node names.
        timing_batch: the batch size ``"auto"`` times at (the deployment's batch).
        timing_threads: ONNX Runtime intra-op threads ``"auto"`` times with (``None``: the
            machine's CPU count).
        reduce_range: quantize the weights to 7 bits instead of 8: ``"auto"`` (on x86 CPUs
            without VNNI, where ONNX Runtime's 8-bit kernels can saturate; see
            ``reduce_range_needed``), ``True`` or ``False``. Give ``False`` for a model that will
            run on a VNNI CPU (or Arm) when you quantize it elsewhere, ``True`` for one that will
            run on a CPU without VNNI.
    """

    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True
    calibration_batches: int = 16
    validation_batches: int | None = None
    min_agreement: float = 0.98
    keep_float: str | tuple[str, ...] = "auto"
    timing_batch: int = 32
    timing_threads: int | None = None
    reduce_range: bool | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        rr = self.reduce_range
        if not (isinstance(rr, bool) or rr == "auto"):
            raise ConfigError(f"reduce_range must be 'auto', true or false. Got {rr!r} instead.")
        kf = self.keep_float
        if isinstance(kf, (list, tuple)):
            if not all(isinstance(n, str) and n for n in kf):
                raise ConfigError(f"keep_float node names must be non-empty strings. Got {kf!r} instead.")
            object.__setattr__(self, "keep_float", tuple(kf))
        elif kf not in ("auto", "none"):
            raise ConfigError(
                f"keep_float must be 'auto', 'none' or a list of ONNX node names. Got {kf!r} instead."
            )
        for name in ("timing_batch", "timing_threads"):
            v = getattr(self, name)
            if v is None and name == "timing_threads":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an int >= 1. Got {v!r} instead.")
        if self.method not in CALIBRATION_METHODS:
            raise ConfigError(
                f"quantize method must be one of {', '.join(CALIBRATION_METHODS)}. "
                f"Got {self.method!r} instead."
            )
        if isinstance(self.calibration_batches, bool) or not (
            isinstance(self.calibration_batches, int) and self.calibration_batches >= 1
        ):
            raise ConfigError(
                f"calibration_batches must be an int >= 1. Got {self.calibration_batches!r} instead."
            )
        vb = self.validation_batches
        if vb is not None and (isinstance(vb, bool) or not isinstance(vb, int) or vb < 1):
            raise ConfigError(f"validation_batches must be an int >= 1 or None. Got {vb!r} instead.")
        if not 0.0 <= float(self.min_agreement) <= 1.0:
            raise ConfigError(f"min_agreement must be in [0, 1]. Got {self.min_agreement!r} instead.")


@dataclass
class QuantizeResult:
    """What ``quantize_onnx`` did. ``path`` is ``None`` when the guard refused the INT8 model."""

    path: str | None
    accepted: bool
    top1_agreement: float  # share of validation rows where INT8 and float top-1 agree (0..1)
    fp32_top1: float | None  # accuracy (0..1) on the validation rows when they have labels
    int8_top1: float | None
    validation_rows: int
    calibration_rows: int
    fp32_file_bytes: int
    int8_file_bytes: int
    options: dict = field(default_factory=dict)
    operators: dict[str, int] = field(default_factory=dict)  # op type -> count in the INT8 graph
    kept_float: list[str] = field(default_factory=list)  # Conv nodes left in float
    # keep_float="auto": whole-model medians (fp32_ms, int8_all_ms, int8_ms, tried per stage, ...)
    precision: dict = field(default_factory=dict)
    reason: str = ""  # why the guard refused (empty when accepted)
    reduce_range: bool = False  # the weights were quantized to 7 bits (options.reduce_range resolved)

    def to_dict(self) -> dict:
        return asdict(self)


def _inputs(batches: Iterable, limit: int | None) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """``(x, y)`` numpy pairs from a loader of ``(x, y, ...)`` tuples or of bare tensors/arrays
    (``y`` is then ``None``); at most ``limit`` batches."""
    for i, batch in enumerate(batches):
        if limit is not None and i >= limit:
            return
        x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) and len(batch) > 1 else (batch, None)
        if isinstance(x, (tuple, list)):
            x = x[0]
        x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
        y = None if y is None else (y.detach().cpu().numpy() if hasattr(y, "detach") else np.asarray(y))
        yield x.astype(np.float32, copy=False), y


def _calibration_reader(batches: list[np.ndarray], input_name: str):
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict | None:
            x = next(self._it, None)
            return None if x is None else {input_name: x}

        def rewind(self) -> None:
            self._it = iter(batches)

    return _Reader()


def quantize_qdq(
    pre: str,
    out: str,
    batches: list[np.ndarray],
    input_name: str,
    *,
    per_channel: bool,
    method: str = "minmax",
    exclude: list[str] | tuple[str, ...] = (),
    reduce_range: bool = False,
) -> None:
    """ONNX Runtime's static QDQ quantization of the pre-processed model ``pre`` into ``out``:
    int8 weights (per channel or per tensor; 7-bit with ``reduce_range``), uint8 activations whose
    ranges are observed on ``batches`` ``(N, C, H, W)`` with ``method``; the Conv nodes in
    ``exclude`` stay float."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calibrate = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    chatter = io.StringIO()  # the calibrators print their progress to stdout
    with contextlib.redirect_stdout(chatter):
        quantize_static(
            pre,
            out,
            _calibration_reader(batches, input_name),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calibrate,
            nodes_to_exclude=list(exclude),
            reduce_range=reduce_range,
            extra_options={"CalibTensorRangeSymmetric": False},
        )
    printed = chatter.getvalue().strip()
    if printed:
        log.debug("onnxruntime.quantization: %s", printed)


def _agreement(fp32_path: str, int8_path: str, validation, limit: int | None, progress: bool):
    """Top-1 agreement of the two models and, where labels exist, each one's accuracy."""
    from icnn_compress.measure import ort_session

    a, b = ort_session(fp32_path, provider="cpu"), ort_session(int8_path, provider="cpu")
    name = a.get_inputs()[0].name
    agree = rows = right_a = right_b = labelled = 0
    for x, y in progress_bar(_inputs(validation, limit), progress=progress, desc="int8 guard", leave=False):
        pa = a.run(None, {name: x})[0].argmax(1)
        pb = b.run(None, {name: x})[0].argmax(1)
        agree += int((pa == pb).sum())
        rows += len(pa)
        if y is not None and y.shape == pa.shape:
            right_a += int((pa == y).sum())
            right_b += int((pb == y).sum())
            labelled += len(y)
    if rows == 0:
        raise ConfigError("quantize_onnx: the validation data gave no batches; the guard needs at least one.")
    fp32 = right_a / labelled if labelled else None
    int8 = right_b / labelled if labelled else None
    return agree / rows, fp32, int8, rows


def quantize_onnx(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calibration: Iterable,
    validation: Iterable | None = None,
    options: QuantizeOptions | None = None,
    *,
    progress: bool = False,
) -> QuantizeResult:
    """Quantize a float ONNX model to INT8 (static, QDQ) and guard its predictions.

    Args:
        fp32_path: the float model (e.g. written by ``export_onnx``); one image input ``(N, C, H, W)``.
        out_path: where the INT8 model goes; written (atomically) only when the guard accepts it.
        calibration: batches of representative inputs: a ``DataLoader`` of ``(x, y, ...)`` or an
            iterable of tensors/arrays ``(N, C, H, W)``; the first ``options.calibration_batches``
            are used.
        validation: batches the guard compares the two models on (labels, when present, also give
            each model's accuracy); default: the calibration batches.
        options: ``QuantizeOptions`` (default: min-max calibration, per-channel weights, 16
            calibration batches, agreement >= 0.98).
        progress: show a progress bar for the guard.

    Returns:
        ``QuantizeResult``; ``accepted`` is False (and nothing is written) when the INT8 model's
        top-1 agreement with the float model is below ``options.min_agreement``.

    Example:
        >>> res = quantize_onnx("model.onnx", "model.int8.onnx", train_dl, val_dl)
        >>> res.accepted, res.top1_agreement
    """
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    opts = options or QuantizeOptions()
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if not fp32_path.is_file():
        raise ConfigError(f"quantize_onnx: no ONNX file at {str(fp32_path)!r}.")
    if out_path.resolve() == fp32_path.resolve():
        raise ConfigError("quantize_onnx: out_path must differ from fp32_path (the float model is kept).")
    model = onnx.load(str(fp32_path), load_external_data=False)
    graph_inputs = [
        i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}
    ]
    if len(graph_inputs) != 1:
        raise ConfigError(
            f"quantize_onnx handles models with one input; {fp32_path.name} has {len(graph_inputs)} "
            f"({', '.join(graph_inputs)})."
        )
    if isinstance(opts.keep_float, tuple):  # named convs: checked before anything is written
        _check_conv_names(model.graph, opts.keep_float, fp32_path.name)
    calib_pairs = list(_inputs(calibration, opts.calibration_batches))
    calib = [x for x, _ in calib_pairs]
    if not calib:
        raise ConfigError("quantize_onnx: the calibration data gave no batches.")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=out_path.parent) as tmp:
        pre, q = str(Path(tmp) / "pre.onnx"), str(Path(tmp) / "int8.onnx")
        quant_pre_process(str(fp32_path), pre)
        reduce_range = reduce_range_needed() if opts.reduce_range == "auto" else bool(opts.reduce_range)
        kept, choice = _kept_float(pre, calib[0], opts, fp32_path, progress, reduce_range)
        if choice and choice["int8_ms"] >= choice["fp32_ms"]:  # even the best mix loses to float here
            log.warning(
                "INT8 is not faster than float on this machine for %s: %.2f ms against %.2f ms at "
                "batch %d, %d threads (narrow layers, or a CPU without fast 8-bit kernels); the "
                "float model is the one to deploy here",
                fp32_path.name,
                choice["int8_ms"],
                choice["fp32_ms"],
                choice["batch"],
                choice["threads"],
            )
        quantize_qdq(
            pre,
            q,
            calib,
            graph_inputs[0],
            per_channel=opts.per_channel,
            method=opts.method,
            exclude=kept,
            reduce_range=reduce_range,
        )
        qmodel = onnx.load(q)
        props = {p.key: p.value for p in model.metadata_props}
        props["producer"] = f"icnn-compress {__version__}"
        props["quantization"] = json.dumps(
            {
                "format": "QDQ",
                "weights": "int7 (reduce_range)" if reduce_range else "int8",
                "activations": "uint8",
                "kept_float": kept,
                **asdict(opts),
                "reduce_range": reduce_range,
            }
        )
        del qmodel.metadata_props[:]
        for k, v in props.items():
            entry = qmodel.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save(qmodel, q)
        agreement, fp32_top1, int8_top1, rows = _agreement(
            str(fp32_path),
            q,
            calib_pairs if validation is None else validation,
            None if validation is None else opts.validation_batches,
            progress,
        )
        accepted = agreement >= opts.min_agreement
        reason = (
            ""
            if accepted
            else f"top-1 agreement with the float model is {agreement:.4f} on {rows} rows, below "
            f"min_agreement {opts.min_agreement:g}; the INT8 model was not written (try "
            f"{_remedies(opts, reduce_range)})"
        )
        int8_bytes = os.path.getsize(q)
        if accepted:
            os.replace(q, out_path)
        else:
            log.warning("INT8 model refused: %s", reason)
    ops = collections.Counter(n.op_type for n in qmodel.graph.node)
    return QuantizeResult(
        path=str(out_path) if accepted else None,
        accepted=accepted,
        top1_agreement=agreement,
        fp32_top1=fp32_top1,
        int8_top1=int8_top1,
        validation_rows=rows,
        calibration_rows=int(sum(len(x) for x in calib)),
        fp32_file_bytes=fp32_path.stat().st_size,
        int8_file_bytes=int8_bytes,
        options=asdict(opts),
        operators=dict(sorted(ops.items())),
        kept_float=kept,
        precision=choice,
        reason=reason,
        reduce_range=reduce_range,
    )


def _remedies(opts: QuantizeOptions, reduce_range: bool) -> str:
    """What else to try when the guard refuses: the settings ``opts`` has not tried yet."""
    other = [m for m in CALIBRATION_METHODS if m != opts.method]
    tips = [f"method {' or '.join(repr(m) for m in other)}", "more calibration_batches"]
    if not reduce_range:
        tips.append("reduce_range=True (7-bit weights)")
    if not opts.per_channel:
        tips.append("per_channel=True")
    if not isinstance(opts.keep_float, tuple):
        tips.append("keep_float=[...] naming the Conv nodes to leave in float")
    return ", ".join(tips)


def _check_conv_names(graph, names: tuple[str, ...], file_name: str) -> None:
    """One-line ``ConfigError`` for the first of ``names`` that is not a Conv node of ``graph``."""
    convs = [n.name for n in graph.node if n.op_type == "Conv" and n.name]
    unknown = [n for n in names if n not in convs]
    if unknown:
        raise ConfigError(
            f"keep_float: no Conv node {unknown[0]!r} in {file_name}; its Conv nodes are "
            f"{', '.join(convs[:8])}{', ...' if len(convs) > 8 else ''}."
        )


def _kept_float(
    pre: str, sample: np.ndarray, opts: QuantizeOptions, fp32_path: Path, progress: bool, reduce_range: bool
):
    """The Conv nodes to leave in float, and what an ``"auto"`` choice measured (or, for the same
    model file, batch and threads on this machine, what it measured before: cached)."""
    import onnx

    from icnn_compress.measure._layer_latency import read_cached, write_cached
    from icnn_compress.quantize._precision import float_stages

    file_name = fp32_path.name

    if opts.keep_float == "none":
        return [], {}
    if isinstance(opts.keep_float, tuple):  # still there after the pre-processing?
        _check_conv_names(onnx.load(pre, load_external_data=False).graph, opts.keep_float, file_name)
        return list(opts.keep_float), {}
    threads = opts.timing_threads or os.cpu_count() or 1
    key = _choice_key(fp32_path, opts.timing_batch, threads, opts.per_channel, reduce_range)
    cached = read_cached(key)
    if cached and isinstance(cached.get("kept_float"), list):
        log.info("INT8: the float stages chosen earlier on this machine for this model (cached)")
        return list(cached["kept_float"]), {**cached, "cached": True}
    choice = float_stages(
        pre,
        sample,
        batch=opts.timing_batch,
        threads=threads,
        per_channel=opts.per_channel,
        reduce_range=reduce_range,
        progress=progress,
    )
    write_cached(key, choice.to_dict())
    return choice.kept_float, {**choice.to_dict(), "cached": False}


def _choice_key(fp32_path: Path, batch: int, threads: int, per_channel: bool, reduce_range: bool) -> str:
    """What an ``"auto"`` choice depends on: the model file's bytes, the machine, ONNX Runtime's
    version, the batch, the threads and the weights' granularity and bits."""
    from icnn_compress._io import sha256_file
    from icnn_compress.measure._layer_latency import machine_key

    key = ["int8-float-stages", sha256_file(fp32_path), *machine_key(), batch, threads]
    return json.dumps([*key, per_channel, reduce_range])
