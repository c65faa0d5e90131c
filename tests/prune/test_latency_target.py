"""``Target(latency_speedup=...)``: the speedup is measured against the unpruned model timed again
beside every candidate, so a machine whose speed drifts during pruning does not skew it."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from icnn_compress import models
from icnn_compress.errors import ConfigError
from icnn_compress.export import export_onnx
from icnn_compress.measure import SpeedupTimer, _speedup
from icnn_compress.prune import PruneResult, Target, prune_model


@pytest.fixture
def drifting_timer(monkeypatch):
    """ONNX Runtime timing replaced by a model's file size (the "true" cost) times a machine that
    gets 4% slower with every timing call; the list of timed files."""
    calls = []

    def fake(path, batch_size, **kw):
        calls.append(path)
        return types.SimpleNamespace(median_ms=Path(path).stat().st_size * 1.04 ** len(calls))

    monkeypatch.setattr(_speedup, "ort_latency", fake)
    return calls


def prune_to_speedup(tmp_path: Path, **kw) -> tuple[PruneResult, float]:
    """resnet_cifar8 pruned to a 1.6x latency speedup; the result and its true (file size) speedup."""
    torch.manual_seed(0)
    model = models.create("resnet_cifar8", num_classes=5, in_channels=1).eval()
    example = torch.rand(1, 1, 16, 16)
    target = Target(latency_speedup=1.6, latency_batch=2, latency_threads=1)
    res = prune_model(model, example, criterion="l1", target=target, progress=False, **kw)
    export_onnx(model, tmp_path / "ref.onnx", example, check=False)
    export_onnx(res.model, tmp_path / "pruned.onnx", example, check=False)
    return res, (tmp_path / "ref.onnx").stat().st_size / (tmp_path / "pruned.onnx").stat().st_size


def test_latency_target_is_measured_in_alternation_with_the_unpruned_model(drifting_timer, tmp_path):
    res, true = prune_to_speedup(tmp_path, round_to=None, step_ratio=0.05)
    # timed once at the start, the reference would look faster than the candidates the more calls
    # follow (1.64x reported for a true 2.08x); in alternation each round's drift is one call (4%)
    assert res.latency_speedup == pytest.approx(true, rel=0.06)
    assert len(drifting_timer) > 20  # several steps, each timed in rounds: the drift compounds to > 2x
    assert res.latency_speedup >= 1.6 and true >= 1.6 / 1.06


def test_latency_aware_widths_land_on_a_latency_target_under_drift(drifting_timer, tmp_path):
    """The plan's stop is found by bisection on quick copies, each timed in alternation with the
    unpruned model, and the pruned model's speedup is measured the same way."""
    res, true = prune_to_speedup(tmp_path, allocation="latency")
    assert res.latency_speedup == pytest.approx(true, rel=0.06)
    assert true == pytest.approx(1.6, rel=0.1)  # aimed at within 5%, plus one round's drift


def test_speedup_timer_alternates_reference_and_candidate(drifting_timer):
    model = models.create("resnet_cifar8", num_classes=5, in_channels=1).eval()
    timer = SpeedupTimer(model, torch.rand(1, 1, 16, 16), batch=2, threads=1, rounds=5)
    assert len(timer.rounds_ms(model)) == 5
    assert [Path(p).stem for p in drifting_timer] == ["reference", "candidate"] * 5
    # the same model against itself: each round's candidate ran one call (4%) later
    assert timer.speedup(model) == pytest.approx(1 / 1.04)


def test_speedup_timer_times_onnx_files_as_they_are(drifting_timer, tmp_path):
    """An ONNX file (e.g. an INT8 model) is timed from where it is, against a module or a file."""
    model = models.create("resnet_cifar8", num_classes=5, in_channels=1).eval()
    example = torch.rand(1, 1, 16, 16)
    big, small = tmp_path / "big.onnx", tmp_path / "small.onnx"
    export_onnx(model, big, example, check=False)
    tiny = torch.nn.Sequential(torch.nn.Conv2d(1, 5, 16), torch.nn.Flatten()).eval()
    export_onnx(tiny, small, example, check=False)
    ratio = big.stat().st_size / small.stat().st_size
    timer = SpeedupTimer(big, example, batch=2, threads=1, rounds=3, stop_spread=None)
    assert timer.speedup(small) == pytest.approx(ratio / 1.04)
    assert [Path(p).name for p in drifting_timer] == ["big.onnx", "small.onnx"] * 3  # no copies made
    with pytest.raises(ConfigError, match="no ONNX file at"):
        timer.speedup(tmp_path / "missing.onnx")


