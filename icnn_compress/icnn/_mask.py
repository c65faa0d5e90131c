"""The mask layer of the interpretable CNN (docs/method.md section 3)."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from icnn_compress.errors import ICNNError
from icnn_compress.icnn._options import CENTRES
from icnn_compress.icnn._templates import mask_shape

__all__ = ["CENTRES", "ICNNMask"]


@functools.lru_cache(maxsize=64)
def _mask_table(h: int, w: int, beta: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``relu`` of the peak-1 template shape for every centre, ``(h*w, h, w)``."""
    return mask_shape((h, w), beta=beta, device=device, dtype=dtype).clamp_min(0.0)


class ICNNMask(nn.Module):
    """``x_masked = x * relu(m_mu_hat)``: keeps each map's activations near its strongest part.

    ``m_mu`` is the template shape ``max(1 - beta * L1(mu) / n, -1)`` with peak 1 (the authors'
    code; the loss uses the tau-scaled templates). Since ``x >= 0`` this equals the paper's
    ``max(x * T_mu_hat, 0)`` up to the scale ``tau``. The mask itself is a constant in the backward
    pass; gradients flow through the kept values.

    Args:
        beta: slope of the mask (paper: 4). Larger is narrower.
        centre: ``"argmax"`` (paper) or ``"centroid"`` (activation-weighted centre, authors' code).
        enabled: ``False`` makes the module an identity (to measure what the mask costs).

    Shapes:
        input and output ``(N, C, h, w)``. Exports to ONNX (ArgMax, arithmetic only).
    """

    def __init__(self, beta: float = 4.0, centre: str = "argmax", enabled: bool = True) -> None:
        super().__init__()
        if centre not in CENTRES:
            raise ICNNError(
                f"The 'centre' parameter of ICNNMask must be one of {CENTRES}. Got {centre!r} instead."
            )
        if not beta > 0:
            raise ICNNError(f"The 'beta' parameter of ICNNMask must be a float > 0. Got {beta!r} instead.")
        self.beta = float(beta)
        self.centre = centre
        self.enabled = bool(enabled)
        # A weak reference to whoever records the unmasked maps for the loss; weak, so that
        # deepcopy / pickling of the model never drags the loss state (or graph tensors) along.
        self._recorder: weakref.ReferenceType[Callable[[Tensor], Tensor]] | None = None

    def __getstate__(self) -> dict:
        # copies and pickles of the model do not carry the link to the loss
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_recorder"] = None
        return state

    def extra_repr(self) -> str:
        return f"beta={self.beta}, centre={self.centre!r}, enabled={self.enabled}"

    def set_recorder(self, recorder: Callable[[Tensor], Tensor] | None) -> None:
        """Route the unmasked input of every grad-enabled forward to ``recorder``."""
        self._recorder = None if recorder is None else weakref.WeakMethod(recorder)  # type: ignore[arg-type]

    def centres(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Row and column of each map's centre, ``(N, C)`` each (float)."""
        n, c, h, w = x.shape
        if self.centre == "argmax":
            idx = x.reshape(n, c, h * w).argmax(dim=2)
            return torch.div(idx, w, rounding_mode="floor").to(x.dtype), (idx % w).to(x.dtype)
        ii = torch.arange(h, device=x.device, dtype=x.dtype)
        jj = torch.arange(w, device=x.device, dtype=x.dtype)
        total = x.sum(dim=(2, 3)).clamp_min(torch.finfo(x.dtype).tiny)
        a = (x.sum(dim=3) * ii).sum(dim=2) / total
        b = (x.sum(dim=2) * jj).sum(dim=2) / total
        return a, b

    def mask(self, x: Tensor) -> Tensor:
        """The (non-negative) mask for ``x``, ``(N, C, h, w)``, without gradient."""
        with torch.no_grad():
            n, c, h, w = x.shape
            if self.centre == "argmax":
                # one gather from the table of all centred masks: cheaper than building each one
                table = _mask_table(h, w, self.beta, x.device, x.dtype)
                idx = x.reshape(n, c, h * w).argmax(dim=2)
                return table[idx]
            a, b = self.centres(x)
            ii = torch.arange(h, device=x.device, dtype=x.dtype).view(1, 1, h, 1)
            jj = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, 1, w)
            dist = (ii - a[..., None, None]).abs() + (jj - b[..., None, None]).abs()
            return torch.clamp(1.0 - self.beta * dist / ((h + w) / 2.0), min=0.0)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ICNNError(
                f"ICNNMask expects maps of shape (N, C, h, w). Got shape {tuple(x.shape)} instead."
            )
        recorder = self._recorder() if self._recorder is not None else None
        if recorder is not None and torch.is_grad_enabled() and not torch.jit.is_tracing():
            x = recorder(x)
        if not self.enabled:
            return x
        return x * self.mask(x)
