"""Which stages of a model to leave in float so that its INT8 version runs fastest here.

ONNX Runtime's integer convolution kernels are not faster everywhere. On the 2-core AVX-512 CPU the
benchmarks run on, a 3x3 convolution with 8 output channels at 28x28 took 390 us in INT8 against
200 us in float, and a first convolution reading one input channel 340 us against 50 us, while
widths of 16 and more ran 1.5-3x faster in INT8. Pruning produces exactly such narrow layers, so an
INT8 copy of a pruned model can be slower than the float model it came from.

Timing each convolution alone does not predict this (a convolution's INT8 cost depends on the
layout and the quantize/dequantize pairs its neighbours leave), so ``float_stages`` measures whole
models: the convolutions are grouped into stages by input resolution; starting from everything in
INT8, each stage in turn is left in float and kept so when the whole model then runs faster by more
than ``min_gain``, on this machine, at the batch and threads given; then each convolution of the
float stages is tried back in INT8 alone, and kept there on the same condition. Only speed is
measured here: each candidate is calibrated on one image; the chosen one is then quantized and
guarded as usual.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from icnn_compress._progress import progress_bar
from icnn_compress.quantize._int8 import quantize_qdq

log = logging.getLogger(__name__)

__all__ = ["StageChoice", "conv_stages", "float_stages"]


def conv_stages(model) -> dict[str, list[str]]:
    """Named Conv nodes of an ONNX ``ModelProto`` (with inferred shapes) grouped by their input's
    spatial size: ``{"HxW": [node names]}``, largest resolution first; convolutions whose input
    size is unknown form the stage ``"?"``."""
    g = model.graph
    sizes = {}
    for vi in [*g.input, *g.value_info]:
        d = vi.type.tensor_type.shape.dim
        if len(d) == 4 and d[2].HasField("dim_value") and d[3].HasField("dim_value"):
            sizes[vi.name] = (d[2].dim_value, d[3].dim_value)
    stages: dict[tuple[int, int] | None, list[str]] = {}
    for n in g.node:
        if n.op_type == "Conv" and n.name:
            stages.setdefault(sizes.get(n.input[0]), []).append(n.name)
    order = sorted(stages, key=lambda hw: -1 if hw is None else -hw[0] * hw[1])
    return {("?" if hw is None else f"{hw[0]}x{hw[1]}"): stages[hw] for hw in order}


@dataclass
class StageChoice:
    """What ``float_stages`` measured: whole-model medians (ms) at ``batch`` with ``threads``."""

    kept_float: list[str]  # Conv nodes to leave in float
    float_stages: list[str]  # the stages ("HxW") they form
    fp32_ms: float  # the float model
    int8_all_ms: float  # every convolution in INT8
    int8_ms: float  # the chosen mix
    batch: int
    threads: int
    # stage ("HxW") -> median with it in float; Conv node -> median with it back in INT8
    tried: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _median_ms(path: str, batch: int, threads: int, budget_s: float) -> float:
    """Median latency (ms) of ``path`` at ``batch``: one run to size the timing, then as many runs
    as fit in ``budget_s`` (3 to 25) after one warm-up."""
    import time

    from icnn_compress.measure import ort_latency, ort_session

    sess = ort_session(path, provider="cpu", threads=threads)
    t0 = time.perf_counter()
    ort_latency(path, batch, session=sess, threads=threads, warmup=0, repeats=1)
    once = max(time.perf_counter() - t0, 1e-4)
    repeats = int(min(25, max(3, budget_s / once)))
    return ort_latency(path, batch, session=sess, threads=threads, warmup=1, repeats=repeats).median_ms


def float_stages(
    pre_path: str,
    sample: np.ndarray,
    *,
    batch: int = 32,
    threads: int = 2,
    per_channel: bool = True,
    reduce_range: bool = False,
    min_gain: float = 0.03,
    budget_s: float = 1.0,
    progress: bool = False,
) -> StageChoice:
    """Choose the stages to leave in float by timing whole INT8 models on this machine.

    Args:
        pre_path: the float ONNX model after ``quant_pre_process`` (shapes inferred, BN folded).
        sample: one input batch ``(N, C, H, W)``, float32; its first image calibrates the
            candidates (only their speed is measured; they are timed on random inputs).
        batch: the batch size the deployed model runs at.
        threads: ONNX Runtime intra-op threads (CPU provider).
        per_channel: quantize the weights per output channel, as the real model will be.
        reduce_range: 7-bit weights, as the real model will be.
        min_gain: a stage stays in float only when that makes the whole model at least this much
            faster (0.03 = 3%), so that timing noise does not decide.
        budget_s: about how long each candidate model is timed.
        progress: show a progress bar over the stages.

    Returns:
        ``StageChoice`` with the Conv nodes to exclude from quantization and every median measured.
    """
    import onnx

    model = onnx.load(pre_path)
    stages = conv_stages(model)
    inputs = {t.name for t in model.graph.initializer}
    input_name = next(i.name for i in model.graph.input if i.name not in inputs)
    kept: list[str] = []
    chosen: list[str] = []
    tried: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="icnn-precision-") as tmp:

        def timed(exclude) -> float:
            path = str(Path(tmp) / f"cand{len(tried)}.onnx")
            quantize_qdq(
                pre_path,
                path,
                [sample[:1]],
                input_name,
                per_channel=per_channel,
                exclude=exclude,
                reduce_range=reduce_range,
            )
            return _median_ms(path, batch, threads, budget_s)

        fp32 = _median_ms(pre_path, batch, threads, budget_s)
        int8_all = best = timed([])
        for stage in progress_bar(list(stages), progress=progress, desc="int8 stages", leave=False):
            t = timed([*kept, *stages[stage]])
            tried[stage] = t
            if t < best * (1.0 - min_gain):
                kept, best = [*kept, *stages[stage]], t
                chosen.append(stage)
        # then each convolution of the float stages alone back in INT8 (a stage's strided first
        # conv may write a wide enough map for the INT8 kernels)
        for conv in progress_bar(list(kept), progress=progress, desc="int8 convs", leave=False):
            trial = [c for c in kept if c != conv]
            t = timed(trial)
            tried[conv] = t
            if t < best * (1.0 - min_gain):
                kept, best = trial, t
    log.info(
        "INT8 at batch %d, %d threads: float %.2f ms, all INT8 %.2f ms, chosen %.2f ms (float stages: %s)",
        batch,
        threads,
        fp32,
        int8_all,
        best,
        ", ".join(chosen) or "none",
    )
    return StageChoice(kept, chosen, fp32, int8_all, best, batch, threads, tried)
