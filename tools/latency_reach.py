"""How much speedup per unit of MACs reduction a model can reach at all on this machine and runtime.

Issue 15 asks pruned models for ONNX Runtime speedup / MACs reduction >= 0.9 at batch 32 and
>= 0.8 at batch 1. Whether that is reachable depends on how much of the model's latency falls with
its widths. This script measures, for each small model, in one process:

- ``unpruned``: the model as built;
- ``floor``: the same graph with every layer 1, 4 or 8 channels wide, the fastest of the three.
  A pruned model of the same depth keeps every op, its launch and its maps, so it is not expected
  to run faster: ``speedup <= T_unpruned / T_floor`` whatever the widths, and the **hard bound** on
  the ratio at a MACs reduction ``r`` is ``T_unpruned / (T_floor * r)``;
- the **linear model**: if the width-dependent part ``T_unpruned - T_floor`` fell in proportion to
  the MACs, the ratio would be ``T_unpruned / (r * T_floor + T_unpruned - T_floor)``. Not a bound:
  a memory-bound layer's time follows its widths while its MACs follow their product (slower),
  and a model that leaves a slow kernel can gain more than its MACs (faster);
- ``uniform``: the model built again with every width scaled by the same factor and rounded to the
  vector kernels' channel blocks (4 up to 16 channels, else 8): what a perfect uniform pruner would
  leave; at each level the speedup interpolated (in log MACs) between the two builds around it;
- what the library's pruner gives at the same levels: ``l1`` with ``round_to=8`` and with
  ``allocation="latency"`` (planned for batch 32 on the same threads).

Every speedup is the median of ``--rounds`` alternating rounds (reference, candidate) of ``--repeats``
calls after ``--warmup`` (ORT_ENABLE_ALL, sequential, ``--threads`` intra-op threads, CPU provider).
Weights are random: latency depends only on the widths. Writes tools/results/latency_reach.json.

    .venv/bin/python tools/latency_reach.py [--models vgg_small,resnet_cifar20] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import torch
from torch import nn

import icnn_compress as ic
from icnn_compress.io import atomic_write_json, environment_info
from icnn_compress.measure import SpeedupTimer, model_stats
from icnn_compress.prune import Target, prune_model

BATCHES = (1, 32)
TARGETS = {"b32": 0.9, "b1": 0.8}
FLOOR_WIDTHS = (1, 4, 8)  # every layer this wide: the fastest of them is the floor


def _block(c: float) -> int:
    """``c`` channels rounded to the kernels' channel block: 4 up to 16 channels, else 8."""
    step = 4 if c <= 16 else 8
    return max(step, int(c / step + 0.5) * step)


def build(name: str, width=None) -> nn.Module:
    """``name`` at its own widths (``width=None``) or with every layer's width ``c`` replaced by
    ``width(c)``; random weights, eval mode."""
    torch.manual_seed(0)
    base = ic.models.create(name, num_classes=10, in_channels=1)
    if width is None:
        return base.eval()
    if isinstance(base, ic.models.VGGSmall):
        cfg = tuple(
            "M" if isinstance(m, nn.MaxPool2d) else width(m.out_channels)
            for m in base.features
            if isinstance(m, (nn.Conv2d, nn.MaxPool2d))
        )
        return ic.models.VGGSmall(num_classes=10, in_channels=1, cfg=cfg).eval()
    if isinstance(base, ic.models.CifarResNet):
        stages = [getattr(base, f"layer{i}")[0].conv2.out_channels for i in (1, 2, 3)]
        return ic.models.CifarResNet(10, 1, 20, tuple(width(c) for c in stages)).eval()
    raise SystemExit(f"--models: {name!r} has no width-scaled builder here (vgg_small, resnet_cifar20).")


