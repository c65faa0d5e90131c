"""The filter loss with the paper's label-driven approximate gradient (docs/method.md sections 4, 5).

``FilterLossState`` holds what persists across steps for one layer: the running log-space
estimates of ``Z_T`` (per filter, per template), the per-class statistics that assign each filter
to a category, and (for gradient balancing) a running measure of the classification gradient.

Normalisation of ``Z_T``: ``log_z`` estimates ``log mean_x exp(s_T(x))`` rather than
``log sum_x``; the dataset size ``|X|`` cancels in ``log p(x|T) - log p(x)`` and only rescales the
gradient by a constant, so the estimate (and hence training) does not depend on the dataset size.
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np
import torch
from torch import Tensor

from icnn_compress._dist import all_reduce_, is_distributed
from icnn_compress.errors import ICNNError
from icnn_compress.icnn._options import ICNNOptions
from icnn_compress.icnn._templates import cached_templates, log_template_prior, template_scores

__all__ = ["FilterLossState", "approximate_gradient", "assign_categories"]

log = logging.getLogger("icnn_compress")


class _Fusable:
    """A pure tensor function run as it is, or compiled with ``torch.compile`` so that its few
    dozen small operations become a handful of fused kernels (on a GPU a small model's step is
    bound by kernel launches). A compile that fails is logged once; the function then runs as
    it is for the rest of the process. (CUDA graphs, ``mode="reduce-overhead"`` with the outputs
    cloned, were measured on an H100 too: the copies in and out cost about what the replay saves.)"""

    def __init__(self, fn) -> None:
        self.fn = fn
        self._compiled = None
        self.failed = False

    def reset(self) -> None:
        """Forget the compiled function (and a failure): the next fused call compiles afresh."""
        self._compiled, self.failed = None, False

    def __call__(self, fused: bool, *args, **kwargs):
        if fused and not self.failed:
            try:
                if self._compiled is None:
                    log.info(
                        "Compiling %s of the filter loss with torch.compile (the first steps take longer; "
                        "fuse='off' runs it op by op).",
                        self.fn.__name__.strip("_").replace("_", " "),
                    )
                    self._compiled = torch.compile(self.fn, dynamic=None)
                return self._compiled(*args, **kwargs)
            except Exception as exc:  # any backend error: the eager function computes the same
                self.failed = True
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                log.warning("Fusing the filter-loss statistics failed (%s); they run op by op.", first)
        return self.fn(*args, **kwargs)


@functools.lru_cache(maxsize=1)
def _has_triton() -> bool:
    """Whether Triton can compile kernels here (asked once per process: the answer does not change
    and asking costs host time on every step)."""
    try:
        from torch.utils._triton import has_triton

        return bool(has_triton())
    except Exception:  # an import error or a broken Triton install both mean: no fused kernels
        return False


def use_fused(fuse: str, device: torch.device) -> bool:
    """Whether the loss statistics run compiled: ``fuse="on"`` always (one process), ``"auto"`` on
    CUDA with Triton, ``"off"`` never. Never under ``torch.distributed`` (its collectives stay
    between the compiled parts' inputs and outputs only in eager mode)."""
    if fuse == "off" or is_distributed():
        return False
    return fuse == "on" or (device.type == "cuda" and _has_triton())


class _InjectGradient(torch.autograd.Function):
    """Returns a precomputed value; its backward hands a precomputed gradient to ``x``."""

    @staticmethod
    def forward(ctx, x: Tensor, value: Tensor, grad: Tensor, state: FilterLossState) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(grad)
        ctx.state = state
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        # the multiplier of the loss in this backward (a GradScaler's scale under AMP): the task
        # gradient measured by the tap carries it too, and balance="grad" must divide it out
        ctx.state.loss_scale = grad_out.detach().abs().float()  # a device tensor: no host sync
        return grad_out * grad, None, None, None


class _GradientTap(torch.autograd.Function):
    """Identity whose backward adds the per-filter sum of squared incoming gradients to a state."""

    @staticmethod
    def forward(ctx, x: Tensor, state: FilterLossState) -> Tensor:  # type: ignore[override]
        ctx.state = state
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        state = ctx.state
        state.fold_task_gradient(grad_out.detach())
        return grad_out, None


def _task_gradient_sums(g: Tensor, pending_sq: Tensor, pending_count: Tensor) -> tuple[Tensor, Tensor]:
    """``pending_sq + sum over (N, h, w) of g**2`` per filter ``(C,)``, and ``pending_count + the
    number of elements behind each``. A non-finite gradient must not poison the running RMS: it
    counts as nothing seen, decided on the device (reading a flag on the host would wait for the
    backward pass)."""
    g = g.float()
    sum_sq = g.pow(2).sum(dim=(0, 2, 3))
    finite = torch.isfinite(sum_sq).all()
    sum_sq = torch.where(finite, sum_sq, torch.zeros_like(sum_sq))
    count = finite.to(torch.float64) * (g.shape[0] * g.shape[2] * g.shape[3])
    return pending_sq + sum_sq.to(pending_sq.dtype), pending_count + count


_fused_task_gradient_sums = _Fusable(_task_gradient_sums)


def approximate_gradient(
    scores: Tensor, log_z: Tensor, templates: Tensor, template_index: Tensor, weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The paper's dominant-term gradient of ``-MI`` and the per-filter MI estimate.

    Args:
        scores: ``s_T(x)``, ``(N, C, T)``.
        log_z: running ``log Z_T`` per filter, ``(C, T)`` (treated as a constant).
        templates: ``(T, P)`` flattened templates.
        template_index: ``T_hat`` per map, ``(N, C)``: the argmax position for images of the
            filter's category, ``T - 1`` (the negative template) otherwise.
        weights: ``(N,)`` 1 for the images that count, 0 for those left out (non-finite maps);
            ``None``: all count. The batch mean is over the images that count.

    Returns:
        ``(grad, mi)``: ``dLoss/dx`` of shape ``(N, C, P)`` for ``Loss = -sum_c MI_c`` with each
        map weighted ``1/N`` (the batch mean), and the MI estimate ``(C,)`` in nats.
    """
    n = scores.shape[0] if weights is None else weights.sum().clamp_min(1.0)
    num_t = templates.shape[0]
    log_pt = log_template_prior(num_t - 1, device=scores.device, dtype=scores.dtype)
    log_px_t = scores - log_z  # log p(x|T), up to the constant log|X|
    log_px = torch.logsumexp(log_px_t + log_pt, dim=2)  # (N, C)
    per_map = (torch.exp(log_pt + log_px_t) * (log_px_t - log_px[..., None])).sum(dim=2)  # (N, C)
    mi = per_map.mean(dim=0) if weights is None else (per_map * weights[:, None]).sum(dim=0) / n
    lp_hat = log_px_t.gather(2, template_index[..., None]).squeeze(2)  # (N, C)
    coef = torch.exp(log_pt[template_index] + lp_hat) * (lp_hat - log_px)
    if weights is not None:
        coef = coef * weights[:, None]
    grad = -(coef[..., None] * templates[template_index]) / n
    return grad, mi


def assign_categories(stats: Tensor, mode: str = "multi") -> Tensor:
    """Filter -> category from per-class statistics ``(C, K)`` (paper: argmax over classes).

    ``mode="balanced"`` gives each class ``~C/K`` filters, maximising the total share of each
    filter's statistic that its class holds (Hungarian assignment over class slots).
    """
    if mode == "multi":
        return stats.argmax(dim=1)
    # imported here: scipy.optimize costs 0.2 s, paid by every import of the loss otherwise
    from scipy.optimize import linear_sum_assignment

    c, k = stats.shape
    share = (stats / stats.sum(dim=1, keepdim=True).clamp_min(1e-12)).cpu().double().numpy()
    slots = math.ceil(c / k)
    cost = -np.repeat(share, slots, axis=1)  # column j is class j // slots
    rows, cols = linear_sum_assignment(cost)
    out = torch.empty(c, dtype=torch.long)
    out[torch.as_tensor(rows)] = torch.as_tensor(cols // slots, dtype=torch.long)
    return out.to(stats.device)


class FilterLossState:
    """Per-layer state of the filter loss; ``state_dict()`` / ``load_state_dict()`` for resume.

    Args:
        num_filters: C, the layer's channel count.
        num_classes: K.
        options: the ``ICNNOptions`` it reads: ``categories`` (``"multi"``, the paper's rule,
            ``"balanced"`` or ``"single"``: every filter belongs to ``positive_class``),
            ``category_stat`` (``"sum"``, the paper's ``sum_ij x``, or ``"max"``, the authors'
            code), ``refresh_every`` (re-assign categories every this many updates, and at the
            first), ``z_momentum`` and ``stat_momentum`` (of the running estimates; 1 = last batch).
    """

    def __init__(self, num_filters: int, num_classes: int, options: ICNNOptions | None = None) -> None:
        options = options or ICNNOptions()
        categories, positive_class = options.categories, options.positive_class
        if categories == "single" and not 0 <= positive_class < num_classes:
            raise ICNNError(
                f"The 'positive_class' option must be in [0, {num_classes}). Got {positive_class!r} instead."
            )
        self.num_filters = num_filters
        self.num_classes = num_classes
        self.mode = categories
        self.positive_class = positive_class
        self.category_stat = options.category_stat
        self.refresh_every = options.refresh_every
        self.z_momentum = options.z_momentum
        self.stat_momentum = options.stat_momentum
        self.updates = 0
        self._skipped: Tensor | int = 0  # images left out because their maps were not finite
        self._assigned = categories == "single"  # categories assigned at least once
        self.log_z: Tensor | None = None  # (C, T)
        self.class_stats = torch.zeros(num_filters, num_classes, dtype=torch.float64)
        self.class_seen = torch.zeros(num_classes, dtype=torch.bool)
        if categories == "single":
            self.categories = torch.full((num_filters,), positive_class, dtype=torch.long)
        else:
            self.categories = torch.full((num_filters,), -1, dtype=torch.long)
        self.task_grad_ms: Tensor | None = None  # running mean square of the task gradient, (C,)
        self._ms_seen: Tensor | None = None  # (device bool) a finite task gradient was folded in
        self._pending_sq = torch.zeros(num_filters, dtype=torch.float64)
        self._pending_count = torch.zeros((), dtype=torch.float64)  # gradient elements behind it
        self._pending_calls = 0  # backward passes seen since the last step (known on the host)
        self.loss_scale: Tensor | float = 1.0  # multiplier of the loss seen in the last backward
        self.fuse = options.fuse  # "auto", "on" or "off": see use_fused
        self._weight: tuple[float, Tensor] | None = None  # lambda and its device tensor

    # ----- task-gradient bookkeeping (balance="grad") -----
    @property
    def skipped(self) -> int:
        """Images left out so far because their maps were not finite (reading it syncs the device)."""
        return int(self._skipped)

    def fold_task_gradient(self, grad: Tensor) -> None:
        """Fold one backward pass's task gradient at this layer, ``(N, C, h, w)``, into the pending
        per-filter sums (on the device; no host synchronisation)."""
        if self._pending_sq.device != grad.device:
            self._pending_sq = self._pending_sq.to(grad.device)
            self._pending_count = self._pending_count.to(grad.device)
        self._pending_sq, self._pending_count = _fused_task_gradient_sums(
            use_fused(self.fuse, grad.device), grad, self._pending_sq, self._pending_count
        )
        self._pending_calls += 1

    def _place(self, device: torch.device) -> None:
        """Move the running state to ``device`` (once, at the first step there)."""
        if self.class_stats.device != device:
            self.class_stats = self.class_stats.to(device)
            self.class_seen = self.class_seen.to(device)
            self.categories = self.categories.to(device)
        if self._pending_sq.device != device:
            self._pending_sq = self._pending_sq.to(device)
            self._pending_count = self._pending_count.to(device)
        if not torch.is_tensor(self.loss_scale) or self.loss_scale.device != device:
            self.loss_scale = torch.as_tensor(self.loss_scale, dtype=torch.float32).to(device)
        if self.task_grad_ms is not None:
            self.task_grad_ms = self.task_grad_ms.to(device)
            seen = self._ms_seen if self._ms_seen is not None else torch.ones((), dtype=torch.bool)
            self._ms_seen = seen.to(device)
        if self.log_z is not None:
            self.log_z = self.log_z.to(device)

    # ----- the loss -----
    def loss(
        self,
        maps: Tensor,
        targets: Tensor,
        *,
        tau: float | None,
        beta: float,
        normalize: bool,
        balance: bool,
        weight: float,
    ) -> tuple[Tensor, Tensor]:
        """Weighted filter loss of one layer for one batch.

        Args:
            maps: ``(N, C, h, w)`` post-ReLU maps of the last forward pass (graph attached).
            targets: ``(N,)`` class indices.
            weight: ``lambda`` for this step; with ``balance`` it is the ratio of the filter-loss
                gradient's RMS to the task gradient's RMS at this layer, per filter.

        Returns:
            ``(loss, mi)``: a float32 scalar whose value is ``-weight * sum_f MI_f`` and whose
            backward is the (weighted or balanced) approximate gradient, and the MI estimate ``(C,)``.
        """
        _, c, h, w = maps.shape
        device = maps.device
        fused = use_fused(self.fuse, device)
        self._place(device)
        refresh = self.mode != "single" and (self.updates % self.refresh_every == 0 or not self._assigned)
        templates = cached_templates(h, w, tau, beta, device)
        seen = balance and self._pending_calls > 0  # the same on every rank: same backward passes
        if seen:
            self._pending_calls = 0
        # lambda as a device tensor (no recompile per value), made again only when it changes
        if self._weight is None or self._weight[0] != float(weight) or self._weight[1].device != device:
            self._weight = (float(weight), torch.full((), float(weight), device=device))
        fold_kw = dict(
            num_classes=self.num_classes,
            stat_sum=self.category_stat == "sum",
            momentum=self.stat_momentum,
            argmax_categories=refresh and self.mode == "multi",
        )
        terms_kw = dict(normalize=normalize, balance=balance, seen=seen, z_momentum=self.z_momentum)
        # the statistics need float32 even under autocast (exp/log-sum-exp of template scores)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            fresh_z = self.log_z is None or tuple(self.log_z.shape) != (c, templates.shape[0])
            # _loss_terms's arguments after the categories: the running estimates and lambda
            terms_args = (
                None if fresh_z else self.log_z,
                templates,
                self._pending_sq,
                self._pending_count,
                self.task_grad_ms,
                self._ms_seen,
                self.loss_scale,
                self._weight[1],
            )
            stats = (self.class_stats, self.class_seen, self.categories)
            if refresh and self.mode == "balanced":  # a Hungarian assignment on the host in between
                x, weights, peak_val, peak_idx, self.class_stats, self.class_seen, _, bad = _fused_fold_maps(
                    fused, maps.detach(), targets, *stats, **fold_kw
                )
                self.categories = assign_categories(self.class_stats, self.mode).to(device)
                out = _fused_loss_terms(
                    fused, x, weights, peak_val, peak_idx, targets, self.categories, *terms_args, **terms_kw
                )
            else:  # one compiled call for both halves
                self.class_stats, self.class_seen, self.categories, bad, *out = _fused_fold_and_loss_terms(
                    fused, maps.detach(), targets, *stats, *terms_args, fold_kw=fold_kw, terms_kw=terms_kw
                )
            if refresh:
                self._assigned = True
            self._skipped = self._skipped + bad
            grad, mi, value, self.log_z, task_ms, ms_seen, pending_sq, pending_count = out
            if seen:
                self.task_grad_ms, self._ms_seen = task_ms, ms_seen
                self._pending_sq, self._pending_count = pending_sq, pending_count
        self.updates += 1
        loss = _InjectGradient.apply(maps, value, grad.to(maps.dtype), self)
        return loss, mi

    def tap(self, x: Tensor) -> Tensor:
        """Identity on ``x`` that measures the task gradient flowing back into it."""
        return _GradientTap.apply(x, self)

    def state_dict(self) -> dict:
        return {
            "updates": self.updates,
            "skipped": self.skipped,
            "assigned": self._assigned,
            "log_z": None if self.log_z is None else self.log_z.detach().cpu(),
            "class_stats": self.class_stats.detach().cpu().clone(),
            "class_seen": self.class_seen.cpu().clone(),
            "categories": self.categories.cpu().clone(),
            "task_grad_ms": None if self.task_grad_ms is None else self.task_grad_ms.cpu().clone(),
            "pending_sq": self._pending_sq.cpu().clone(),
            "pending_count": float(self._pending_count),
            "pending_calls": self._pending_calls,
            "ms_seen": None if self._ms_seen is None else bool(self._ms_seen),
            "loss_scale": float(self.loss_scale),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["class_stats"].shape != self.class_stats.shape:
            raise ICNNError(
                f"ICNN state has {tuple(state['class_stats'].shape)} filters x classes; "
                f"this layer has {tuple(self.class_stats.shape)}."
            )
        self.updates = int(state["updates"])
        self._skipped = int(state.get("skipped", 0))
        self._assigned = bool(state.get("assigned", bool((state["categories"] >= 0).all())))
        self.log_z = state["log_z"]
        self.class_stats = state["class_stats"].clone()
        self.class_seen = state["class_seen"].clone()
        self.categories = state["categories"].clone()
        self.task_grad_ms = state["task_grad_ms"]
        self._pending_sq = state["pending_sq"].clone()
        self._pending_count = torch.tensor(float(state["pending_count"]), dtype=torch.float64)
        # older states knew only the count; a count > 0 meant a backward pass was seen
        self._pending_calls = int(state.get("pending_calls", float(state["pending_count"]) > 0))
        seen = state.get("ms_seen", None if self.task_grad_ms is None else True)
        self._ms_seen = None if seen is None else torch.tensor(bool(seen))
        self.loss_scale = float(state["loss_scale"])


def _fold_maps(
    maps: Tensor,
    targets: Tensor,
    class_stats: Tensor,
    class_seen: Tensor,
    categories: Tensor,
    *,
    num_classes: int,
    stat_sum: bool,
    momentum: float,
    argmax_categories: bool,
):
    """The per-image part of a loss step: finite maps, each map's peak, and the class statistics.

    Args:
        maps: ``(N, C, h, w)`` detached maps (any float dtype).
        targets: ``(N,)`` class indices.
        class_stats: ``(C, K)`` float64 running mean statistic per filter and class;
            ``class_seen``: ``(K,)`` bool; ``categories``: ``(C,)`` long.
        argmax_categories: re-assign each filter to the class of its largest statistic.

    Returns:
        ``(x, weights, peak_val, peak_idx, class_stats, class_seen, categories, bad)``: the float32
        maps with non-finite images zeroed ``(N, C, h, w)``, ``(N,)`` 1 for the images that count,
        the peak value and flat position per map ``(N, C)``, the new statistics, and how many images
        were left out (a device scalar). An image whose maps hold NaN/inf (a bad pixel, an
        overflow) gets weight 0: the running estimates never see it and its maps get no gradient.
    """
    x = maps.float()
    n, c, h, w = x.shape
    finite = torch.isfinite(x).flatten(1).all(dim=1)  # (N,)
    weights = finite.to(torch.float32)
    x = torch.where(finite[:, None, None, None], x, torch.zeros((), device=x.device))
    peak_val, peak_idx = x.reshape(n, c, h * w).max(dim=2)  # (N, C)
    stat = x.sum(dim=(2, 3)) if stat_sum else peak_val
    # (N, K); F.one_hot would read the targets' range on the host (a sync on every step)
    onehot = (targets[:, None] == torch.arange(num_classes, device=targets.device)).to(stat.dtype)
    onehot = onehot * weights[:, None]
    packed = all_reduce_(torch.cat([stat.t() @ onehot, onehot.sum(0, keepdim=True)], dim=0).double())
    sums, counts = packed[:-1], packed[-1]
    present = counts > 0
    mean = sums / counts.clamp_min(1.0)
    fresh = (present & ~class_seen)[None, :]
    old = (present & class_seen)[None, :]
    blended = (1 - momentum) * class_stats + momentum * mean
    class_stats = torch.where(fresh, mean, torch.where(old, blended, class_stats))
    class_seen = class_seen | present
    if argmax_categories:
        categories = class_stats.argmax(dim=1)
    bad = (~finite).sum()
    return x, weights, peak_val, peak_idx, class_stats, class_seen, categories, bad


def _loss_terms(
    x: Tensor,
    weights: Tensor,
    peak_val: Tensor,
    peak_idx: Tensor,
    targets: Tensor,
    categories: Tensor,
    log_z: Tensor | None,
    templates: Tensor,
    pending_sq: Tensor,
    pending_count: Tensor,
    task_ms: Tensor | None,
    ms_seen: Tensor | None,
    loss_scale: Tensor,
    weight: Tensor,
    *,
    normalize: bool,
    balance: bool,
    seen: bool,
    z_momentum: float,
):
    """The gradient and MI of one loss step, and the running estimates it updates.

    Args:
        x, weights, peak_val, peak_idx: from ``_fold_maps``; ``targets`` ``(N,)``;
            ``categories`` ``(C,)``.
        log_z: running ``log Z_T`` ``(C, T)``, ``None`` to start afresh from this batch.
        templates: ``(T, h*w)``.
        pending_sq, pending_count: the task gradient folded in since the last step (``(C,)`` and
            a scalar, float64); ``seen``: whether any backward pass folded one in.
        task_ms, ms_seen: the running mean square of the task gradient ``(C,)`` (``None`` before
            the first) and whether a finite one was folded in (a bool scalar).
        loss_scale: the multiplier of the loss in the last backward (a scalar tensor).
        weight: lambda for this step (a scalar tensor).

    Returns:
        ``(grad, mi, value, log_z, task_ms, ms_seen, pending_sq, pending_count)``: ``dLoss/dmaps``
        ``(N, C, h, w)`` float32, the MI estimate ``(C,)``, the reported value
        ``-lambda * sum_f MI_f``, the new running estimates and the emptied pending sums.
    """
    n, c, h, w = x.shape
    valid = weights.sum().reshape(1)
    if normalize:
        packed = all_reduce_(torch.cat([(peak_val * weights[:, None]).sum(0), valid]))
        scale = (packed[:-1] / packed[-1].clamp_min(1.0)).clamp_min(1e-6)  # (C,) mean of max x
    else:
        scale = torch.ones(c, device=x.device)
    xn = x / scale[None, :, None, None]
    scores = template_scores(xn, templates)  # (N, C, T)
    # the running log Z_T (log-mean-exp over the images that count; a batch where none counts
    # leaves the estimate as it was)
    peak = all_reduce_(scores.amax(dim=0), "max")
    e = torch.exp(scores - peak) * weights[:, None, None]
    packed = all_reduce_(torch.cat([e.sum(dim=0).flatten(), valid.to(scores.dtype)]))
    total = packed[-1]
    batch = peak + torch.log(packed[:-1].view_as(peak).clamp_min(1e-38)) - torch.log(total.clamp_min(1.0))
    if log_z is None or z_momentum >= 1:
        new = batch
    else:
        new = torch.logaddexp(log_z + math.log1p(-z_momentum), batch + math.log(z_momentum))
    log_z = torch.where(total > 0, new, batch if log_z is None else log_z)
    own = targets[:, None] == categories[None, :]
    t_hat = torch.where(own, peak_idx, torch.full_like(peak_idx, h * w))
    grad, mi = approximate_gradient(scores, log_z, templates, t_hat, weights)
    grad = grad.reshape(n, c, h, w) / scale[None, :, None, None]
    if balance:
        if seen:
            packed = all_reduce_(torch.cat([pending_sq, pending_count.reshape(1).to(pending_sq)]))
            count = packed[-1]
            ms = packed[:-1] / count.clamp_min(1.0) / loss_scale.double().clamp_min(1e-30) ** 2
            if task_ms is None:  # zeros until a finite gradient arrives: no loss gradient
                task_ms = torch.zeros_like(ms)
                ms_seen = torch.zeros((), dtype=torch.bool, device=ms.device)
            blended = torch.where(ms_seen, 0.9 * task_ms + 0.1 * ms, ms)
            task_ms = torch.where(count > 0, blended, task_ms)
            ms_seen = ms_seen | (count > 0)
            pending_sq, pending_count = torch.zeros_like(pending_sq), torch.zeros_like(pending_count)
        if task_ms is None:  # no task gradient seen yet: no filter-loss gradient this step
            factor = torch.zeros(c, device=x.device)
        else:
            own_ms = all_reduce_(torch.cat([grad.pow(2).sum(dim=(0, 2, 3)), valid * (h * w)]))
            own_rms = (own_ms[:-1] / own_ms[-1].clamp_min(1.0)).sqrt().clamp_min(1e-30)
            factor = weight * task_ms.float().sqrt() / own_rms
    else:
        factor = weight.expand(c)
    grad = grad * factor[None, :, None, None]
    # reported value: -lambda * sum_f MI_f (float32: lambda * MI can exceed float16's range)
    value = -weight * mi.sum()
    return grad, mi, value, log_z, task_ms, ms_seen, pending_sq, pending_count


def _fold_and_loss_terms(
    maps: Tensor,
    targets: Tensor,
    class_stats: Tensor,
    class_seen: Tensor,
    categories: Tensor,
    *terms_args: Tensor | None,
    fold_kw: dict,
    terms_kw: dict,
):
    """``_fold_maps`` then ``_loss_terms`` in one function (one compiled call per step);
    ``terms_args`` are ``_loss_terms``'s positional arguments from ``log_z`` on.

    Returns:
        ``(class_stats, class_seen, categories, bad)`` of ``_fold_maps`` followed by the eight
        outputs of ``_loss_terms``.
    """
    x, weights, peak_val, peak_idx, class_stats, class_seen, categories, bad = _fold_maps(
        maps, targets, class_stats, class_seen, categories, **fold_kw
    )
    out = _loss_terms(x, weights, peak_val, peak_idx, targets, categories, *terms_args, **terms_kw)
    return (class_stats, class_seen, categories, bad, *out)


_fused_fold_maps = _Fusable(_fold_maps)
_fused_loss_terms = _Fusable(_loss_terms)
_fused_fold_and_loss_terms = _Fusable(_fold_and_loss_terms)
