"""Planted truth: filters that are exact detectors of known parts (some duplicated), plus random ones."""

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset

from icnn_compress import ConfigError
from icnn_compress.analysis import (
    cluster_filters,
    filter_signatures,
    location_instability,
    location_instability_reference,
    part_interpretability,
    receptive_field,
)

SIDE, PARTS, CLASSES = 32, 6, 3
PLACES = {0: (8, 8), 1: (24, 8), 2: (8, 24), 3: (24, 24), 4: (16, 10), 5: (16, 24)}


class PlantedParts(Dataset):
    """Class c holds parts 2c and 2c+1 (disks of radius 3, jittered +-3 px); image channel p is the
    mask of part p, so a 1x1 conv that copies channel p is an exact detector of part p. A last
    channel of uniform noise is what the random filters look at."""

    def __init__(self, n=150, seed=0):
        g = torch.Generator().manual_seed(seed)
        yy, xx = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
        self.items = []
        for i in range(n):
            c = i % CLASSES
            masks = torch.zeros(PARTS, SIDE, SIDE, dtype=torch.bool)
            lm = torch.zeros(PARTS, 3)
            for p in (2 * c, 2 * c + 1):
                x0, y0 = (v + int(torch.randint(-3, 4, (1,), generator=g)) for v in PLACES[p])
                masks[p] = (xx - x0) ** 2 + (yy - y0) ** 2 <= 9
                lm[p] = torch.tensor([x0, y0, 1.0])
            image = torch.cat([masks.float(), torch.rand(1, SIDE, SIDE, generator=g)])
            self.items.append((image, c, lm, masks))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


DETECTS = [0, 0, 1, 2, 3, 3, 4, 5]  # filter -> part; filters 0/1 and 4/5 are duplicates
NUM_RANDOM = 4


