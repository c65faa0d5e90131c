"""Loading weights from local files only (never downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from icnn_compress.errors import ConfigError

__all__ = ["load_matching_weights", "load_weights", "torchvision_weights_state_dict"]


def load_weights(model: nn.Module, source: str | os.PathLike | dict, *, strict: bool = True) -> nn.Module:
    """Load a state dict (a path read with ``weights_only=True``, or a dict) into ``model``.

    A checkpoint written by the Trainer (``{"model": state_dict, ...}``) is accepted too. Raises
    ``ConfigError`` naming every key whose shape differs, and with ``strict`` the missing and
    unexpected keys.
    """
    if isinstance(source, dict):
        state = source
    else:
        from icnn_compress._artefact import read_weights_file

        state = read_weights_file(Path(source), what="Weights file")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ConfigError(f"Weights must be a state dict (a dict of tensors). Got {type(state).__name__}.")
    own = model.state_dict()
    bad = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and torch.is_tensor(v) and v.shape != own[k].shape
    ]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = []
    if bad:
        problems.append("shape mismatch for " + "; ".join(bad[:10]) + (" ..." if len(bad) > 10 else ""))
    if strict and missing:
        problems.append(f"missing keys {missing[:10]}" + (" ..." if len(missing) > 10 else ""))
    if strict and unexpected:
        problems.append(f"unexpected keys {unexpected[:10]}" + (" ..." if len(unexpected) > 10 else ""))
    if problems:
        raise ConfigError(
            "The weights do not fit the model: "
            + "; ".join(problems)
            + ". Check num_classes/in_channels, or pass strict=False to skip missing/unexpected keys."
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return model


def load_matching_weights(model: nn.Module, state: dict) -> nn.Module:
    """Load the tensors of ``state`` whose name and shape fit ``model`` (pretrained weights into a
    model whose classifier or stem was changed); the names left at their init are listed in
    ``model.icnn_skipped_weights``."""
    own = model.state_dict()
    keep = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(keep, strict=False)
    model.icnn_skipped_weights = sorted(set(own) - set(keep))  # type: ignore[attr-defined]
    return model


def torchvision_weights_state_dict(arch: str, weights_name: str) -> dict:
    """The state dict of a torchvision weights enum entry, from the torch hub cache only."""
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(arch)
        weights = enum[weights_name] if weights_name != "DEFAULT" else enum.DEFAULT
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"Unknown torchvision weights {weights_name!r} for {arch!r}.") from exc
    filename = weights.url.rsplit("/", 1)[-1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not cached.is_file():
        raise ConfigError(
            f"torchvision weights {arch}.{weights.name} are not in the local cache ({cached}) and "
            "icnn-compress never downloads: copy the file there, or pass a local weights path."
        )
    return torch.load(cached, map_location="cpu", weights_only=True)
