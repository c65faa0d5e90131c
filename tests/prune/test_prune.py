"""Pruning engine: planted duplicates, targets on torchvision models, exact indices, save/load."""

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from icnn_compress import ConfigError, models
from icnn_compress.prune import (
    Target,
    TargetError,
    list_criteria,
    load_pruned,
    make_importance,
    prune_filters,
    prune_model,
    save_pruned,
)

from ._reload import save_and_reload_resnet_cifar8

TWINS = {8: 0, 9: 1, 10: 2, 11: 3}  # copy -> original, in layer "3" (16 filters)


def planted_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 12, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 5),
    )
    conv = model[3]
    with torch.no_grad():
        conv.bias.abs_().add_(0.1)  # no dead filter: only the copies are redundant
        for copy_, orig in TWINS.items():
            conv.weight[orig] *= 3.0  # originals (and so their copies) have the largest norms
            conv.bias[orig] = conv.bias[orig].abs()
            conv.weight[copy_] = conv.weight[orig]
            conv.bias[copy_] = conv.bias[orig]
    return model


def probe(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.rand(n, 3, 16, 16, generator=g), torch.randint(0, 5, (n,), generator=g))
    return DataLoader(ds, batch_size=16)


def group_scores(model, criterion, data):
    imp = make_importance(criterion)
    if hasattr(imp, "refresh"):
        imp.refresh(model, data)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.rand(1, 3, 16, 16))
    group = graph.get_pruning_group(model[3], tp.prune_conv_out_channels, idxs=list(range(16)))
    return imp(group)


def lowest_four(scores):
    return set(scores.argsort()[:4].tolist())


def one_per_twin_pair(chosen) -> bool:
    return all((c in chosen) != (o in chosen) for c, o in TWINS.items()) and chosen <= set(TWINS) | set(
        TWINS.values()
    )


def test_icnn_cluster_singles_out_the_copies_and_l1_does_not():
    model, data = planted_model(), probe()
    chosen = lowest_four(group_scores(model, "icnn-cluster", data))
    assert one_per_twin_pair(chosen), chosen
    assert not one_per_twin_pair(lowest_four(group_scores(model, "l1", data)))


def test_icnn_cluster_cost_is_what_the_kept_channels_cannot_reconstruct():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 6, generator=g, dtype=torch.float64)
    a[:, 5] = a[:, 0] + 0.5 * a[:, 1]  # a linear combination, not a copy: no cluster can see it
    a[:, 4] = 3.0 * a[:, 2]  # a scaled twin
    w2 = torch.ones(6, dtype=torch.float64)
    from icnn_compress.prune._criteria import ClusterRedundancyImportance

    scores = ClusterRedundancyImportance._score(a, w2, labels=None)
    first_two = set(scores.argsort()[:2].tolist())
    assert len(first_two & {0, 1, 5}) == 1 and len(first_two & {2, 4}) == 1, scores
    # once one of each redundant set is gone, the rest cannot be reconstructed: they cost ~1 or more
    assert scores.sort().values[2] > 0.5 and scores.sort().values[1] < 1e-3, scores


def test_removing_copies_with_compensation_keeps_outputs():
    model, data = planted_model(), probe()
    x = torch.rand(8, 3, 16, 16)
    model.eval()
    with torch.no_grad():  # pruning works under no_grad too (the graph is traced with grad enabled)
        before = model(x)
        res = prune_filters(model, torch.rand(1, 3, 16, 16), "3", sorted(TWINS), compensate=True, data=data)
        after = res.model(x)
    assert res.model[3].out_channels == 12 and res.compensated_layers == 1
    rel = float((after - before).norm() / before.norm())
    assert rel < 1e-4, rel
    plain = prune_filters(planted_model().eval(), torch.rand(1, 3, 16, 16), "3", sorted(TWINS))
    with torch.no_grad():
        assert float((plain.model(x) - before).norm() / before.norm()) > 1e-2  # compensation is what did it