def compare(timer: SpeedupTimer, model: nn.Module) -> tuple[float, float, float]:
    """``(reference ms, candidate ms, speedup)`` of the round with the median speedup (a round
    slowed by another process does not count)."""
    rounds = sorted((r / c, r, c) for r, c in timer.rounds_ms(model))
    ratio, r, c = rounds[len(rounds) // 2]
    return r, c, ratio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vgg_small,resnet_cifar20")
    p.add_argument("--levels", default="2,3,4")
    p.add_argument(
        "--scales",
        default="0.875,0.75,0.625,0.5625,0.5,0.4375,0.375,0.3125,0.25,0.1875,0.125",
        help="uniform width factors to build (rounded to channel blocks)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per speedup (median)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "latency_reach.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    example = torch.rand(1, 1, 28, 28)
    levels = [float(x) for x in a.levels.split(",")]
    rows, summary = [], {}
    timing = dict(threads=a.threads, rounds=a.rounds, warmup=a.warmup, repeats=a.repeats, stop_spread=None)
    for name in a.models.split(","):
        base = build(name, None)
        timers = {b: SpeedupTimer(base, example, batch=b, **timing) for b in BATCHES}
        macs0 = model_stats(base, example)["macs"]
        variants: list[tuple[str, float | None, nn.Module]] = [
            ("floor", w, build(name, lambda c, w=w: w)) for w in FLOOR_WIDTHS
        ]
        variants += [
            ("uniform", float(s), build(name, lambda c, s=float(s): _block(c * s)))
            for s in a.scales.split(",")
        ]
        for level in levels:
            for kind, kw in (
                ("round_to=8", {"round_to": 8}),
                ("latency-aware", {"allocation": "latency"}),
            ):
                res = prune_model(
                    base,
                    example,
                    criterion="l1",
                    target=Target(macs_reduction=level, latency_threads=a.threads),
                    refit_classifier=False,
                    progress=False,
                    **{"round_to": None, **kw},
                )
                variants.append((kind, level, res.model.eval()))
        for kind, setting, model in variants:
            row = {"model": name, "kind": kind, "setting": setting}
            row["macs_reduction"] = macs0 / model_stats(model, example)["macs"]
            for b in BATCHES:
                ref_ms, ms, speedup = compare(timers[b], model)
                row[f"unpruned_ms_b{b}"], row[f"ms_b{b}"], row[f"speedup_b{b}"] = ref_ms, ms, speedup
                row[f"speedup_over_macs_b{b}"] = speedup / row["macs_reduction"]
            rows.append(row)
            print(
                f"{name} {kind} {setting}: MACs {row['macs_reduction']:.2f}x, b1 {row['ms_b1']:.3f} ms "
                f"({row['speedup_b1']:.2f}x), b32 {row['ms_b32']:.2f} ms ({row['speedup_b32']:.2f}x)",
                flush=True,
            )
        summary[name] = summarise([r for r in rows if r["model"] == name], levels)
    summary["targets"] = {f"speedup_over_macs_{b}": f">= {t}" for b, t in TARGETS.items()}
    result = {
        "benchmark": "latency_reach",
        "command": "python tools/latency_reach.py "
        + " ".join(
            f"--{k} {getattr(a, k)}" for k in ("models", "levels", "threads", "warmup", "repeats", "rounds")
        ),
        "environment": environment_info(),
        "setup": {
            "scales": a.scales,
            "provider": "cpu",
            "optimization": "ORT_ENABLE_ALL",
            "input": "1x28x28",
        },
        "rows": rows,
        "summary": summary,
    }
    atomic_write_json(result, a.out)
    print(f"wrote {a.out}")


def summarise(rows: list[dict], levels: list[float]) -> dict:
    """Per batch and level: the two bounds, the uniform widths, and the library's two width rules."""
    floors = [r for r in rows if r["kind"] == "floor"]
    uniform = sorted((r for r in rows if r["kind"] == "uniform"), key=lambda r: r["macs_reduction"])
    out: dict = {}
    for b in BATCHES:
        floor = max(floors, key=lambda r: r[f"speedup_b{b}"])
        full = floor[f"speedup_b{b}"]  # T_unpruned / T_floor
        out[f"floor_width_b{b}"] = floor["setting"]
        out[f"floor_share_b{b}"] = 1 / full
        out[f"max_speedup_b{b}"] = full
        for level in levels:
            key = f"{level:g}x"
            cell = out.setdefault(f"b{b}", {}).setdefault(key, {})
            cell["hard_bound"] = full / level
            cell["linear_model"] = 1 / (level / full + 1 - 1 / full)
            speedup = _interpolate(uniform, level, f"speedup_b{b}")
            if speedup is not None:
                cell["uniform"] = speedup / level
            for kind in ("round_to=8", "latency-aware"):
                r = next(r for r in rows if r["kind"] == kind and r["setting"] == level)
                cell[kind] = r[f"speedup_over_macs_b{b}"]
            target = TARGETS[f"b{b}"]
            cell["reachable"] = cell["hard_bound"] >= target
    return out


def _interpolate(rows: list[dict], level: float, key: str) -> float | None:
    """``key`` at MACs reduction ``level``, interpolated linearly in log MACs between the two
    uniform builds around it (``None`` outside their range); builds with the same MACs are
    averaged."""
    by_macs: dict[float, list[float]] = {}
    for r in rows:
        by_macs.setdefault(round(r["macs_reduction"], 6), []).append(r[key])
    points = sorted((m, sum(v) / len(v)) for m, v in by_macs.items())
    for (m0, v0), (m1, v1) in itertools.pairwise(points):
        if m0 <= level <= m1:
            t = math.log(level / m0) / math.log(m1 / m0)
            return v0 + t * (v1 - v0)
    return None


if __name__ == "__main__":
    main()
