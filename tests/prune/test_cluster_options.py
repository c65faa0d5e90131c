"""icnn-cluster on residual groups and its options: where the clusters are read, the category
guard, BatchNorm-normalised consumer energy, and one-line errors for bad option values."""

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from icnn_compress import ConfigError, models
from icnn_compress.prune import make_importance
from icnn_compress.prune._criteria import following_bn_scales, map_points


def resnet_and_probe():
    torch.manual_seed(0)
    model = models.create("resnet_cifar8", num_classes=4, in_channels=1).eval()
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.rand(48, 1, 16, 16, generator=g), torch.randint(0, 4, (48,), generator=g))
    return model, DataLoader(ds, batch_size=16)


def test_a_conv_that_feeds_a_residual_add_is_read_after_the_add():
    model, _ = resnet_and_probe()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    points = map_points(model, convs)
    assert points["conv1"] == "relu"
    assert points["layer1.0.conv1"] == "layer1.0.relu1"
    assert points["layer1.0.conv2"] == "layer1.0.relu2"  # the stream, after the addition
    shortcut = next(n for n in convs if "shortcut" in n)
    block = shortcut.rsplit(".shortcut", 1)[0]
    assert points[shortcut] == f"{block}.relu2"


def test_residual_group_uses_the_clusters_of_the_deepest_stream_map():
    model, data = resnet_and_probe()
    imp = make_importance("icnn-cluster", probe_batches=3)
    imp.refresh(model, data)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.rand(1, 1, 16, 16))
    group = graph.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=list(range(16)))
    labels, cats = imp._group_labels(group, 16)
    deepest = model.layer1[-1].conv2  # the stem's channels are carried to the end of stage 1
    assert torch.equal(labels, imp.cluster_labels(deepest)) and torch.equal(cats, imp.categories[deepest])
    own = make_importance("icnn-cluster", probe_batches=3, cluster_maps="own")
    own.refresh(model, data)
    assert torch.equal(own._group_labels(group, 16)[0], own.cluster_labels(model.conv1))
    scores = imp(group)
    assert scores.shape == (16,) and bool(torch.isfinite(scores).all())


def test_category_guard_keeps_the_best_filter_of_every_category():
    model, data = resnet_and_probe()
    conv = model.layer1[0].conv1
    with torch.no_grad():
        conv.weight[0] *= 1e-3  # channel 0 becomes the cheapest filter of the layer
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.rand(1, 1, 16, 16))
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
    cats = torch.zeros(conv.out_channels, dtype=torch.long)
    cats[0] = 3  # ... and the only filter of category 3
    scores = {}
    for guard in (False, True):
        imp = make_importance("icnn-cluster", probe_batches=3, keep_categories=guard)
        imp.refresh(model, data)
        imp.categories[conv] = cats
        scores[guard] = imp(group)
    assert int(scores[False].argmin()) == 0  # without the guard it goes first
    assert 0 in scores[True].argsort()[-2:].tolist()  # with it, it is one of the last two to go


def test_following_bn_scales_are_gamma_squared_over_variance():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1))
    bn = model[1]
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.25]))
    scales = following_bn_scales(model)
    assert set(scales) == {model[0]}  # the last conv feeds no BatchNorm
    expected = torch.tensor([1.0, 4.0, 9.0]) / (torch.tensor([1.0, 4.0, 0.25]) + bn.eps)
    assert torch.allclose(scales[model[0]], expected)


@pytest.mark.parametrize(
    "option, value", [("cluster_maps", "stream"), ("consumer_units", "bn"), ("cluster_maps", 3)]
)
def test_bad_option_values_are_one_line_errors(option, value):
    with pytest.raises(ConfigError, match=option):
        make_importance("icnn-cluster", **{option: value})
