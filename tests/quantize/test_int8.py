"""INT8 post-training quantization: what is written, what the guard refuses, bad options."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from icnn_compress import models
from icnn_compress.errors import ConfigError
from icnn_compress.export import export_onnx, read_metadata
from icnn_compress.quantize import QuantizeOptions, quantize_onnx


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
    res = quantize_onnx(path, out, batches[:4], batches[4:], QuantizeOptions(min_agreement=0.5))
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
    good = quantize_onnx(path, out, [val[0][0]], val, QuantizeOptions(min_agreement=0.9))
    assert good.accepted and good.top1_agreement > 0.9 and good.int8_top1 > 0.9
    out.unlink()
    # calibrated on inputs 1000x too large: the logits' quantization step swallows their differences
    res = quantize_onnx(path, out, [val[0][0] * 1e3], val, QuantizeOptions(min_agreement=0.9))
    assert not res.accepted and res.path is None and not out.exists()
    assert res.top1_agreement < 0.9
    assert "min_agreement 0.9" in res.reason
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
