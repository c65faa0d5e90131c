"""Channel importance criteria as torch-pruning ``Importance`` classes, behind one name registry."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import torch_pruning as tp
from threadpoolctl import ThreadpoolController
from torch import Tensor, nn
from torch.utils.data import DataLoader

from icnn_compress._registry import Registry
from icnn_compress.errors import ConfigError
from icnn_compress.prune._probe import collect_layer_inputs

__all__ = [
    "ClusterRedundancyImportance",
    "CriterionSpec",
    "consumer_deps",
    "conv_signatures",
    "criterion_spec",
    "input_energy",
    "list_criteria",
    "make_importance",
    "register_criterion",
]


SIGNATURE_MODES = ("every-step", "first-step")
STREAM_RANKINGS = ("magnitude", "magnitude-only", "redundancy")


@dataclass(frozen=True)
class CriterionSpec:
    """A registered criterion: how to build its ``Importance`` and what it needs.

    Attributes:
        factory: ``factory(**options) -> Importance``.
        needs_data: it scores from probe batches (``prune_model`` then requires ``data``).
        needs_gradients: it reads ``.grad`` of the weights (``prune_model`` runs a backward pass
            on the probe batches before each step).
        needs_labels: its ``refresh`` reads the batches' labels, numbered as the model's outputs
            (with ``keep_classes``: the kept classes' batches, labels renumbered as the restricted
            head's outputs).
        options: the option names the factory accepts; anything else is a ``ConfigError``.
    """

    name: str
    factory: Callable[..., tp.importance.Importance]
    needs_data: bool = False
    needs_gradients: bool = False
    options: tuple[str, ...] = ()
    needs_labels: bool = False


_CRITERIA: Registry[CriterionSpec] = Registry("criterion")


def _accepted(factory: Callable) -> tuple[str, ...]:
    params = inspect.signature(factory).parameters.values()
    return tuple(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))


def register_criterion(
    name: str, *, needs_data: bool = False, needs_gradients: bool = False, needs_labels: bool = False
):
    """Decorator: register ``fn(**options) -> torch_pruning Importance`` (a function or an
    ``Importance`` class) under ``name``; its keyword arguments are the criterion's options.
    A refresh before each pruning step is a ``refresh(model, loader)`` method of the importance."""

    def wrap(factory):
        spec = CriterionSpec(name, factory, needs_data, needs_gradients, _accepted(factory), needs_labels)
        _CRITERIA.register(name)(spec)
        return factory

    return wrap


def list_criteria() -> list[str]:
    return _CRITERIA.names()


def criterion_spec(name: str) -> CriterionSpec:
    """The registry entry of a criterion name (``ConfigError`` with suggestions when unknown)."""
    return _CRITERIA.get(name)


def make_importance(name: str, **options) -> tp.importance.Importance:
    """The ``Importance`` object of a criterion name (see ``list_criteria()``); options it does not
    take are refused with the list of those it does."""
    spec = _CRITERIA.get(name)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        allowed = ", ".join(spec.options) or "none"
        raise ConfigError(
            f"criterion {name!r} has no option {', '.join(map(repr, unknown))}; its options: {allowed}."
        )
    return spec.factory(**options)


def _no_options(importance: Callable[[], tp.importance.Importance]) -> Callable[[], tp.importance.Importance]:
    def factory() -> tp.importance.Importance:
        return importance()

    return factory


register_criterion("l1")(_no_options(lambda: tp.importance.GroupMagnitudeImportance(p=1)))
register_criterion("l2")(_no_options(lambda: tp.importance.GroupMagnitudeImportance(p=2)))
register_criterion("fpgm")(_no_options(tp.importance.FPGMImportance))
register_criterion("taylor", needs_data=True, needs_gradients=True)(
    _no_options(tp.importance.GroupTaylorImportance)
)
register_criterion("bn-scale")(_no_options(tp.importance.BNScaleImportance))
register_criterion("lamp")(_no_options(tp.importance.LAMPImportance))


@register_criterion("random")
def _random(seed: int = 0) -> tp.importance.Importance:
    return _SeededRandomImportance(seed)


class _SeededRandomImportance(tp.importance.Importance):
    """Uniform random scores from a seeded generator (reproducible baselines)."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def __call__(self, group, **kwargs) -> Tensor:
        return torch.rand(len(group[0].idxs), generator=self.generator)


IN_CHANNEL_FNS = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)