@pytest.mark.parametrize(
    ("arch", "size", "step_ratio", "goal"),
    [
        # small steps; 0.05 on vgg16_bn: at 0.01 its 427 steps re-score the 25088-wide classifier (130 s)
        ("vgg16_bn", 32, 0.05, 2.0),
        ("resnet18", 32, 0.01, 2.0),
        ("mobilenet_v2", 32, 0.01, 2.0),
        ("vgg16_bn", 32, 0.1, 3.0),  # large steps: the last ones are shortened to land on the target
        ("resnet18", 32, 0.1, 4.0),
    ],
)
def test_macs_targets_met_within_3_percent(arch, size, step_ratio, goal):
    model = models.create(arch, num_classes=10, in_channels=3, small_input=True)
    x = torch.rand(1, 3, size, size)
    res = prune_model(
        model,
        x,
        criterion="l1",
        target=Target(macs_reduction=goal),
        step_ratio=step_ratio,
        round_to=None,  # free widths: the target is met to a few channels
        progress=False,
    )
    assert goal <= res.macs_reduction <= goal * 1.03, res.macs_reduction
    out = res.model(torch.rand(2, 3, size, size))
    assert out.shape == (2, 10)
    out.sum().backward()
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [
        m.out_channels for m in models.create(arch, small_input=True).modules() if isinstance(m, nn.Conv2d)
    ]  # the original model is untouched
    assert res.removed and all(len(v) == len(set(v)) for v in res.removed.values())


@pytest.mark.parametrize(("arch", "goal"), [("resnet18", 2.0), ("mobilenet_v2", 2.0), ("vgg16_bn", 3.0)])
def test_default_widths_are_multiples_of_8_and_land_just_past_the_target(arch, goal):
    model = models.create(arch, num_classes=10, in_channels=3, small_input=True)
    res = prune_model(
        model, torch.rand(1, 3, 32, 32), criterion="l1", target=goal, step_ratio=0.05, progress=False
    )
    # whole groups of 8 channels: never short of the target, at most ~11% past it (resnet18 2.22x)
    assert goal <= res.macs_reduction <= goal * 1.13, res.macs_reduction
    before = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    after = {n: m.out_channels for n, m in res.model.named_modules() if isinstance(m, nn.Conv2d)}
    changed = [n for n in before if after[n] != before[n]]
    assert changed and all(after[n] % 8 == 0 for n in changed), {n: after[n] for n in changed}


@pytest.mark.parametrize("goal", [1.2, 1.3, 1.5])
def test_a_step_that_would_jump_past_the_target_stops_at_the_group_that_reaches_it(goal):
    # six 32-wide convs with round_to=8: the first full step takes every layer to 24 channels at
    # once (1.76x), whatever the target below that
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 32, 3, padding=1), nn.ReLU()]
    for _ in range(5):
        layers += [nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4)).eval()
    res = prune_model(
        model, torch.rand(1, 3, 16, 16), criterion="l2", target=goal, round_to=8, progress=False
    )
    assert goal <= res.macs_reduction <= goal * 1.12, res.macs_reduction
    widths = [m.out_channels for m in res.model if isinstance(m, nn.Conv2d)]
    assert 32 in widths and 24 in widths, widths  # some groups cut by a whole block of 8, not all


def test_params_target_and_round_to():
    model = models.create("vgg_small", num_classes=10, in_channels=1)
    res = prune_model(
        model,
        torch.rand(1, 1, 28, 28),
        criterion="fpgm",
        target=Target(params_reduction=1.5),
        round_to=8,
        progress=False,
    )
    assert res.params_reduction >= 1.5
    widths = [m.out_channels for m in res.model.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths), widths


@pytest.mark.parametrize("criterion", sorted(set(list_criteria())))
@pytest.mark.parametrize("compensate", [False, True])
def test_every_criterion_prunes_resnet_with_and_without_compensation(criterion, compensate):
    model = models.create("resnet_cifar8", num_classes=5, in_channels=3)
    data = probe(32)
    res = prune_model(
        model,
        torch.rand(1, 3, 16, 16),
        criterion=criterion,
        target=1.5,
        data=data,
        compensate=compensate,
        step_ratio=0.05,
        probe_batches=2,
        progress=False,
    )
    assert res.macs_reduction >= 1.5
    assert torch.isfinite(res.model(torch.rand(2, 3, 16, 16))).all()


