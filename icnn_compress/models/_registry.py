"""A name -> constructor registry of classifiers (torchvision's ``register_model`` pattern)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from icnn_compress._registry import Registry
from icnn_compress.errors import ConfigError
from icnn_compress.models._timm import build_timm, is_timm_name

__all__ = ["create", "list_models", "register_model"]

_MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a constructor ``fn(*, num_classes, in_channels, small_input) -> nn.Module``."""

    return _MODELS.register(name)


def list_models() -> list[str]:
    """Names of all registered models, sorted (timm models, ``"timm:<name>"``, are not listed)."""
    return _MODELS.names()


def create(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    small_input: bool | None = None,
    weights: str | None = None,
    strict: bool = True,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from ``list_models()``, or ``"timm:<name>"`` for any timm model (with the
            optional extra ``pip install 'icnn-compress[timm]'``).
        num_classes: classifier outputs.
        in_channels: input channels (1 for Fashion-MNIST).
        small_input: adapt the stem for inputs of about 32 px or less (torchvision models:
            3x3 stride-1 stem, no stem max-pool). ``None``: the model's own default.
        weights: a local state-dict file (loaded with ``weights_only=True``; timm models also
            take ``.safetensors``) or, for torchvision models, a torchvision weights name
            (``"IMAGENET1K_V1"``) whose file is already in the torch hub cache, for timm models
            ``"pretrained"``: timm's default weights from the local Hugging Face cache (nothing
            is ever downloaded).
        strict: with ``weights``, refuse missing/unexpected keys (shape mismatches always fail).

    Example:
        >>> model = create("vgg_small", num_classes=10, in_channels=1)
    """
    build = partial(build_timm, name) if is_timm_name(name) else _MODELS.get(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be an int >= 1. Got {num_classes!r} instead.")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"in_channels must be an int >= 1. Got {in_channels!r} instead.")
    kwargs: dict = {"num_classes": num_classes, "in_channels": in_channels}
    if small_input is not None:
        kwargs["small_input"] = small_input
    if weights is not None:
        kwargs["weights"] = weights
        kwargs["strict"] = strict
    return build(**kwargs)
