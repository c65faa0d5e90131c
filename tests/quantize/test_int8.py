"""INT8 post-training quantization: what is written, what the guard refuses, bad options."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from icnn_compress import models
from icnn_compress.errors import ConfigError
from icnn_compress.export import export_onnx, read_metadata
from icnn_compress.quantize import QuantizeOptions, quantize_onnx, reduce_range_needed


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """A small BN network exported to ONNX, and image-like batches (N, 1, 16, 16) in [0, 1]."""
    torch.manual_seed(0)
    model = models.create("vgg_small", num_classes=5, in_channels=1).eval()
    for m in model.modules():  # non-trivial BN statistics, so that folding them matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("q") / "model.onnx"
    export_onnx(model, path, torch.rand(1, 1, 16, 16), metadata={"classes": list("abcde")})
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.rand(16, 1, 16, 16, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(6)
    ]
    return path, batches


def test_int8_model_is_written_folded_smaller_and_agrees(fp32, tmp_path):
    path, batches = fp32
    out = tmp_path / "model.int8.onnx"
    opts = QuantizeOptions(min_agreement=0.5, keep_float="none")
    res = quantize_onnx(path, out, batches[:4], batches[4:], opts)
    assert res.accepted and res.path == str(out) and out.is_file()
    assert res.validation_rows == 32 and res.calibration_rows == 64
    assert 0.5 <= res.top1_agreement <= 1.0
    assert res.fp32_top1 is not None and res.int8_top1 is not None  # labels were given
    graph = onnx.load(str(out)).graph
    ops = {n.op_type for n in graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert "BatchNormalization" not in ops  # folded into the convolutions
    assert res.int8_file_bytes < 0.4 * res.fp32_file_bytes  # 8-bit weights
    meta = read_metadata(out)
    assert meta["classes"] == json.dumps(list("abcde"))  # the float model's metadata is kept
    assert json.loads(meta["quantization"])["method"] == "minmax"
    # the INT8 model runs and stays close to the float model's logits
    x = batches[5][0].numpy()
    a = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    b = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()
    assert not [p for p in tmp_path.iterdir() if p.name != out.name]  # no temporary left behind


def test_guard_refuses_a_badly_calibrated_model_and_writes_nothing(tmp_path):
    # a template matcher: logit c = <template c, image>, so the class depends on the input
    g = torch.Generator().manual_seed(2)
    templates = torch.randn(5, 1, 16, 16, generator=g).sign()
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 5, 16, bias=False), torch.nn.Flatten()).eval()
    model[0].weight.data.copy_(templates)
    path = tmp_path / "model.onnx"
    export_onnx(model, path, torch.rand(1, 1, 16, 16))
    labels = torch.arange(64) % 5
    val = [(templates[labels] + 0.5 * torch.randn(64, 1, 16, 16, generator=g), labels)]
    out = tmp_path / "model.int8.onnx"
    opts = QuantizeOptions(min_agreement=0.9, keep_float="none")  # its one conv must be quantized
    good = quantize_onnx(path, out, [val[0][0]], val, opts)
    assert good.accepted and good.top1_agreement > 0.9 and good.int8_top1 > 0.9
    out.unlink()
    # calibrated on inputs 1000x too large: the logits' quantization step swallows their differences
    res = quantize_onnx(path, out, [val[0][0] * 1e3], val, opts)
    assert not res.accepted and res.path is None and not out.exists()
    assert res.top1_agreement < 0.9
    assert "min_agreement 0.9" in res.reason
    # the hint names only what these options have not tried: the other two methods, not per_channel
    assert "method 'entropy' or 'percentile'" in res.reason and "per_channel" not in res.reason
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_other_calibration_methods(fp32, tmp_path, method):
    path, batches = fp32
    res = quantize_onnx(
        path, tmp_path / "m.onnx", batches[:3], None, QuantizeOptions(method=method, min_agreement=0.0)
    )
    assert res.accepted and res.options["method"] == method
    assert res.validation_rows == 48 and res.fp32_top1 is not None  # default: the calibration batches


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "kl"}, "quantize method must be one of minmax, entropy, percentile"),
        ({"calibration_batches": 0}, "calibration_batches must be an int >= 1"),
        ({"validation_batches": True}, "validation_batches"),
        ({"min_agreement": 1.5}, r"min_agreement must be in \[0, 1\]"),
        ({"keep_float": "some"}, "keep_float must be 'auto', 'none' or a list of ONNX node names"),
        ({"keep_float": ["a", ""]}, "keep_float node names must be non-empty strings"),
        ({"timing_batch": 0}, "timing_batch must be an int >= 1"),
        ({"timing_threads": 1.5}, "timing_threads must be an int >= 1"),
        ({"reduce_range": "yes"}, "reduce_range must be 'auto', true or false"),
        ({"reduce_range": 1}, "reduce_range must be 'auto', true or false"),
    ],
)
def test_bad_options_are_one_line_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        QuantizeOptions(**kwargs)


def test_bad_paths_and_empty_data(fp32, tmp_path):
    path, batches = fp32
    with pytest.raises(ConfigError, match="no ONNX file"):
        quantize_onnx(tmp_path / "missing.onnx", tmp_path / "o.onnx", batches)
    with pytest.raises(ConfigError, match="must differ"):
        quantize_onnx(path, path, batches)
    with pytest.raises(ConfigError, match="calibration data gave no batches"):
        quantize_onnx(path, tmp_path / "o.onnx", [])
    assert not (tmp_path / "o.onnx").exists()


def _float_convs(path) -> set[str]:
    """Conv nodes of an ONNX file that still run in float (not folded into QDQ pairs)."""
    graph = onnx.load(str(path)).graph
    dq_out = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in graph.node if n.op_type == "Conv" and n.input[1] not in dq_out}


def test_named_convolutions_stay_in_float(fp32, tmp_path):
    path, batches = fp32
    convs = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]
    assert len(convs) >= 3
    everything = quantize_onnx(
        path, tmp_path / "a.onnx", batches[:2], None, QuantizeOptions(keep_float="none")
    )
    assert everything.kept_float == [] and _float_convs(tmp_path / "a.onnx") == set()
    res = quantize_onnx(
        path, tmp_path / "b.onnx", batches[:2], None, QuantizeOptions(keep_float=convs[:1], min_agreement=0.5)
    )
    assert res.accepted and res.kept_float == convs[:1]
    assert _float_convs(tmp_path / "b.onnx") == {convs[0]}
    assert json.loads(read_metadata(tmp_path / "b.onnx")["quantization"])["kept_float"] == convs[:1]
    with pytest.raises(
        ConfigError, match=r"keep_float: no Conv node 'nope' in model\.onnx; its Conv nodes are"
    ):
        quantize_onnx(path, tmp_path / "c.onnx", batches[:2], None, QuantizeOptions(keep_float=["nope"]))
    assert not (tmp_path / "c.onnx").exists()
    with pytest.raises(ConfigError, match="no Conv node 'nope'"):  # checked before any folder is made
        quantize_onnx(
            path, tmp_path / "new" / "c.onnx", batches[:2], None, QuantizeOptions(keep_float=["nope"])
        )
    assert not (tmp_path / "new").exists()


def test_auto_leaves_in_float_the_stages_that_make_the_model_faster(fp32, tmp_path, monkeypatch):
    """The choice follows the whole-model timings: here (timings replaced) leaving the first
    resolution's convolutions in float is faster, leaving the others is not."""
    from icnn_compress.quantize import _precision

    path, batches = fp32
    pre = tmp_path / "pre.onnx"
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(path), str(pre))
    stages = _precision.conv_stages(onnx.load(str(pre)))
    assert list(stages)[:2] == ["16x16", "8x8"]  # largest resolution first
    first = stages["16x16"]

    def fake_median(model_path, batch, threads, budget_s):
        assert batch == 4 and threads == 1  # timed at the batch and threads asked for
        if Path(model_path).name == "pre.onnx":
            return 10.0  # the float model
        floats = _float_convs(model_path)
        return 5.0 - (2.0 if set(first) <= floats else 0.0) + 0.5 * (len(floats - set(first)) > 0)

    monkeypatch.setattr(_precision, "_median_ms", fake_median)
    opts = QuantizeOptions(keep_float="auto", timing_batch=4, timing_threads=1, min_agreement=0.5)
    res = quantize_onnx(path, tmp_path / "m.onnx", batches[:2], None, opts)
    assert res.accepted and sorted(res.kept_float) == sorted(first)
    assert _float_convs(tmp_path / "m.onnx") == set(first)
    p = res.precision
    assert p["float_stages"] == ["16x16"] and p["batch"] == 4 and p["threads"] == 1
    assert (p["fp32_ms"], p["int8_all_ms"], p["int8_ms"]) == (10.0, 5.0, 3.0)
    assert set(p["tried"]) == set(stages) | set(first) and p["tried"]["16x16"] == 3.0
    assert all(p["tried"][k] == 3.5 for k in stages if k != "16x16")  # slower: left in INT8
    assert all(p["tried"][c] == 5.0 for c in first)  # each conv back in INT8 alone: slower, stays