def consumer_deps(group) -> list[tuple[nn.Module, list[int], list[int]]]:
    """``(module, idxs, root_idxs)`` of each layer in ``group`` whose *input* channels are cut:
    the layers that consume the feature map (for a residual group, the coupled map)."""
    out = []
    for i, (dep, idxs) in enumerate(group):
        if dep.pruning_fn in IN_CHANNEL_FNS:
            out.append((dep.target.module, list(idxs), list(group[i].root_idxs)))
    return out


def input_energy(weight: Tensor, scale: Tensor | None = None, *, block: int = 1 << 22) -> Tensor:
    """``(C_in,)`` float64: the squared norm of the weights that read each input channel (or
    feature), summed over outputs and kernel positions; ``scale`` ``(out,)`` weighs each output's
    share. Summed over blocks of ``block`` elements of output rows, so that a large layer is never
    copied whole in float64."""
    w = weight.detach()
    rows = max(1, block // max(1, w[0].numel()))
    out = torch.zeros(w.shape[1], dtype=torch.float64, device=w.device)
    for start in range(0, w.shape[0], rows):
        squares = w[start : start + rows].double().square_()  # one float64 copy of the block
        part = squares.flatten(2).sum(2) if squares.dim() > 2 else squares  # (rows, C_in)
        if scale is not None:
            part = part * scale[start : start + rows].to(part).view(-1, 1)
        out += part.sum(0)
    return out.cpu()


def flattened_channels(
    module: nn.Module, idxs: list, root_idxs: list, c_in: int
) -> tuple[int, list[int]] | None:
    """For a Linear that reads a flattened ``(C, H, W)`` map and loses whole channels: ``(H * W,
    removed channels)`` in its own channel numbering; ``None`` for any other consumer."""
    if not isinstance(module, nn.Linear):
        return None
    channels = set(root_idxs)
    if not channels or len(idxs) % len(channels) or len(idxs) == len(channels):
        return None
    k = len(idxs) // len(channels)
    if c_in % k:
        return None
    blocks = sorted({int(i) // k for i in idxs})
    if len(blocks) != len(channels) or sorted(int(i) for i in idxs) != [
        b * k + s for b in blocks for s in range(k)
    ]:
        return None
    return k, blocks


def following_bn_scales(model: nn.Module) -> dict[nn.Module, Tensor]:
    """For each conv/linear whose output goes straight into a BatchNorm: ``gamma^2 / (var + eps)``
    per output channel, the factor by which that BatchNorm scales the energy of the output."""
    from icnn_compress.icnn._attach import trace_graph

    graph = trace_graph(model)
    if graph is None:  # untraceable model: no rescaling
        return {}
    out: dict[nn.Module, Tensor] = {}
    for node in graph.nodes:
        if node.op != "call_module" or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op != "call_module":
            continue
        layer, bn = model.get_submodule(node.target), model.get_submodule(user.target)
        if (
            isinstance(layer, (nn.Conv2d, nn.Linear))
            and isinstance(bn, nn.modules.batchnorm._BatchNorm)
            and bn.running_var is not None
        ):
            gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
            out[layer] = (gamma.pow(2) / (bn.running_var + bn.eps)).cpu()
    return out


def map_points(model: nn.Module, convs: list[str]) -> dict[str, str]:
    """Conv name -> the module whose output holds its filters' maps as they are used: the ReLU
    after it (through BatchNorm), or for a conv that feeds a residual addition, the ReLU after
    the addition; the conv itself when neither is found (maps clamped at 0 by the signatures)."""
    from icnn_compress.analysis import layer_maps_points
    from icnn_compress.icnn._attach import trace_graph

    graph = trace_graph(model)
    if graph is None:  # untraceable model: the conv's own ReLU where it has one
        return layer_maps_points(model, convs)
    calls: dict[str, int] = {}
    nodes = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
            nodes.setdefault(node.target, node)
    out = {}
    for name in convs:
        point, node = name, nodes.get(name)
        while node is not None and len(node.users) == 1:
            node = next(iter(node.users))
            if node.op == "call_module":
                mod = model.get_submodule(node.target)
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    continue
                if isinstance(mod, (nn.ReLU, nn.ReLU6)) and calls[node.target] == 1:
                    point = str(node.target)
                break
            if not (node.op == "call_function" and getattr(node.target, "__name__", "") in ("add", "iadd")):
                break
        out[name] = point
    return out


def conv_signatures(model: nn.Module, loader, batches: int, *, used: bool = True) -> tuple[dict, dict]:
    """Signatures of every conv's filters on at most ``batches`` batches, read where the maps are
    used (``map_points``; ``used=False``: each conv's own ReLU). Returns ``(conv name -> point,
    point -> LayerSignature)``."""
    from icnn_compress.analysis import filter_signatures, layer_maps_points

    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    points = map_points(model, convs) if used else layer_maps_points(model, convs)
    size = getattr(loader, "batch_size", None) or 64
    fields = _spatial_points(model, sorted(set(points.values())), next(iter(loader))[0].shape[1:])
    sigs = filter_signatures(
        model, loader, list(fields), progress=False, max_images=batches * size, fields=fields
    )
    return {n: p for n, p in points.items() if p in fields}, sigs


def _spatial_points(model: nn.Module, points: list[str], input_size: tuple[int, ...]) -> dict:
    """The points whose maps have a receptive field, with their fields (point -> ``RF``, in the
    order of ``points``): the convs after a pooling to 1x1 (the squeeze-excitation blocks of
    EfficientNet, MobileNet v3...) have none, and get no signature (their groups are ranked
    without clusters). One trace of the model, shared with the signatures."""
    from icnn_compress.analysis import receptive_fields

    found = receptive_fields(model, points, tuple(input_size), strict=False)
    return {point: found[point] for point in points if point in found}


@register_criterion("icnn-cluster", needs_data=True)
class ClusterRedundancyImportance(tp.importance.Importance):
    """Cluster redundancy: a filter matters by what the other filters cannot reconstruct of it.

    A filter's cost is the output energy that the layers consuming it would lose if it were
    removed *and compensated*: the variance of its map that is left after the best least-squares
    fit from the other channels still kept (``1 / (Cov^-1)_ii``), times the squared norm of the
    consumer weights that read it. Channels are ranked by backward elimination (remove the
    cheapest, refit, repeat), so of two twins the first scores ~0 and goes first, and the second
    is then as expensive as a unique filter.
    Filters are clustered by category and part (``analysis.cluster_filters`` on signatures of the
    model before pruning); each cluster's representative (its highest-scoring member) ranks above
    every other filter of the layer, so one filter per (category, part) is kept as long as a
    redundant one is left.
    Maps are read where they are consumed: at the input of the layers that take the channel, so
    the coupled channels of a residual group are scored on the coupled feature map (the mean over
    its consumers), and the group's clusters come from the stream map nearest the output (after
    the ReLU that follows the last residual addition: where a loss on the block shapes them).

    Options (all measured on Fashion-MNIST, see docs):
        keep_categories: the best filter of each category ranks above all others, so that no
            category loses its last detector while other filters remain (off by default).
        balance_categories: rank each filter against the filters of its own category (off by
            default: it cost 1-2 points of one-shot accuracy).
        consumer_units: ``"output"`` (consumer output energy, default) or ``"normalised"``
            (the energy after the consumer's BatchNorm, ``gamma^2 / var`` per output channel).
        cluster_maps: ``"used"`` (default: clusters of a residual group from the stream map
            nearest the output) or ``"own"`` (the maps of the group's root conv).
        stream_ranking: how the channels of a group read by several layers (a residual stream)
            are ranked: ``"magnitude-only"`` (default: the group's L2 norm; the category options
            leave streams alone too), ``"magnitude"`` (the same, each cluster's strongest member
            kept last) or ``"redundancy"`` (the consumers'
            reconstruction cost, as for every other group). The identity path carries a stream
            channel to every later block without weights, which the reconstruction cost at the
            consumers does not see: on resnet_cifar20 at 3x / 4x the redundancy ranking of the
            streams cost 2.9 / 6.6 points one-shot against magnitude. Keeping the clusters'
            strongest members last made the ranking depend on the probe (which members a probe's
            clusters name): on the loss-trained resnet_cifar20 it cost 1.6 / 2.2 / 5.1 points at
            2x / 3x / 4x against magnitude alone, with a spread over probes 3-15x as wide
            (2 bases x 3 probe seeds; on the plain model -0.1 / +0.2 / +1.6).
        signatures: ``"first-step"`` (default: signatures, clusters and categories of the model
            before pruning, carried to later steps through the channels still alive, so a filter
            keeps its cluster and category and a later step only reads the consumers' inputs) or
            ``"every-step"`` (from the model as each step finds it). Measured on both models
            (2 bases x 2 probe seeds, 2x-4x): first-step within 0.1 point of every-step or better
            (+2 points at 4x on resnet_cifar20), at 0.6x the pruning time of resnet50. Needs
            ``bind`` (``prune_model`` calls it); unbound, every step computes its own.

    Call ``refresh(model, loader)`` before scoring (``prune_model`` does, at every step). Under
    per-layer ranking ``prune_model`` also sets ``step_bound``: the elimination then stops once the
    channels a step can remove are ranked, which gives them the same lowest scores as ranking
    every channel, at a fraction of the cost on wide layers.
    """

    def __init__(
        self,
        *,
        distance_threshold: float = 0.25,
        probe_batches: int = 8,
        balance_categories: bool = False,
        keep_categories: bool = False,
        consumer_units: str = "output",
        cluster_maps: str = "used",
        stream_ranking: str = "magnitude-only",
        signatures: str = "first-step",
        ridge: float = 1e-5,
        handle=None,
    ) -> None:
        if cluster_maps not in ("used", "own"):
            raise ConfigError(f"cluster_maps must be 'used' or 'own'. Got {cluster_maps!r} instead.")
        if stream_ranking not in STREAM_RANKINGS:
            raise ConfigError(
                f"stream_ranking must be one of {', '.join(map(repr, STREAM_RANKINGS))}. "
                f"Got {stream_ranking!r} instead."
            )
        if signatures not in SIGNATURE_MODES:
            raise ConfigError(
                f"signatures must be one of {', '.join(map(repr, SIGNATURE_MODES))}. "
                f"Got {signatures!r} instead."
            )
        self.stream_ranking = stream_ranking
        self.signatures = signatures
        if consumer_units not in ("output", "normalised"):
            raise ConfigError(
                f"consumer_units must be 'output' or 'normalised'. Got {consumer_units!r} instead."
            )
        self.distance_threshold = distance_threshold
        self.balance_categories = balance_categories
        self.keep_categories = keep_categories
        self.consumer_units = consumer_units
        self.cluster_maps = cluster_maps
        self.ridge = ridge
        self.probe_batches = probe_batches
        self.handle = handle
        self._points: dict[nn.Module, str] = {}  # conv -> where its maps are read
        self._sigs: dict = {}  # point -> LayerSignature
        self._labels: dict[str, Tensor] = {}  # point -> cluster labels of _sigs, filled on first use
        self.categories: dict[nn.Module, Tensor] = {}
        self.depth: dict[nn.Module, int] = {}
        self.inputs: dict[nn.Module, Tensor] = {}
        self.out_scale: dict[nn.Module, Tensor] = {}
        # set by prune_model before a step of per-layer ranking: group -> the most channels the
        # step can remove from it (None: rank them all); only the lowest scores are then exact
        self.step_bound: Callable[[object], int | None] | None = None
        # set by bind (prune_model): conv -> name, name -> its original channels still alive
        self.names: dict[nn.Module, str] = {}
        self.alive: dict[str, list[int]] = {}
        # signatures="first-step": the first step's points and categories, in original numbering
        self._first: tuple[dict[nn.Module, str], dict[nn.Module, Tensor]] | None = None
        self._alive_idx: dict[nn.Module, Tensor] = {}  # conv -> its alive original channels

    def bind(self, names: dict[nn.Module, str], alive: dict[str, list[int]]) -> None:
        """Follow the channels a pruning run removes: ``alive[name]`` lists the original channels
        of conv ``name`` still in the model, in their current order (kept up to date by the
        caller). With ``signatures="first-step"``, later steps read labels through it."""
        self.names, self.alive, self._first = names, alive, None

    def refresh(self, model: nn.Module, loader: DataLoader) -> None:
        """Recompute consumer inputs, and signatures, clusters and categories (at every step, or
        with ``signatures="first-step"`` on the first call after ``bind`` only).

        A conv's filters are described where their maps are used: after its ReLU, or, for a conv
        that feeds a residual addition, after the ReLU that follows the addition."""
        consumers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        self.inputs = collect_layer_inputs(model, loader, consumers, max_batches=self.probe_batches)
        self.out_scale = following_bn_scales(model) if self.consumer_units == "normalised" else {}
        if self._first is not None:
            self._carry_first()
            return
        self._describe(model, loader)
        if self.signatures == "first-step" and self.alive:
            self._first = (dict(self._points), dict(self.categories))

    def _carry_first(self) -> None:
        """Later steps of ``signatures="first-step"``: the first step's descriptions, restricted
        to the channels still alive (the labels are indexed on use, in ``cluster_labels``)."""
        points, categories = self._first
        # the signatures of the maps already clustered are not needed again
        self._sigs = {p: sig for p, sig in self._sigs.items() if p not in self._labels}
        self._points, self.categories, self._alive_idx = {}, {}, {}
        for conv, point in points.items():
            alive = self.alive.get(self.names.get(conv, ""))
            if alive is None or len(alive) != conv.out_channels:
                continue  # not followed: ranked without clusters from now on
            idx = torch.as_tensor(alive, dtype=torch.long)
            self._points[conv], self._alive_idx[conv] = point, idx
            self.categories[conv] = categories[conv][idx]

    def _describe(self, model: nn.Module, loader: DataLoader) -> None:
        """Signatures and categories of every conv on the probe (clusters come on first use)."""
        convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        points, sigs = conv_signatures(model, loader, self.probe_batches, used=self.cluster_maps == "used")
        handle_cats = self.handle.filter_categories if self.handle is not None else {}
        self.categories, self.depth, self._alive_idx = {}, {}, {}
        self._points, self._sigs, self._labels = {}, sigs, {}
        for depth, (name, conv) in enumerate(convs.items()):
            sig = sigs.get(points.get(name))
            if sig is None or sig.num_filters != conv.out_channels:
                continue  # not spatial (no signature), or the map is not the conv's own width
            cats = handle_cats.get(name)
            ok = cats is not None and cats.numel() == conv.out_channels and bool((cats >= 0).all())
            self._points[conv] = points[name]
            self.categories[conv] = cats.cpu().clone() if ok else sig.category.clone()
            self.depth[conv] = depth

    def cluster_labels(self, conv: nn.Module) -> Tensor:
        """Cluster labels ``(C,)`` of a conv's filters, clustered on first use (a group's labels
        come from one of its convs, so most maps are never clustered)."""
        point = self._points[conv]
        if point not in self._labels:
            from icnn_compress.analysis import cluster_filters

            # below the category penalty no cluster mixes categories: distances within each only
            found = cluster_filters(
                self._sigs[point],
                distance_threshold=self.distance_threshold,
                ari=False,
                cross_category=self.distance_threshold >= 1.0,
            )
            labels = found.labels.clone()
            # dead filters (-1) each form their own cluster: they add nothing, their energy is ~0
            dead = torch.nonzero(labels < 0).flatten()
            labels[dead] = labels.max() + 1 + torch.arange(dead.numel())
            self._labels[point] = labels
        idx = self._alive_idx.get(conv)
        return self._labels[point] if idx is None else self._labels[point][idx]

    def _group_labels(self, group, n: int) -> tuple[Tensor | None, Tensor | None]:
        """Cluster labels and categories ``(n,)`` in the root's channel numbering, from the deepest
        conv whose outputs the group cuts (for a residual stream: the map nearest the output)."""
        best = None
        for k, (dep, idxs) in enumerate(group):
            module = dep.target.module
            if dep.pruning_fn != tp.prune_conv_out_channels or module not in self._points:
                continue
            if self.cluster_maps == "own" and k > 0:
                continue  # the root's own maps only
            if best is None or self.depth[module] > self.depth[best[0]]:
                best = (module, list(idxs), list(group[k].root_idxs))
        if best is None:
            return None, None
        module, idxs, root_idxs = best
        found = self.cluster_labels(module)
        labels = torch.full((n,), -1, dtype=torch.long)
        cats = torch.full((n,), -1, dtype=torch.long)
        i, r = torch.as_tensor(idxs, dtype=torch.long), torch.as_tensor(root_idxs, dtype=torch.long)
        ok = (r >= 0) & (r < n) & (i < found.numel())
        labels[r[ok]] = found[i[ok]]
        cats[r[ok]] = self.categories[module][i[ok]]
        if bool((labels < 0).any()):
            return None, None
        return labels, cats

    @torch.no_grad()
    def __call__(self, group, **kwargs) -> Tensor:
        n = len(group[0].idxs)
        scores = torch.zeros(n, dtype=torch.float64)
        used = 0
        if not isinstance(group[0].dep.target.module, nn.Conv2d):
            # hidden units of a Linear layer are not filters with maps: rank them by magnitude (and
            # the elimination below would cost O(width^3) on a 4096-wide classifier layer)
            return tp.importance.GroupMagnitudeImportance(p=2)(group)
        consumers = list(consumer_deps(group))
        stream = self.stream_ranking != "redundancy" and len(consumers) > 1
        if stream and self.stream_ranking == "magnitude-only":  # no clusters, no category options
            return self._finish(self._stream_scores(group, None), None)
        # the consumers with probe inputs; grouped convs (depthwise, ResNeXt) are not read here
        readable = [
            (module, idxs, root_idxs)
            for module, idxs, root_idxs in consumers
            if (acts := self.inputs.get(module)) is not None
            and not (isinstance(module, nn.Conv2d) and module.groups > 1)
            and max(idxs) < acts.shape[1]  # else a stale probe (layer changed since refresh)
        ]
        if not stream and not readable:  # nothing to score against: the L2 magnitude, unclustered
            return tp.importance.GroupMagnitudeImportance(p=2)(group)
        labels, cats = self._group_labels(group, n)  # clustered here, on first use
        if stream:
            return self._finish(self._stream_scores(group, labels), cats)
        # ranking stops early only where that is exact: one consumer (the lowest scores of a sum
        # over consumers need every consumer's full ranking) and no rescaling per category
        exact_early = self.step_bound is not None and len(consumers) == 1 and not self.balance_categories
        bound = self.step_bound(group) if exact_early else None
        for module, idxs, root_idxs in readable:
            acts = self.inputs[module]
            c_in = module.weight.shape[1]
            scale = self.out_scale.get(module)
            if scale is not None and scale.numel() != module.weight.shape[0]:
                scale = None
            # in the units the network sees where scaled: what the consumer's BatchNorm makes of it
            energy = input_energy(module.weight, scale)
            flat = flattened_channels(module, idxs, root_idxs, c_in)
            if flat is not None:
                # a Linear over a flattened map: one row per (image, position), one column per
                # channel, never a matrix as wide as the flattened features
                k, _ = flat
                acts = acts.reshape(acts.shape[0], -1, k).permute(0, 2, 1).reshape(-1, c_in // k)
                energy = energy.view(-1, k).sum(1)
                pairs = sorted({(int(i) // k, int(r)) for i, r in zip(idxs, root_idxs)})
                idxs, root_idxs = [i for i, _ in pairs], [r for _, r in pairs]
            if list(root_idxs) == list(range(n)) and list(idxs) == list(range(acts.shape[1])):
                a, w2 = acts.double(), energy.clone()  # the consumer reads the group's channels in order
            else:
                order = torch.as_tensor(root_idxs)
                a = torch.zeros(acts.shape[0], n, dtype=torch.float64)
                a[:, order] = acts[:, idxs].double()
                w2 = torch.zeros(n, dtype=torch.float64)
                w2[order] = energy[idxs]
            scores += self._score(a, w2, labels, self.ridge, bound)
            used += 1
        scores /= used
        return self._finish(scores, cats)

    @staticmethod
    def _stream_scores(group, labels: Tensor | None) -> Tensor:
        """A residual stream's channels ``(n,)``: the group's L2 magnitude, each cluster's
        strongest member lifted above all (one filter per category and part kept last)."""
        scores = tp.importance.GroupMagnitudeImportance(p=2)(group).double()
        return _lift_representatives(scores, labels)

    def _finish(self, scores: Tensor, cats: Tensor | None) -> Tensor:
        """The category options, then scores scaled to mean 1 (float64: representatives are lifted
        by the layer's largest score, and float32 would tie the order of removal among them)."""
        n = scores.numel()
        if self.balance_categories and cats is not None:
            # rank each filter against the filters of its own category, so that removal is spread
            # over the categories instead of wiping out the features of the weakest one
            for c in cats.unique():
                sel = cats == c
                scores[sel] = scores[sel] / scores[sel].mean().clamp_min(1e-12)
        if self.keep_categories and cats is not None:
            # the best filter of each category goes last: no category is left without a detector
            # while any other filter of the layer remains
            guard = torch.zeros(n, dtype=torch.bool)
            for c in cats.unique():
                members = torch.nonzero(cats == c).flatten()
                guard[members[scores[members].argmax()]] = True
            scores[guard] += 2 * scores.max()
        return scores / scores.mean().clamp_min(1e-12)

    @staticmethod
    def _score(
        a: Tensor, w2: Tensor, labels: Tensor | None, ridge: float = 1e-5, bound: int | None = None
    ) -> Tensor:
        """Per channel: the consumer's output energy that the other channels cannot reconstruct.
        ``a``: ``(rows, n)`` consumer inputs; ``w2``: ``(n,)`` squared norms of the consumer
        weights that read each channel; ``labels``: ``(n,)`` cluster of each channel.

        ``bound``: stop the elimination once this many channels that are not the last of their
        cluster are ranked (the most a step can remove), or once all of those are and ``bound``
        channels in all are removed; the channels still kept then score their
        current cost above every ranked one. The lowest ``bound`` scores are the same as with the
        full elimination, at ``O(n * bound^2)`` instead of ``O(n^3)`` after the inverse. (Keeping
        each cluster's last channel among the regressors instead of eliminating it too was measured
        and is worse: resnet_cifar20 one-shot 2x / 3x / 4x 0.860 / 0.804 / 0.615 against 0.874 /
        0.826 / 0.750, two bases x two probe seeds.)"""
        # backward elimination: the residual variance of channel i regressed on the channels still
        # kept is 1 / (P)_ii with P = cov^-1 restricted to them; remove the cheapest, downdate P by
        # rank one, repeat. Twins: the first goes at ~0 cost, the second is then expensive.
        # The downdates are kept as the columns of u (P = cov^-1 - u u^T): each removal costs one
        # matrix-vector product with the removals so far, and only P's diagonal is kept whole.
        with _numpy_blas().limit(limits=1, user_api="blas"):
            return ClusterRedundancyImportance._eliminate(a, w2, labels, ridge, bound)

    @staticmethod
    def _eliminate(a: Tensor, w2: Tensor, labels: Tensor | None, ridge: float, bound: int | None) -> Tensor:
        """The elimination of :meth:`_score`, with NumPy's BLAS on one thread."""
        diag, column = _precision(a, ridge)
        n = w2.numel()
        # the loop runs one small step per removed channel: in NumPy, whose per-call overhead is a
        # tenth of PyTorch's (mobilenet_v2: 30k steps, 3.1 s of overhead -> 0.6 s), same float64 math.
        # Arrays hold the channels not yet removed ("rows": their original numbers); every quarter
        # of them removed, they are compacted, so a step costs O(channels left), not O(n)
        rows = np.arange(n)
        w2_left = w2.numpy().astype(np.float64)  # a removed channel's weight becomes inf: never again
        members = torch.bincount(labels).tolist() if labels is not None else None
        cluster = labels.tolist() if labels is not None else None
        limit = n if bound is None else min(n, max(int(bound), 0))
        # channels that are not their cluster's last: once all of them are ranked, the lowest
        # scores are theirs and then the representatives' in the order they were removed, so
        # ``limit`` removals in all suffice (a layer of one-filter clusters: ``limit``, not ``n``)
        spare = n if members is None else n - sum(1 for m in members if m > 0)
        u = np.zeros((n, min(n, 2 * limit + 8)))
        order: list[int] = []
        values: list[float] = []
        running, ranked, t, stale = 0.0, 0, 0, 0
        while ranked < limit and t < n and not (ranked == spare and t >= limit):
            if stale >= max(16, rows.size // 4):  # drop the removed channels from every array
                keep = np.isfinite(w2_left)
                rows, w2_left, diag, u = rows[keep], w2_left[keep], diag[keep], u[keep]
                column.keep(keep)
                stale = 0
            if t == u.shape[1]:  # many representatives on the way: room for more removals
                u = np.concatenate([u, np.zeros((u.shape[0], min(u.shape[1], n - t)))], 1)
            cost = w2_left / np.maximum(diag, 1e-30)
            i = int(cost.argmin())
            # increasing in the order of removal, by a step that survives the representatives'
            # lift (adding the layer's largest score): else their order of removal became ties
            running = max(running * (1 + 1e-6), float(cost[i]))
            order.append(int(rows[i]))
            values.append(running)
            w2_left[i] = np.inf
            col = column(i) - u[:, :t] @ u[i, :t]  # column i of the current P
            piv = max(float(col[i]), 1e-30)
            u[:, t] = col * piv**-0.5
            diag -= col * col / piv
            t += 1
            stale += 1
            if members is None:
                ranked += 1
            else:  # the last of its cluster becomes the representative, never removed by a step
                c = cluster[order[-1]]
                members[c] -= 1
                ranked += members[c] > 0
        out = w2.numpy().copy()
        out[rows] = out[rows] / np.maximum(diag, 1e-30)  # stopped early: the rest rank above
        out = running * (1 + 2e-6) + torch.from_numpy(out).clamp_min(0)
        out[order] = torch.tensor(values, dtype=torch.float64)
        return _lift_representatives(out, labels)


@cache
def _numpy_blas() -> ThreadpoolController:
    """The BLAS thread pools NumPy loaded, found once (finding them reads the loaded libraries).
    The elimination's matrix-vector products are limited to one thread: on the 2-core CPU,
    OpenBLAS's threads made them several times slower (timm convnext_nano: the columns 14 s ->
    1.3 s, with another job on the machine)."""
    return ThreadpoolController()


class _Columns:
    """Columns of ``P = cov^-1`` (float64 NumPy) for the channels still in the elimination:
    calling it with ``i`` gives column ``i`` restricted to them, ``i`` counted among them;
    ``keep(mask)`` drops the others (``mask`` ``(channels left,)``)."""

    def __init__(self, prec: np.ndarray | None = None, bt: np.ndarray | None = None, lam: float = 1.0):
        self.prec, self.bt, self.lam = prec, bt, lam

    def __call__(self, i: int) -> np.ndarray:
        if self.prec is not None:
            return self.prec[:, i]
        col = -(self.bt @ self.bt[i])  # P = (I - B^T B) / lam
        col[i] += 1.0
        return col / self.lam

    def keep(self, mask: np.ndarray) -> None:
        if self.prec is not None:
            self.prec = self.prec[np.ix_(mask, mask)]
        else:
            self.bt = np.ascontiguousarray(self.bt[mask])


def _precision(a: Tensor, ridge: float) -> tuple[np.ndarray, _Columns]:
    """The diagonal of ``P = cov^-1`` ``(n,)`` and its columns (``_Columns``), float64 NumPy, for
    ``cov = A^T A / r + lam * I`` of the centred inputs ``A`` ``(r, n)``, ``lam = ridge * mean
    variance``. With fewer rows than channels (a wide layer probed at a few positions) it is
    computed through the ``r x r`` matrix ``M = r lam I + A A^T`` (Woodbury:
    ``P = (I - A^T M^-1 A) / lam``), never forming an ``n x n`` matrix; the same numbers either way
    (up to rounding)."""
    a = a - a.mean(0)  # a constant part is absorbed by the consumer's bias (compensation does it)
    r, n = a.shape
    lam = ridge * (float(a.pow(2).sum()) / (r * n) + 1e-30)
    if r < n:
        m = a @ a.t()
        m.diagonal().add_(r * lam)
        factor, info = torch.linalg.cholesky_ex(m)
        if int(info) == 0:  # else (non-finite inputs): the direct inverse below, as for r >= n
            # B = L^-1 A with M = L L^T: A^T M^-1 A = B^T B, one triangular solve
            # kept as B^T (n, r), C-ordered: each column is one contiguous matrix-vector product
            bt = np.ascontiguousarray(torch.linalg.solve_triangular(factor, a, upper=False).numpy().T)
            return (1.0 - (bt * bt).sum(1)) / lam, _Columns(bt=bt, lam=lam)
    prec = ridge_precision(a.t() @ a / r, ridge).numpy()
    return prec.diagonal().copy(), _Columns(prec=prec)


def ridge_precision(cov: Tensor, ridge: float) -> Tensor:
    """``(cov + lam I)^-1`` for a covariance ``(n, n)``, ``lam = ridge * mean variance`` (the mean
    of its diagonal): the precision matrix whose column ``c`` divided by its diagonal entry gives
    channel ``c``'s least-squares residual weights on the others. Cholesky (the ridge makes it
    SPD: half the time of an LU inverse); a direct inverse if that fails (non-finite inputs)."""
    lam = ridge * (float(cov.diagonal().mean()) + 1e-30)
    cov = cov + lam * torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
    factor, info = torch.linalg.cholesky_ex(cov)
    return torch.cholesky_inverse(factor) if int(info) == 0 else torch.linalg.inv(cov)


def _lift_representatives(scores: Tensor, labels: Tensor | None) -> Tensor:
    """Lift each cluster's representative (its first highest-scoring member) above every channel,
    in place; ``scores`` and ``labels`` are ``(n,)``. ``labels=None``: unchanged."""
    if labels is None:
        return scores
    n, k = scores.numel(), int(labels.max()) + 1
    top = torch.full((k,), -float("inf"), dtype=scores.dtype).scatter_reduce(0, labels, scores, "amax")
    at_top = torch.nonzero(scores == top[labels]).flatten()
    first = torch.full((k,), n, dtype=torch.long).scatter_reduce(0, labels[at_top], at_top, "amin")
    scores[first[first < n]] += scores.max()
    return scores
