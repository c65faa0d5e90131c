"""Channel importance criteria as torch-pruning ``Importance`` classes, behind one name registry."""

from __future__ import annotations

import difflib
from collections.abc import Callable

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.utils.data import DataLoader

from icnn_compress.errors import ConfigError
from icnn_compress.prune._probe import collect_layer_inputs

__all__ = [
    "ClusterRedundancyImportance",
    "consumer_deps",
    "list_criteria",
    "make_importance",
    "register_criterion",
]

_CRITERIA: dict[str, Callable[..., tp.importance.Importance]] = {}
NEEDS_DATA = {"icnn-cluster", "taylor"}  # criteria that score from probe data or gradients


def register_criterion(name: str):
    """Decorator: register ``fn(**options) -> torch_pruning Importance`` under ``name``."""

    def wrap(fn):
        if name in _CRITERIA:
            raise ConfigError(f"A criterion named {name!r} is already registered.")
        _CRITERIA[name] = fn
        return fn

    return wrap


def list_criteria() -> list[str]:
    return sorted(_CRITERIA)


def make_importance(name: str, **options) -> tp.importance.Importance:
    """The ``Importance`` object of a criterion name (see ``list_criteria()``)."""
    if name not in _CRITERIA:
        close = difflib.get_close_matches(name, list(_CRITERIA), n=2)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"Unknown criterion {name!r}.{hint} Available: {', '.join(list_criteria())}.")
    return _CRITERIA[name](**options)


register_criterion("l1")(lambda **_: tp.importance.GroupMagnitudeImportance(p=1))
register_criterion("l2")(lambda **_: tp.importance.GroupMagnitudeImportance(p=2))
register_criterion("fpgm")(lambda **_: tp.importance.FPGMImportance())
register_criterion("taylor")(lambda **_: tp.importance.GroupTaylorImportance())
register_criterion("bn-scale")(lambda **_: tp.importance.BNScaleImportance())
register_criterion("lamp")(lambda **_: tp.importance.LAMPImportance())
register_criterion("random")(lambda seed=0, **_: _SeededRandomImportance(seed))


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


def _residual_energy(a: Tensor, basis: Tensor, ridge: float) -> float:
    """Mean squared residual of ``a (rows,)`` after ridge regression on ``basis (rows, k)`` + bias."""
    x = torch.cat([basis, torch.ones(basis.shape[0], 1, dtype=basis.dtype)], 1)
    gram = x.t() @ x
    gram += ridge * (gram.diagonal().mean() + 1e-12) * torch.eye(gram.shape[0], dtype=gram.dtype)
    w = torch.linalg.solve(gram, x.t() @ a)
    return float(((a - x @ w) ** 2).mean())


@register_criterion("icnn-cluster")
class ClusterRedundancyImportance(tp.importance.Importance):
    """Cluster redundancy: a filter matters by what it adds beyond the filters of its cluster.

    Filters are clustered by category and part (``analysis.cluster_filters`` on signatures of the
    current model). Within a cluster the representative (the member with the most energy) is
    scored by the energy of its feature map; every other member by the energy of what is left of
    its map after a least-squares fit on the members ranked above it (greedy, most novel first).
    A filter with a twin in its cluster thus scores ~0 and goes first; filters alone in their
    cluster keep their full energy.
    Maps are read where they are consumed: at the input of the layers that take the channel, so
    the coupled channels of a residual group are scored on the coupled feature map (the mean over
    its consumers).

    Call ``refresh(model, loader)`` before scoring (``prune_model`` does, at every step).
    """

    def __init__(
        self,
        *,
        distance_threshold: float = 0.25,
        ridge: float = 1e-5,
        probe_batches: int = 8,
        handle=None,
        **_,
    ) -> None:
        self.distance_threshold = distance_threshold
        self.ridge = ridge
        self.probe_batches = probe_batches
        self.handle = handle
        self.labels: dict[nn.Module, Tensor] = {}
        self.inputs: dict[nn.Module, Tensor] = {}

    def refresh(self, model: nn.Module, loader: DataLoader) -> None:
        """Recompute signatures, clusters and consumer inputs from the current model."""
        from icnn_compress.analysis import cluster_filters, filter_signatures

        convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        consumers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        self.inputs = collect_layer_inputs(model, loader, consumers, max_batches=self.probe_batches)
        sigs = filter_signatures(
            model,
            loader,
            list(convs),
            handle=self.handle,
            progress=False,
            max_images=self.probe_batches * (loader.batch_size or 64),
        )
        self.labels = {}
        for name, sig in sigs.items():
            cl = cluster_filters(sig, distance_threshold=self.distance_threshold, ari=False)
            labels = cl.labels.clone()
            # dead filters (-1) each form their own cluster: they add nothing, their energy is ~0
            dead = torch.nonzero(labels < 0).flatten()
            labels[dead] = labels.max() + 1 + torch.arange(dead.numel())
            self.labels[convs[name]] = labels

    @torch.no_grad()
    def __call__(self, group, **kwargs) -> Tensor:
        root = group[0].dep.target.module
        n = len(group[0].idxs)
        scores = torch.zeros(n, dtype=torch.float64)
        used = 0
        labels = self.labels.get(root)
        for module, idxs, root_idxs in consumer_deps(group):
            acts = self.inputs.get(module)
            if acts is None or (isinstance(module, nn.Conv2d) and module.groups > 1):
                continue
            if max(idxs) >= acts.shape[1]:
                continue  # stale probe (layer changed since refresh)
            a = torch.zeros(acts.shape[0], n, dtype=torch.float64)
            a[:, torch.as_tensor(root_idxs)] = acts[:, idxs].double()
            scores += self._score(a, labels if labels is not None and labels.numel() == n else None)
            used += 1
        if used == 0:  # no probe for this group: fall back to the L2 magnitude
            return tp.importance.GroupMagnitudeImportance(p=2)(group)
        scores /= used
        return (scores / scores.mean().clamp_min(1e-12)).float()

    def _score(self, a: Tensor, labels: Tensor | None) -> Tensor:
        energy = (a**2).mean(0)
        if labels is None:
            return energy
        out = energy.clone()
        for cl in labels.unique():
            members = torch.nonzero(labels == cl).flatten().tolist()
            if len(members) < 2:
                continue
            kept = [max(members, key=lambda m: float(energy[m]))]
            rest = [m for m in members if m != kept[0]]
            while rest:
                basis = a[:, kept]
                res = {m: _residual_energy(a[:, m], basis, self.ridge) for m in rest}
                best = max(rest, key=lambda m: res[m])
                out[best] = res[best]
                kept.append(best)
                rest.remove(best)
        return out