def test_auto_warns_when_no_int8_mix_beats_float(fp32, tmp_path, monkeypatch, caplog):
    from icnn_compress.quantize import _precision

    path, batches = fp32

    def fake_median(model_path, batch, threads, budget_s):
        return 2.0 if Path(model_path).name == "pre.onnx" else 5.0  # float always faster

    monkeypatch.setattr(_precision, "_median_ms", fake_median)
    opts = QuantizeOptions(keep_float="auto", timing_batch=4, timing_threads=1, min_agreement=0.5)
    with caplog.at_level("WARNING", logger="icnn_compress.quantize._int8"):
        res = quantize_onnx(path, tmp_path / "m.onnx", batches[:2], None, opts)
    assert res.accepted  # written (the guard judges accuracy), but the user is told
    assert "INT8 is not faster than float on this machine for model.onnx: 5.00 ms against 2.00" in caplog.text


def test_auto_measures_on_this_machine(fp32, tmp_path):
    path, batches = fp32
    res = quantize_onnx(path, tmp_path / "m.onnx", batches[:2], None, QuantizeOptions(min_agreement=0.5))
    p = res.precision
    assert res.options["keep_float"] == "auto" and p["batch"] == 32
    assert p["fp32_ms"] > 0 and p["int8_all_ms"] > 0 and p["int8_ms"] <= p["int8_all_ms"]
    assert _float_convs(tmp_path / "m.onnx") == set(res.kept_float)


