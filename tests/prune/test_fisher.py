"""The `fisher` criterion: per image, the squared first-order loss change of zeroing a channel,
summed over images (with keep_classes: tests/prune/test_keep_classes.py)."""

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from icnn_compress.prune import criterion_spec, make_importance


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Flatten(),  # a linear that reads 5 x 4 x 4 features: each channel is 16 of its inputs
        nn.Linear(80, 3),
    ).eval()


def gated_scores(model: nn.Module, x, y, after: int, channels: int):
    """The reference: a gate of ones multiplies module ``after``'s output channels; per image the
    gradient of its own loss by the gate, squared, summed over the images."""
    gate = torch.ones(channels, requires_grad=True)
    handle = model[after].register_forward_hook(lambda m, i, out: out * gate.view(1, -1, 1, 1))
    total = torch.zeros(channels, dtype=torch.float64)
    try:
        for n in range(len(x)):
            loss = nn.functional.cross_entropy(model(x[n : n + 1]), y[n : n + 1])
            (g,) = torch.autograd.grad(loss, gate)
            total += g.double() ** 2
    finally:
        handle.remove()
    return total


@pytest.mark.parametrize("root, after", [(0, 3), (4, 6)])
def test_scores_are_the_per_image_squared_loss_change_of_zeroing_a_channel(root, after):
    """Read at the next conv's input (after pooling) or the linear's (each channel spread over 16
    features), the score of every channel equals the gated reference."""
    model = small_net()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 3, 8, 8, generator=g), torch.randint(0, 3, (12,), generator=g)
    importance = make_importance("fisher", probe_batches=3)
    importance.refresh(model, DataLoader(TensorDataset(x, y), batch_size=4))
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.rand(1, 3, 8, 8))
    conv = model[root]
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
    expected = gated_scores(model, x, y, after, conv.out_channels)
    torch.testing.assert_close(importance(group).double(), expected, rtol=1e-4, atol=1e-9)


def test_only_probe_batches_are_read():
    model = small_net()
    x, y = torch.randn(12, 3, 8, 8), torch.randint(0, 3, (12,))
    importance = make_importance("fisher", probe_batches=2)
    importance.refresh(model, DataLoader(TensorDataset(x, y), batch_size=4))
    assert {len(t) for t in importance.terms.values()} == {8}


def test_registered_as_reading_labels():
    spec = criterion_spec("fisher")
    assert spec.needs_data and spec.needs_labels and not spec.needs_gradients
    assert "probe_batches" in spec.options


def reconstructed_scores(model: nn.Module, x, y, after: int, channels: int):
    """The reference of ``residual=True``: each channel of module ``after``'s output is moved by a
    gate ``t`` towards its least-squares reconstruction from the other channels (with intercept,
    fitted over every position of ``x``); per image the gradient of its loss by ``t``, squared,
    summed over the images."""
    with torch.no_grad():
        acts = []
        handle = model[after].register_forward_hook(lambda m, i, out: acts.append(out))
        model(x)
        handle.remove()
        rows = acts[0].movedim(1, -1).reshape(-1, channels).double()
    total = torch.zeros(channels, dtype=torch.float64)
    for c in range(channels):
        others = torch.cat([rows[:, [j for j in range(channels) if j != c]], torch.ones(len(rows), 1)], 1)
        coef = torch.linalg.lstsq(others, rows[:, c : c + 1]).solution
        recon = (others @ coef).float().reshape(*acts[0].movedim(1, -1).shape[:-1])
        for n in range(len(x)):
            t = torch.zeros((), requires_grad=True)

            def move(m, i, out, c=c, n=n, t=t, recon=recon):
                out = out.clone()
                out[:, c] = out[:, c] + t * (recon[n : n + 1] - out[:, c])
                return out

            handle = model[after].register_forward_hook(move)
            try:
                loss = nn.functional.cross_entropy(model(x[n : n + 1]), y[n : n + 1])
                (g,) = torch.autograd.grad(loss, t)
                total[c] += g.double() ** 2
            finally:
                handle.remove()
    return total