def planted_model() -> nn.Sequential:
    conv = nn.Conv2d(PARTS + 1, len(DETECTS) + NUM_RANDOM, 1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        for f, p in enumerate(DETECTS):
            conv.weight[f, p] = 1.0
        g = torch.Generator().manual_seed(1)
        conv.weight[len(DETECTS) :, PARTS] = 0.5 + torch.rand(NUM_RANDOM, 1, 1, generator=g)
    return nn.Sequential(
        conv,
        nn.ReLU(),
        nn.AvgPool2d(4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(conv.out_channels, CLASSES),
    )


@pytest.fixture(scope="module")
def planted():
    torch.manual_seed(0)
    model = planted_model()
    loader = DataLoader(PlantedParts(), batch_size=32)
    sig = filter_signatures(model, loader, "2", num_classes=CLASSES, progress=False)["2"]
    return model, loader, sig


def test_categories_and_peak_locations(planted):
    _, _, sig = planted
    assert sig.category[: len(DETECTS)].tolist() == [p // 2 for p in DETECTS]
    assert sig.rf.stride == 4 and sig.rf.size == 4
    for f, p in enumerate(DETECTS):
        own = (sig.labels == p // 2) & (sig.landmarks[:, p, 2] > 0)
        err = (sig.peak_xy[own, f] - sig.landmarks[own, p, :2]).norm(dim=1)
        assert float(err.max()) <= 3.0  # within one pooled cell of the part centre


def test_clusters_equal_planted_groups(planted):
    _, _, sig = planted
    gt = torch.tensor(DETECTS + [-1] * NUM_RANDOM)
    cl = cluster_filters(sig, distance_threshold=0.1, gt_parts=gt)
    det = cl.labels[: len(DETECTS)]
    assert det[0] == det[1] and det[4] == det[5]
    assert len(set(det.tolist())) == 6
    assert cl.ari == pytest.approx(1.0)
    assert not set(cl.labels[len(DETECTS) :].tolist()) & set(det.tolist())  # random filters stay apart
    for c in set(det.tolist()):
        assert cl.medoids[c] in cl.members(c)
        assert cl.categories[c] == DETECTS[cl.medoids[c]] // 2


def test_cluster_count_and_errors(planted):
    _, _, sig = planted
    cl = cluster_filters(sig, distance_threshold=None, n_clusters=3)
    assert cl.num_clusters == 3
    with pytest.raises(ConfigError, match="exactly one of distance_threshold and n_clusters"):
        cluster_filters(sig, distance_threshold=0.2, n_clusters=3)


def test_location_instability_detectors_vs_random(planted):
    _, _, sig = planted
    res = location_instability(sig)
    per = res["per_filter"]
    detectors, random = per[: len(DETECTS)], per[len(DETECTS) :]
    assert float(detectors.max()) < 0.05
    assert float(random.min()) > 2 * float(detectors.max())


def test_the_reference_scores_ideal_detectors_as_the_planted_ones_score(planted):
    """The planted filters are exact part detectors, so they must score what the reference says
    an ideal detector of their part scores; the random filters score worse than a fixed position."""
    _, _, sig = planted
    ref = location_instability_reference(sig)
    per = location_instability(sig)["per_filter"]
    assert ref["part_detectors"].shape == (PARTS,)
    assert per[: len(DETECTS)].tolist() == pytest.approx(ref["part_detectors"][DETECTS].tolist(), abs=1e-6)
    assert ref["floor"] == pytest.approx(float(ref["part_detectors"].min()))
    assert ref["part_mean"] == pytest.approx(float(ref["part_detectors"].mean()))
    assert 0 < ref["floor"] < ref["part_mean"] < ref["fixed"] < float(per[len(DETECTS) :].min())
    # exactly on its part, a detector keeps only the other parts' own jitter, not the map's rounding
    assert ref["floor_exact"] < ref["floor"]


def test_part_interpretability_detectors_vs_random(planted):
    model, loader, _ = planted
    # parts cover ~1% of all positions here, so the top-0.5% threshold of the spec would keep only
    # each map's single strongest cell; 2% keeps a part-sized region
    res = part_interpretability(model, loader, "2", quantile=0.02, progress=False)
    per = res["per_filter"]
    assert res["best_part"][: len(DETECTS)].tolist() == DETECTS
    assert float(per[: len(DETECTS)].min()) > 0.9
    assert float(per[len(DETECTS) :].max()) < float(per[: len(DETECTS)].min())


def test_metrics_need_annotations():
    model = planted_model()
    loader = DataLoader([(torch.rand(PARTS + 1, SIDE, SIDE), 0)] * 4, batch_size=2)
    sig = filter_signatures(model, loader, "2", num_classes=CLASSES, progress=False)["2"]
    with pytest.raises(ConfigError, match="needs landmarks"):
        location_instability(sig)
    with pytest.raises(ConfigError, match="needs landmarks"):
        location_instability_reference(sig)
    with pytest.raises(ConfigError, match="needs part masks"):
        part_interpretability(model, loader, "2", progress=False)


@pytest.mark.parametrize(
    ("arch", "layer", "size", "stride"),
    [
        ("vgg16", "features.28", 196, 16),
        ("resnet18", "layer4", 435, 32),
        ("alexnet", "features.10", 163, 16),
    ],
)
def test_receptive_fields_of_torchvision_models(arch, layer, size, stride):
    rf = receptive_field(getattr(torchvision.models, arch)(), layer, (3, 224, 224))
    assert (rf.size, rf.stride) == (size, stride)


def test_receptive_field_offset_and_centre():
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(1, 1, 3))
    rf = receptive_field(model, "2", (1, 16, 16))
    assert (rf.size, rf.stride, rf.offset) == (8, 2, 2.5)
    assert rf.centre(1, 2) == (6.5, 4.5)


def test_pictures_are_written(planted, tmp_path):
    from PIL import Image

    from icnn_compress.analysis import plot_cluster_overview, plot_filter_gallery, plot_instability_histogram

    model, loader, sig = planted
    cl = cluster_filters(sig, distance_threshold=0.1)
    paths = [
        plot_filter_gallery(model, loader.dataset, sig, cl, tmp_path / "gallery.png"),
        plot_instability_histogram({"planted": location_instability(sig)["per_filter"]}, tmp_path / "h.png"),
        plot_cluster_overview(sig, cl, tmp_path / "overview.png"),
    ]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
