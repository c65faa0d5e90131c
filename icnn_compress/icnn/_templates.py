"""Templates, priors and the exact mutual information of the interpretable filter loss.

Notation follows ``docs/method.md``: a filter's map ``x`` is ``h x w`` (``n x n`` in the paper), there
are ``h*w`` positive templates ``T_mu`` (one per position) and one negative template ``T-``, all
equally likely a priori.

Non-square maps: the paper's L1 distance ``(|i-a| + |j-b|) / n`` is divided by the mean side
``(h + w) / 2`` instead of ``n``, and ``tau`` defaults to ``0.5 / (h*w)``; for square maps both are
exactly the paper's formulas.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
from torch import Tensor

from icnn_compress.errors import ICNNError

__all__ = ["log_template_prior", "make_templates", "mask_shape", "mutual_information"]


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        h = w = size
    else:
        # under the ONNX tracer the sizes are traced values; the exported graph has a fixed spatial
        # size (only the batch axis is dynamic), so baking them in as constants is correct
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        raise ICNNError(f"The map size must be positive. Got {size!r} instead.")
    return h, w


def default_tau(size: int | tuple[int, int]) -> float:
    """The paper's ``tau = 0.5 / n**2`` (``0.5 / (h*w)`` for non-square maps)."""
    h, w = _hw(size)
    return 0.5 / (h * w)


def mask_shape(
    size: int | tuple[int, int],
    *,
    beta: float = 4.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The unscaled template shape ``max(1 - beta * L1 / n, -1)`` for every centre.

    Returns:
        Tensor of shape ``(h*w, h, w)``; row ``a*w + b`` is centred at row ``a``, column ``b``
        and has peak value 1.
    """
    h, w = _hw(size)
    side = (h + w) / 2.0
    ii = torch.arange(h, device=device, dtype=dtype)
    jj = torch.arange(w, device=device, dtype=dtype)
    di = (ii[:, None] - ii[None, :]).abs()  # (a, i)
    dj = (jj[:, None] - jj[None, :]).abs()  # (b, j)
    dist = di[:, None, :, None] + dj[None, :, None, :]  # (a, b, i, j)
    shape = torch.clamp(1.0 - beta * dist / side, min=-1.0)
    return shape.reshape(h * w, h, w)


@functools.lru_cache(maxsize=64)
def cached_templates(h: int, w: int, tau: float | None, beta: float, device: torch.device) -> Tensor:
    """Flattened float32 templates ``(h*w + 1, h*w)`` for the loss, cached per shape and device."""
    return make_templates((h, w), tau=tau, beta=beta, device=device).reshape(h * w + 1, h * w)


def make_templates(
    n: int | tuple[int, int],
    *,
    tau: float | None = None,
    beta: float = 4.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """All templates of the loss for maps of side ``n`` (or ``(h, w)``).

    Args:
        n: the map side, or ``(h, w)`` for non-square maps (see the module docstring).
        tau: template scale; ``None`` means the paper's ``0.5 / n**2``.
        beta: the template's slope (paper: 4).

    Returns:
        Tensor of shape ``(n*n + 1, n, n)``: row ``a*n + b`` is the positive template centred at
        row ``a``, column ``b``; the last row is the negative template ``-tau``.

    Example:
        >>> make_templates(3).shape
        torch.Size([10, 3, 3])
    """
    h, w = _hw(n)
    tau = default_tau((h, w)) if tau is None else float(tau)
    pos = tau * mask_shape((h, w), beta=beta, device=device, dtype=dtype)
    neg = torch.full((1, h, w), -tau, device=device, dtype=dtype)
    return torch.cat([pos, neg], dim=0)


def log_template_prior(
    num_positions: int, *, device: torch.device | str | None = None, dtype=torch.float32
) -> Tensor:
    """``log p(T)`` for the ``num_positions + 1`` templates.

    ``p(T-) = 1 - alpha`` and ``p(T_mu) = alpha / n**2`` with ``alpha = n**2 / (1 + n**2)``: all
    templates are equally likely, so every entry is ``-log(num_positions + 1)``.
    """
    return torch.full((num_positions + 1,), -math.log(num_positions + 1), device=device, dtype=dtype)


def template_scores(maps: Tensor, templates: Tensor) -> Tensor:
    """``s_T(x) = sum_ij x_ij t_ij`` for every map and template.

    Args:
        maps: ``(N, C, h, w)``.
        templates: ``(T, h, w)``.

    Returns:
        ``(N, C, T)``.
    """
    n, c = maps.shape[:2]
    return torch.einsum("ncp,tp->nct", maps.reshape(n, c, -1), templates.reshape(templates.shape[0], -1))


def mutual_information(maps: Tensor, *, tau: float | None = None, beta: float = 4.0) -> Tensor:
    """The exact ``MI(X; T)`` in nats of each filter, with the paper's priors.

    The ``N`` maps of each filter are the set ``X`` (so ``Z_T`` is computed from them exactly);
    everything is evaluated with log-sum-exp in the dtype of ``maps`` (use float64 for reference
    values). Differentiable with autograd (through ``Z_T`` as well).

    Args:
        maps: ``(N, C, h, w)`` feature maps after ReLU (values >= 0). Non-square maps use the
            templates described in the module docstring.
        tau: template scale; ``None`` means ``0.5 / (h*w)``.
        beta: the template's slope.

    Returns:
        ``(C,)`` mutual information per filter, in ``[0, log(h*w + 1)]``.
    """
    if maps.dim() != 4:
        raise ICNNError(f"maps must have shape (N, C, h, w). Got shape {tuple(maps.shape)} instead.")
    if maps.shape[0] < 1:
        raise ICNNError("maps must hold at least one map per filter (N >= 1).")
    if bool((maps < 0).any()):
        raise ICNNError(
            f"maps must be non-negative (feature maps after ReLU); got a minimum of {float(maps.min()):.3g}."
        )
    h, w = maps.shape[-2:]
    templates = make_templates((h, w), tau=tau, beta=beta, device=maps.device, dtype=maps.dtype)
    s = template_scores(maps, templates)  # (N, C, T)
    log_px_t = s - torch.logsumexp(s, dim=0, keepdim=True)  # log p(x|T)
    log_pt = log_template_prior(h * w, device=maps.device, dtype=maps.dtype)
    log_px = torch.logsumexp(log_px_t + log_pt, dim=2, keepdim=True)  # log p(x)
    terms = torch.exp(log_pt + log_px_t) * (log_px_t - log_px)
    return terms.sum(dim=(0, 2))
