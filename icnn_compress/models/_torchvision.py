"""torchvision classifiers, adapted to in_channels, num_classes and small inputs."""

from __future__ import annotations

from functools import partial

import torchvision
from torch import nn

from icnn_compress.models._registry import register_model
from icnn_compress.models._weights import load_matching_weights, load_weights, torchvision_weights_state_dict

__all__ = ["TORCHVISION_MODELS"]

# every CNN classifier of torchvision (the transformers, ViT/Swin/MaxViT, have no filters to prune)
_NOT_CNN = ("vit_", "swin_", "maxvit_")
TORCHVISION_MODELS = tuple(
    n for n in torchvision.models.list_models(module=torchvision.models) if not n.startswith(_NOT_CNN)
)
# constructor arguments for a plain classifier: no auxiliary heads, no slow scipy initialisation
_EXTRA = {
    "googlenet": {"aux_logits": False, "init_weights": False},
    "inception_v3": {"aux_logits": False, "init_weights": False},
}


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    return next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _adapt(model: nn.Module, arch: str, in_channels: int, small_input: bool) -> nn.Module:
    name, conv = _first_conv(model)
    if small_input:
        # a 3x3 stride-1 stem keeps spatial resolution for ~32 px inputs (CIFAR practice)
        stride = 1
        kernel, padding = (3, 1)
        if arch.startswith("resnet"):
            model.maxpool = nn.Identity()
        elif arch == "alexnet":
            model.features[2] = nn.Identity()  # the first max-pool
        elif arch == "mobilenet_v2":
            kernel, padding = 3, 1
    else:
        stride, kernel, padding = conv.stride, conv.kernel_size, conv.padding
    if small_input or in_channels != conv.in_channels:
        new = nn.Conv2d(in_channels, conv.out_channels, kernel, stride, padding, bias=conv.bias is not None)
        _replace(model, name, new)
    return model


def _build(arch: str, *, num_classes=10, in_channels=3, small_input=False, weights=None, strict=True):
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **_EXTRA.get(arch, {}))
    model = _adapt(model, arch, in_channels, small_input)
    if weights is None:
        return model
    if weights.isupper() or weights == "DEFAULT":  # a torchvision weights name, from the local cache
        # the classifier / stem may have been changed: keep what fits, report the rest
        return load_matching_weights(model, torchvision_weights_state_dict(arch, weights))
    return load_weights(model, weights, strict=strict)


for _arch in TORCHVISION_MODELS:
    register_model(_arch)(partial(_build, _arch))
