"""The compiled loss statistics (``fuse="on"``) compute what the eager ones do."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from icnn_compress import attach_icnn
from icnn_compress.icnn import _loss
from tests.icnn.test_no_host_sync import small_net

# on a machine with a GPU the CUDA path is checked too (CI's machine has none)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def train(model: nn.Module, fuse: str, device: str = "cpu", steps: int = 4, categories: str = "multi"):
    model = model.to(device)
    handle = attach_icnn(
        model, ["2"], num_classes=4, warmup_steps=0, refresh_every=2, fuse=fuse, categories=categories
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        n = 6 if i < steps - 1 else 5  # a smaller last batch, as at the end of an epoch
        x, y = torch.rand(n, 1, 10, 10, generator=g), torch.randint(0, 4, (n,), generator=g)
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y) + handle.loss(y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, handle, float(loss)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("device", DEVICES)
# "multi": both halves in one compiled call; "balanced": two, a Hungarian assignment between them
@pytest.mark.parametrize("categories", ["multi", "balanced"])
def test_fused_statistics_match_the_eager_ones(device, categories):
    fusables = (_loss._fused_fold_maps, _loss._fused_loss_terms, _loss._fused_fold_and_loss_terms)
    for f in fusables:
        f.reset()
    base = small_net()
    eager, h_eager, loss_eager = train(copy.deepcopy(base), "off", device, categories=categories)
    fused, h_fused, loss_fused = train(copy.deepcopy(base), "on", device, categories=categories)
    assert not any(f.failed for f in fusables)
    used = _loss._fused_loss_terms if categories == "balanced" else _loss._fused_fold_and_loss_terms
    assert used._compiled is not None  # the compiled path really ran
    assert loss_fused == pytest.approx(loss_eager, rel=1e-5, abs=1e-6)
    for a, b in zip(eager.parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    s_e, s_f = h_eager.state_dict(), h_fused.state_dict()
    for key in ("log_z", "class_stats", "categories", "task_grad_ms", "pending_sq"):
        ea = next(iter(s_e["sites"].values()))[key]
        fa = next(iter(s_f["sites"].values()))[key]
        torch.testing.assert_close(fa, ea, rtol=1e-5, atol=1e-5)


def test_a_failing_compile_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    def broken(fn, **kwargs):
        raise RuntimeError("no compiler here")

    fold = _loss._Fusable(_loss._fold_maps)
    monkeypatch.setattr(torch, "compile", broken)
    x = torch.rand(3, 2, 4, 4)
    args = (
        x,
        torch.tensor([0, 1, 0]),
        torch.zeros(2, 2, dtype=torch.float64),
        torch.zeros(2, dtype=torch.bool),
        torch.zeros(2, dtype=torch.long),
    )
    kw = dict(num_classes=2, stat_sum=True, momentum=0.1, argmax_categories=True)
    with caplog.at_level(logging.WARNING, logger="icnn_compress"):
        got = fold(True, *args, **kw)
        again = fold(True, *args, **kw)
    want = _loss._fold_maps(*args, **kw)
    assert fold.failed
    assert sum("no compiler here" in r.getMessage() for r in caplog.records) == 1
    for a, b, c in zip(got, again, want, strict=True):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, c)


def test_fuse_option_is_validated():
    from icnn_compress.errors import ICNNError

    with pytest.raises(ICNNError, match=r"'fuse' option .* one of"):
        attach_icnn(small_net(), ["2"], num_classes=4, fuse="yes")