def test_impossible_target_and_bad_arguments():
    model = models.create("resnet_cifar8", num_classes=5)
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(TargetError, match="cannot be met"):
        prune_model(model, x, target=50.0, max_layer_ratio=0.5, step_ratio=0.1, progress=False)
    with pytest.raises(ConfigError, match="must be a float > 1"):
        Target(macs_reduction=0.5)
    with pytest.raises(ConfigError, match="exactly one of"):
        Target(macs_reduction=2.0, params_reduction=2.0)
    with pytest.raises(ConfigError, match="'icnn-cluster' needs data="):
        prune_model(model, x, criterion="icnn-cluster", progress=False)
    with pytest.raises(ConfigError, match="Did you mean 'fpgm'"):
        prune_model(model, x, criterion="fgpm", progress=False)
    with pytest.raises(ConfigError, match="type BatchNorm1d, but the model has no such module"):
        prune_model(model, x, ignored_layers=[nn.BatchNorm1d], progress=False)
    with pytest.raises(ConfigError, match="leaves no conv or linear layer"):
        prune_model(model, x, ignored_layers=[nn.Conv2d, nn.Linear], progress=False)


def test_ignored_layer_types_are_expanded():
    model = models.create("resnet_cifar8", num_classes=5)
    res = prune_model(
        model, torch.rand(1, 3, 16, 16), target=1.3, ignored_layers=["layer1.0.conv1"], progress=False
    )
    assert res.model.layer1[0].conv1.out_channels == model.layer1[0].conv1.out_channels


@pytest.mark.parametrize(
    ("indices", "match"),
    [
        ([], "is empty"),
        ([1, 1], r"duplicates: \[1\]"),
        ([0, 16], r"indices \[16\] are out of range for '3' with 16 channels"),
        ([-1], "out of range"),
        (list(range(16)), "would remove all 16 channels"),
        ([0.5], "must be integers"),
    ],
)
def test_prune_filters_validates_indices(indices, match):
    with pytest.raises(ConfigError, match=match):
        prune_filters(planted_model(), torch.rand(1, 3, 16, 16), "3", indices)


def test_prune_filters_layer_errors():
    with pytest.raises(ConfigError, match="no module named 'nope'"):
        prune_filters(planted_model(), torch.rand(1, 3, 16, 16), "nope", [0])
    with pytest.raises(ConfigError, match="needs a Conv2d layer; '4' is a ReLU"):
        prune_filters(planted_model(), torch.rand(1, 3, 16, 16), "4", [0])


def test_save_load_is_exact(tmp_path):
    model = models.create("resnet_cifar8", num_classes=5, in_channels=1)
    res = prune_model(model, torch.rand(1, 1, 16, 16), criterion="l2", target=2.0, progress=False)
    path = tmp_path / "pruned.pt"
    loaded, meta = save_and_reload_resnet_cifar8(res, path, metadata={"criterion": "l2"})
    record = torch.load(path, weights_only=True)  # plain tensors and strings only
    assert record["format"].startswith("icnn-compress-pruned")
    x = torch.rand(3, 1, 16, 16)
    res.model.eval()
    loaded.eval()
    assert torch.equal(loaded(x), res.model(x))
    assert meta == {"criterion": "l2"}


def test_save_load_with_frozen_icnn_masks(tmp_path):
    from icnn_compress import attach_icnn

    model = models.create("vgg_small", num_classes=4, in_channels=1)
    opts = {"beta": 2.0}
    handle = attach_icnn(model, "features.23", 4, **opts)
    handle.freeze()
    res = prune_model(model, torch.rand(1, 1, 28, 28), target=1.5, progress=False)
    path = tmp_path / "p.pt"
    save_pruned(
        res.model,
        path,
        arch="vgg_small",
        arch_kwargs={"num_classes": 4, "in_channels": 1},
        history=res.history,
        input_shape=(1, 28, 28),
        icnn={"layers": ["features.23"], "num_classes": 4, "options": opts},
    )
    loaded, _ = load_pruned(path)
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(loaded.eval()(x), res.model.eval()(x))


