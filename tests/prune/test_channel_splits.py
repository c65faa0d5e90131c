"""A cross-stage-partial (CSP) block splits a conv's channels in two and adds a residual on one
half; torch-pruning maps that group's channels past the end of the conv. Those layers are left
unpruned (with a warning naming them) and the rest of the model prunes, exports and runs."""

import logging

import pytest
import torch
from torch import nn

import icnn_compress.prune._engine as engine
from icnn_compress.export import export_onnx
from icnn_compress.prune import UnsupportedModelError, prune_model


def cbr(i: int, o: int, k: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = cbr(c, c), cbr(c, c, 3)

    def forward(self, x):
        return x + self.conv2(self.conv1(x))


class TinyCSP(nn.Module):
    """timm's CSP stage in miniature: expand, split in two, residual blocks on one half, concat."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv_exp = cbr(3, 16, 3), cbr(16, 32)
        self.blocks = nn.Sequential(Block(16), Block(16))
        self.conv_transition_b, self.conv_transition = cbr(16, 16), cbr(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        xs, xb = self.conv_exp(self.stem(x)).split(16, dim=1)
        out = self.conv_transition(torch.cat([xs, self.conv_transition_b(self.blocks(xb))], 1))
        return self.head(out.mean((2, 3)))


def prune(model):
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(2)]
    return prune_model(
        model,
        torch.rand(1, 3, 16, 16),
        criterion="l2",
        target=1.5,
        data=data,
        compensate=True,
        progress=False,
    )


def test_the_split_group_is_left_unpruned_and_the_rest_prunes(caplog, tmp_path):
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="icnn_compress"):
        res = prune(TinyCSP().eval())
    assert res.macs_reduction >= 1.5
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "3 layers are left unpruned" in warned and "conv_exp.0" in warned
    widths = {n: m.out_channels for n, m in res.model.named_modules() if isinstance(m, nn.Conv2d)}
    assert widths["conv_exp.0"] == 32 and widths["blocks.0.conv2.0"] == 16  # the split group, whole
    # the others carry the reduction (pruning stops at the group that reaches the target)
    assert widths["blocks.0.conv1.0"] < 16 and widths["blocks.1.conv1.0"] < 16
    assert export_onnx(res.model.eval(), tmp_path / "m.onnx", torch.rand(1, 3, 16, 16)).max_abs_diff < 1e-4


def test_without_the_guard_the_failure_is_one_line_naming_a_layer(monkeypatch):
    monkeypatch.setattr(engine, "_leave_unfollowed_splits", lambda pruner: [])
    torch.manual_seed(0)
    with pytest.raises(
        UnsupportedModelError,
        match=r"^torch-pruning cannot rank and remove the channels of this model at layer '[^']+' \(Index",
    ) as info:
        prune(TinyCSP().eval())
    assert "\n" not in str(info.value)
