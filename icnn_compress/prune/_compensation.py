"""Compensation: fold what the kept channels can reconstruct of the removed ones into the consumers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from icnn_compress.prune._criteria import consumer_deps, flattened_channels

__all__ = ["compensate_group", "fit_reconstruction", "well_posed"]


def fit_reconstruction(
    acts: Tensor, removed: list[int], kept: list[int], *, ridge: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """Ridge least squares ``acts[:, removed] ~ acts[:, kept] @ W + b``.

    Args:
        acts: ``(rows, C)`` probe activations of the consumer's input.
        ridge: regularisation relative to the mean diagonal of the Gram matrix.

    Returns:
        ``W (len(kept), len(removed))`` and ``b (len(removed),)``.
    """
    a = acts.double()
    x = torch.cat([a[:, kept], torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    gram = x.t() @ x
    gram += ridge * (gram.diagonal()[:-1].mean() + 1e-12) * torch.eye(gram.shape[0], dtype=a.dtype)
    rhs = x.t() @ a[:, removed]
    # the ridge-regularised Gram matrix is symmetric positive definite: Cholesky is about twice as
    # fast as a general solve; a numerically indefinite one falls back to it
    factor, info = torch.linalg.cholesky_ex(gram)
    sol = torch.cholesky_solve(rhs, factor) if int(info) == 0 else torch.linalg.solve(gram, rhs)
    return sol[:-1], sol[-1]


def well_posed(rows: int, kept: int) -> bool:
    """A fit of ``kept`` + 1 unknowns per removed channel needs clearly more probe rows than
    unknowns: at least twice as many (else the ridge, not the data, decides the weights)."""
    return rows >= 2 * (kept + 1)


@torch.no_grad()
def compensate_group(
    group, inputs: dict[nn.Module, Tensor], *, ridge: float = 1e-5, absorbed: dict | None = None
) -> int:
    """Before ``group.prune()``: for each layer that consumes the channels being removed, fit how
    the kept input channels reconstruct the removed ones and add that to the kept weights (and the
    intercept to the bias). Depthwise/grouped convs cannot mix channels and are left alone.

    ``absorbed``, when given, receives the first compensated fit of the group: ``{removed root
    channel: [(kept root channel, coefficient), ...]}`` with the three largest coefficients by
    magnitude, in the group root's current channel numbering.

    Returns:
        The number of consumer layers compensated.
    """
    done = 0
    for module, idxs, root_idxs in consumer_deps(group):
        acts = inputs.get(module)
        if acts is None or not idxs:
            continue
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            continue
        c_in = module.weight.shape[1]
        if acts.shape[1] != c_in or max(idxs) >= c_in:
            continue  # the probe is stale for this layer
        flat = flattened_channels(module, idxs, root_idxs, c_in)
        if flat is not None:
            done += _compensate_flattened(module, acts, *flat, ridge, absorbed if not done else None, group)
            continue
        removed = sorted(set(idxs))
        kept = [i for i in range(c_in) if i not in set(removed)]
        if not kept or not well_posed(acts.shape[0], len(kept)):
            continue  # e.g. VGG's 4096-wide hidden Linear layers with 4096 probe rows
        w_fit, b_fit = fit_reconstruction(acts, removed, kept, ridge=ridge)
        if absorbed is not None and not done:
            _record_absorption(absorbed, group, module, removed, kept, w_fit)
        _fold(module, removed, kept, w_fit, b_fit, c_in)
        done += 1
    return done


def _compensate_flattened(
    module: nn.Linear, acts: Tensor, k: int, removed: list[int], ridge: float, absorbed: dict | None, group
) -> int:
    """Compensation of a Linear over a flattened map, one channel mix for every position: the fit
    has the channel count as its width (``(rows * H * W, C)``), not the flattened feature count."""
    c = module.weight.shape[1] // k
    kept = [i for i in range(c) if i not in set(removed)]
    if not kept or not well_posed(acts.shape[0] * k, len(kept)):
        return 0
    per_position = acts.reshape(acts.shape[0], c, k).permute(0, 2, 1).reshape(-1, c)
    w_fit, b_fit = fit_reconstruction(per_position, removed, kept, ridge=ridge)
    if absorbed is not None:
        _record_absorption(absorbed, group, module, removed, kept, w_fit, k)
    _fold(module, removed, kept, w_fit, b_fit, c)
    return 1


FOLD_BLOCK = 1 << 22  # float64 elements of a consumer's weight updated at a time (32 MB)


def _fold(
    module: nn.Module, removed: list[int], kept: list[int], w_fit: Tensor, b_fit: Tensor, c: int
) -> None:
    """Add what the kept input channels reconstruct of the removed ones to the kept weights, and
    the intercept to the bias. The weight is seen as ``(out, c, s)`` (``s``: kernel positions, or
    positions of a flattened map) and updated in float64 a block of output rows at a time, so a
    large classifier never has a float64 copy (VGG-16's first Linear: 822 MB)."""
    weight = module.weight.data
    view = weight.view(weight.shape[0], c, -1)
    rows = max(1, FOLD_BLOCK // max(1, view[0].numel()))
    bias_delta = torch.empty(weight.shape[0], dtype=torch.float64, device=weight.device)
    for start in range(0, weight.shape[0], rows):
        block = view[start : start + rows].double()
        w_removed = block[:, removed, :]  # (o, R, s)
        block[:, kept, :] += torch.einsum("ors,kr->oks", w_removed, w_fit)
        bias_delta[start : start + rows] = torch.einsum("ors,r->o", w_removed, b_fit)
        view[start : start + rows] = block.to(weight.dtype)
    _add_to_bias(module, bias_delta)


def _add_to_bias(module: nn.Module, delta: Tensor) -> None:
    """``module.bias += delta`` (``(out,)``), creating a zero bias first when the layer has none."""
    weight = module.weight
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype))
    module.bias.data += delta.to(module.bias.dtype)


def _record_absorption(
    absorbed: dict, group, module: nn.Module, removed: list, kept: list, w_fit: Tensor, k: int = 1
) -> None:
    """Map the consumer's input channels back to the group root's and keep the top-3 coefficients
    (``k``: flattened features per channel of a Linear over a flattened map)."""
    to_root: dict[int, int] = {}
    for consumer, idxs, root_idxs in consumer_deps(group):
        if consumer is module:
            to_root.update({int(i) // k: int(r) for i, r in zip(idxs, root_idxs)})
    if any(to_root.get(r, r) != r for r in removed):
        return  # the consumer numbers its inputs differently from the root (e.g. a concatenation)
    top = min(3, len(kept))
    for j, r in enumerate(removed):
        if r not in to_root:
            continue
        coef = w_fit[:, j]
        order = coef.abs().argsort(descending=True)[:top]
        absorbed[to_root[r]] = [(kept[int(k)], float(coef[int(k)])) for k in order]
