"""Latency of the deployed model: ONNX Runtime vs PyTorch eager, and measured speedup vs MACs reduction.

For each small model, pruned with ``l1`` to several MACs reductions (free widths, ``round_to=8``, and
latency-aware widths, ``allocation="latency"``, planned for batch 32 on the same threads),
exported to ONNX and timed in ONNX Runtime (graph optimisations on, sequential, ``--threads``
intra-op threads) and in PyTorch eager (``torch.inference_mode``, same threads), at batch 1 and 32.
Medians over ``--repeats`` calls after ``--warmup``; all numbers from one process on one machine.
ORT speedups are measured with ``measure.SpeedupTimer``: the unpruned model timed again beside each
pruned one, the median ratio of five alternating rounds.
Writes tools/results/latency.json with ``summary.<model>.ort_vs_eager_b1`` and
``summary.<model>.speedup_over_macs_b32.<level>`` (measured ORT speedup / MACs reduction, the best
width rule), ``..._b1``, and ``summary.<model>.latency_aware.<level>`` (``..._b1``) for the
latency-aware widths.

    .venv/bin/python tools/bench_latency.py [--threads 2] [--provider cpu]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import icnn_compress as ic
from icnn_compress.export import export_onnx
from icnn_compress.io import atomic_write_json, environment_info
from icnn_compress.measure import SpeedupTimer, model_stats, ort_latency, ort_session, torch_latency
from icnn_compress.prune import prune_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vgg_small,resnet_cifar20")
    p.add_argument("--levels", default="2,3,4")
    p.add_argument(
        "--round-to",
        default="none,8,latency",
        help="width rules: none (free widths), an int (multiples of it), latency (allocation='latency')",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--provider", default="cpu")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "latency.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    example = torch.rand(1, 1, 28, 28)
    rows, summary = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            torch.manual_seed(0)
            base = ic.models.create(name, num_classes=10, in_channels=1).eval()
            variants = [("1x", None, base)]
            for rt in a.round_to.split(","):
                round_to = None if rt in ("none", "latency") else int(rt)
                allocation = "latency" if rt == "latency" else "uniform"
                for level in a.levels.split(","):
                    res = prune_model(
                        base,
                        example,
                        criterion="l1",
                        target=ic.prune.Target(macs_reduction=float(level), latency_threads=a.threads),
                        round_to=round_to,
                        allocation=allocation,
                        refit_classifier=False,  # as the published numbers were measured
                        progress=False,
                    )
                    variants.append((f"{level}x", rt if rt == "latency" else round_to, res.model.eval()))
            # speedups: the unpruned model timed again beside each pruned one (alternating rounds)
            timers = {
                b: SpeedupTimer(
                    base,
                    example,
                    batch=b,
                    threads=a.threads,
                    provider=a.provider,
                    warmup=a.warmup,
                    repeats=a.repeats,
                    stop_spread=None,  # the table's figures: always the median of five rounds
                )
                for b in (1, 32)
            }
            for level, round_to, model in variants:
                path = Path(tmp) / f"{name}_{level}_{round_to}.onnx"
                export_onnx(model, path, example)
                sess = ort_session(path, provider=a.provider, threads=a.threads)
                stats = model_stats(model, example)
                row = {
                    "model": name,
                    "level": level,
                    "round_to": round_to,
                    **stats,
                    "file_bytes": path.stat().st_size,
                }
                for b in (1, 32):
                    ort = ort_latency(
                        path, b, session=sess, threads=a.threads, warmup=a.warmup, repeats=a.repeats
                    )
                    eager = torch_latency(
                        model, torch.rand(b, 1, 28, 28), threads=a.threads, warmup=a.warmup, repeats=a.repeats
                    )
                    row[f"ort_b{b}"] = ort.to_dict()
                    row[f"eager_b{b}"] = eager.to_dict()
                row["provider"] = row["ort_b1"]["provider"]
                if level != "1x":
                    base_macs = rows[[r["model"] for r in rows].index(name)]["macs"]
                    row["macs_reduction"] = base_macs / row["macs"]
                    for b in (1, 32):
                        row[f"ort_speedup_b{b}"] = timers[b].speedup(model)
                        row[f"speedup_over_macs_b{b}"] = row[f"ort_speedup_b{b}"] / row["macs_reduction"]
                rows.append(row)
                print(
                    f"{name} {level} round_to={round_to}: ORT b1 {row['ort_b1']['median_ms']:.3f} ms, "
                    f"b32 {row['ort_b32']['median_ms']:.2f} ms; "
                    f"eager b1 {row['eager_b1']['median_ms']:.3f} ms, "
                    f"b32 {row['eager_b32']['median_ms']:.2f} ms"
                    + (
                        f"; MACs {row['macs_reduction']:.2f}x -> ORT b32 {row['ort_speedup_b32']:.2f}x"
                        if level != "1x"
                        else ""
                    ),
                    flush=True,
                )
            unpruned = next(r for r in rows if r["model"] == name and r["level"] == "1x")
            best, best_b1 = {}, {}
            for r in rows:
                if r["model"] == name and r["level"] != "1x":
                    key = r["level"]
                    best[key] = max(best.get(key, 0.0), r["speedup_over_macs_b32"])
                    best_b1[key] = max(best_b1.get(key, 0.0), r["speedup_over_macs_b1"])
            aware = [r for r in rows if r["model"] == name and r["round_to"] == "latency"]
            summary[name] = {
                "latency_aware": {r["level"]: r["speedup_over_macs_b32"] for r in aware},
                "latency_aware_b1": {r["level"]: r["speedup_over_macs_b1"] for r in aware},
                "ort_vs_eager_b1": unpruned["eager_b1"]["median_ms"] / unpruned["ort_b1"]["median_ms"],
                "ort_vs_eager_b32": unpruned["eager_b32"]["median_ms"] / unpruned["ort_b32"]["median_ms"],
                "speedup_over_macs_b32": best,
                "speedup_over_macs_b1": best_b1,
                "speedup_over_macs_b32_by_round_to": {
                    str(r["round_to"]): {} for r in rows if r["model"] == name and r["level"] != "1x"
                },
            }
            for r in rows:
                if r["model"] == name and r["level"] != "1x":
                    summary[name]["speedup_over_macs_b32_by_round_to"][str(r["round_to"])][r["level"]] = r[
                        "speedup_over_macs_b32"
                    ]
    result = {
        "benchmark": "latency",
        "command": f"python tools/bench_latency.py --threads {a.threads} --provider {a.provider}",
        "environment": environment_info(),
        "setup": {
            **vars(a),
            "input": [1, 28, 28],
            "criterion": "l1",
            "weights": "random init (latency only)",
            "ort_session": "ORT_ENABLE_ALL, sequential, inter_op 1, intra_op = threads",
            "eager": "torch.inference_mode, eval, torch.set_num_threads(threads)",
        },
        "rows": rows,
        "summary": {
            **summary,
            "targets": {
                "ort_vs_eager_b1": ">= 3",
                "speedup_over_macs_b32": ">= 0.9",
                "speedup_over_macs_b1": ">= 0.8",
            },
        },
    }
    atomic_write_json(result, a.out)
    print({k: v for k, v in summary.items()})


if __name__ == "__main__":
    main()
