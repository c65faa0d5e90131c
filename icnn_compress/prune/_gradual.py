"""Gradual pruning inside training: prune in steps between epochs until the target."""

from __future__ import annotations

import math

from torch import Tensor
from torch.utils.data import DataLoader

from icnn_compress.prune._engine import PruneResult, Target, prune_model

__all__ = ["GradualPruning", "gradual_schedule"]


def gradual_schedule(final: float, steps: int) -> list[float]:
    """Intermediate MACs-reduction factors, geometric from 1 to ``final`` over ``steps`` steps."""
    return [math.exp(math.log(final) * (i + 1) / steps) for i in range(steps)]


class GradualPruning:
    """A Trainer callback that prunes after each of the first ``steps`` epochs, each time to the
    next factor of a geometric schedule towards ``target`` (MACs reduction), with signatures and
    clusters refreshed from the current model (``prune_model`` does that at every step). The
    optimizer is rebuilt after each pruning, since the pruned layers hold new parameters.

    For your own loop, call ``step(model)`` between epochs instead.
    """

    def __init__(
        self,
        example_inputs: Tensor,
        *,
        target: float,
        steps: int,
        criterion: str = "icnn-cluster",
        data: DataLoader | None = None,
        **prune_options,
    ) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1. Got {steps!r} instead.")
        self.example_inputs = example_inputs
        self.schedule = gradual_schedule(float(target), steps)
        self.criterion, self.data, self.prune_options = criterion, data, prune_options
        self.done = 0
        self.base_macs: int | None = None
        self.results: list[PruneResult] = []

    def step(self, model) -> PruneResult | None:
        """Prune ``model`` in place to the next factor of the schedule; ``None`` when finished."""
        if self.done >= len(self.schedule):
            return None
        from icnn_compress.prune._engine import _stats

        macs, _ = _stats(model, self.example_inputs.to(next(model.parameters()).device))
        self.base_macs = self.base_macs or macs
        wanted = self.schedule[self.done] * macs / self.base_macs  # factor relative to the current model
        self.done += 1
        if wanted <= 1.0:
            return None
        res = prune_model(
            model,
            self.example_inputs,
            criterion=self.criterion,
            target=Target(macs_reduction=wanted),
            data=self.data,
            inplace=True,
            progress=False,
            **self.prune_options,
        )
        self.results.append(res)
        return res

    def on_epoch_end(self, trainer, epoch: int, metrics: dict) -> None:
        if self.data is None:
            self.data = trainer.train_loader
        if self.step(trainer.model) is not None:
            trainer.rebuild_optimizer()
