"""timm models by name, ``"timm:<name>"`` (the optional extra ``pip install 'icnn-compress[timm]'``).

Weights come from a local file or from the user's Hugging Face cache (``weights="pretrained"``);
nothing is downloaded.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from torch import nn

from icnn_compress.errors import ConfigError, DataError
from icnn_compress.models._weights import load_matching_weights, load_weights

__all__ = ["PREFIX", "build_timm", "is_timm_name"]

PREFIX = "timm:"
_INSTALL = "pip install 'icnn-compress[timm]'"


def is_timm_name(name: str) -> bool:
    """Whether ``name`` asks for a timm model (``"timm:resnet50"``)."""
    return isinstance(name, str) and name.startswith(PREFIX)


def _timm():
    try:
        import timm
    except ImportError:
        raise ConfigError(f"timm models need the 'timm' package: {_INSTALL}.") from None
    return timm


def build_timm(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    small_input: bool | None = None,
    weights: str | None = None,
    strict: bool = True,
) -> nn.Module:
    """``timm.create_model`` for ``"timm:<arch>"`` with ``num_classes`` outputs and ``in_channels``
    inputs, random init unless ``weights``: a local state-dict file (``.safetensors``, or a torch
    file read with ``weights_only=True``), or ``"pretrained"``: timm's default weights for the
    architecture, only from the local Hugging Face cache (the classifier and stem keep their own
    init where their shapes differ; the skipped keys are in ``model.icnn_skipped_weights``)."""
    timm = _timm()
    arch = name[len(PREFIX) :]
    known = timm.list_models()
    if arch.split(".")[0] not in known:
        close = difflib.get_close_matches(arch, known, n=3)
        hint = f" Did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
        raise ConfigError(f"Unknown timm model {arch!r}.{hint} See timm.list_models() for the names.")
    if small_input:
        raise ConfigError(
            f"small_input applies to torchvision models; {name!r} keeps timm's stem (set it to null)."
        )
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    if weights is None:
        return model
    if weights == "pretrained":
        return load_matching_weights(model, _cached_pretrained(timm, arch))
    if Path(weights).suffix == ".safetensors":
        return load_weights(model, _read_safetensors(Path(weights)), strict=strict)
    return load_weights(model, weights, strict=strict)


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    if not path.is_file():
        raise DataError(f"Weights file {str(path)!r} does not exist or is not a file.")
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError
        raise DataError(f"Weights file {str(path)!r} is not a readable safetensors file ({exc}).") from None


def _cached_pretrained(timm, arch: str) -> dict:
    """timm's default weights for ``arch`` from the local Hugging Face cache; never downloads."""
    cfg = timm.models.get_pretrained_cfg(arch)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        raise ConfigError(f"timm has no pretrained weights for {arch!r}; pass a local weights file.")
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            if filename.endswith(".safetensors"):
                return _read_safetensors(Path(found))
            from icnn_compress._artefact import read_weights_file

            return read_weights_file(found, what="Cached timm weights")
    raise ConfigError(
        f"timm weights for {arch!r} ({hub_id}) are not in the local Hugging Face cache and "
        "icnn-compress never downloads: fetch them once with timm or huggingface_hub, or pass a "
        "local weights file."
    )
