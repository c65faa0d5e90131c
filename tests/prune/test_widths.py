"""Explicit per-layer widths (``prune_model(widths=...)``) and latency-aware widths
(``allocation="latency"``): exact widths, reload, validation, measured tables cached per machine."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch import nn

from icnn_compress import ConfigError, models
from icnn_compress._io import parse_cpuinfo
from icnn_compress.measure import _layer_latency
from icnn_compress.measure._layer_latency import conv_latency_table, latency_table_cache, table_widths
from icnn_compress.prune import Target, prune_model

from ._reload import save_and_reload_resnet_cifar8


def conv_widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_widths_prune_each_named_layer_to_its_width_and_reload(tmp_path):
    model = models.create("resnet_cifar8", num_classes=5, in_channels=1)
    example = torch.rand(1, 1, 16, 16)
    res = prune_model(
        model,
        example,
        criterion="l2",
        widths={"layer1.0.conv1": 5, "layer3.0.shortcut.0": 40},
        progress=False,
    )
    widths = conv_widths(res.model)
    assert widths["layer1.0.conv1"] == 5
    # the shortcut's group is the whole residual stage: every conv that writes it follows
    assert widths["layer3.0.shortcut.0"] == widths["layer3.0.conv2"] == 40
    assert widths["layer2.0.conv1"] == conv_widths(model)["layer2.0.conv1"]  # not named: untouched
    assert res.macs_reduction > 1.0
    loaded, _ = save_and_reload_resnet_cifar8(res, tmp_path / "p.pt")
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(loaded.eval()(x), res.model.eval()(x))


@pytest.mark.parametrize(
    ("widths", "match"),
    [
        ({"nope": 3}, "no conv or linear layer named 'nope'"),
        ({"layer1.0.conv1": 0}, r"widths\['layer1.0.conv1'\] must be an int in \[2, 16\]"),
        ({"layer1.0.conv1": 17}, r"must be an int in \[2, 16\]"),
        ({"layer1.0.conv1": 2.5}, "must be an int"),
        ({}, "non-empty dict"),
    ],
)
def test_bad_widths_get_one_line(widths, match):
    model = models.create("resnet_cifar8", num_classes=5, in_channels=1)
    with pytest.raises(ConfigError, match=match):
        prune_model(model, torch.rand(1, 1, 16, 16), widths=widths, progress=False)


def test_allocation_is_validated():
    model = models.create("resnet_cifar8", num_classes=5, in_channels=1)
    example = torch.rand(1, 1, 16, 16)
    with pytest.raises(ConfigError, match="allocation must be one of"):
        prune_model(model, example, allocation="fast", progress=False)
    with pytest.raises(ConfigError, match="macs_reduction or latency_speedup target"):
        prune_model(model, example, target=Target(params_reduction=2.0), allocation="latency", progress=False)


def test_conv_latency_table_is_measured_once_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("ICNN_COMPRESS_CACHE", str(tmp_path))
    monkeypatch.setattr(_layer_latency, "_MEMORY", {})
    conv = nn.Conv2d(8, 12, 3, padding=1)
    table = conv_latency_table(conv, (8, 8), batch=1, threads=1, repeats=2)
    assert sorted(table) == [4, 8, 12] and all(v > 0 for v in table.values())
    assert latency_table_cache().is_file()
    monkeypatch.setattr(_layer_latency, "_MEMORY", {})  # a new process: only the disk cache is left
    built = []
    monkeypatch.setattr(_layer_latency, "_one_conv_model", lambda *a: built.append(a))
    assert conv_latency_table(conv, (8, 8), batch=1, threads=1, repeats=2) == table
    assert built == []
    with pytest.raises(ValueError, match="vary must be one of"):
        conv_latency_table(conv, (8, 8), vary="both")


def test_latency_tables_of_another_cpu_are_not_reused(tmp_path, monkeypatch):
    # a VM's host name ("vm") and platform.processor() ("") are the same on every host: the key
    # must tell CPUs apart by model and instruction sets, or one host's tables plan another's widths
    epyc = "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma f16c\n"
    xeon = "model name\t: Intel Xeon\nflags\t\t: fpu avx2 fma avx512f avx512bw avx512_vnni\n"
    assert parse_cpuinfo(epyc) == ("AMD EPYC", "avx2+fma")
    assert parse_cpuinfo(xeon) == ("Intel Xeon", "avx2+fma+avx512f+avx512bw+avx512_vnni")
    assert parse_cpuinfo("") == ("", "")
    monkeypatch.setenv("ICNN_COMPRESS_CACHE", str(tmp_path))
    monkeypatch.setattr(_layer_latency, "_MEMORY", {})
    monkeypatch.setattr(_layer_latency, "cpu_identity", lambda: parse_cpuinfo(epyc))
    conv = nn.Conv2d(8, 12, 3, padding=1)
    conv_latency_table(conv, (8, 8), batch=1, threads=1, repeats=2)
    monkeypatch.setattr(_layer_latency, "_MEMORY", {})
    monkeypatch.setattr(_layer_latency, "cpu_identity", lambda: parse_cpuinfo(xeon))
    built = []
    real = _layer_latency._one_conv_model
    monkeypatch.setattr(_layer_latency, "_one_conv_model", lambda *a: built.append(a) or real(*a))
    conv_latency_table(conv, (8, 8), batch=1, threads=1, repeats=2)
    assert built, "the other CPU's table was read from the cache instead of measured"
    assert len(json.loads(latency_table_cache().read_text())) == 2


def test_latency_aware_widths_meet_a_macs_target_on_kernel_friendly_widths(tmp_path, monkeypatch):
    monkeypatch.setenv("ICNN_COMPRESS_CACHE", str(tmp_path))
    torch.manual_seed(0)
    model = models.create("vgg_small", num_classes=10, in_channels=1)
    before = conv_widths(model)
    res = prune_model(
        model,
        torch.rand(1, 1, 28, 28),
        criterion="l1",
        target=Target(macs_reduction=1.5, latency_batch=1, latency_threads=1),
        allocation="latency",
        progress=False,
    )
    assert res.macs_reduction >= 1.5
    after = conv_widths(res.model)
    changed = {n: w for n, w in after.items() if w != before[n]}
    assert changed, "nothing was pruned"
    assert all(w % 4 == 0 for w in changed.values()), changed
    assert conv_widths(model) == before  # the caller's model is untouched


def test_default_table_widths_are_fine_where_a_block_matters_and_coarse_above():
    narrow = table_widths(160)
    assert narrow == list(range(4, 161, 4))  # the benchmark models: every multiple of 4
    wide = table_widths(2048)
    assert len(wide) == 144 and wide[-1] == 2048  # instead of 512 widths
    steps = {b - a for a, b in itertools.pairwise(wide)}
    assert steps == {4, 16, 32}
    assert all(b - a == 4 for a, b in itertools.pairwise(wide) if b <= 256)
    assert all(b - a == 32 for a, b in itertools.pairwise(wide) if a >= 1024)
    assert table_widths(300)[-2:] == [288, 300] and table_widths(3) == [3]  # the width itself