class _WithScale(torch.nn.Module):
    """A conv net with a non-persistent buffer: saved weights do not restore it."""

    def __init__(self, num_classes: int = 3, in_channels: int = 1, small_input=None):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, 16, 3)
        self.head = torch.nn.Linear(16, num_classes)
        self.register_buffer("scale", torch.full((1,), 2.0), persistent=False)

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)) * self.scale)


def test_reload_builds_the_full_size_model_without_memory_when_it_is_safe(tmp_path, monkeypatch):
    """The unpruned architecture is built on the meta device; with a non-persistent buffer (which
    the saved weights do not hold) it is built in memory, and both reloads are exact."""
    from icnn_compress.models._registry import _MODELS
    from icnn_compress.prune import _io

    devices = []
    real = _io._rebuild
    monkeypatch.setattr(
        _io, "_rebuild", lambda record, device: devices.append(device.type) or real(record, device)
    )
    monkeypatch.setitem(_MODELS._items, "with_scale", _WithScale)
    x = torch.rand(2, 1, 12, 12)
    for arch, expected in (("vgg_small", ["meta"]), ("with_scale", ["meta", "cpu"])):
        devices.clear()
        model = models.create(arch, num_classes=3, in_channels=1).eval()
        res = prune_model(model, torch.rand(1, 1, 12, 12), target=1.5, round_to=None, progress=False)
        path = tmp_path / f"{arch}.pt"
        kwargs = {"num_classes": 3, "in_channels": 1}
        save_pruned(
            res.model, path, arch=arch, arch_kwargs=kwargs, history=res.history, input_shape=(1, 12, 12)
        )
        loaded, _ = load_pruned(path)
        assert devices == expected
        assert all(not t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x), res.model.eval()(x))


def test_a_removed_copy_is_absorbed_by_its_original():
    model, data = planted_model(), probe()
    res = prune_model(
        model,
        torch.rand(1, 3, 16, 16),
        criterion="icnn-cluster",
        target=1.3,
        data=data,
        compensate=True,
        step_ratio=0.25,
        round_to=None,  # the planted twins are single channels
        progress=False,
    )
    absorbed = res.absorbed["3"]
    twins = {**TWINS, **{o: c for c, o in TWINS.items()}}
    for r in res.removed["3"]:
        (kept, coef), *_ = absorbed[r]  # the largest coefficient first
        assert kept == twins[r] and abs(coef - 1.0) < 0.01, (r, absorbed[r])
    assert res.absorbed_json()["3"][str(res.removed["3"][0])][0][0] == twins[res.removed["3"][0]]


def test_criteria_declare_their_needs_and_refuse_unknown_options():
    from icnn_compress.prune import criterion_spec, register_criterion

    assert criterion_spec("taylor").needs_gradients and criterion_spec("icnn-cluster").needs_data
    assert not criterion_spec("l1").needs_data and criterion_spec("random").options == ("seed",)
    with pytest.raises(ConfigError, match=r"'l2' has no option 'seed'; its options: none"):
        make_importance("l2", seed=1)
    with pytest.raises(ConfigError, match=r"distance_treshold.*distance_threshold"):
        make_importance("icnn-cluster", distance_treshold=0.3)  # a typo is an error, not ignored
    calls = []

    @register_criterion("test-needs-data", needs_data=True)
    def _factory(scale: float = 1.0):
        calls.append(scale)
        return tp.importance.GroupMagnitudeImportance(p=1)

    model = planted_model()
    with pytest.raises(ConfigError, match="needs data"):
        prune_model(model, torch.rand(1, 3, 16, 16), criterion="test-needs-data", target=1.2, progress=False)
    res = prune_model(
        model,
        torch.rand(1, 3, 16, 16),
        criterion="test-needs-data",
        target=1.2,
        data=probe(),
        criterion_options={"scale": 2.0},
        progress=False,
    )
    assert calls == [2.0] and res.macs_reduction >= 1.2


