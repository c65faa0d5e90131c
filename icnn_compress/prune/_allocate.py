"""Latency-aware widths: how many channels each layer gives up (``prune_model(allocation="latency")``).

Uniform pruning takes the same share of every layer; MACs then fall evenly, but latency does not:
a layer at high resolution costs more per channel than its MACs say, and a width just past a
kernel's channel block costs as much as the whole block. This module plans per-layer widths from
what the machine measures instead:

1. **Latency model.** Every conv whose channels a dependency group changes is timed alone in
   ONNX Runtime against its output width and its input width (``conv_latency_table``, cached per
   machine, provider, threads and batch). A conv's latency at ``(c_in, c_out)`` is predicted as
   ``T_out(c_out) * T_in(c_in) / T_full`` (separable; widths between measured ones interpolated);
   the model's as the sum over convs plus a constant for everything else, calibrated on the
   measured latency of the unpruned model.
2. **Importance.** The criterion scores every group's channels on the unpruned model. Removing the
   ``j``-th weakest of ``C`` channels costs its share of the group's total score, times
   ``C / (C - j)``: taking a tenth of any layer costs about the same, and a layer gets dearer to
   thin the thinner it is.
3. **Greedy allocation.** Repeatedly take from the group whose next narrower width (on the fast
   side of a latency step: a width every wider option of which is measurably slower) buys the most
   predicted latency per unit of importance. No layer may lead the average share of channels
   removed by more than ``MAX_DEVIATION`` (0.2): without that bound the greedy stripped the small
   high-resolution layers of resnet_cifar20 to 4 channels and lost 6 points one-shot for 8% more
   speed (tools/results/latency_aware.json records the bounded version).
4. **Measured stop.** The greedy moves form a sequence of ever narrower plans. The first plan that
   meets the target is found by bisection, each probe measured on a quick copy pruned to its widths
   (the real MACs count, or the ONNX Runtime latency of the exported copy): the predictions only
   order the moves, the measurements decide where to stop, so a ``latency_speedup`` target lands
   near it (README table 2c: within 5% in five of six cases, +10.4% in the sixth). The model is then
   pruned to those widths with the chosen criterion (``prune_model(widths=...)``).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch_pruning as tp
from torch import Tensor, nn

from icnn_compress.errors import ConfigError
from icnn_compress.measure._layer_latency import conv_io_sizes, conv_latency_table

log = logging.getLogger(__name__)

__all__ = ["LatencyModel", "plan_latency_widths", "prune_latency_aware"]

_TOLERANCE = 0.05  # a latency_speedup target is aimed at within 5% (bisection stops 2.5% short at most)
MAX_DEVIATION = 0.2  # a layer's share removed may lead the average share by at most this
_STEP_TOLERANCE = 0.03  # widths within 3% of a wider one's latency are not worth keeping on the menu


def _interp(table: dict[int, float], width: float) -> float:
    """Latency at ``width`` from a measured table (linear between measured widths)."""
    ws = sorted(table)
    return float(np.interp(width, ws, [table[w] for w in ws]))


class LatencyModel:
    """Predicted ONNX Runtime latency (ms) of a set of convs at any input/output widths.

    Args:
        convs: ``{conv: (input (H, W), vary)}`` where ``vary`` is the set of widths that change:
            ``{"out"}``, ``{"in"}`` or both.
        batch, threads, provider: where the model will run (as for ``ort_latency``).
    """

    def __init__(
        self,
        convs: dict[nn.Conv2d, tuple[tuple[int, int], set[str]]],
        *,
        batch: int,
        threads: int,
        provider: str,
    ) -> None:
        self.out: dict[nn.Conv2d, dict[int, float]] = {}
        self.inp: dict[nn.Conv2d, dict[int, float]] = {}
        self.full: dict[nn.Conv2d, float] = {}
        for conv, (hw, vary) in convs.items():
            kw = dict(batch=batch, threads=threads, provider=provider)
            out = conv_latency_table(
                conv, hw, vary="out", widths=None if "out" in vary else [conv.out_channels], **kw
            )
            self.out[conv] = out
            self.full[conv] = out[conv.out_channels]
            if "in" in vary:
                self.inp[conv] = conv_latency_table(conv, hw, vary="in", **kw)

    def conv_ms(self, conv: nn.Conv2d, cin: float, cout: float) -> float:
        """Predicted latency of ``conv`` with ``cin`` input and ``cout`` output channels."""
        t = _interp(self.out[conv], cout)
        if conv in self.inp:
            t *= _interp(self.inp[conv], cin) / max(self.full[conv], 1e-9)
        return t

    def total_ms(self, widths: dict[nn.Conv2d, list[int]]) -> float:
        """Sum over the modelled convs at ``{conv: [cin, cout]}``."""
        return sum(self.conv_ms(c, *widths[c]) for c in self.out)


@dataclass
class _Group:
    """One dependency group as the planner sees it."""

    name: str
    root: nn.Module
    channels: int
    min_width: int
    out_convs: list[nn.Conv2d]
    in_convs: list[nn.Conv2d]
    costs: np.ndarray  # costs[k]: importance lost by removing the k weakest channels
    menu: list[int] = field(default_factory=list)  # allowed widths, ascending


def _removal_costs(scores: Tensor | None, channels: int) -> np.ndarray:
    """``costs[k]`` for ``k = 0..channels``: the ``k`` weakest channels' share of the layer's total
    score, each weighted by ``C / (C - j)`` (thinning a thin layer is dear)."""
    if scores is None or len(scores) != channels:
        s = np.ones(channels)
    else:
        s = np.sort(np.nan_to_num(scores.detach().double().cpu().numpy(), nan=0.0).clip(min=0.0))
    s = s / max(float(s.sum()), 1e-12)  # a share of the layer: comparable across layer sizes
    j = np.arange(channels)
    return np.concatenate([[0.0], np.cumsum(s * channels / (channels - j))])


def _efficient(curve: dict[int, float], low: int) -> list[int]:
    """Widths >= ``low`` at the right end of each latency step of ``curve`` (every wider width is
    slower by more than ``_STEP_TOLERANCE``); the full width is always kept."""
    out, best_above = [], float("inf")
    for w in sorted(curve, reverse=True):
        if w < low:
            break
        if not out or curve[w] * (1 + _STEP_TOLERANCE) < best_above:
            out.append(w)
        best_above = min(best_above, curve[w])
    return sorted(out)


def _groups(pruner, model: nn.Module, importance, max_layer_ratio: float) -> list[_Group]:
    names = {m: n for n, m in model.named_modules()}
    dg = pruner.DG
    found = []
    for group in dg.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    ):
        root = group[0].dep.target.module
        if isinstance(root, nn.Conv2d) and root.groups != 1:
            continue  # grouped/depthwise roots keep their width
        if not isinstance(root, (nn.Conv2d, nn.Linear)):
            continue
        channels = root.out_channels if isinstance(root, nn.Conv2d) else root.out_features
        outs, ins = [], []
        for dep, _ in group:
            m = dep.target.module
            if isinstance(m, nn.Conv2d) and m.groups == 1:
                (outs if dg.is_out_channel_pruning_fn(dep.handler) else ins).append(m)
        found.append(
            _Group(
                names[root],
                root,
                channels,
                max(1, math.ceil(channels * (1 - max_layer_ratio))),
                outs,
                ins,
                # a coupled group (a ResNet stage's residual channels) loses that share in each of
                # its layers at once
                _removal_costs(importance(group), channels) * max(1, len(outs)),
            )
        )
    return found


def plan_latency_widths(
    groups: list[_Group], latency: LatencyModel, spatial: dict, *, base_macs: float
) -> list[tuple[dict[str, int], float, float]]:
    """The greedy sequence of plans, narrowest last: at each move, the group whose next narrower
    menu width removes the most predicted conv latency per unit of importance gives it up.

    Returns ``[(widths, predicted conv ms, predicted MACs), ...]`` after each move, ``widths``
    being ``{group root name: width}`` for the groups narrowed so far."""
    state = {c: [c.in_channels, c.out_channels] for c in latency.out}
    full = {g.name: g.channels for g in groups}
    width = dict(full)

    def conv_macs(c: nn.Conv2d, cin: float, cout: float) -> float:
        oh, ow = spatial[c][1]
        return cin * cout * c.kernel_size[0] * c.kernel_size[1] * oh * ow / c.groups

    macs_now, lat_now = float(base_macs), latency.total_ms(state)
    total = sum(full.values())
    plans = []
    while True:
        best = None
        removed = total - sum(width.values())
        for g in groups:
            w = width[g.name]
            lower = [m for m in g.menu if m < w]
            if not lower:
                continue
            nw, k = lower[-1], w - lower[-1]
            # stay near uniform: no layer more than MAX_DEVIATION ahead of the average share removed
            # (a move that would lead further ranks after every move that would not)
            share = 1 - nw / g.channels
            near = share <= max(MAX_DEVIATION, (removed + k) / total + MAX_DEVIATION)
            d_lat = d_macs = 0.0
            for c in g.out_convs:
                cin, cout = state[c]
                d_lat += latency.conv_ms(c, cin, cout) - latency.conv_ms(c, cin, cout - k)
                d_macs += conv_macs(c, cin, cout) - conv_macs(c, cin, cout - k)
            for c in g.in_convs:
                cin, cout = state[c]
                d_lat += latency.conv_ms(c, cin, cout) - latency.conv_ms(c, cin - k, cout)
                d_macs += conv_macs(c, cin, cout) - conv_macs(c, cin - k, cout)
            d_cost = g.costs[g.channels - nw] - g.costs[g.channels - w]
            # latency per unit of importance; a measured gain below noise still counts its MACs
            score = (near, (max(d_lat, 0.0) + 1e-9 * d_macs) / max(d_cost, 1e-9))
            if best is None or score > best[0]:
                best = (score, g, nw, d_lat, d_macs)
        if best is None:
            return plans
        _, g, nw, d_lat, d_macs = best
        k = width[g.name] - nw
        for c in g.out_convs:
            state[c][1] -= k
        for c in g.in_convs:
            state[c][0] -= k
        width[g.name] = nw
        lat_now, macs_now = lat_now - d_lat, macs_now - d_macs
        plans.append(
            (
                {n: w for n, w in width.items() if w < dict((x.name, x.channels) for x in groups)[n]},
                lat_now,
                macs_now,
            )
        )


def _first_reaching(plans: list, reached) -> int:
    """Index of the first plan for which ``reached(i)`` is true (bisection: the sequence narrows
    monotonically), or ``len(plans) - 1`` when none does."""
    lo, hi = 0, len(plans) - 1
    if not reached(hi):
        return hi
    while lo < hi:
        mid = (lo + hi) // 2
        if reached(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def prune_latency_aware(model: nn.Module, example_inputs: Tensor, *, target, data, **kw):
    """``prune_model(..., allocation="latency")``: plan widths, prune to them, check, re-plan."""
    from icnn_compress.prune._criteria import criterion_spec
    from icnn_compress.prune._engine import (
        TargetError,
        _dependency_graph,
        _ignored_modules,
        _importance,
        _speedup_timer,
        _stats,
        _taylor_gradients,
        ignored_module_names,
        prune_model,
    )

    if target.kind not in ("macs_reduction", "latency_speedup"):
        raise ConfigError(
            f"allocation='latency' plans for a macs_reduction or latency_speedup target. Got {target.kind}."
        )
    if kw.get("keep_classes") is not None:
        raise ConfigError(
            "allocation='latency' does not combine with keep_classes; use allocation='uniform'."
        )
    spec = criterion_spec(kw["criterion"])
    if (spec.needs_data or kw["compensate"]) and data is None:
        raise ConfigError(f"criterion {kw['criterion']!r} / compensate=True needs data= (probe batches).")
    importance = _importance(
        spec, kw["criterion"], kw["probe_batches"], kw["criterion_options"], kw["compensate"], kw["ridge"]
    )
    work = copy.deepcopy(model)  # scores and groups are read from a copy; the caller's model is untouched
    device = next(work.parameters()).device
    example = example_inputs.to(device)
    ignored = _ignored_modules(work, ignored_module_names(work, kw["ignored_layers"]), kw["keep_classifier"])
    pruner = _dependency_graph(
        lambda: tp.pruner.MetaPruner(work, example, importance=importance, ignored_layers=ignored), work
    )
    if hasattr(importance, "refresh"):
        importance.refresh(work, data)
    if spec.needs_gradients:
        _taylor_gradients(work, data, kw["probe_batches"])
    groups = _groups(pruner, work, importance, kw["max_layer_ratio"])
    spatial = conv_io_sizes(work, example[:1])
    convs: dict = {}
    for g in groups:
        for c in g.out_convs:
            convs.setdefault(c, (spatial[c][0], set()))[1].add("out")
        for c in g.in_convs:
            convs.setdefault(c, (spatial[c][0], set()))[1].add("in")
    latency = LatencyModel(convs, batch=target.latency_batch, threads=target.latency_threads, provider="cpu")
    for g in groups:
        curve = {}
        step = 4 if g.channels <= 16 else 8  # the vector kernels' channel blocks
        for w in sorted({*range(step, g.channels + 1, step), g.channels}):
            curve[w] = sum(latency.conv_ms(c, c.in_channels, w) for c in g.out_convs) + sum(
                latency.conv_ms(c, w, c.out_channels) for c in g.in_convs
            )
        g.menu = (
            _efficient(curve, g.min_width)
            if (g.out_convs or g.in_convs)
            else [w for w in sorted(curve) if w >= g.min_width]
        )
    macs0, _ = _stats(work, example[:1])
    plans = plan_latency_widths(groups, latency, spatial, base_macs=macs0)
    if not plans:
        raise TargetError(f"Target {target.kind}={target.value:g}: no layer can be narrowed.")
    timer = _speedup_timer(work, example, target) if target.kind == "latency_speedup" else None
    common = dict(
        max_layer_ratio=kw["max_layer_ratio"],
        ignored_layers=kw["ignored_layers"],
        keep_classifier=kw["keep_classifier"],
        round_to=None,
        progress=False,
    )
    measured: dict[tuple, float] = {}

    def value(widths: dict[str, int]) -> float:
        """The MACs reduction or measured speedup of a quick copy pruned to ``widths`` (which
        channels go does not change either)."""
        key = tuple(sorted(widths.items()))
        if key not in measured:
            quick = prune_model(
                model,
                example_inputs,
                criterion="l1",
                widths=widths,
                step_ratio=kw["max_layer_ratio"],
                bn_batches=0,
                **common,
            )
            if target.kind == "latency_speedup":
                measured[key] = timer.speedup(quick.model)
            else:
                measured[key] = quick.macs_reduction
        return measured[key]

    def reaches(widths: dict[str, int]) -> bool:
        if target.kind == "latency_speedup":
            return value(widths) >= target.value * (1 - _TOLERANCE / 2)
        # compensation gives bias-free convs a bias, which the MACs count includes (~0.3-1%)
        return value(widths) >= target.value * (1.01 if kw["compensate"] else 1.0)

    best = _first_reaching(plans, lambda i: reaches(plans[i][0]))
    widths = plans[best][0]
    if not reaches(widths):
        raise TargetError(
            f"Target {target.kind}={target.value:g} cannot be met with latency-aware widths: the "
            f"narrowest plan reaches {value(widths):.3g} (max_layer_ratio={kw['max_layer_ratio']:g}). "
            "Raise max_layer_ratio, or lower the target."
        )
    if best > 0:  # the last move took one group a whole menu step: try the widths in between
        before = plans[best - 1][0]
        name = next(n for n in widths if widths[n] != before.get(n))
        wide = before.get(name, next(_channels(g.root) for g in groups if g.name == name))
        between = [{**widths, name: w} for w in range(wide - 1, widths[name], -1) if w % 4 == 0]
        if between:
            k = _first_reaching(between, lambda i: reaches(between[i]))
            if reaches(between[k]):
                widths = between[k]
    log.info("latency-aware widths: plan %d of %d, %s %.3f", best + 1, len(plans), target.kind, value(widths))
    return prune_model(
        model,
        example_inputs,
        criterion=kw["criterion"],
        target=target,
        data=data,
        compensate=kw["compensate"],
        step_ratio=max(kw["step_ratio"], 0.05),
        probe_batches=kw["probe_batches"],
        bn_batches=kw["bn_batches"],
        ridge=kw["ridge"],
        criterion_options=kw["criterion_options"],
        widths=widths,
        refit_classifier=kw["refit_classifier"],
        inplace=kw["inplace"],
        **{**common, "progress": kw["progress"]},
    )


def _channels(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
