"""timm models by name ("timm:<name>"): built for any classes and channels, weights from a local
file or the local Hugging Face cache only, pruned, exported and reloaded like torchvision models."""

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from icnn_compress import ConfigError, models
from icnn_compress.errors import DataError
from icnn_compress.export import export_onnx
from icnn_compress.prune import load_pruned, prune_model, save_pruned

TINY = "timm:resnet10t"  # a real timm ResNet (tiered stem), small enough for the suite


def test_a_timm_model_is_built_for_the_classes_and_channels_asked():
    model = models.create(TINY, num_classes=5, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 32, 32)).shape == (2, 5)


def test_unknown_names_and_options_get_one_line_errors():
    with pytest.raises(ConfigError, match=r"Unknown timm model 'resnet51'.*Did you mean.*timm:resnet50"):
        models.create("timm:resnet51")
    with pytest.raises(ConfigError, match="small_input applies to torchvision models"):
        models.create(TINY, small_input=True)
    with pytest.raises(DataError, match="does not exist"):
        models.create(TINY, weights="/nonexistent/w.safetensors")


def test_weights_from_a_local_safetensors_file(tmp_path):
    source = models.create(TINY, num_classes=3)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = models.create(TINY, num_classes=3, weights=str(tmp_path / "w.safetensors")).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), source.eval()(x))
    with pytest.raises(ConfigError, match="shape mismatch"):
        models.create(TINY, num_classes=4, weights=str(tmp_path / "w.safetensors"))


def _cache(root, hub_id: str, state: dict) -> None:
    """Lay out a Hugging Face hub cache entry (refs/main -> snapshots/<sha>/model.safetensors)."""
    repo = root / ("models--" + hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    save_file(state, str(snap / "model.safetensors"))


def test_pretrained_weights_come_from_the_local_cache_only(tmp_path, monkeypatch):
    import huggingface_hub.constants
    import timm

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        ConfigError, match="not in the local Hugging Face cache and icnn-compress never downloads"
    ):
        models.create(TINY, weights="pretrained")
    imagenet = models.create(TINY, num_classes=1000)
    _cache(tmp_path, timm.models.get_pretrained_cfg(TINY[5:]).hf_hub_id, imagenet.state_dict())
    model = models.create(TINY, num_classes=10, weights="pretrained")
    # every weight but the 10-class head comes from the file
    assert model.icnn_skipped_weights == ["fc.bias", "fc.weight"]
    assert torch.equal(model.state_dict()["conv1.0.weight"], imagenet.state_dict()["conv1.0.weight"])


@pytest.mark.parametrize("criterion", ["l2", "icnn-cluster"])
def test_a_timm_model_prunes_exports_and_reloads(criterion, tmp_path):
    torch.manual_seed(0)
    model = models.create(TINY, num_classes=4, in_channels=3).eval()
    g = torch.Generator().manual_seed(0)
    data = DataLoader(
        TensorDataset(torch.rand(32, 3, 32, 32, generator=g), torch.randint(0, 4, (32,), generator=g)),
        batch_size=16,
    )
    example = torch.rand(1, 3, 32, 32, generator=g)
    res = prune_model(
        model, example, criterion=criterion, target=2.0, data=data, compensate=True, progress=False
    )
    assert res.macs_reduction >= 2.0
    pruned = res.model.eval()
    assert export_onnx(pruned, tmp_path / "m.onnx", example).max_abs_diff < 1e-4
    save_pruned(
        pruned,
        tmp_path / "m.pt",
        arch=TINY,
        history=res.history,
        input_shape=(3, 32, 32),
        arch_kwargs={"num_classes": 4, "in_channels": 3},
    )
    loaded, _ = load_pruned(tmp_path / "m.pt")
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(example), pruned(example), atol=1e-5)
