"""Knowledge distillation: a frozen teacher's softened logits as a second target.

The loss of a step is ``(1 - weight) * CE(student, y) + weight * T**2 * KL(p_teacher || p_student)``
with ``p = softmax(logits / T)`` (Hinton et al., 2015); ``T**2`` keeps the gradient scale of the
soft term independent of ``T``. The teacher runs in eval mode under ``torch.no_grad`` and is never
updated, so a resumed run sees exactly the same targets.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icnn_compress.errors import ConfigError

__all__ = ["Distillation", "distillation_loss", "frozen_copy"]


@dataclass
class Distillation:
    """Options of knowledge distillation from a frozen ``teacher``.

    Attributes:
        teacher: the network whose logits are the soft targets (copied and frozen by the Trainer
            only if you pass ``frozen_copy(model)``; it is used as given otherwise).
        weight: share of the soft (KL) term in [0, 1]; 0 turns distillation off.
        temperature: softmax temperature ``T`` > 0 of both distributions.
    """

    teacher: nn.Module
    weight: float = 0.5
    temperature: float = 4.0

    def __post_init__(self) -> None:
        if not isinstance(self.teacher, nn.Module):
            raise ConfigError(f"Distillation needs an nn.Module teacher. Got {type(self.teacher).__name__}.")
        if not (math.isfinite(self.weight) and 0 <= self.weight <= 1):
            raise ConfigError(f"Distillation weight must be in [0, 1]. Got {self.weight!r} instead.")
        if not (math.isfinite(self.temperature) and 0 < self.temperature <= 100):
            raise ConfigError(
                f"Distillation temperature must be in (0, 100]. Got {self.temperature!r} instead."
            )


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with ``requires_grad=False`` everywhere (a teacher)."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T**2 * KL(softmax(teacher/T) || softmax(student/T))``, batch mean; logits ``(N, K)``."""
    if student.shape != teacher.shape:
        raise ConfigError(
            f"The teacher's logits {tuple(teacher.shape)} do not match the student's {tuple(student.shape)}."
        )
    t = temperature
    log_p_student = F.log_softmax(student.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher.float() / t, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (t * t)


@torch.no_grad()
def teacher_logits(teacher: nn.Module, x: Tensor) -> Tensor:
    """The teacher's logits for ``x`` (eval mode, no autograd graph)."""
    if teacher.training:
        teacher.eval()
    out = teacher(x)
    return out[0] if isinstance(out, (tuple, list)) else out
