"""Fisher pruning: what removing a channel costs the loss, image by image, to second order."""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.utils.data import DataLoader

from icnn_compress.errors import ConfigError, DataError

__all__ = ["FisherImportance", "check_labels"]

_READS = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)


def check_labels(out: Tensor, labels: Tensor, criterion: str) -> None:
    """``DataError`` unless every label is an output index of ``out`` ``(N, K)``."""
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < out.shape[1]:
        raise DataError(
            f"criterion {criterion!r}: the data's labels run from {int(labels.min())} to "
            f"{int(labels.max())}, but the model has {out.shape[1]} outputs (labels must be "
            f"0..{out.shape[1] - 1}, numbered as the model's outputs)."
        )


class FisherImportance(tp.importance.Importance):
    """Fisher pruning (Theis et al., 2018): channel ``c`` of a dependency group scores

        ``sum_n ( sum_{k, h, w} x[n, c, h, w] * dL_n / dx[n, c, h, w] )^2``

    where ``x`` is the input of each layer ``k`` that reads the channel (conv or linear; a tensor
    read by several layers counts once) and ``L_n`` the cross-entropy of image ``n``. The inner sum
    is, to first order, what image ``n``'s loss gains when the channel is zeroed where it is read;
    squared per image (the empirical Fisher information), the terms of images that pull in opposite
    directions add instead of cancelling as in first-order Taylor, whose score sums them over the
    batch first. With ``keep_classes`` the loss is the kept classes' through the restricted head, on
    their images (benchmarks table 8d).

    A residual stream channel is scored where each block reads it; the identity path that carries
    it further is not seen (as for every input-side score). ``refresh(model, loader)`` before
    scoring (``prune_model`` calls it at every step, on ``probe_batches`` labelled batches).
    """

    def __init__(self, probe_batches: int = 8) -> None:
        if probe_batches < 1:
            raise ConfigError(f"criterion 'fisher': probe_batches must be >= 1. Got {probe_batches}.")
        self.probe_batches = probe_batches
        self.terms: dict[nn.Module, Tensor] = {}  # reader (first of its input) -> (N, C_in) float32
        self.reader: dict[nn.Module, nn.Module] = {}  # every reader -> the one its input is filed under

    def refresh(self, model: nn.Module, loader: DataLoader) -> None:
        """Per image and input channel of every conv and linear layer, ``sum_hw x * dL/dx``."""
        readers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        seen: list[tuple[nn.Module, Tensor]] = []
        handles = [m.register_forward_pre_hook(lambda m, args: seen.append((m, args[0]))) for m in readers]
        terms: dict[nn.Module, list[Tensor]] = {}
        device = next(model.parameters()).device
        was = model.training
        model.eval()
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
                loss = nn.functional.cross_entropy(out, labels, reduction="sum")
                grads = torch.autograd.grad(loss, [x for _, x in inputs], allow_unused=True)
                for (m, x), g in zip(inputs, grads):
                    if g is None:
                        continue
                    term = x.detach() * g
                    term = term.sum((2, 3)) if term.dim() == 4 else term.reshape(len(term), -1)
                    terms.setdefault(m, []).append(term.float().cpu())
                seen.clear()
        finally:
            for h in handles:
                h.remove()
            model.train(was)
        self.terms = {m: torch.cat(t) for m, t in terms.items()}

    @torch.no_grad()
    def __call__(self, group, **kwargs) -> Tensor | None:
        total: Tensor | None = None
        counted: set[nn.Module] = set()
        for i, (dep, idxs) in enumerate(group):
            if dep.pruning_fn not in _READS:
                continue
            key = self.reader.get(dep.target.module)
            root_idxs = group[i].root_idxs
            if key is None or key in counted or key not in self.terms or any(r is None for r in root_idxs):
                continue
            counted.add(key)
            terms = self.terms[key][:, list(idxs)]
            if total is None:
                total = torch.zeros(len(terms), len(group[0].idxs))
            total.index_add_(1, torch.as_tensor(root_idxs), terms)
        if total is None:
            return None
        return total.double().pow(2).sum(0).float()
