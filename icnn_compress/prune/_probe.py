"""Probe activations: the inputs that each conv/linear layer sees, sampled at random positions."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

__all__ = ["collect_layer_inputs", "reestimate_batchnorm"]


@torch.no_grad()
def collect_layer_inputs(
    model: nn.Module,
    loader: DataLoader,
    modules: list[nn.Module],
    *,
    max_batches: int = 8,
    rows_per_batch: int = 512,
    seed: int = 0,
    on_batch: Callable[[list[tuple[nn.Module, Tensor]]], None] | None = None,
) -> dict[nn.Module, Tensor]:
    """For each module, a matrix ``(rows, C_in)`` of its input vectors (conv: channel vectors at
    random spatial positions; linear: the input rows), from at most ``max_batches`` batches.
    ``on_batch``, if given, is called after each batch's forward pass with every ``(module, full
    input)`` of that pass, in call order, so that another statistic shares the pass."""
    g = torch.Generator().manual_seed(seed)
    store: dict[nn.Module, list[Tensor]] = {m: [] for m in modules}
    seen: list[tuple[nn.Module, Tensor]] = []

    def hook(module, args):
        x = args[0].detach()
        if on_batch is not None:
            seen.append((module, x))
        if x.dim() == 4:
            n, c, h, w = x.shape
            if n * h * w > rows_per_batch:
                # the same rows as permuting the whole map to (N*H*W, C) and sampling it, without
                # copying the map: only the sampled positions are gathered
                idx = torch.randperm(n * h * w, generator=g)[:rows_per_batch].to(x.device)
                pos = idx % (h * w)
                x = x[idx // (h * w), :, pos // w, pos % w]
            else:
                x = x.permute(0, 2, 3, 1).reshape(-1, c)
        else:
            if x.dim() > 2:
                x = x.reshape(-1, x.shape[-1])
            if x.shape[0] > rows_per_batch:
                x = x[torch.randperm(x.shape[0], generator=g)[:rows_per_batch].to(x.device)]
        store[module].append(x.float().cpu())

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            seen.clear()
            model(batch[0].to(device))
            if on_batch is not None:
                on_batch(seen)
        seen.clear()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {m: torch.cat(v) for m, v in store.items() if v}


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, loader: DataLoader, *, max_batches: int = 20) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them (cumulative average) on at
    most ``max_batches`` batches in train mode. Returns the number of batches used."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or max_batches <= 0:
        return 0
    saved = {m: m.momentum for m in bns}
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches below
    device = next(model.parameters()).device
    was_training = model.training
    model.train()
    used = 0
    try:
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            model(batch[0].to(device))
            used += 1
    finally:
        for m, mom in saved.items():
            m.momentum = mom
        model.train(was_training)
    return used
