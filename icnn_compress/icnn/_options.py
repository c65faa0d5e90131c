"""The options of the interpretable filter loss, as one typed, validated object."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from icnn_compress.errors import ICNNError

__all__ = [
    "BALANCES",
    "CATEGORY_MODES",
    "CATEGORY_STATS",
    "CENTRES",
    "FUSES",
    "NORMALIZES",
    "SCHEDULES",
    "ICNNOptions",
]

SCHEDULES = ("constant", "paper")
BALANCES = ("none", "grad")
NORMALIZES = ("mean_max", "none")
CENTRES = ("argmax", "centroid")
CATEGORY_MODES = ("multi", "balanced", "single")
CATEGORY_STATS = ("sum", "max")
FUSES = ("auto", "on", "off")


@dataclass(frozen=True)
class ICNNOptions:
    """How the loss and the masks behave (``attach_icnn(model, layers, K, ICNNOptions(...))``).

    Attributes:
        weight: lambda. With ``balance="grad"``: the ratio of the RMS of the filter loss's gradient
            to the RMS of the task loss's gradient at the same maps, per filter; with
            ``balance="none"``: the literal weight of the loss.
        balance: ``"grad"`` (scale-free balance against the task gradient) or ``"none"``.
        normalize: ``"mean_max"`` (maps divided by the batch mean of their maximum) or ``"none"``.
        schedule: ``"constant"`` or ``"paper"`` (lambda / t in epoch t, counted from 1).
        warmup_steps: linear ramp of lambda over the first steps (0: none).
        beta: template slope (the paper's 4); tau: template scale (``None``: ``0.5 / n**2``).
        centre: mask centre: ``"argmax"`` (the strongest cell) or ``"centroid"``.
        mask: apply the mask layer in the forward pass (``False``: the loss alone). Without the
            mask the task gradient that ``balance="grad"`` measures is not masked (2.4x larger
            on a ResNet block output), so the same ``weight`` pushes harder: 0.5 collapsed
            fine-tunes of ~1000 steps on both benchmark models, 0.2 did not.
        categories: filter -> class: ``"multi"`` (argmax of its mean response, the paper),
            ``"balanced"`` (~C/K filters per class) or ``"single"`` (every filter ->
            ``positive_class``).
        category_stat: per-image statistic for the categories: ``"sum"`` (paper) or ``"max"``.
        refresh_every: re-assign categories every this many loss calls.
        z_momentum, stat_momentum: momentum in (0, 1] of the running ``Z_T`` and class statistics.
        fuse: run the per-step statistics compiled with ``torch.compile`` (a handful of fused
            kernels instead of ~150 small ones): ``"auto"`` on CUDA where Triton is installed,
            ``"on"`` wherever ``torch.compile`` works, ``"off"`` never. Single-process runs only;
            the first steps compile (tens of seconds). Same numbers either way.
    """

    weight: float = 0.5
    balance: str = "grad"
    normalize: str = "mean_max"
    schedule: str = "constant"
    warmup_steps: int = 200
    beta: float = 4.0
    tau: float | None = None
    centre: str = "argmax"
    mask: bool = True
    categories: str = "multi"
    positive_class: int = 1
    category_stat: str = "sum"
    refresh_every: int = 50
    z_momentum: float = 0.1
    stat_momentum: float = 0.1
    fuse: str = "auto"

    def __post_init__(self) -> None:
        for key, allowed in (
            ("balance", BALANCES),
            ("normalize", NORMALIZES),
            ("schedule", SCHEDULES),
            ("centre", CENTRES),
            ("categories", CATEGORY_MODES),
            ("category_stat", CATEGORY_STATS),
            ("fuse", FUSES),
        ):
            if getattr(self, key) not in allowed:
                _bad(key, f"one of {allowed}", getattr(self, key))
        if not _number(self.weight) or not (math.isfinite(self.weight) and self.weight >= 0):
            _bad("weight", "a finite float >= 0", self.weight)
        if not _number(self.beta) or not (math.isfinite(self.beta) and self.beta > 0):
            _bad("beta", "a finite float > 0", self.beta)
        if self.tau is not None and (not _number(self.tau) or not (math.isfinite(self.tau) and self.tau > 0)):
            _bad("tau", "None or a finite float > 0", self.tau)
        for key in ("warmup_steps", "positive_class"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                _bad(key, "an int >= 0", value)
        if (
            isinstance(self.refresh_every, bool)
            or not isinstance(self.refresh_every, int)
            or self.refresh_every < 1
        ):
            _bad("refresh_every", "an int >= 1", self.refresh_every)
        for key in ("z_momentum", "stat_momentum"):
            value = getattr(self, key)
            if not _number(value) or not 0 < value <= 1:
                _bad(key, "a float in (0, 1]", value)
        if not isinstance(self.mask, bool):
            _bad("mask", "True or False", self.mask)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in declaration order."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_kwargs(cls, **kwargs) -> ICNNOptions:
        """``ICNNOptions(**kwargs)`` with a one-line error naming an unknown option."""
        unknown = sorted(set(kwargs) - set(cls.names()))
        if unknown:
            raise ICNNError(
                f"Unknown option(s) {', '.join(map(repr, unknown))} of attach_icnn; the options are "
                f"{', '.join(cls.names())}."
            )
        return cls(**kwargs)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bad(key: str, allowed: str, value) -> None:
    raise ICNNError(f"The '{key}' option of attach_icnn must be {allowed}. Got {value!r} instead.")
