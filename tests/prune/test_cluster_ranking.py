"""icnn-cluster's ranking, made cheap without changing what it removes: the backward elimination
against a brute-force reference, early stopping where a step cannot reach further, the location
distances against their direct formula, and one trace of the model for all its maps."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import icnn_compress.prune._engine as engine
from icnn_compress import models
from icnn_compress.analysis import filter_distances, layer_maps_points
from icnn_compress.prune import prune_model
from icnn_compress.prune._criteria import ClusterRedundancyImportance

from .test_cluster_options import resnet_and_probe

score = ClusterRedundancyImportance._score


def brute_force_order(a: torch.Tensor, w2: torch.Tensor, ridge: float = 1e-5) -> list[int]:
    """Backward elimination by definition: refit every remaining channel on the others each time."""
    a = a - a.mean(0)
    cov = a.t() @ a / a.shape[0]
    cov += ridge * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    left, order = list(range(w2.numel())), []
    while left:
        prec = torch.linalg.inv(cov[left][:, left])
        cost = w2[left] / prec.diagonal()
        order.append(left.pop(int(cost.argmin())))
    return order


def redundant_inputs(n: int, rows: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, n)`` inputs where the second half are noisy scaled copies of the first, and weights."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, n - n // 2, generator=g, dtype=torch.float64)
    twins = 2 * base[:, : n // 2] + 0.05 * torch.randn(rows, n // 2, generator=g, dtype=torch.float64)
    return torch.cat([base, twins], 1), torch.rand(n, generator=g, dtype=torch.float64) + 0.5


def test_elimination_order_is_the_brute_force_order():
    a, w2 = redundant_inputs(12)
    scores = score(a, w2, labels=None)
    assert scores.argsort().tolist() == brute_force_order(a, w2)


@pytest.mark.parametrize("rows", [10, 40, 200])  # fewer rows than channels: through an r x r matrix
def test_the_precision_is_the_inverse_of_the_ridged_covariance(rows):
    from icnn_compress.prune._criteria import _precision

    g = torch.Generator().manual_seed(rows)
    a = torch.randn(rows, 60, generator=g, dtype=torch.float64) @ torch.randn(60, 60, generator=g).double()
    c = a - a.mean(0)
    cov = c.t() @ c / rows
    cov += 1e-3 * cov.diagonal().mean() * torch.eye(60, dtype=torch.float64)
    want = torch.linalg.inv(cov).numpy()
    diag, column = _precision(a, 1e-3)
    assert abs(diag - want.diagonal()).max() <= 1e-6 * abs(want).max()
    for i in (0, 17, 59):
        assert abs(column(i) - want[:, i]).max() <= 1e-6 * abs(want).max()
    if rows < 60:  # and the elimination it drives is still the elimination by definition
        w2 = torch.rand(60, generator=g, dtype=torch.float64) + 0.5
        assert score(a, w2, labels=None, ridge=1e-3).argsort().tolist() == brute_force_order(a, w2, 1e-3)


@pytest.mark.parametrize("with_labels", [False, True])
def test_stopping_early_keeps_the_lowest_scores(with_labels):
    a, w2 = redundant_inputs(96, rows=600, seed=1)
    labels = torch.arange(96) % 30 if with_labels else None
    full = score(a, w2, labels)
    for bound in (1, 5, 17):
        early = score(a, w2, labels, bound=bound)
        assert torch.equal(early.argsort()[:bound], full.argsort()[:bound]), bound
        assert torch.allclose(early.sort().values[:bound], full.sort().values[:bound])
    if with_labels:  # no cluster loses its last member to a step
        lowest = set(score(a, w2, labels, bound=17).argsort()[:17].tolist())
        assert all(not set(torch.nonzero(labels == cl).flatten().tolist()) <= lowest for cl in range(30))


@pytest.mark.parametrize("pairs", [0, 3, 10])
def test_stopping_early_with_fewer_redundant_channels_than_the_bound(pairs):
    # mostly one-filter clusters (a random-init layer): the elimination stops after ``bound``
    # removals once the few channels that share a cluster are ranked, with the same lowest scores
    a, w2 = redundant_inputs(80, rows=500, seed=2)
    labels = torch.arange(80)
    labels[40 : 40 + pairs] = torch.arange(pairs)  # twin i shares the cluster of channel i
    labels = torch.unique(labels, return_inverse=True)[1]
    full = score(a, w2, labels)
    for bound in (pairs + 1, 12, 30):
        early = score(a, w2, labels, bound=bound)
        assert torch.equal(early.argsort()[:bound], full.argsort()[:bound]), (pairs, bound)
        assert not torch.equal(early, full)  # it did stop early (the rest: current costs)


@pytest.mark.parametrize(
    "name, size",
    [
        ("resnet_cifar8", 16),
        # random init, 32 px: nearly every filter its own cluster, and representatives removed in
        # the same steps as the rest (their order once tied in the float32 scores)
        ("squeezenet1_0", 32),
    ],
)
def test_prune_model_removes_the_same_channels_with_and_without_early_stopping(monkeypatch, name, size):
    def run():
        torch.manual_seed(0)
        model = models.create(name, num_classes=4, in_channels=1).eval()
        g = torch.Generator().manual_seed(0)
        ds = TensorDataset(
            torch.rand(48, 1, size, size, generator=g), torch.randint(0, 4, (48,), generator=g)
        )
        return prune_model(
            model,
            torch.rand(1, 1, size, size),
            criterion="icnn-cluster",
            target=2.0,
            data=DataLoader(ds, batch_size=16),
            compensate=True,
            probe_batches=3,
            step_ratio=0.1,
            round_to=None,
            progress=False,
        )

    bounds: list = []
    real = engine._step_bound

    def spy(*args):
        bound = real(*args)
        return lambda group: bounds.append(bound(group)) or bounds[-1]

    monkeypatch.setattr(engine, "_step_bound", spy)
    early = run()
    assert any(b is not None and b < 8 for b in bounds)  # the early stop did happen
    monkeypatch.setattr(engine, "_step_bound", lambda *args: lambda group: None)
    full = run()
    assert early.removed == full.removed and early.macs_after == full.macs_after


def test_location_distances_match_their_formula():
    g = torch.Generator().manual_seed(0)
    n, c, size = 20, 7, (16, 16)
    value = torch.rand(n, c, generator=g) * (torch.rand(n, c, generator=g) > 0.3)
    xy = torch.rand(n, c, 2, generator=g) * 16
    # the fields filter_distances reads
    sig = SimpleNamespace(
        peak_value=value, peak_xy=xy, category=torch.zeros(c, dtype=torch.long), image_size=size
    )
    got = filter_distances(sig, w_response=0.0, w_location=1.0, location_scale=1.0).double()
    wts = value.double() / value.double().max(0).values
    expected = torch.zeros(c, c, dtype=torch.float64)
    for i in range(c):
        for j in range(c):
            pw = wts[:, i] * wts[:, j]
            d = (xy[:, i].double() - xy[:, j].double()).norm(dim=1)
            expected[i, j] = 0.0 if i == j else float((pw * d).sum() / pw.sum()) / math.hypot(*size)
    assert torch.allclose(got, expected, atol=1e-5)


def test_maps_of_many_convs_cost_one_trace(monkeypatch):
    model = models.create("resnet_cifar8", num_classes=4, in_channels=1)
    traces = []
    real = torch.fx.symbolic_trace
    monkeypatch.setattr(torch.fx, "symbolic_trace", lambda m, *a, **k: traces.append(1) or real(m, *a, **k))
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    points = layer_maps_points(model, convs)
    assert len(traces) == 1
    assert points["conv1"] == "relu" and points["layer1.0.conv1"] == "layer1.0.relu1"


def test_a_residual_stream_is_ranked_by_magnitude_optionally_with_its_clusters_kept():
    import torch_pruning as tp

    from icnn_compress.errors import ConfigError
    from icnn_compress.prune._criteria import consumer_deps

    with pytest.raises(ConfigError, match="stream_ranking"):
        ClusterRedundancyImportance(stream_ranking="l2")
    model, probe = resnet_and_probe()
    imp = ClusterRedundancyImportance(probe_batches=2, stream_ranking="magnitude")
    imp.refresh(model, probe)
    only = ClusterRedundancyImportance(probe_batches=2)  # the default: magnitude alone
    only.refresh(model, probe)
    # magnitude alone means no category option reorders a stream either
    guarded = ClusterRedundancyImportance(probe_batches=2, keep_categories=True, balance_categories=True)
    guarded.refresh(model, probe)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.rand(1, 1, 16, 16))
    streams = [gr for gr in dg.get_all_groups() if len(list(consumer_deps(gr))) > 1]
    assert streams  # resnet_cifar8 has residual streams
    for group in streams:
        got = imp(group)
        l2 = tp.importance.GroupMagnitudeImportance(p=2)(group)
        assert torch.equal(only(group).argsort(stable=True), l2.argsort(stable=True))
        assert torch.equal(guarded(group).argsort(stable=True), l2.argsort(stable=True))
        labels, _ = imp._group_labels(group, len(got))
        reps = set()
        if labels is not None:  # each cluster's strongest member by magnitude is kept last
            for cl in labels.unique():
                members = torch.nonzero(labels == cl).flatten()
                reps.add(int(members[l2[members].argmax()]))
        rest = [i for i in range(len(got)) if i not in reps]
        assert sorted(rest, key=lambda i: float(got[i])) == sorted(rest, key=lambda i: float(l2[i]))
        assert all(float(got[r]) > float(got[rest].max()) for r in reps) if rest and reps else True
    redundancy = ClusterRedundancyImportance(probe_batches=2, stream_ranking="redundancy")
    redundancy.refresh(model, probe)
    assert any(not torch.equal(redundancy(gr).argsort(), imp(gr).argsort()) for gr in streams)


def test_first_step_signatures_are_carried_through_the_channels_still_alive(monkeypatch):
    from icnn_compress.errors import ConfigError
    from icnn_compress.prune import _criteria

    with pytest.raises(ConfigError, match="signatures"):
        ClusterRedundancyImportance(signatures="once")
    model, probe = resnet_and_probe()
    names = {m: n for n, m in model.named_modules()}
    alive = {n: list(range(m.out_channels)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    calls = []
    real = _criteria.conv_signatures
    monkeypatch.setattr(_criteria, "conv_signatures", lambda *a, **k: calls.append(1) or real(*a, **k))
    imp = ClusterRedundancyImportance(probe_batches=2, signatures="first-step")
    imp.bind(names, alive)
    imp.refresh(model, probe)
    conv = model.get_submodule("layer1.0.conv1")
    first_labels, first_cats = imp.cluster_labels(conv).clone(), imp.categories[conv].clone()
    # the engine renumbers the survivors after a step; a permutation of the same width stands in
    alive["layer1.0.conv1"] = alive["layer1.0.conv1"][::-1]
    imp.refresh(model, probe)
    assert len(calls) == 1  # later steps read only the consumers' inputs
    flipped = torch.arange(conv.out_channels - 1, -1, -1)
    assert torch.equal(imp.cluster_labels(conv), first_labels[flipped])
    assert torch.equal(imp.categories[conv], first_cats[flipped])
    every = ClusterRedundancyImportance(probe_batches=2, signatures="every-step")
    every.bind(names, alive)
    every.refresh(model, probe)
    every.refresh(model, probe)
    assert len(calls) == 3


@pytest.mark.parametrize("signatures", ["every-step", "first-step"])
def test_compensation_reuses_the_inputs_the_criterion_collected(monkeypatch, signatures):
    model, probe = resnet_and_probe()

    def second_read(*args, **kwargs):
        raise AssertionError("the probe was read twice in one step")

    monkeypatch.setattr(engine, "collect_layer_inputs", second_read)
    common = dict(target=1.5, data=probe, compensate=True, probe_batches=2, progress=False)
    res = prune_model(
        model,
        torch.rand(1, 1, 16, 16),
        criterion="icnn-cluster",
        criterion_options={"signatures": signatures},
        **common,
    )
    assert res.macs_reduction >= 1.5
    with pytest.raises(AssertionError, match="read twice"):  # l2 has no inputs: the engine reads them
        prune_model(model, torch.rand(1, 1, 16, 16), criterion="l2", **common)


def random_signature(c: int, n: int = 24, categories: int = 3, seed: int = 0) -> SimpleNamespace:
    """The fields ``filter_distances`` / ``cluster_filters`` read, for ``c`` filters on ``n`` images;
    filters 2k and 2k+1 are near twins, so that clusters of several members form."""
    g = torch.Generator().manual_seed(seed)
    value = torch.rand(n, c, generator=g) * (torch.rand(n, c, generator=g) > 0.2)
    value[:, 1::2] = value[:, 0::2][:, : c // 2] * 0.9 + 0.01
    xy = torch.rand(n, c, 2, generator=g) * 16
    xy[:, 1::2] = xy[:, 0::2][:, : c // 2] + 0.5
    category = torch.randint(0, categories, (c,), generator=g)
    category[1::2] = category[0::2][: c // 2]
    return SimpleNamespace(
        peak_value=value,
        peak_xy=xy,
        category=category,
        image_size=(16, 16),
        alive=torch.ones(c),
        num_filters=c,
        layer="conv",
        landmarks=None,
    )


@pytest.mark.parametrize("linkage", ["average", "complete", "single"])
def test_distances_within_categories_only_give_the_same_clusters_below_the_penalty(linkage):
    from icnn_compress.analysis import cluster_filters

    sig = random_signature(40)
    full = filter_distances(sig)
    within = filter_distances(sig, cross_category=False)
    same = sig.category[:, None] == sig.category[None, :]
    assert torch.equal(within[same], full[same])  # measured where it matters, the same numbers
    assert bool((within[~same] >= 1.0).all())  # the rest at least the penalty
    for threshold in (0.05, 0.25, 0.6, 0.99):
        a = cluster_filters(sig, distance_threshold=threshold, linkage=linkage, cross_category=False)
        b = cluster_filters(sig, distance_threshold=threshold, linkage=linkage)
        assert torch.equal(a.labels, b.labels), threshold
        assert (a.medoids, a.spreads, a.categories) == (b.medoids, b.spreads, b.categories)
    assert a.num_clusters < 40  # the twins did merge: clusters of several members were described


def test_each_cluster_is_described_by_its_definition():
    from icnn_compress.analysis import cluster_filters

    sig = random_signature(30, seed=3)
    sig.alive[5] = 0.0  # a dead filter: label -1, in no cluster
    found = cluster_filters(sig, distance_threshold=0.3)
    assert int(found.labels[5]) == -1
    sizes = torch.bincount(found.labels[found.labels >= 0])
    assert int((sizes == 1).sum()) > 0 and int((sizes > 1).sum()) > 0
    assert list(found.medoids) == sorted(found.medoids) == list(range(found.num_clusters))
    for cl in range(found.num_clusters):
        idx = torch.nonzero(found.labels == cl).flatten().tolist()
        sums = [sum(float(found.distances[i, j]) for j in idx) for i in idx]
        medoid = idx[min(range(len(idx)), key=lambda k: (sums[k], k))]
        assert found.medoids[cl] == medoid
        spread = sum(float(found.distances[medoid, j]) for j in idx) / len(idx)
        assert found.spreads[cl] == pytest.approx(spread)
        counts = torch.bincount(sig.category[idx])
        assert found.categories[cl] == int(counts.argmax())


@pytest.mark.parametrize("rows", [30, 300])  # through the r x r matrix, and directly
def test_a_long_elimination_is_the_brute_force_order(rows):
    # 80 channels: the arrays are compacted several times on the way (every quarter removed)
    a, w2 = redundant_inputs(80, rows=rows, seed=2)
    assert score(a, w2, labels=None, ridge=1e-3).argsort().tolist() == brute_force_order(a, w2, 1e-3)


def test_a_small_model_is_counted_by_a_real_forward_after_its_first_count(monkeypatch):
    from icnn_compress import measure

    where: list[str] = []
    real = measure.model_stats
    monkeypatch.setattr(measure, "model_stats", lambda *a, **k: where.append(k["where"]) or real(*a, **k))

    def run():
        torch.manual_seed(0)
        model = models.create("resnet_cifar8", num_classes=4, in_channels=1).eval()
        return prune_model(model, torch.rand(1, 1, 16, 16), criterion="l2", target=2.0, progress=False)

    small = run()
    assert where[0] == "meta" and set(where[1:]) == {"model"} and len(where) >= 2
    where.clear()
    monkeypatch.setattr(engine, "_REAL_COUNT_MAX_MACS", 0)  # as a model too big to run
    large = run()
    assert set(where) == {"meta"}
    assert (small.removed, small.macs_after, small.params_after) == (
        large.removed,
        large.macs_after,
        large.params_after,
    )


def test_signatures_of_every_conv_find_the_receptive_fields_once(monkeypatch):
    import icnn_compress.analysis as analysis
    import icnn_compress.analysis._signatures as signatures
    from icnn_compress.prune._criteria import conv_signatures

    model, probe = resnet_and_probe()
    calls = []
    real = analysis.receptive_fields

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(analysis, "receptive_fields", counted)
    monkeypatch.setattr(signatures, "receptive_fields", counted)
    points, sigs = conv_signatures(model, probe, 2)
    assert len(calls) == 1
    assert sigs and set(points.values()) <= set(sigs)
    assert all(sig.rf is not None for sig in sigs.values())


def test_a_real_forward_count_that_fails_falls_back_to_the_meta_device(monkeypatch):
    from icnn_compress import measure

    where: list[str] = []
    real = measure.model_stats

    def count(model, example, **kwargs):
        where.append(kwargs["where"])
        if where[-1] == "model":
            raise RuntimeError("this model runs only on its own accelerator")
        return real(model, example, **kwargs)

    monkeypatch.setattr(measure, "model_stats", count)
    torch.manual_seed(0)
    model = models.create("resnet_cifar8", num_classes=4, in_channels=1).eval()
    res = prune_model(model, torch.rand(1, 1, 16, 16), criterion="l2", target=2.0, progress=False)
    assert res.macs_reduction >= 2.0
    assert where.count("model") == 1 and where[-1] == "meta"  # tried once, then meta
