"""Category-aware pruning: specialise a model to the classes a deployment needs.

Every filter has a category, the class it responds to most on the probe data (with the
interpretable loss, the class it was trained to detect). To keep a subset of the classes, the
classifier keeps only their outputs and, in every layer, the filters of the other categories go
first (in the order of the chosen criterion), then the rest.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.utils.data import DataLoader

from icnn_compress.errors import ConfigError

__all__ = [
    "KEEP_MODES",
    "KeepClassesImportance",
    "check_keep_classes",
    "class_responses",
    "kept_class_batches",
    "restrict_classifier",
]
KEEP_MODES = ("category", "relevance", "criterion")


def restrict_classifier(model: nn.Module, classes) -> nn.Module:
    """A copy of ``model`` whose last ``nn.Linear`` keeps only the outputs of ``classes`` (output
    ``i`` = the ``i``-th smallest kept class, as after ``prune_model(..., keep_classes=)``): the
    unpruned reference, or a distillation teacher, of a specialised model."""
    import copy

    model = copy.deepcopy(model)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("restrict_classifier needs a model whose last layer is an nn.Linear.")
    name, head = linears[-1]
    kept = check_keep_classes(classes, head)
    new = nn.Linear(head.in_features, len(kept), bias=head.bias is not None).to(head.weight.device)
    with torch.no_grad():
        new.weight.copy_(head.weight[kept])
        if head.bias is not None:
            new.bias.copy_(head.bias[kept])
    new.requires_grad_(head.weight.requires_grad)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def check_keep_classes(keep_classes, classifier: nn.Module | None) -> list[int]:
    """``keep_classes`` as a sorted list of distinct class indices of ``classifier`` (a Linear).
    Raises ``ConfigError`` for anything else."""
    if not isinstance(classifier, nn.Linear):
        raise ConfigError("keep_classes needs a model whose last layer is an nn.Linear classifier.")
    if torch.is_tensor(keep_classes):
        keep_classes = keep_classes.tolist()
    if isinstance(keep_classes, (str, bytes)) or not hasattr(keep_classes, "__iter__"):
        raise ConfigError(f"keep_classes must be a list of class indices. Got {keep_classes!r}.")
    items = list(keep_classes)
    k = classifier.out_features
    bad = [c for c in items if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < k]
    if bad:
        raise ConfigError(f"keep_classes holds {bad}: class indices must be integers in 0..{k - 1}.")
    if len(set(items)) != len(items):
        raise ConfigError(f"keep_classes has duplicates: {sorted({c for c in items if items.count(c) > 1})}.")
    if len(items) < 2:
        raise ConfigError(
            f"keep_classes needs at least 2 classes (a classifier of one class says nothing). Got {items}."
        )
    return sorted(items)


def kept_class_batches(data, classes: list[int], batches: int) -> list[tuple[Tensor, Tensor]]:
    """At most ``batches`` batches ``(images (N, C, H, W), labels (N,))`` of the images of
    ``classes`` found in ``data`` (batches of ``(images, labels, ...)``), at the size of its first
    batch, read until that many are full (labels as in ``data``). What a model specialised to
    ``classes`` is fitted on: its compensation, BatchNorm statistics and classifier refit.
    Raises ``ConfigError`` when ``data`` holds none of them."""
    keep = torch.as_tensor(classes)
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    size = found = 0
    for batch in data:
        x, y = batch[0], batch[1]
        size = size or len(x)
        sel = torch.isin(y.cpu(), keep)
        xs.append(x[sel.to(x.device)])
        ys.append(y[sel.to(y.device)])
        found += int(sel.sum())
        if found >= batches * size:
            break
    if found == 0:
        raise ConfigError(f"keep_classes={classes}: data holds no image of these classes.")
    x, y = torch.cat(xs)[: batches * size], torch.cat(ys)[: batches * size]
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


@torch.no_grad()
def class_responses(model: nn.Module, data: DataLoader, batches: int = 8) -> dict[str, Tensor]:
    """Conv name -> ``(C, K)`` mean response (``sum_ij`` of the post-ReLU map, or after a residual
    addition) of each output channel to each class's images, on at most ``batches`` batches. The
    category of a channel is its argmax over classes."""
    from icnn_compress.prune._criteria import conv_signatures

    points, sigs = conv_signatures(model, data, batches)
    return {n: sigs[p].class_mean.clone() for n, p in points.items()}


class KeepClassesImportance(tp.importance.Importance):
    """Wraps a criterion for ``keep_classes``; ``mode``:

    * ``"category"``: channels whose category (argmax class response) is outside ``keep`` rank
      below all the others, each side in the criterion's own order;
    * ``"relevance"``: the criterion's score (scaled to [0, 1]) times the channel's relevance to
      the kept classes, its mean response to them over its mean response to all classes: generic
      filters keep their rank, those selective for dropped classes fall, those for kept ones rise;
    * ``"criterion"``: the criterion's own scores. The kept classes still shape them where the
      criterion reads labels: ``taylor`` and ``fisher`` take their loss through the restricted
      head on the kept classes' images, so each channel scores what removing it costs the kept
      classes' loss (Taylor: to first order over the batch; Fisher: per image, squared); the
      strongest specialisations measured (benchmarks tables 8c and 8d).

    ``bind`` gives it the engine's bookkeeping of which original channels each conv still has,
    so responses measured once stay aligned."""

    def __init__(
        self,
        inner: tp.importance.Importance,
        responses: dict[str, Tensor],
        keep: list[int],
        mode: str = "relevance",
    ) -> None:
        if mode not in KEEP_MODES:
            raise ConfigError(f"keep_classes_mode must be one of {', '.join(KEEP_MODES)}. Got {mode!r}.")
        self.inner, self.mode = inner, mode
        kept = torch.as_tensor(keep)
        self.outside = {n: ~torch.isin(r.argmax(1), kept) for n, r in responses.items()}
        self.relevance = {n: r[:, kept].mean(1) / r.mean(1).clamp_min(1e-12) for n, r in responses.items()}
        self.names: dict[nn.Module, str] = {}
        self.alive: dict[str, list[int]] = {}

    def bind(self, names: dict[nn.Module, str], alive: dict[str, list[int]]) -> None:
        self.names, self.alive = names, alive
        if hasattr(self.inner, "bind"):
            self.inner.bind(names, alive)

    def refresh(self, model: nn.Module, loader: DataLoader) -> None:
        if hasattr(self.inner, "refresh"):
            self.inner.refresh(model, loader)

    @torch.no_grad()
    def __call__(self, group, **kwargs) -> Tensor:
        scores = self.inner(group, **kwargs)
        name = self.names.get(group[0].dep.target.module)
        if self.mode == "criterion" or name not in self.outside or name not in self.alive or scores is None:
            return scores
        original = torch.as_tensor(self.alive[name])
        idxs = torch.as_tensor(list(group[0].idxs))
        if idxs.numel() != scores.numel() or int(idxs.max()) >= original.numel():
            return scores
        s = scores.double()  # the inner criterion's order kept (icnn-cluster's are float64)
        s = (s - s.min()) / (s.max() - s.min()).clamp_min(1e-12)
        here = original[idxs]
        if self.mode == "relevance":
            return (s + 1e-3) * self.relevance[name][here].double()
        return torch.where(self.outside[name][here], 0.5 * s, 1.0 + s)
