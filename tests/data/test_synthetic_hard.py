"""The hard synthetic-parts setting: a pure function of (seed, split, index), consistent
annotations under occlusion and missing parts, four classes per part set, the easy setting intact."""

import pytest
import torch

from icnn_compress import DataError
from icnn_compress.data import SyntheticParts, loaders


def test_hard_items_are_reproducible_and_annotations_consistent():
    a = SyntheticParts("train", 200, image_size=32, annotations=True, difficulty="hard", num_classes=8)
    b = SyntheticParts("train", 200, image_size=32, annotations=True, difficulty="hard", num_classes=8)
    visible_parts, missing = [], 0
    for i in range(0, 200, 5):
        x, y, marks, masks = a[i]
        x2, *_ = b[i]
        assert torch.equal(x, x2) and x.shape == (3, 32, 32) and 0 <= float(x.min()) <= float(x.max()) <= 1
        for p in range(len(marks)):
            if marks[p, 2] > 0:  # a visible landmark lies on its own part's mask
                col, row = int(round(float(marks[p, 0]))), int(round(float(marks[p, 1])))
                assert bool(masks[p, row, col])
        assert not bool((masks.sum(0) > 1).any())  # a pixel belongs to at most one part
        layout_parts = {q for q, _, _ in a.layouts[y]}
        drawn = {p for p in range(len(marks)) if bool(masks[p].any())}
        assert drawn <= layout_parts
        missing += len(layout_parts - drawn)
        visible_parts.append(len(drawn))
    assert missing > 0  # parts go missing or get fully occluded in the hard setting
    assert a[0][0].shape == SyntheticParts("val", 4, image_size=32, difficulty="hard")[0][0].shape


def test_four_classes_share_each_part_set_in_different_layouts():
    ds = SyntheticParts("train", 8, num_classes=8, difficulty="hard")
    for g in (0, 4):
        group = ds.layouts[g : g + 4]
        assert len({frozenset(p for p, _, _ in lay) for lay in group}) == 1
        assert len({frozenset(lay) for lay in group}) == 4


def test_easy_is_the_default_and_unknown_difficulty_is_refused():
    assert SyntheticParts("train", 4).difficulty == "easy"
    with pytest.raises(DataError, match="difficulty"):
        SyntheticParts("train", 4, difficulty="medium")
    train, _ = loaders(
        "synthetic-parts", batch_size=4, train_size=8, val_size=4, image_size=32, difficulty="hard"
    )
    assert train.dataset.difficulty == "hard"