def test_a_linear_over_a_flattened_map_is_compensated_per_channel():
    # channel 5 is an exact copy of channel 1: removing it with compensation changes nothing, and the
    # fit is over 8 channels (positions as rows), not the 128 flattened features
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 5)
    ).eval()
    model[0].weight.data[5] = model[0].weight.data[1]
    model[0].bias.data[5] = model[0].bias.data[1]
    data = [(torch.rand(16, 3, 16, 16), torch.zeros(16, dtype=torch.long)) for _ in range(4)]
    x = torch.rand(8, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
    res = prune_filters(model, torch.rand(1, 3, 16, 16), "0", [5], compensate=True, data=data, inplace=False)
    assert res.model[4].in_features == 112 and res.compensated_layers == 1
    with torch.no_grad():
        assert torch.allclose(res.model(x), before, atol=1e-4)
    assert res.absorbed["0"][5][0][0] == 1 and abs(res.absorbed["0"][5][0][1] - 1.0) < 0.01


def test_icnn_cluster_on_a_flattened_classifier_with_a_hidden_linear_layer():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(256, 64),
        nn.ReLU(),
        nn.Linear(64, 5),
    )
    data = [(torch.rand(16, 3, 16, 16), torch.randint(0, 5, (16,))) for _ in range(4)]
    res = prune_model(
        model,
        torch.rand(1, 3, 16, 16),
        criterion="icnn-cluster",
        target=1.5,
        data=data,
        compensate=True,
        round_to=None,
        step_ratio=0.1,
        progress=False,
    )
    assert res.macs_reduction >= 1.5
    # the conv lost filters, scored per channel through the flattened Linear
    assert res.model[0].out_channels < 16 and res.model[5].in_features == 16 * res.model[0].out_channels
    assert res.model(torch.rand(2, 3, 16, 16)).shape == (2, 5)


def test_a_model_torch_pruning_cannot_trace_is_refused_in_one_line():
    import torchvision

    from icnn_compress.prune import UnsupportedModelError

    model = torchvision.models.shufflenet_v2_x0_5(num_classes=3)  # its channel shuffle defeats the tracer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        UnsupportedModelError, match=r"cannot trace the channel dependencies .* after layer '"
    ):
        prune_model(model, torch.rand(1, 3, 32, 32), target=1.5, progress=False, inplace=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_icnn_cluster_prunes_a_model_with_squeeze_excitation_blocks():
    """The convs after a pooling to 1x1 (squeeze-excitation) have no receptive field: their groups
    are ranked without clusters instead of failing (EfficientNet, MobileNet v3, in the zoo)."""
    from torchvision.ops import SqueezeExcitation

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        SqueezeExcitation(16, 8),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(8, 3, 16, 16, generator=g), torch.arange(8) % 4) for _ in range(2)]
    res = prune_model(
        model,
        torch.rand(1, 3, 16, 16),
        criterion="icnn-cluster",
        target=1.5,
        data=data,
        compensate=True,
        progress=False,
    )
    assert res.macs_reduction >= 1.5
    assert res.model(torch.rand(2, 3, 16, 16)).shape == (2, 4)


def test_approach_steps_count_macs_in_full_only_near_the_target(monkeypatch):
    """The layers' own counts skip the full count while the target is out of reach; the channels
    removed and the MACs reached are those of a full count after every group."""
    import icnn_compress.prune._engine as engine

    calls = []
    real = engine._stats
    monkeypatch.setattr(engine, "_stats", lambda *a: calls.append(1) or real(*a))

    def run(margin):
        monkeypatch.setattr(engine._TargetCheck, "MARGIN", margin)
        calls.clear()
        torch.manual_seed(0)
        model = models.create("resnet_cifar8", num_classes=5, in_channels=3)
        res = prune_model(
            model, torch.rand(1, 3, 16, 16), target=2.0, round_to=None, step_ratio=0.2, progress=False
        )
        return res, len(calls)

    (full, n_full), (quick, n_quick) = run(0.0), run(0.98)
    assert quick.removed == full.removed and quick.macs_after == full.macs_after
    assert n_quick < n_full, (n_quick, n_full)
