"""Timing one ONNX Runtime session right after another: the evidence behind ``SPIN_SETTLE_S``.

ONNX Runtime's intra-op workers spin for a while after each run. A session timed while another
session's workers still spin shares the cores with them. ``ort_latency`` therefore waits
``SPIN_SETTLE_S`` after a different session's run before it times one. This tool measures the same
things with that wait (``settle``) and without it (``no-settle``, ``settle_s=0``), in one run:

- **a per-layer latency table** as the latency-aware planner measures it: one 3x3 conv
  (``--channels`` in and out, ``--size`` x ``--size`` input, batch 32) at every output width in
  steps of 8, all sessions created first, then two passes over the widths in opposite orders (2
  calls warm-up, 7 timed, the faster median of the two passes kept). The table is measured
  ``--trials`` times. Reported: the median and largest disagreement between trials (|log ratio|
  as a percentage) and the number of *inversions*: widths at least 10% slower than the next wider
  one, which a staircase of channel blocks does not have;
- **alternating rounds**, taken by ``SpeedupTimer`` with the same ``settle_s``: vgg_small
  (random weights) against the same model pruned (``l1``) to 2x fewer MACs, five rounds of
  (reference, candidate) at batch 1 and 32, repeated ``--trials`` times. Reported: the spread of
  the rounds' ratios (largest / smallest - 1) and the median ratio.

Writes tools/results/spin_settle.json with a ``summary``.

    .venv/bin/python tools/bench_spin_settle.py [--threads 2] [--trials 3]   # ~4 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import icnn_compress as ic
from icnn_compress.export import export_onnx
from icnn_compress.io import atomic_write_json, environment_info
from icnn_compress.measure import SPIN_SETTLE_S, SpeedupTimer, ort_latency, ort_session
from icnn_compress.prune import Target, prune_model

MODES = {"no-settle": 0.0, "settle": SPIN_SETTLE_S}


def conv_table(tmp: Path, a, settle_s: float) -> dict[int, float]:
    """``{width: ms}`` of one conv at each output width, measured as the latency planner does."""
    sessions = {}
    for w in range(8, a.channels + 1, 8):
        path = tmp / f"conv{w}.onnx"
        if not path.exists():
            conv = nn.Sequential(nn.Conv2d(a.channels, w, 3, padding=1, bias=False), nn.ReLU()).eval()
            export_onnx(conv, path, torch.rand(1, a.channels, a.size, a.size), check=False)
        sessions[w] = (path, ort_session(path, provider="cpu", threads=a.threads))
    table: dict[int, float] = {}
    for order in (list(sessions), list(sessions)[::-1]):
        for w in order:
            path, sess = sessions[w]
            ms = ort_latency(
                path, 32, session=sess, threads=a.threads, warmup=2, repeats=7, settle_s=settle_s
            ).median_ms
            table[w] = min(table.get(w, math.inf), ms)
    return table


def inversions(table: dict[int, float]) -> int:
    """Widths at least 10% slower than the next wider one."""
    ws = sorted(table)
    return sum(table[w] > 1.1 * table[v] for w, v in itertools.pairwise(ws))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--channels", type=int, default=160)
    p.add_argument("--size", type=int, default=7)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "spin_settle.json"))
    a = p.parse_args()
    if a.trials < 2:
        p.error("--trials must be >= 2")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    summary: dict = {}
    raw: dict = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        example = torch.rand(1, 1, 28, 28)
        full = ic.models.create("vgg_small", num_classes=10, in_channels=1).eval()
        pruned = prune_model(
            full,
            example,
            criterion="l1",
            target=Target(macs_reduction=2.0),
            refit_classifier=False,
            progress=False,
        ).model
        timers = {
            (b, mode): SpeedupTimer(
                full, example, batch=b, threads=a.threads, stop_spread=None, settle_s=settle_s
            )
            for b in (1, 32)
            for mode, settle_s in MODES.items()
        }
        for trial in range(a.trials):
            for mode, settle_s in MODES.items():  # the two modes interleaved, so drift hits both
                t0 = time.perf_counter()
                table = conv_table(tmp, a, settle_s)
                wall = time.perf_counter() - t0
                entry = raw.setdefault(
                    mode, {"tables": [], "table_wall_s": [], "rounds_b1": [], "rounds_b32": []}
                )
                entry["tables"].append(table)
                entry["table_wall_s"].append(wall)
                for b in (1, 32):
                    pairs = timers[(b, mode)].rounds_ms(pruned)
                    entry[f"rounds_b{b}"].append([r / c for r, c in pairs])
                print(mode, f"trial {trial + 1}", {w: round(v, 2) for w, v in table.items()}, flush=True)
    for mode, entry in raw.items():
        tables = entry["tables"]
        disagreement = [
            100 * abs(math.log(t1[w] / t2[w]))
            for i, t1 in enumerate(tables)
            for t2 in tables[i + 1 :]
            for w in t1
        ]
        summary[mode] = {
            "table_inversions": [inversions(t) for t in tables],
            "table_trial_disagreement_median_pct": statistics.median(disagreement),
            "table_trial_disagreement_max_pct": max(disagreement),
            "table_wall_s": statistics.median(entry["table_wall_s"]),
        }
        for b in (1, 32):
            rs = entry[f"rounds_b{b}"]
            summary[mode][f"round_spread_b{b}_pct"] = [100 * (max(r) / min(r) - 1) for r in rs]
            summary[mode][f"median_ratio_b{b}"] = [statistics.median(r) for r in rs]
        print(mode, summary[mode], flush=True)
    result = {
        "benchmark": "spin_settle",
        "command": f"python tools/bench_spin_settle.py --threads {a.threads} --trials {a.trials}",
        "environment": environment_info(),
        "setup": {
            **vars(a),
            "settle_s": SPIN_SETTLE_S,
            "conv": f"3x3, {a.channels} in, widths 8..{a.channels} step 8, {a.size}x{a.size}, batch 32",
            "rounds": "vgg_small vs the same l1-pruned to 2x MACs, random weights, "
            "5 rounds of 20 calls after 5",
        },
        "raw": raw,
        "summary": summary,
    }
    atomic_write_json(result, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
