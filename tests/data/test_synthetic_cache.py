"""SyntheticParts keeps drawn items in memory: the same items as drawing them again, copies that a
caller cannot change, and never more than the budget."""

import pytest
import torch

from icnn_compress import DataError
from icnn_compress.data import SyntheticParts


def _equal(a, b) -> bool:
    pairs = zip(a, b, strict=True)
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in pairs)


@pytest.mark.parametrize("annotations", [False, True])
def test_cached_items_are_the_items_drawn_without_a_cache(annotations):
    kw = dict(image_size=24, annotations=annotations, num_classes=4)
    cached, fresh = SyntheticParts("train", 12, **kw), SyntheticParts("train", 12, cache_mb=0, **kw)
    for _ in range(2):  # the second pass reads the cache
        for i in range(12):
            assert _equal(cached[i], fresh[i])
    assert len(cached._cache) == 12 and not fresh._cache


def test_a_caller_changing_an_item_does_not_change_the_cache():
    ds = SyntheticParts("val", 3, image_size=24)
    image, label = ds[1]
    image.zero_()
    again, label2 = ds[1]
    assert label2 == label and float(again.abs().sum()) > 0


def test_the_cache_stays_within_its_budget():
    item_bytes = 3 * 24 * 24 * 4  # one float32 image of 24 x 24 px
    ds = SyntheticParts("train", 10, image_size=24, cache_mb=3.5 * item_bytes / 2**20)
    for i in range(10):
        ds[i]
    assert sorted(ds._cache) == [0, 1, 2]  # the first three fit, the rest are drawn each time
    assert _equal(ds[7], SyntheticParts("train", 10, image_size=24, cache_mb=0)[7])


def test_a_negative_budget_is_refused():
    with pytest.raises(DataError, match="cache_mb"):
        SyntheticParts("train", 4, cache_mb=-1)
