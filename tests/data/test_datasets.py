import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from icnn_compress import ConfigError, DataError, data


def test_synthetic_parts_is_deterministic_and_split_dependent():
    a = data.SyntheticParts("train", 20, annotations=True, seed=3)
    b = data.SyntheticParts("train", 20, annotations=True, seed=3)
    for i in (0, 7, 19):
        for u, v in zip(a[i], b[i]):
            assert torch.equal(torch.as_tensor(u), torch.as_tensor(v))
    other = data.SyntheticParts("val", 20, seed=3)
    assert not torch.equal(a[0][0], other[0][0])
    assert not torch.equal(a[0][0], data.SyntheticParts("train", 20, seed=4)[0][0])


def test_synthetic_parts_landmarks_inside_masks_and_shapes():
    ds = data.SyntheticParts("train", 60, annotations=True, num_classes=4, image_size=48)
    visible_total = 0
    labels = set()
    for i in range(len(ds)):
        img, label, lm, masks = ds[i]
        labels.add(label)
        assert img.shape == (3, 48, 48) and img.dtype == torch.float32
        assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
        assert lm.shape == (ds.num_parts, 3) and masks.shape == (ds.num_parts, 48, 48)
        for p in range(ds.num_parts):
            if lm[p, 2] > 0:
                visible_total += 1
                col, row = round(float(lm[p, 0])), round(float(lm[p, 1]))
                assert masks[p, row, col], (i, p)
        assert int((lm[:, 2] > 0).sum()) <= 3
    assert labels == {0, 1, 2, 3}
    assert visible_total > 100


def test_synthetic_pairs_share_parts_but_not_layouts():
    ds = data.SyntheticParts("train", 1, num_classes=6)
    for k in (0, 2, 4):
        a, b = ds.layouts[k], ds.layouts[k + 1]
        assert sorted(p for p, _, _ in a) == sorted(p for p, _, _ in b)
        assert {(p, x, y) for p, x, y in a} != {(p, x, y) for p, x, y in b}


def test_synthetic_errors():
    with pytest.raises(DataError, match="'split' parameter of SyntheticParts"):
        data.SyntheticParts("dev")
    with pytest.raises(DataError, match=r"num_classes of SyntheticParts must be in \[2, 16\]"):
        data.SyntheticParts(num_classes=1)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_reader_on_tiny_idx(tmp_path, monkeypatch, gz):
    monkeypatch.setenv("ICNN_COMPRESS_CACHE", str(tmp_path / "cache"))
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([3, 1, 4, 1, 5])
    data.write_idx(images, labels, tmp_path / "fm", "train", gz=gz)
    ds = data.FashionMNIST("train", root=tmp_path / "fm")
    assert len(ds) == 5
    img, label = ds[2]
    assert label == 4 and img.shape == (1, 28, 28)
    torch.testing.assert_close(img[0], images[2].float() / 255)


def test_fashion_missing_files_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        data.FashionMNIST("train", root=tmp_path)


@pytest.mark.skipif(
    not os.path.isdir(data.FASHION_MNIST_ROOT),
    reason="the Debian package dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setenv("ICNN_COMPRESS_CACHE", str(tmp_path))
    test = data.FashionMNIST("test")
    assert len(test) == 10000
    assert torch.bincount(test.targets).tolist() == [1000] * 10
    train_dl, _val_dl = data.loaders("fashion-mnist", batch_size=16, limit=64)
    x, y = next(iter(train_dl))
    assert x.shape == (16, 1, 28, 28) and y.shape == (16,)


def _write_cub(root: Path) -> None:
    (root / "images" / "001.Bird").mkdir(parents=True)
    (root / "images" / "002.Other").mkdir(parents=True)
    (root / "parts").mkdir()
    rows = [(1, "001.Bird/a.jpg", 1, 1), (2, "002.Other/b.jpg", 2, 0), (3, "001.Bird/c.jpg", 1, 1)]
    for _, name, _, _ in rows:
        Image.new("RGB", (40, 20), (120, 30, 200)).save(root / "images" / name)
    (root / "images.txt").write_text("".join(f"{i} {n}\n" for i, n, _, _ in rows))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in rows))
    (root / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    (root / "bounding_boxes.txt").write_text("".join(f"{i} 10.0 5.0 20.0 10.0\n" for i, _, _, _ in rows))
    locs = []
    for i, _, _, _ in rows:
        for p in range(1, 16):
            locs.append(f"{i} {p} {15.0 + p % 3} 8.0 {1 if p < 5 else 0}\n")
    locs.append("1 6 1.0 1.0 1\n")  # visible but outside the box: becomes invisible after the crop
    (root / "parts" / "part_locs.txt").write_text("".join(locs))


def test_cub_fixture_with_landmarks(tmp_path):
    _write_cub(tmp_path)
    train = data.CUB200(tmp_path, "train", image_size=32, annotations=True)
    assert len(train) == 2
    img, label, lm = train[0]
    assert img.shape == (3, 32, 32) and label == 0
    # part 1 at (16, 8) in the image; box (10, 5, 20x10); resize 20x10 -> 32x32
    assert float(lm[0, 0]) == pytest.approx((16 - 10) * 32 / 20)
    assert float(lm[0, 1]) == pytest.approx((8 - 5) * 32 / 10)
    assert float(lm[0, 2]) == 1.0 and float(lm[5, 2]) == 0.0
    test = data.CUB200(tmp_path, "test", image_size=32)
    assert len(test) == 1 and test[0][1] == 1


def test_cub_missing_file_is_named(tmp_path):
    _write_cub(tmp_path)
    (tmp_path / "bounding_boxes.txt").unlink()
    with pytest.raises(DataError, match=r"bounding_boxes\.txt"):
        data.CUB200(tmp_path)


def test_imagefolder_loader(tmp_path):
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for k in range(2):
                Image.new("RGB", (30, 30), (k * 50, 10, 10)).save(tmp_path / split / cls / f"{k}.png")
    _train_dl, val_dl = data.loaders("imagefolder", root=str(tmp_path), image_size=24, batch_size=2)
    x, _y = next(iter(val_dl))
    assert x.shape == (2, 3, 24, 24)
    with pytest.raises(ConfigError, match="has no train/ subfolder"):
        data.loaders("imagefolder", root=str(tmp_path / "train"))


def test_unknown_dataset_suggests():
    with pytest.raises(ConfigError, match="Did you mean 'fashion-mnist'"):
        data.loaders("fashion_mnist")
