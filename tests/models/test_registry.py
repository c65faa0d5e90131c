import pytest
import torch

from icnn_compress import ConfigError, models
from icnn_compress.errors import DataError

SMALL = ["vgg_small", "resnet_cifar8", "resnet_cifar20"]


# one model of each torchvision CNN family (the registry holds every size of each)
FAMILIES = [
    "resnet18", "resnext50_32x4d", "wide_resnet50_2", "vgg11", "vgg11_bn", "alexnet", "squeezenet1_1",
    "densenet121", "googlenet", "inception_v3", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
    "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf", "shufflenet_v2_x0_5", "mnasnet0_5",
    "convnext_tiny",
]  # fmt: skip


def test_the_registry_holds_every_torchvision_cnn_and_no_transformer():
    import torchvision

    names = set(models.list_models())
    assert set(FAMILIES) <= names and {"vgg16_bn", "resnet152", "efficientnet_b7"} <= names
    assert not {n for n in names if n.startswith(("vit_", "swin_", "maxvit_"))}
    assert len(names) == len(SMALL) + len(
        [
            n
            for n in torchvision.models.list_models(module=torchvision.models)
            if not n.startswith(("vit_", "swin_", "maxvit_"))
        ]
    )


@pytest.mark.parametrize("name", SMALL + FAMILIES)
def test_every_model_builds_and_runs_small(name):
    model = models.create(name, num_classes=7, in_channels=1, small_input=True).eval()
    size = 80 if name == "inception_v3" else 32  # its stem needs at least 75 px
    with torch.no_grad():
        out = model(torch.rand(2, 1, size, size))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("name", SMALL)
def test_small_models_train_step_on_28px(name):
    model = models.create(name, num_classes=10, in_channels=1)
    out = model(torch.rand(4, 1, 28, 28))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_duplicate_registration_is_refused():
    with pytest.raises(ConfigError, match="already registered"):
        models.register_model("vgg_small")(lambda **kw: None)


def test_unknown_model_suggests():
    with pytest.raises(ConfigError, match="Did you mean 'vgg_small'"):
        models.create("vgg_smal")


def test_local_weights_round_trip_and_mismatch(tmp_path):
    a = models.create("resnet_cifar8", num_classes=4, in_channels=1)
    path = tmp_path / "w.pt"
    torch.save(a.state_dict(), path)
    b = models.create("resnet_cifar8", num_classes=4, in_channels=1, weights=str(path))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    with pytest.raises(ConfigError, match=r"shape mismatch for fc.weight: file \(4, 64\) vs model \(5, 64\)"):
        models.create("resnet_cifar8", num_classes=5, in_channels=1, weights=str(path))
    with pytest.raises(DataError, match="does not exist"):
        models.create("resnet_cifar8", weights=str(tmp_path / "nope.pt"))


def test_pickled_model_is_refused(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(models.create("resnet_cifar8"), path)
    with pytest.raises(DataError, match="arbitrary objects, which is never loaded") as err:
        models.create("resnet_cifar8", weights=str(path))
    assert "weights_only=False" not in str(err.value)


def test_torchvision_weights_name_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ConfigError, match=r"not in the local cache .* never downloads"):
        models.create("resnet18", weights="IMAGENET1K_V1")
    # the same name works once its file is in the cache
    ref = models.create("resnet18", num_classes=1000)
    (tmp_path / "checkpoints").mkdir()
    torch.save(ref.state_dict(), tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    got = models.create("resnet18", num_classes=10, weights="IMAGENET1K_V1")
    assert torch.equal(got.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    assert "fc.weight" in got.icnn_skipped_weights