def test_auto_puts_back_in_int8_a_conv_of_a_float_stage_that_is_faster_there(fp32, tmp_path, monkeypatch):
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from icnn_compress.quantize import _precision

    path, batches = fp32
    pre = tmp_path / "pre.onnx"
    quant_pre_process(str(path), str(pre))
    first = _precision.conv_stages(onnx.load(str(pre)))["16x16"]
    assert len(first) >= 2

    def fake_median(model_path, batch, threads, budget_s):
        if Path(model_path).name == "pre.onnx":
            return 10.0
        floats = _float_convs(model_path)
        if floats == set(first[1:]):
            return 2.5  # the stage in float but its first conv in INT8: the fastest
        return 3.0 if floats == set(first) else 5.0

    monkeypatch.setattr(_precision, "_median_ms", fake_median)
    opts = QuantizeOptions(timing_batch=4, timing_threads=1, min_agreement=0.5)
    res = quantize_onnx(path, tmp_path / "m.onnx", batches[:2], None, opts)
    assert sorted(res.kept_float) == sorted(first[1:]) and res.precision["int8_ms"] == 2.5
    assert res.precision["tried"][first[0]] == 2.5 and _float_convs(tmp_path / "m.onnx") == set(first[1:])


def test_auto_reuses_its_choice_for_the_same_model_batch_and_threads(fp32, tmp_path, monkeypatch):
    """A rerun (or a resumed run) on the same machine keeps the same convolutions in float without
    timing again; another batch size is timed afresh."""
    from icnn_compress.quantize import _precision

    path, batches = fp32
    calls = []

    def fake_median(model_path, batch, threads, budget_s):
        calls.append(batch)
        return 10.0 if Path(model_path).name == "pre.onnx" else 5.0 - 0.01 * len(_float_convs(model_path))

    monkeypatch.setattr(_precision, "_median_ms", fake_median)
    opts = QuantizeOptions(timing_batch=4, timing_threads=1, min_agreement=0.5)
    first = quantize_onnx(path, tmp_path / "a.onnx", batches[:2], None, opts)
    timed = len(calls)
    assert timed > 2 and first.precision["cached"] is False
    again = quantize_onnx(path, tmp_path / "b.onnx", batches[:2], None, opts)
    assert len(calls) == timed  # nothing timed the second time
    assert again.precision["cached"] is True and again.kept_float == first.kept_float
    assert again.precision["int8_ms"] == first.precision["int8_ms"]
    other = quantize_onnx(
        path,
        tmp_path / "c.onnx",
        batches[:2],
        None,
        QuantizeOptions(timing_batch=8, timing_threads=1, min_agreement=0.5),
    )
    assert other.precision["cached"] is False and set(calls[timed:]) == {8}


@pytest.mark.parametrize(
    ("machine", "flags", "needed"),
    [
        ("x86_64", "avx2+fma", True),  # AVX2 without VNNI: u8 x s8 pairs summed in 16 bits saturate
        ("x86_64", "", True),  # instruction sets unknown: the safe choice
        ("AMD64", "avx2+fma+avx512f+avx512bw+avx512_vnni", False),
        ("x86_64", "avx2+fma+avx_vnni", False),
        ("aarch64", "asimddp", False),
    ],
)
def test_reduce_range_is_needed_on_x86_without_vnni_only(machine, flags, needed):
    assert reduce_range_needed(machine, flags) is needed


def _weight_codes(path) -> np.ndarray:
    """Every int8 weight code of the QDQ model's convolutions."""
    graph = onnx.load(str(path)).graph
    ints = [onnx.numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    return np.concatenate([w.ravel() for w in ints if w.ndim == 4])


@pytest.mark.parametrize("reduce_range", [True, False])
def test_reduce_range_writes_seven_bit_weights_and_says_so(fp32, tmp_path, reduce_range):
    path, batches = fp32
    out = tmp_path / "m.onnx"
    opts = QuantizeOptions(min_agreement=0.0, keep_float="none", reduce_range=reduce_range)
    res = quantize_onnx(path, out, batches[:2], batches[4:], opts)
    codes = _weight_codes(out)
    # per-channel symmetric weights: each channel's largest weight maps to the range's end
    assert np.abs(codes).max() == (64 if reduce_range else 127)
    assert res.reduce_range is reduce_range
    assert json.loads(read_metadata(out)["quantization"])["reduce_range"] is reduce_range


def test_reduce_range_auto_follows_this_cpu(fp32, tmp_path):
    path, batches = fp32
    res = quantize_onnx(path, tmp_path / "m.onnx", batches[:2], None, QuantizeOptions(min_agreement=0.0))
    assert res.reduce_range is reduce_range_needed()
    assert res.options["reduce_range"] == "auto"
