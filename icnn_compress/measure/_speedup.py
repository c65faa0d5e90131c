"""Measured speedup of a model over a reference in ONNX Runtime, robust to a drifting machine.

A speedup computed from two timings taken minutes apart inherits whatever the machine did in
between (another process, a throttled core, a noisy neighbour on a VM). ``SpeedupTimer`` exports
the reference once and times it again beside every candidate, in alternating rounds, and keeps the
median ratio, so a slowdown that hits both shows in neither.

It stops early when the rounds agree: once more than half of the rounds are in and their ratios lie
within ``stop_spread`` of each other, the median of all the rounds could only land among them, so
the rest are not timed. How often that happens depends on the machine: on the 2-core benchmark VM
it stopped early in 2 of 20 measurements at batch 32 (tools/bench_speedup_timer.py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from torch import Tensor, nn

from icnn_compress.errors import ConfigError
from icnn_compress.measure._latency import SPIN_SETTLE_S, ort_latency, ort_session

__all__ = ["SpeedupTimer"]


class SpeedupTimer:
    """ONNX Runtime speedup of models over ``reference`` (exported when the timer is made).

    Args:
        reference: the model to compare against (usually the unpruned one; left where it is), or an
            ONNX file of it (e.g. the float model an INT8 file was quantized from). Candidates too
            may be modules or ONNX files.
        example: ``(1, C, H, W)`` input for exporting modules; the batch is ``batch``.
        batch, threads, provider: how the models are run (``ort_session``/``ort_latency``).
        rounds: alternating (reference, candidate) rounds; the median ratio is kept. Five, so that
            two slowed rounds do not decide it: in two runs of ten measurements of one pruned
            model on a 2-core VM (tools/bench_speedup_timer.py), five rounds stayed within -3.5% to
            +6.9% of the median, three once read 11.6% low, the ratio of minima -16% to +10%; a
            later run on a noisier day spread five rounds -18% to +14% (resnet_cifar20).
        warmup, repeats: calls per timing (the median of ``repeats`` after ``warmup``).
        settle_s: each timing starts this long after the other model's last run, so that its
            spinning ONNX Runtime workers are idle (``ort_latency``; 0 does not wait).
        stop_spread: ``speedup`` stops after ``rounds // 2 + 1`` rounds when their largest ratio is
            within this fraction of their smallest (0.02: 2%); the median of all ``rounds`` would lie
            between those two, so the answer moves by less than this. ``None`` always times every
            round.
    """

    def __init__(
        self,
        reference: nn.Module,
        example: Tensor,
        *,
        batch: int = 32,
        threads: int | None = 2,
        provider: str = "cpu",
        rounds: int = 5,
        warmup: int = 5,
        repeats: int = 20,
        stop_spread: float | None = 0.02,
        settle_s: float = SPIN_SETTLE_S,
    ) -> None:
        if rounds < 1:
            raise ConfigError(f"rounds must be an int >= 1. Got {rounds!r} instead.")
        if stop_spread is not None and stop_spread < 0:
            raise ConfigError(f"stop_spread must be a fraction >= 0 or None. Got {stop_spread!r} instead.")
        self._tmp = tempfile.TemporaryDirectory()  # removed with the timer
        self.example, self.batch, self.threads, self.provider = example[:1], batch, threads, provider
        self.rounds, self.warmup, self.repeats = rounds, warmup, repeats
        self.stop_spread, self.settle_s = stop_spread, settle_s
        self.rounds_used: list[int] = []  # rounds timed by each ``speedup`` call, in order
        self.reference = self._session(reference, "reference")

    def _session(self, model: nn.Module | str | Path, name: str):
        from icnn_compress.export import export_onnx

        if isinstance(model, (str, Path)):  # an ONNX file, timed as it is
            if not Path(model).is_file():
                raise ConfigError(f"SpeedupTimer: no ONNX file at {str(model)!r}.")
            return Path(model), ort_session(model, provider=self.provider, threads=self.threads)
        device = next(model.parameters()).device
        path = Path(self._tmp.name) / f"{name}.onnx"
        export_onnx(model.cpu(), path, self.example.cpu(), check=False)
        model.to(device)
        return path, ort_session(path, provider=self.provider, threads=self.threads)

    def _ms(self, entry) -> float:
        path, sess = entry
        return ort_latency(
            path,
            self.batch,
            session=sess,
            threads=self.threads,
            warmup=self.warmup,
            repeats=self.repeats,
            settle_s=self.settle_s,
        ).median_ms

    def rounds_ms(
        self, model: nn.Module | str | Path, *, early_stop: bool = False
    ) -> list[tuple[float, float]]:
        """``[(reference ms, model ms), ...]``, one pair per round, timed in alternation: all
        ``rounds`` of them, or with ``early_stop`` only the first ``rounds // 2 + 1`` when those
        agree within ``stop_spread``."""
        candidate = self._session(model, "candidate")
        pairs: list[tuple[float, float]] = []
        for _ in range(self.rounds):
            pairs.append((self._ms(self.reference), self._ms(candidate)))
            if early_stop and len(pairs) == self.rounds // 2 + 1 and self.agree(pairs, self.stop_spread):
                break
        return pairs

    def speedup(self, model: nn.Module | str | Path) -> float:
        """Reference latency over ``model``'s: the median ratio of the alternating rounds (stopping
        early when the first ones agree, see ``stop_spread``)."""
        pairs = self.rounds_ms(model, early_stop=self.stop_spread is not None)
        self.rounds_used.append(len(pairs))
        return self.median_ratio(pairs)

    @staticmethod
    def agree(pairs: list[tuple[float, float]], spread: float | None) -> bool:
        """Whether the rounds' ratios ``reference ms / model ms`` lie within ``spread`` (a fraction)
        of each other: largest / smallest - 1 <= spread. ``None`` never agrees."""
        if spread is None:
            return False
        ratios = [r / c for r, c in pairs]
        return max(ratios) <= min(ratios) * (1 + spread)

    @staticmethod
    def median_ratio(pairs: list[tuple[float, float]]) -> float:
        """The median of ``reference ms / model ms`` over ``rounds_ms`` pairs (the upper middle one
        for an even count)."""
        ratios = sorted(r / c for r, c in pairs)
        return ratios[len(ratios) // 2]
