"""Classifier refit: after pruning, the last ``nn.Linear`` is fitted again so that its outputs match
the unpruned model's on the probe batches (ridge least squares, closed form, no training).

Pruning and compensation keep each layer's output close to the original one, but the small errors
of many layers add up in the features the classifier reads; at 3x-4x fewer MACs they can shift one
class's logit enough to wipe the class out. Refitting the classifier's weights and bias to the
unpruned model's logits on the same images undoes that shift (it distils the logits into the
last layer, in one solve).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from icnn_compress.prune._compensation import fit_reconstruction, well_posed

__all__ = ["last_linear_name", "refit_classifier"]

_log = logging.getLogger(__name__)


def last_linear_name(model: nn.Module) -> str | None:
    """The name of the last ``nn.Linear`` of ``model`` in module order (its classifier), or ``None``."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


@torch.no_grad()
def refit_classifier(
    model: nn.Module,
    teacher: nn.Module,
    data,
    *,
    max_batches: int = 20,
    ridge: float = 1e-3,
    classes: list[int] | None = None,
) -> bool:
    """Fit ``model``'s last ``nn.Linear`` (weights and bias, in place) to the outputs of the same
    layer of ``teacher`` on the same images.

    Args:
        model: the pruned network (eval mode is used, and each module's mode restored).
        teacher: the network before pruning, with a layer of the same name (its outputs are the
            targets; eval mode is used, and each module's mode restored).
        data: batches ``(images, labels, ...)``; at most ``max_batches`` are read, each once, by
            both networks.
        ridge: regularisation relative to the mean diagonal of the features' Gram matrix.
        classes: the teacher outputs to fit, in order (``keep_classes`` of a specialised model);
            ``None``: all of them.

    Returns:
        ``True`` when the layer was refit; ``False`` when it could not be (no ``nn.Linear``, no
        layer of that name or width in ``teacher``, or fewer than twice as many probe rows as
        features, where the ridge rather than the data would decide the weights): then nothing
        changed.
    """
    name = last_linear_name(model)
    if name is None:
        return False
    head = model.get_submodule(name)
    try:
        target = teacher.get_submodule(name)
    except AttributeError:
        return False
    outputs = len(classes) if classes is not None else target.out_features
    if not isinstance(target, nn.Linear) or target.in_features < 1 or head.out_features != outputs:
        return False
    most = _most_rows(data, max_batches)
    if most is not None and not well_posed(most, head.in_features):
        _log.info(
            "classifier %s not refit: at most %d probe rows for %d features (needs twice as many rows)",
            name,
            most,
            head.in_features,
        )
        return False
    feats, goals = _paired_rows(model, teacher, head, target, data, max_batches)
    if not feats:
        return False
    x, z = torch.cat(feats), torch.cat(goals)
    if classes is not None:
        z = z[:, classes]
    if not well_posed(x.shape[0], x.shape[1]):
        _log.info(
            "classifier %s not refit: %d probe rows for %d features (needs twice as many rows)",
            name,
            x.shape[0],
            x.shape[1],
        )
        return False
    k = x.shape[1]
    weight, bias = fit_reconstruction(
        torch.cat([x, z], 1), list(range(k, k + z.shape[1])), list(range(k)), ridge=ridge
    )
    if not (bool(torch.isfinite(weight).all()) and bool(torch.isfinite(bias).all())):
        _log.warning("classifier %s not refit: the fit is not finite (non-finite probe outputs?)", name)
        return False
    head.weight.copy_(weight.t().to(head.weight))
    if head.bias is None:
        head.bias = nn.Parameter(torch.zeros_like(head.weight[:, 0]))
    head.bias.copy_(bias.to(head.bias))
    return True


def _most_rows(data, max_batches: int) -> int | None:
    """An upper bound on the images ``max_batches`` batches of ``data`` hold, known without reading
    them (a list of batches, or a DataLoader with a batch size); ``None`` when unknown."""
    if isinstance(data, (list, tuple)):
        return sum(int(b[0].shape[0]) for b in data[:max_batches])
    size = getattr(data, "batch_size", None)
    try:
        return int(size) * min(len(data), max_batches) if size else None
    except TypeError:  # an iterable dataset's loader has no length
        return None


def _is_output(out, goals: list[Tensor]) -> bool:
    """Whether the model's output ``out`` is what its last Linear gave (the last of ``goals``):
    a classifier, not e.g. a squeeze-excitation layer inside a block."""
    if not torch.is_tensor(out) or not goals:
        return False
    flat = out.detach().reshape(-1, goals[-1].shape[1]) if out.numel() == goals[-1].numel() else None
    return flat is not None and torch.equal(flat.double().cpu(), goals[-1])


@contextlib.contextmanager
def _evaluating(*models: nn.Module) -> Iterator[None]:
    """Every module of ``models`` in eval mode, each one's own mode restored afterwards (the
    teacher is the caller's model, which may hold modules in either mode)."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training


def _paired_rows(
    model: nn.Module, teacher: nn.Module, head: nn.Linear, target: nn.Linear, data, max_batches: int
) -> tuple[list[Tensor], list[Tensor]]:
    """The pruned head's inputs ``(rows, in_features)`` and the teacher head's outputs ``(rows,
    out_features)`` on the same images, float64 on the CPU."""
    feats: list[Tensor] = []
    goals: list[Tensor] = []
    hooks = [
        head.register_forward_pre_hook(
            lambda m, args: feats.append(args[0].detach().reshape(-1, m.in_features).double().cpu())
        ),
        target.register_forward_hook(
            lambda m, args, out: goals.append(out.detach().reshape(-1, m.out_features).double().cpu())
        ),
    ]
    device = next(model.parameters()).device
    teacher_device = next(teacher.parameters()).device
    try:
        with _evaluating(model, teacher):
            for i, batch in enumerate(data):
                if i >= max_batches:
                    break
                model(batch[0].to(device))
                out = teacher(batch[0].to(teacher_device))
                if i == 0 and not _is_output(out, goals):
                    _log.info("last nn.Linear not refit: its outputs are not the model's outputs")
                    return [], []
    finally:
        for h in hooks:
            h.remove()
    if len(feats) != len(goals) or any(f.shape[0] != g.shape[0] for f, g in zip(feats, goals)):
        return [], []  # the heads ran a different number of times (e.g. a shared layer)
    return feats, goals
