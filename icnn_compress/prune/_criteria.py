"""Channel importance criteria as torch-pruning ``Importance`` classes, behind one name registry."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.utils.data import DataLoader

from icnn_compress._registry import Registry
from icnn_compress.prune._probe import collect_layer_inputs

__all__ = [
    "ClusterRedundancyImportance",
    "consumer_deps",
    "list_criteria",
    "make_importance",
    "register_criterion",
]

_CRITERIA: Registry[Callable[..., tp.importance.Importance]] = Registry("criterion")
NEEDS_DATA = {"icnn-cluster", "taylor"}  # criteria that score from probe data or gradients


def register_criterion(name: str):
    """Decorator: register ``fn(**options) -> torch_pruning Importance`` under ``name``."""

    return _CRITERIA.register(name)


def list_criteria() -> list[str]:
    return _CRITERIA.names()


def make_importance(name: str, **options) -> tp.importance.Importance:
    """The ``Importance`` object of a criterion name (see ``list_criteria()``)."""
    return _CRITERIA.get(name)(**options)


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


@register_criterion("icnn-cluster")
class ClusterRedundancyImportance(tp.importance.Importance):
    """Cluster redundancy: a filter matters by what the other filters cannot reconstruct of it.

    A filter's cost is the output energy that the layers consuming it would lose if it were
    removed *and compensated*: the variance of its map that is left after the best least-squares
    fit from the other channels still kept (``1 / (Cov^-1)_ii``), times the squared norm of the
    consumer weights that read it. Channels are ranked by backward elimination (remove the
    cheapest, refit, repeat), so of two twins the first scores ~0 and goes first, and the second
    is then as expensive as a unique filter.
    Filters are clustered by category and part (``analysis.cluster_filters`` on signatures of the
    current model); each cluster's representative (its highest-scoring member) ranks above every
    other filter of the layer, so one filter per (category, part) is kept as long as a redundant
    one is left.
    Maps are read where they are consumed: at the input of the layers that take the channel, so
    the coupled channels of a residual group are scored on the coupled feature map (the mean over
    its consumers). ``balance_categories=True`` ranks each filter against the filters of its own
    category instead (off by default: it cost 1-2 points of one-shot accuracy on Fashion-MNIST).

    Call ``refresh(model, loader)`` before scoring (``prune_model`` does, at every step).
    """

    def __init__(
        self,
        *,
        distance_threshold: float = 0.25,
        probe_batches: int = 8,
        balance_categories: bool = False,
        ridge: float = 1e-5,
        handle=None,
        **_,
    ) -> None:
        self.distance_threshold = distance_threshold
        self.balance_categories = balance_categories
        self.ridge = ridge
        self.probe_batches = probe_batches
        self.handle = handle
        self.labels: dict[nn.Module, Tensor] = {}
        self.categories: dict[nn.Module, Tensor] = {}
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
            max_images=self.probe_batches * (getattr(loader, "batch_size", None) or 64),
        )
        self.labels = {}
        for name, sig in sigs.items():
            cl = cluster_filters(sig, distance_threshold=self.distance_threshold, ari=False)
            labels = cl.labels.clone()
            # dead filters (-1) each form their own cluster: they add nothing, their energy is ~0
            dead = torch.nonzero(labels < 0).flatten()
            labels[dead] = labels.max() + 1 + torch.arange(dead.numel())
            self.labels[convs[name]] = labels
            self.categories[convs[name]] = sig.category.clone()

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
            order = torch.as_tensor(root_idxs)
            a = torch.zeros(acts.shape[0], n, dtype=torch.float64)
            a[:, order] = acts[:, idxs].double()
            w = module.weight.detach().double()
            w2 = torch.zeros(n, dtype=torch.float64)
            w2[order] = w.transpose(0, 1)[idxs].flatten(1).pow(2).sum(1)
            scores += self._score(
                a, w2, labels if labels is not None and labels.numel() == n else None, self.ridge
            )
            used += 1
        if used == 0:  # no probe for this group: fall back to the L2 magnitude
            return tp.importance.GroupMagnitudeImportance(p=2)(group)
        scores /= used
        cats = self.categories.get(root)
        if self.balance_categories and cats is not None and cats.numel() == n:
            # rank each filter against the filters of its own category, so that removal is spread
            # over the categories instead of wiping out the features of the weakest one
            for c in cats.unique():
                sel = cats == c
                scores[sel] = scores[sel] / scores[sel].mean().clamp_min(1e-12)
        return (scores / scores.mean().clamp_min(1e-12)).float()

    @staticmethod
    def _score(a: Tensor, w2: Tensor, labels: Tensor | None, ridge: float = 1e-5) -> Tensor:
        """Per channel: the consumer's output energy that the other channels cannot reconstruct.
        ``a``: ``(rows, n)`` consumer inputs; ``w2``: ``(n,)`` squared norms of the consumer
        weights that read each channel; ``labels``: ``(n,)`` cluster of each channel."""
        a = a - a.mean(0)  # a constant part is absorbed by the consumer's bias (compensation does it)
        cov = a.t() @ a / a.shape[0]
        cov += ridge * (cov.diagonal().mean() + 1e-30) * torch.eye(cov.shape[0], dtype=cov.dtype)
        # backward elimination: the residual variance of channel i regressed on the channels still
        # kept is 1 / (P)_ii with P = cov^-1 restricted to them; remove the cheapest, update P by a
        # rank-one downdate, repeat. Twins: the first goes at ~0 cost, the second is then expensive.
        prec = torch.linalg.inv(cov)
        left = torch.ones(out_n := w2.numel(), dtype=torch.bool)
        out = torch.zeros(out_n, dtype=torch.float64)
        running = 0.0
        for _ in range(out_n):
            cost = w2 / prec.diagonal().clamp_min(1e-30)
            cost[~left] = float("inf")
            i = int(cost.argmin())
            running = max(running * (1 + 1e-9), float(cost[i]))  # increasing in the order of removal
            out[i] = running
            left[i] = False
            p_i = prec[:, i].clone()
            prec -= torch.outer(p_i, p_i) / p_i[i].clamp_min(1e-30)
            prec[i, :] = 0
            prec[:, i] = 0
            prec[i, i] = 1.0
        if labels is not None:
            reps = torch.zeros(out.numel(), dtype=torch.bool)
            for cl in labels.unique():
                members = torch.nonzero(labels == cl).flatten()
                reps[members[out[members].argmax()]] = True
            out[reps] += out.max()
        return out
