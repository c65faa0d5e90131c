"""Small helpers for torch.distributed that are no-ops in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce_", "is_distributed", "rank", "world_size"]


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``"sum"`` or ``"max"``) across ranks; returns ``tensor``."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor
