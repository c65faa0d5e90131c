"""Fisher pruning: what removing a channel costs the loss, image by image, to second order."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.utils.data import DataLoader

from icnn_compress.errors import ConfigError, DataError
from icnn_compress.prune._criteria import flattened_channels, register_criterion, ridge_precision
from icnn_compress.prune._probe import collect_layer_inputs

__all__ = ["FisherImportance", "check_labels", "eliminate"]

_READS = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
RESIDUAL_MAX_WIDTH = 4096  # wider inputs (VGG's flattened 25088 features) are scored plainly
ELIMINATION_MAX_WIDTH = 256  # wider inputs: leave-one-out residuals (the cross terms grow as width^2)
ELIMINATION_MAX_BYTES = 1 << 30  # the cross terms of one refresh, all layers together (float32)


def check_labels(out: Tensor, labels: Tensor, criterion: str) -> None:
    """``DataError`` unless every label is an output index of ``out`` ``(N, K)``."""
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < out.shape[1]:
        raise DataError(
            f"criterion {criterion!r}: the data's labels run from {int(labels.min())} to "
            f"{int(labels.max())}, but the model has {out.shape[1]} outputs (labels must be "
            f"0..{out.shape[1] - 1}, numbered as the model's outputs)."
        )


@register_criterion("fisher", needs_data=True, needs_labels=True)
class FisherImportance(tp.importance.Importance):
    """Fisher pruning (Theis et al., 2018): channel ``c`` of a dependency group scores

        ``sum_n ( sum_{k, h, w} x[n, c, h, w] * dL_n / dx[n, c, h, w] )^2``

    where ``x`` is the input of each layer ``k`` that reads the channel (conv or linear; a tensor
    read by several layers counts once) and ``L_n`` the cross-entropy of image ``n``. The inner sum
    is, to first order, what image ``n``'s loss gains when the channel is zeroed where it is read;
    squared per image (the empirical Fisher information), the terms of images that pull in opposite
    directions add instead of cancelling as in first-order Taylor, whose score sums them over the
    batch first. With ``keep_classes`` the loss is the kept classes' through the restricted head, on
    their images (benchmarks tables 8d-8e).

    With ``residual=True`` (what ``prune_model`` passes when it compensates, unless the option is
    set) ``x`` of channel ``c`` is replaced by its residual on the other channels of the same input,
    ``x_c - mean_c - sum_j a_j (x_j - mean_j)`` with ``a`` the least-squares fit over the probe's
    positions (ridge ``ridge`` relative to the mean variance): what compensation cannot rebuild of
    the channel and the loss therefore still loses. A channel that the others reconstruct well
    scores low even if it matters to the loss.

    With ``eliminate=True`` (default) the channels of an input up to 256 wide are ranked by
    backward elimination: the cheapest goes, the others' residuals are re-fitted on the channels
    still kept (a rank-one downdate of the precision matrix), and so on, so that two channels that
    rebuild each other are not both scored as cheap, as leave-one-out residuals
    (``eliminate=False``, and inputs wider than 256) score them. Scores are the running maximum of
    the costs at removal: lower scores go first, and layers compare under global ranking. Under
    per-layer ranking ``prune_model`` sets ``step_bound`` and the elimination stops once the
    channels a step can remove are ranked (the rest score above them by their current cost). On
    resnet_cifar20 at 4x leave-one-out residuals were 0.2 point below plain Fisher one-shot and
    the elimination 1.2 above it (benchmarks 8g).

    Scored plainly: channels read by several layers (a residual stream, which identity paths carry
    on uncompensated: on resnet_cifar20 residual scores there lost 1-10 points one-shot), inputs
    wider than 4096 features and linear layers that read a flattened map. A depthwise conv is
    pruned with the layer it follows; the channel is scored where the next regular layer reads it.

    A residual stream channel is scored where each block reads it; the identity path that carries
    it further is not seen (as for every input-side score). ``refresh(model, loader)`` before
    scoring (``prune_model`` calls it at every step, on ``probe_batches`` labelled batches).
    """

    def __init__(
        self, probe_batches: int = 8, residual: bool = False, ridge: float = 1e-5, eliminate: bool = True
    ) -> None:
        if isinstance(probe_batches, bool) or not isinstance(probe_batches, int) or probe_batches < 1:
            raise ConfigError(
                f"criterion 'fisher': probe_batches must be an int >= 1. Got {probe_batches!r}."
            )
        for name, value in (("residual", residual), ("eliminate", eliminate)):
            if not isinstance(value, bool):
                raise ConfigError(f"criterion 'fisher': {name} must be true or false. Got {value!r}.")
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge > 0:
            raise ConfigError(f"criterion 'fisher': ridge must be a number > 0. Got {ridge!r}.")
        self.probe_batches, self.residual, self.ridge = probe_batches, residual, float(ridge)
        self.eliminate = eliminate
        self.terms: dict[nn.Module, Tensor] = {}  # reader (first of its input) -> (N, C_in) float32
        self.residual_terms: dict[nn.Module, Tensor] = {}  # the same with the residuals of x
        self.reader: dict[nn.Module, nn.Module] = {}  # every reader -> the one its input is filed under
        # eliminate: reader -> (N, C, C) float32, [n, j, c] = sum over positions of
        # (x_j - mean_j) * dL_n/dx_c; and reader -> the precision matrix (C, C) float64 of its input
        self.cross: dict[nn.Module, Tensor] = {}
        self.precision: dict[nn.Module, Tensor] = {}
        # with residual: every reader's input rows on the probe, as compensation collects them
        # (``prune_model`` reuses them instead of another pass)
        self.inputs: dict[nn.Module, Tensor] = {}
        # set by prune_model before a step of per-layer ranking: group -> the most channels the
        # step can remove from it (None: rank them all)
        self.step_bound: Callable[[object], int | None] | None = None

    def refresh(self, model: nn.Module, loader: DataLoader) -> None:
        """Per image and input channel of every conv and linear layer, ``sum_hw x * dL/dx`` (and,
        with ``residual``, the same with each channel's residual on the others, and the cross terms
        of the elimination)."""
        readers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        device = next(model.parameters()).device
        was = model.training
        model.eval()
        try:
            fits, self.inputs = (
                _residual_fits(model, loader, readers, self.probe_batches, self.ridge)
                if self.residual
                else ({}, {})
            )
            self._gradient_terms(model, loader, readers, device, fits)
        finally:
            model.train(was)

    def _gradient_terms(self, model, loader, readers, device, fits: dict) -> None:
        seen: list[tuple[nn.Module, Tensor]] = []
        handles = [m.register_forward_pre_hook(lambda m, args: seen.append((m, args[0]))) for m in readers]
        terms: dict[nn.Module, list[Tensor]] = {}
        residual_terms: dict[nn.Module, list[Tensor]] = {}
        cross: dict[nn.Module, list[Tensor]] = {}
        crossed: set[nn.Module] | None = None  # the inputs that get cross terms, chosen on batch 1
        # column c: channel c's least-squares residual weights on the others (leave-one-out)
        weights = {m: precision / precision.diagonal() for m, (_, precision) in fits.items()}
        try:
            for i, batch in enumerate(loader):
                if i >= self.probe_batches:
                    break
                seen.clear()
                out = model(batch[0].to(device))
                labels = batch[1].to(device)
                check_labels(out, labels, "fisher")
                first: dict[int, nn.Module] = {}
                for m, x in seen:
                    self.reader[m] = first.setdefault(id(x), m)
                inputs = [(m, x) for m, x in seen if first[id(x)] is m and x.requires_grad]
                if crossed is None:
                    batches = _batches(loader, self.probe_batches)
                    crossed = self._crossed(seen, first, fits, len(labels), batches)
                loss = nn.functional.cross_entropy(out, labels, reduction="sum")
                grads = torch.autograd.grad(loss, [x for _, x in inputs], allow_unused=True)
                for (m, x), g in zip(inputs, grads):
                    if g is None:
                        continue
                    x = x.detach()
                    terms.setdefault(m, []).append(_per_channel(x * g))
                    if m in fits:
                        centred = x - _as_map(fits[m][0], x)
                        w = weights[m].to(x.dtype)
                        if m in crossed:
                            # (N, C, positions) each; a linear's input is one position
                            xs, gs = (t.reshape(*t.shape[:2], -1) for t in (centred, g))
                            pair = torch.einsum("njp,ncp->njc", xs, gs)
                            cross.setdefault(m, []).append(pair.float().cpu())
                            # the leave-one-out terms follow from it without another pass over
                            # the positions: sum_j pair[n, j, c] * w[j, c]
                            term = torch.einsum("njc,jc->nc", pair, w).float().cpu()
                        else:
                            # residuals of every channel at once: a 1x1 channel mix of the input
                            r = torch.einsum("nc...,cd->nd...", centred, w)
                            term = _per_channel(r * g)
                        residual_terms.setdefault(m, []).append(term)
                seen.clear()
        finally:
            for h in handles:
                h.remove()
        self.terms = {m: torch.cat(t) for m, t in terms.items()}
        self.residual_terms = {m: torch.cat(t) for m, t in residual_terms.items()}
        self.cross = {m: torch.cat(t) for m, t in cross.items()}
        self.precision = {m: fits[m][1].cpu() for m in self.cross}

    def _crossed(self, seen, first: dict, fits: dict, batch: int, batches: int) -> set[nn.Module]:
        """The inputs that get elimination cross terms: read by one layer only (a stream's channels
        are scored plainly anyway), with gradients (not the model's input), residual-fitted, at
        most ``ELIMINATION_MAX_WIDTH`` wide, in the order the model reads them while their
        ``(N, C, C)`` float32 terms fit in ``ELIMINATION_MAX_BYTES`` (the rest: leave-one-out)."""
        if not self.eliminate:
            return set()
        readers_of: dict[int, int] = {}
        for _, x in seen:
            readers_of[id(x)] = readers_of.get(id(x), 0) + 1
        chosen, used = set(), 0
        for m, x in seen:
            if first[id(x)] is not m or readers_of[id(x)] > 1 or m not in fits or not x.requires_grad:
                continue
            width = x.shape[1]
            size = 4 * batch * batches * width * width
            if width <= ELIMINATION_MAX_WIDTH and used + size <= ELIMINATION_MAX_BYTES:
                chosen.add(m)
                used += size
        return chosen

    @torch.no_grad()
    def __call__(self, group, **kwargs) -> Tensor | None:
        reads = {}  # input key -> (reader, its channel indices, the root's)
        for i, (dep, idxs) in enumerate(group):
            if dep.pruning_fn not in _READS:
                continue
            key = self.reader.get(dep.target.module)
            root_idxs = group[i].root_idxs
            if key is None or key in reads or key not in self.terms or any(r is None for r in root_idxs):
                continue
            reads[key] = (dep.target.module, list(idxs), list(root_idxs))
        # a channel read by several layers (a residual stream) is also carried on by identity paths
        # that no compensation rebuilds: scored plainly, as icnn-cluster ranks streams by magnitude
        residual = len(reads) == 1
        if residual:
            ((key, (module, idxs, root_idxs)),) = reads.items()
            if key in self.cross and (
                flattened_channels(module, idxs, root_idxs, self.terms[key].shape[1]) is None
            ):
                bound = self.step_bound(group) if self.step_bound is not None else None
                scores = eliminate(self.cross[key], self.precision[key], idxs, bound)
                out = torch.zeros(len(group[0].idxs), dtype=torch.float64)
                out[torch.as_tensor(root_idxs)] = scores
                return out.float()
        total: Tensor | None = None
        for key, (module, idxs, root_idxs) in reads.items():
            source = self.terms
            if (
                residual
                and key in self.residual_terms
                and flattened_channels(module, idxs, root_idxs, self.terms[key].shape[1]) is None
            ):
                source = self.residual_terms  # a flattened map's channel is scored plainly
            terms = source[key][:, idxs]
            if total is None:
                total = torch.zeros(len(terms), len(group[0].idxs))
            total.index_add_(1, torch.as_tensor(root_idxs), terms)
        if total is None:
            return None
        return total.double().pow(2).sum(0).float()


def eliminate(cross: Tensor, precision: Tensor, candidates: list[int], bound: int | None = None) -> Tensor:
    """Backward elimination of the ``candidates`` among an input's ``C`` channels: repeatedly
    remove the candidate whose residual on the channels still kept costs the loss least, summed
    over images as ``sum_n (sum_j cross[n, j, c] * w[j, c])^2``, with ``w[:, c]`` the column of the
    kept channels' precision matrix divided by its diagonal (its residual's weights). ``cross``
    ``(N, C, C)``: ``sum_pos (x_j - mean_j) * dL_n/dx_c``; ``precision`` ``(C, C)``: the inverse
    of the ridge covariance of all ``C`` channels. Returns ``(len(candidates),)`` float64 scores,
    increasing in the order of removal (the running maximum of the costs); after ``bound``
    removals (``None``: all) the candidates left score that maximum plus their current cost.

    Removing channel ``a`` downdates ``P`` by rank one (``P - P[:, a] P[a, :] / P[a, a]`` is the
    inverse of the covariance without ``a``, zero in ``a``'s row and column), and the numerators
    ``u[n, c] = sum_j cross[n, j, c] P[j, c]`` with it: ``O(N C K)`` per removal for ``K``
    candidates."""
    p = precision.double().clone()
    cand = torch.as_tensor(list(candidates), dtype=torch.long)
    n, c, k = len(cross), cross.shape[1], len(cand)
    # (C, N, K), contiguous: row j holds every image's candidates against channel j, so that the
    # contraction over j at each removal is one matrix-vector product (not a strided copy)
    sub = cross[:, :, cand].permute(1, 0, 2).contiguous()
    u = torch.einsum("jnk,jk->nk", sub, p[:, cand].to(sub.dtype)).double()
    sub = sub.view(c, n * k)
    scores = torch.zeros(k, dtype=torch.float64)
    left = torch.ones(k, dtype=torch.bool)
    limit = k if bound is None else min(k, max(int(bound), 0))
    running = 0.0

    def costs() -> Tensor:
        return u.pow(2).sum(0) / p.diagonal()[cand].clamp_min(1e-300).pow(2)

    for _ in range(limit):
        cost = costs().masked_fill(~left, float("inf"))
        i = int(cost.argmin())
        a = int(cand[i])
        # strictly increasing in the order of removal, so that ties never reorder it
        running = max(running * (1 + 1e-6), float(cost[i]))
        scores[i], left[i] = running, False
        column = p[:, a].clone()
        pivot = float(column[a])
        if pivot <= 0:
            break  # numerically singular: the rest are ranked by their current cost below
        v = (column.to(sub.dtype) @ sub).view(n, k).double()
        u -= v * (column[cand] / pivot).view(1, -1)
        p -= torch.outer(column, column) / pivot
    if bool(left.any()):
        scores[left] = running * (1 + 1e-6) + costs()[left]
    return scores


def _batches(loader, probe_batches: int) -> int:
    """How many batches a refresh reads: ``probe_batches``, or fewer if the loader has fewer."""
    try:
        return min(probe_batches, len(loader))
    except TypeError:  # an iterable without a length
        return probe_batches


def _per_channel(t: Tensor) -> Tensor:
    """``(N, C, ...)`` -> ``(N, C)`` float32 on the CPU: summed over positions."""
    return (t.sum(tuple(range(2, t.dim()))) if t.dim() > 2 else t).float().cpu()


def _as_map(v: Tensor, like: Tensor) -> Tensor:
    """A per-channel vector ``(C,)`` shaped to broadcast over ``like`` ``(N, C, ...)``."""
    return v.to(like.dtype).view(1, -1, *([1] * (like.dim() - 2)))


@torch.no_grad()
def _residual_fits(
    model: nn.Module, loader: DataLoader, readers: list[nn.Module], batches: int, ridge: float
) -> tuple[dict[nn.Module, tuple[Tensor, Tensor]], dict[nn.Module, Tensor]]:
    """For every layer input up to ``RESIDUAL_MAX_WIDTH`` channels wide: its channel means ``(C,)``
    and the precision matrix ``P`` ``(C, C)`` float64 of its ridge-regularised covariance over every
    position of the first ``batches`` batches; column ``c`` of ``P`` divided by ``P[c, c]`` maps the
    centred input to channel ``c``'s least-squares residual on the other channels. Filed under the
    first reader of each input tensor. The same pass collects every reader's input rows as
    ``collect_layer_inputs`` does (second value), which compensation then reuses."""
    sums: dict[nn.Module, list] = {}  # reader -> [sum x x^T (float64), sum x, rows]

    def add(seen: list[tuple[nn.Module, Tensor]]) -> None:
        done: set[int] = set()
        for m, x in seen:
            if id(x) in done:
                continue
            done.add(id(x))
            if x.dim() < 2 or x.shape[1] > RESIDUAL_MAX_WIDTH:
                continue
            if isinstance(m, nn.Conv2d) and m.groups > 1:
                continue  # a grouped conv's input is pruned with its producer, never scored here
            rows = x.movedim(1, -1).reshape(-1, x.shape[1]).float()
            s = sums.setdefault(m, [0.0, 0.0, 0])
            s[0] = s[0] + (rows.t() @ rows).double()
            s[1] = s[1] + rows.sum(0).double()
            s[2] += len(rows)

    inputs = collect_layer_inputs(model, loader, readers, max_batches=batches, on_batch=add)
    fits = {}
    for m, (gram, total, n) in sums.items():
        mean = total / n
        cov = gram / n - torch.outer(mean, mean)
        fits[m] = (mean.float(), ridge_precision(cov, ridge))
    return fits, inputs