def test_speedup_timer_stops_early_only_when_the_first_rounds_agree(monkeypatch):
    """Three agreeing rounds of five end the measurement; three that disagree do not, and then the
    answer is the median of all five."""
    model = models.create("resnet_cifar8", num_classes=5, in_channels=1).eval()
    steady = {"reference": [2.0] * 5, "candidate": [1.0, 1.01, 0.995, 5.0, 5.0]}
    noisy = {"reference": [2.0] * 5, "candidate": [1.0, 1.2, 0.9, 1.1, 1.05]}
    for seq, rounds, expect in ((steady, 3, 2 / 1.0), (noisy, 5, 2 / 1.05)):
        calls = {"reference": 0, "candidate": 0}

        def fake(path, batch_size, seq=seq, calls=calls, **kw):
            stem = Path(path).stem
            calls[stem] += 1
            return types.SimpleNamespace(median_ms=seq[stem][calls[stem] - 1])

        monkeypatch.setattr(_speedup, "ort_latency", fake)
        timer = SpeedupTimer(model, torch.rand(1, 1, 16, 16), batch=2, threads=1, rounds=5, stop_spread=0.02)
        assert timer.speedup(model) == pytest.approx(expect)
        assert timer.rounds_used == [rounds] and calls == {"reference": rounds, "candidate": rounds}
        # stop_spread=None times every round
        calls.update(reference=0, candidate=0)
        full = SpeedupTimer(model, torch.rand(1, 1, 16, 16), batch=2, threads=1, rounds=5, stop_spread=None)
        full.speedup(model)
        assert full.rounds_used == [5]
    for bad in (dict(stop_spread=-0.01), dict(rounds=0)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            SpeedupTimer(model, torch.rand(1, 1, 16, 16), **bad)


def test_early_stop_moves_the_median_by_less_than_the_spread():
    """The claim behind ``stop_spread``: when the first ``rounds // 2 + 1`` ratios agree within it,
    the median of all ``rounds`` lies among them."""
    rng = torch.Generator().manual_seed(0)
    checked = 0
    for rounds in (3, 4, 5, 7):
        first = rounds // 2 + 1
        for _ in range(2000):
            ratios = (1 + 0.03 * torch.randn(rounds, generator=rng)).tolist()
            pairs = [(r, 1.0) for r in ratios]
            if not SpeedupTimer.agree(pairs[:first], 0.02):
                continue
            checked += 1
            early, full = SpeedupTimer.median_ratio(pairs[:first]), SpeedupTimer.median_ratio(pairs)
            assert min(ratios[:first]) <= full <= max(ratios[:first])
            assert abs(early / full - 1) <= 0.02 + 1e-12
    assert checked > 100


def test_speedup_timer_passes_its_settle_time_to_every_timing(monkeypatch):
    seen = []

    def fake(path, batch_size, **kw):
        seen.append(kw["settle_s"])
        return types.SimpleNamespace(median_ms=1.0)

    monkeypatch.setattr(_speedup, "ort_latency", fake)
    model = models.create("resnet_cifar8", num_classes=5, in_channels=1).eval()
    SpeedupTimer(model, torch.rand(1, 1, 16, 16), batch=2, threads=1).speedup(model)
    SpeedupTimer(model, torch.rand(1, 1, 16, 16), batch=2, threads=1, settle_s=0.0).speedup(model)
    # equal rounds agree: three rounds of two timings each
    assert seen == [_speedup.SPIN_SETTLE_S] * 6 + [0.0] * 6
