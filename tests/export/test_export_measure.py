import numpy as np
import pytest
import torch
from torch import nn

from icnn_compress import models
from icnn_compress.export import ExportError, export_onnx, read_metadata
from icnn_compress.measure import model_stats, ort_accuracy, ort_latency, torch_latency
from icnn_compress.prune import prune_model


@pytest.fixture
def pruned():
    model = models.create("resnet_cifar8", num_classes=4, in_channels=1)
    return prune_model(model, torch.rand(1, 1, 16, 16), target=1.5, round_to=4, progress=False).model.eval()


def test_pruned_model_exports_with_checker_parity_and_metadata(pruned, tmp_path):
    path = tmp_path / "m.onnx"
    res = export_onnx(
        pruned,
        path,
        torch.rand(1, 1, 16, 16),
        metadata={"classes": ["a", "b", "c", "d"], "preprocessing": {"mean": 0.5}},
    )
    assert path.is_file() and res.file_bytes == path.stat().st_size
    assert res.max_abs_diff < 1e-4 and res.top1_agreement == 1.0
    meta = read_metadata(path)
    assert meta["classes"] == '["a", "b", "c", "d"]' and meta["producer"].startswith("icnn-compress")
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary left behind


class Branchy(nn.Module):
    """Data-dependent Python control flow: the trace freezes one branch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        y = self.conv(x).mean(dim=(2, 3))
        return y * 2 if float(x.sum()) > 0 else y * -3


def test_broken_parity_is_caught_and_nothing_is_written(tmp_path):
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="Parity check failed"):
        export_onnx(Branchy(), path, torch.ones(1, 1, 8, 8), parity_inputs=[-torch.ones(2, 1, 8, 8)])
    assert not path.exists()
    assert not list(tmp_path.iterdir())


class Cancelling(nn.Module):
    """Two nearly identical convolutions subtracted: outputs near 1e-2 from intermediates near 1e5,
    so float32 rounding alone separates ONNX Runtime from PyTorch by more than the plain tolerance."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(32, 8, 3, bias=False)
        w = torch.randn(4, 32, 3, 3, generator=torch.Generator().manual_seed(0)) * 1e3
        self.conv.weight.data = torch.cat([w, w * (1 + 1e-5)])

    def forward(self, x):
        z = self.conv(x)
        return (z[:, 4:] - z[:, :4]).mean(dim=(2, 3))


def test_rounding_of_an_ill_conditioned_model_is_not_a_parity_failure(tmp_path):
    """Judged against a float64 run: ONNX Runtime is as close to it as PyTorch's float32 is."""
    x = torch.rand(1, 32, 12, 12, generator=torch.Generator().manual_seed(1))
    res = export_onnx(Cancelling(), tmp_path / "c.onnx", x)
    assert res.max_abs_diff > 1e-4 + 1e-3 * 0.05  # above the plain tolerance: the float64 run decided
    # a graph that computes something else still fails, float64 or not
    with pytest.raises(ExportError, match="Parity check failed"):
        export_onnx(
            Branchy(), tmp_path / "b.onnx", torch.ones(1, 1, 8, 8), parity_inputs=[-torch.ones(2, 1, 8, 8)]
        )


def test_what_rounding_allows_is_measured_layer_by_layer():
    """An output off by a few times what one unit of float32 rounding per layer moves the float64
    run is rounding (even where PyTorch itself happened to be closer); far beyond it is not."""
    from icnn_compress.export._onnx import _within_rounding

    model, x = Cancelling().double(), torch.rand(1, 32, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = model(x.double()).numpy()
    rel = np.abs(exact).max() * 2.0**-23
    ref = exact + rel  # PyTorch at the float32 floor: no help in telling rounding apart
    assert _within_rounding(model.float(), x, exact + 1e3 * rel, ref)  # the cancellation amplifies it
    assert not _within_rounding(model.float(), x, exact + 1e9 * rel, ref)
    assert not _within_rounding(model.float(), x, exact + np.abs(exact).max(), ref)


def test_latency_statistics_are_sane(pruned, tmp_path):
    path = tmp_path / "m.onnx"
    export_onnx(pruned, path, torch.rand(1, 1, 16, 16))
    for stats in (
        ort_latency(path, 4, provider="cpu", threads=1, warmup=2, repeats=15),
        torch_latency(pruned, torch.rand(4, 1, 16, 16), threads=1, warmup=2, repeats=15),
    ):
        assert 0 < stats.min_ms <= stats.median_ms <= stats.p90_ms <= stats.max_ms
        assert stats.repeats == 15 and stats.batch_size == 4
    plain = ort_latency(path, 1, provider="cpu", repeats=3)
    assert plain.provider == "CPUExecutionProvider" and not plain.io_binding  # CPU: plain run by default
    bound = ort_latency(path, 4, provider="cpu", threads=1, warmup=1, repeats=5, io_binding=True)
    assert bound.io_binding and 0 < bound.min_ms <= bound.median_ms and bound.to_dict()["io_binding"]


def test_onnx_accuracy_matches_pytorch(pruned, tmp_path):
    path = tmp_path / "m.onnx"
    export_onnx(pruned, path, torch.rand(1, 1, 16, 16))
    data = [(torch.rand(8, 1, 16, 16), torch.randint(0, 4, (8,))) for _ in range(3)]
    with torch.no_grad():
        want = sum(int((pruned(x).argmax(1) == y).sum()) for x, y in data) / 24
    assert ort_accuracy(path, data, provider="cpu") == pytest.approx(want)


def test_model_stats_counts_macs_and_params():
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False))
    stats = model_stats(conv, torch.rand(1, 1, 5, 5))
    assert stats == {"macs": 4 * 9 * 3 * 3, "params": 36}


def test_model_stats_are_the_same_on_the_meta_device_and_where_the_model_is():
    import torchvision

    model = torchvision.models.mobilenet_v2(num_classes=5).eval()
    example = torch.rand(1, 3, 32, 32)
    meta = model_stats(model, example)
    assert model_stats(model, example, where="model") == meta
    assert meta["params"] == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="where"):
        model_stats(model, example, where="cuda")


def test_a_session_is_not_timed_while_another_ones_workers_still_spin(tmp_path, monkeypatch):
    """ONNX Runtime's workers spin for tens of ms after a run; timing another session then shares
    the cores with them. ``ort_latency`` waits out ``SPIN_SETTLE_S`` when the session changes, and
    only then."""
    from icnn_compress.measure import _latency
    from icnn_compress.measure._latency import ort_session

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()).eval()
    paths = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for path in paths:
        export_onnx(model, path, torch.rand(1, 1, 8, 8), check=False)
    a, b = (ort_session(p, provider="cpu", threads=1) for p in paths)
    waits: list[float] = []
    monkeypatch.setattr(_latency.time, "sleep", waits.append)
    monkeypatch.setattr(_latency, "_last_run", {"session": None, "end": 0.0})  # no earlier test's run
    ort_latency(paths[0], 1, session=a, warmup=0, repeats=2)
    ort_latency(paths[0], 1, session=a, warmup=0, repeats=2)
    assert waits == []  # the same session again: nothing to wait for
    ort_latency(paths[1], 1, session=b, warmup=0, repeats=2)
    assert len(waits) == 1 and 0 < waits[0] <= _latency.SPIN_SETTLE_S
    ort_latency(paths[1], 1, session=b, warmup=0, repeats=2)
    ort_latency(paths[0], 1, session=a, warmup=0, repeats=2)
    assert len(waits) == 2
