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
    """Cluster redundancy: a filter matters by what it adds beyond the filters of its cluster.

    Filters are clustered by category and part (``analysis.cluster_filters`` on signatures of the
    current model). A filter's score is the output energy it feeds into the layers that consume
    it: the variance of its map times the squared norm of the consumer weights that read it. Within
    a cluster, the representative (the member that carries the most) keeps its full score, and
    every other member scores only what is left of its map after projecting out the members ranked
    above it (greedy Gram-Schmidt, most novel first). A filter with a twin in its cluster thus
    scores ~0 and goes first; filters alone in their cluster keep their full score.
    Maps are read where they are consumed: at the input of the layers that take the channel, so
    the coupled channels of a residual group are scored on the coupled feature map (the mean over
    its consumers).

    Call ``refresh(model, loader)`` before scoring (``prune_model`` does, at every step).
    """

    def __init__(
        self,
        *,
        distance_threshold: float = 0.25,
        probe_batches: int = 8,
        balance_categories: bool = True,
        handle=None,
        **_,
    ) -> None:
        self.distance_threshold = distance_threshold
        self.balance_categories = balance_categories
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
            scores += self._score(a, w2, labels if labels is not None and labels.numel() == n else None)
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
    def _score(a: Tensor, w2: Tensor, labels: Tensor | None) -> Tensor:
        """Per channel: the consumer's output energy that the channel carries beyond the channels
        of its cluster ranked above it. ``a``: ``(rows, n)`` consumer inputs; ``w2``: ``(n,)``
        squared norms of the consumer weights that read each channel."""
        a = a - a.mean(0)  # a constant part is absorbed by the consumer's bias (compensation does it)
        out = (a**2).mean(0)
        reps = torch.zeros(out.numel(), dtype=torch.bool)
        if labels is not None:
            for cl in labels.unique():
                members = torch.nonzero(labels == cl).flatten()
                if members.numel() < 2:
                    continue
                # greedy Gram-Schmidt: take the member that adds the most, remove its direction
                # from the others' residuals, repeat; each member scores its residual energy
                res = a[:, members].clone()
                left = list(range(members.numel()))
                while left:
                    gain = res[:, left].pow(2).mean(0) * w2[members[left]]
                    j = left[int(gain.argmax())]
                    out[members[j]] = res[:, j].pow(2).mean()
                    reps[members[j]] = len(left) == members.numel()  # the first pick represents it
                    left.remove(j)
                    norm = res[:, j].norm()
                    if left and norm > 1e-9 * (a.norm() + 1e-30):
                        q = res[:, j] / norm
                        res[:, left] -= q[:, None] * (q @ res[:, left])[None, :]
        out = out * w2
        if labels is not None:
            # representatives (and filters alone in their cluster) rank above every redundant member:
            # one filter per (category, part) is kept as long as any redundant one is left
            singles = torch.tensor([int((labels == labels[i]).sum()) == 1 for i in range(labels.numel())])
            keep = reps | singles
            out[keep] += out.max()
        return out
