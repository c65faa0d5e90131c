"""Small helpers for torch.distributed that are no-ops in a single process."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_reduce_", "broadcast", "init_from_env", "is_distributed", "leave", "rank", "world_size"]


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


def init_from_env(device: str | None = None) -> bool:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) when it has more than one rank:
    NCCL with one GPU per process (``LOCAL_RANK``) on CUDA, gloo on the CPU. Collectives wait up
    to ``ICNN_DIST_TIMEOUT_MIN`` minutes (default 180: the other ranks wait while rank 0 prunes
    and measures). Returns whether it joined one (then call ``leave()`` at the end)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    cuda = str(device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    minutes = float(os.environ.get("ICNN_DIST_TIMEOUT_MIN", "180"))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=minutes))
    return True


def leave() -> None:
    """Leave the process group joined by ``init_from_env``."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` (any picklable object) on every rank; ``obj`` itself in one process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