def test_residual_scores_are_the_loss_change_left_after_compensation():
    """residual=True: a channel's score is the per-image squared loss change of replacing it by
    what the other channels reconstruct of it (what compensation folds in), not of zeroing it."""
    model = small_net()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 3, 8, 8, generator=g), torch.randint(0, 3, (12,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.rand(1, 3, 8, 8))
    conv = model[0]
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
    residual = make_importance("fisher", probe_batches=3, residual=True, ridge=1e-9, eliminate=False)
    residual.refresh(model, loader)
    expected = reconstructed_scores(model, x, y, 3, conv.out_channels)
    torch.testing.assert_close(residual(group).double(), expected, rtol=1e-3, atol=1e-9)
    plain = make_importance("fisher", probe_batches=3)
    plain.refresh(model, loader)
    assert not torch.allclose(plain(group), residual(group), rtol=0.05)  # a different ranking input


def test_residual_scores_a_flattened_map_plainly():
    """A linear reading a flattened map loses whole channels: scored as plain Fisher."""
    model = small_net()
    x, y = torch.randn(12, 3, 8, 8), torch.randint(0, 3, (12,))
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.rand(1, 3, 8, 8))
    conv = model[4]
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
    expected = gated_scores(model, x, y, 6, conv.out_channels)
    residual = make_importance("fisher", probe_batches=3, residual=True)
    residual.refresh(model, DataLoader(TensorDataset(x, y), batch_size=4))
    torch.testing.assert_close(residual(group).double(), expected, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize(("compensate", "options", "residual"), [
    (True, None, True), (False, None, False), (True, {"residual": False}, False),
])  # fmt: skip
def test_prune_model_scores_residuals_when_it_compensates(compensate, options, residual):
    from icnn_compress.prune._engine import _importance

    importance = _importance(criterion_spec("fisher"), "fisher", 4, options, compensate, 1e-3)
    assert importance.residual is residual and importance.ridge == 1e-3 and importance.probe_batches == 4


@pytest.mark.parametrize(("options", "match"), [
    ({"residual": "yes"}, r"criterion 'fisher': residual must be true or false. Got 'yes'."),
    ({"ridge": 0.0}, r"criterion 'fisher': ridge must be a number > 0. Got 0.0."),
    ({"eliminate": 1}, r"criterion 'fisher': eliminate must be true or false. Got 1."),
    ({"probe_batches": 0}, r"criterion 'fisher': probe_batches must be an int >= 1. Got 0."),
    ({"probe_batches": 2.5}, r"criterion 'fisher': probe_batches must be an int >= 1. Got 2.5."),
])  # fmt: skip
def test_refuses_bad_residual_options(options, match):
    from icnn_compress.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        make_importance("fisher", **options)


class _Stream(nn.Module):
    """A residual stream (conv ``a`` + block output, read by ``b`` and ``d``) and an inner conv
    ``b`` read by ``c`` alone."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = (
            nn.Conv2d(3, 6, 3, padding=1),
            nn.Conv2d(6, 5, 3, padding=1),
            nn.Conv2d(5, 6, 1),
        )
        self.d, self.head = nn.Conv2d(6, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.a(x))
        x = torch.relu(x + self.c(torch.relu(self.b(x))))
        return self.head(torch.relu(self.d(x)).mean((2, 3)))


def test_residual_streams_are_scored_plainly():
    """A channel that several layers read is carried on by the identity path, which compensation
    does not rebuild: its score stays plain Fisher; a channel one layer reads gets the residual."""
    model = _Stream().eval()
    x, y = torch.randn(12, 3, 8, 8), torch.randint(0, 3, (12,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.rand(1, 3, 8, 8))
    plain, residual = make_importance("fisher"), make_importance("fisher", residual=True)
    plain.refresh(model, loader)
    residual.refresh(model, loader)
    stream = graph.get_pruning_group(model.a, tp.prune_conv_out_channels, idxs=list(range(6)))
    inner = graph.get_pruning_group(model.b, tp.prune_conv_out_channels, idxs=list(range(5)))
    torch.testing.assert_close(residual(stream), plain(stream))
    assert not torch.allclose(residual(inner), plain(inner), rtol=0.05)


def eliminated_scores(model: nn.Module, x, y, after: int, channels: int, ridge: float):
    """The reference of ``eliminate=True``: greedy backward elimination with every residual fitted
    afresh (an explicit inverse of the kept channels' covariance, the ridge of the full one), its
    loss change summed image by image; returns the costs at removal, in the order of removal."""
    acts = []
    handle = model[after].register_forward_hook(lambda m, i, out: acts.append(out))
    maps = []
    try:
        for n in range(len(x)):
            acts.clear()
            loss = nn.functional.cross_entropy(model(x[n : n + 1]), y[n : n + 1])
            (g,) = torch.autograd.grad(loss, acts[0])
            maps.append((acts[0].detach().double()[0], g.double()[0]))  # (C, H, W) each
    finally:
        handle.remove()
    rows = torch.cat([a.reshape(channels, -1).t() for a, _ in maps])
    mean = rows.mean(0)
    cov = torch.cov(rows.t(), correction=0)
    cov += ridge * cov.diagonal().mean() * torch.eye(channels, dtype=torch.float64)
    alive, order, costs = list(range(channels)), [], []
    while alive:
        prec = torch.linalg.inv(cov[alive][:, alive])
        cost = []
        for k, c in enumerate(alive):
            w = prec[:, k] / prec[k, k]
            total = 0.0
            for a, g in maps:
                centred = a[alive] - mean[alive].view(-1, 1, 1)
                residual = torch.einsum("jhw,j->hw", centred, w)
                total += float((residual * g[c]).sum()) ** 2
            cost.append(total)
        k = min(range(len(alive)), key=cost.__getitem__)
        order.append(alive.pop(k))
        costs.append(cost[k])
    return order, costs


def test_eliminated_scores_refit_the_residuals_on_the_channels_kept():
    """eliminate=True: channels go in the order of a greedy elimination whose residuals are re-fitted
    on the channels still kept; scores are the running maximum of the costs at removal."""
    model = small_net()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 3, 8, 8, generator=g), torch.randint(0, 3, (12,), generator=g)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.rand(1, 3, 8, 8))
    conv = model[0]
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
    importance = make_importance("fisher", probe_batches=3, residual=True, ridge=1e-3)
    importance.refresh(model, DataLoader(TensorDataset(x, y), batch_size=4))
    scores = importance(group).double()
    order, costs = eliminated_scores(model, x, y, 3, conv.out_channels, 1e-3)
    assert torch.argsort(scores).tolist() == order
    running = torch.tensor(costs, dtype=torch.float64).cummax(0).values
    torch.testing.assert_close(scores[order], running, rtol=1e-3, atol=1e-9)


def test_a_step_bound_ranks_only_the_channels_a_step_removes():
    """With a bound of k removals the k lowest scores are the full elimination's; the channels
    left score above every one of them."""
    from icnn_compress.prune._fisher import eliminate

    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 7, 5, generator=g)  # 40 images, 7 channels, 5 positions
    grad = torch.randn(40, 7, 5, generator=g)
    centred = x - x.mean((0, 2)).view(1, -1, 1)
    cross = torch.einsum("njp,ncp->njc", centred, grad)
    rows = x.movedim(1, -1).reshape(-1, 7).double()
    precision = torch.linalg.inv(torch.cov(rows.t(), correction=0) + 1e-3 * torch.eye(7, dtype=torch.float64))
    candidates = [6, 0, 2, 5, 1, 3, 4]
    full = eliminate(cross, precision, candidates)
    bounded = eliminate(cross, precision, candidates, bound=3)
    lowest = torch.argsort(full)[:3]
    torch.testing.assert_close(bounded[lowest], full[lowest])
    rest = [i for i in range(7) if i not in lowest.tolist()]
    assert bool((bounded[rest] > bounded[lowest].max()).all())
    assert len(set(full.tolist())) == 7  # strictly increasing in the order of removal


def test_elimination_does_not_score_both_twins_as_rebuildable():
    """Two identical channels rebuild each other: leave-one-out residuals score both near zero;
    the elimination removes one at that cost and then finds the other expensive."""
    model = small_net()
    with torch.no_grad():
        model[0].weight[1] = model[0].weight[0]
        model[0].bias[1] = model[0].bias[0]
        model[1].weight[1], model[1].bias[1] = model[1].weight[0], model[1].bias[0]
        model[1].running_mean[1], model[1].running_var[1] = model[1].running_mean[0], model[1].running_var[0]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 3, 8, 8, generator=g), torch.randint(0, 3, (12,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.rand(1, 3, 8, 8))
    group = graph.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=list(range(6)))
    scores = {}
    for eliminate in (False, True):
        importance = make_importance("fisher", probe_batches=3, residual=True, eliminate=eliminate)
        importance.refresh(model, loader)
        scores[eliminate] = importance(group).double()
    loo, elim = scores[False], scores[True]
    assert max(loo[0], loo[1]) < 1e-3 * loo.median()
    assert min(elim[0], elim[1]) < 1e-3 * elim.median()
    assert max(elim[0], elim[1]) > 1e-2 * elim.median()


def test_cross_terms_past_the_memory_budget_fall_back_to_leave_one_out(monkeypatch):
    from icnn_compress.prune import _fisher

    model = small_net()
    x, y = torch.randn(12, 3, 8, 8), torch.randint(0, 3, (12,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.rand(1, 3, 8, 8))
    group = graph.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=list(range(6)))
    loo = make_importance("fisher", probe_batches=3, residual=True, eliminate=False)
    loo.refresh(model, loader)
    monkeypatch.setattr(_fisher, "ELIMINATION_MAX_BYTES", 4 * 12 * 6 * 6 - 1)  # one byte short
    short = make_importance("fisher", probe_batches=3, residual=True)
    short.refresh(model, loader)
    assert not short.cross
    torch.testing.assert_close(short(group), loo(group))
    monkeypatch.setattr(_fisher, "ELIMINATION_MAX_BYTES", 4 * 12 * 6 * 6)
    enough = make_importance("fisher", probe_batches=3, residual=True)
    enough.refresh(model, loader)
    assert [m for m in enough.cross] == [model[4]]


def test_leave_one_out_terms_from_the_cross_terms_equal_the_direct_ones():
    """With cross terms the leave-one-out terms are read off them: the same numbers as the 1x1
    channel mix of the centred input computes without them."""
    model = small_net()
    x, y = torch.randn(12, 3, 8, 8), torch.randint(0, 3, (12,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    direct = make_importance("fisher", probe_batches=3, residual=True, eliminate=False)
    crossed = make_importance("fisher", probe_batches=3, residual=True)
    direct.refresh(model, loader)
    crossed.refresh(model, loader)
    assert model[4] in crossed.cross and model[4] not in direct.cross
    torch.testing.assert_close(
        crossed.residual_terms[model[4]], direct.residual_terms[model[4]], rtol=1e-4, atol=1e-6
    )


def test_residual_refresh_collects_the_rows_compensation_reads(monkeypatch):
    """The residual fits' pass also collects every layer's input rows, the same rows as
    collect_layer_inputs, and prune_model compensates from them without another pass."""
    from icnn_compress.prune import Target, _engine, prune_model
    from icnn_compress.prune._probe import collect_layer_inputs

    model = small_net()
    g = torch.Generator().manual_seed(2)
    batches = [
        (torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)
    ]
    importance = make_importance("fisher", probe_batches=3, residual=True)
    importance.refresh(model, batches)
    readers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    expected = collect_layer_inputs(model, batches, readers, max_batches=3)
    assert importance.inputs.keys() == expected.keys()
    for m, rows in expected.items():
        assert torch.equal(importance.inputs[m], rows)

    def no_second_pass(*args, **kwargs):
        raise AssertionError("compensation collected the probe inputs again")

    monkeypatch.setattr(_engine, "collect_layer_inputs", no_second_pass)
    result = prune_model(
        model, torch.rand(1, 3, 8, 8), criterion="fisher", target=Target(macs_reduction=1.3),
        data=batches, compensate=True, probe_batches=3, round_to=None, progress=False,
    )  # fmt: skip
    assert result.compensated_layers > 0 and result.macs_reduction >= 1.3
