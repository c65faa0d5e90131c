"""Latency-aware widths against multiples of 8, on trained models: accuracy, latency, landing.

For each model (the Fashion-MNIST baselines of tools/bench_fashion.py, seed 0, or ``--weights``)
and MACs level, the model is pruned with ``l2`` + compensation twice: uniform widths in multiples of 8
(``round_to=8``, the default) and latency-aware widths (``allocation="latency"``, planned on this
machine for ONNX Runtime at batch 32 and ``--threads``). Each pruned model gets its BatchNorm
re-estimated on 20 probe batches (one-shot), is exported and timed in ONNX Runtime at batch 1 and 32
(speedups: the unpruned model timed again beside each pruned one, the median ratio of five
alternating rounds of ``--repeats`` calls after 10), scored on the first
``--eval-size`` test images, then recovered (``--recover-steps`` SGD steps at lr 0.01, distilled
from the unpruned model) and scored again. Then ``Target(latency_speedup=...)`` at each of
``--speedups`` is pruned with latency-aware widths and its measured speedup compared with the target.

Writes tools/results/latency_aware.json: ``summary.<model>.<level>.<rule>`` = {macs_reduction,
speedup_b32, speedup_b1, speedup_over_macs_b32, speedup_over_macs_b1, oneshot, recovered} and
``summary.<model>.latency_targets.<speedup>`` = {measured, error}.

    .venv/bin/python tools/bench_latency_aware.py [--threads 2]   # ~15 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from _common import baseline_path, conv_widths, fashion_width_data, log_to_stdout

import icnn_compress as ic
from icnn_compress.export import export_onnx
from icnn_compress.io import atomic_write_json, environment_info
from icnn_compress.measure import SpeedupTimer, ort_accuracy, ort_latency
from icnn_compress.prune import Target, prune_model, reestimate_batchnorm

RULES = {"round_to=8": dict(round_to=8), "latency-aware": dict(allocation="latency")}


def evaluate(model: torch.nn.Module, tmp: Path, name: str, eval_dl, a, *, latency: bool = False) -> dict:
    """Top-1 of ``model`` exported to ``tmp`` (ONNX Runtime) and, with ``latency``, its latency at
    batch 1 and 32 (the pruned models' speedups come from ``SpeedupTimer`` instead)."""
    path = tmp / f"{name}.onnx"
    export_onnx(model.eval(), path, torch.rand(1, 1, 28, 28))
    out = {"top1": ort_accuracy(path, eval_dl, threads=a.threads)}
    for b in (1, 32) if latency else ():
        out[f"ms_b{b}"] = ort_latency(path, b, threads=a.threads, warmup=10, repeats=a.repeats).median_ms
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vgg_small,resnet_cifar20")
    p.add_argument("--levels", default="2,3,4")
    p.add_argument("--speedups", default="1.5,2,2.5")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--eval-size", type=int, default=5000)
    p.add_argument("--recover-steps", type=int, default=150)
    p.add_argument(
        "--weights",
        default=None,
        help="trained weights, '{model}' standing for the model's name "
        "(default: the tools/bench_fashion.py baselines, runs/baselines/<model>_fashion_e6.pt)",
    )
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "latency_aware.json"))
    p.add_argument("--render", action="store_true", help="only write the .md table from an existing --out")
    a = p.parse_args()
    log_to_stdout()
    if a.render:
        render(json.loads(Path(a.out).read_text()), Path(a.out).with_suffix(".md"))
        return
    torch.set_num_threads(a.threads)
    train_dl, eval_dl, probe = fashion_width_data(a.eval_size)
    example = torch.rand(1, 1, 28, 28)
    rows, summary = [], {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name in a.models.split(","):
            weights = Path(a.weights.format(model=name)) if a.weights else baseline_path(name, 6)
            if not weights.is_file():
                raise SystemExit(f"{weights} is missing: python tools/bench_fashion.py --model {name}")
            base = ic.models.create(name, num_classes=10, in_channels=1, weights=str(weights)).eval()
            ref = evaluate(base, tmp, f"{name}_base", eval_dl, a, latency=True)
            # speedups: the unpruned model timed again beside each pruned one, median of alternating rounds
            timers = {
                b: SpeedupTimer(
                    base, example, batch=b, threads=a.threads, warmup=10, repeats=a.repeats, stop_spread=None
                )
                for b in (1, 32)
            }
            out = summary.setdefault(name, {"unpruned": ref})
            print(name, "unpruned", ref, flush=True)
            for level in a.levels.split(","):
                for rule in RULES:
                    t0 = time.perf_counter()
                    res = prune_rule(base, example, float(level), rule, probe, a.threads)
                    prune_s = time.perf_counter() - t0
                    one = evaluate(res.model, tmp, f"{name}_{level}_{rule}", eval_dl, a)
                    speedups = {b: timers[b].speedup(res.model) for b in (1, 32)}
                    _recover(res.model, base, train_dl, a.recover_steps)
                    rec = evaluate(res.model, tmp, f"{name}_{level}_{rule}_rec", eval_dl, a)
                    row = {
                        "model": name,
                        "level": f"{level}x",
                        "rule": rule,
                        "macs_reduction": res.macs_reduction,
                        "widths": conv_widths(res.model),
                        "speedup_b32": speedups[32],
                        "speedup_b1": speedups[1],
                        "oneshot": one["top1"],
                        "recovered": rec["top1"],
                        "prune_s": prune_s,
                    }
                    row["speedup_over_macs_b32"] = row["speedup_b32"] / row["macs_reduction"]
                    row["speedup_over_macs_b1"] = row["speedup_b1"] / row["macs_reduction"]
                    rows.append(row)
                    out.setdefault(f"{level}x", {})[rule] = {
                        k: v for k, v in row.items() if k not in ("model", "level", "rule", "widths")
                    }
                    print({k: v for k, v in row.items() if k != "widths"}, flush=True)
            for s in a.speedups.split(","):
                res = prune_model(
                    base,
                    example,
                    criterion="l2",
                    target=Target(latency_speedup=float(s), latency_threads=a.threads),
                    allocation="latency",
                    refit_classifier=False,  # as the published numbers were measured
                    progress=False,
                )
                measured = timers[32].speedup(res.model.eval())
                out.setdefault("latency_targets", {})[s] = {
                    "measured": measured,
                    "at_prune_time": res.latency_speedup,
                    "error": measured / float(s) - 1,
                    "macs_reduction": res.macs_reduction,
                }
                print(name, "latency target", s, out["latency_targets"][s], flush=True)
    result = {
        "benchmark": "latency_aware",
        "command": f"python tools/bench_latency_aware.py --threads {a.threads}"
        + (f" --weights {a.weights}" if a.weights else ""),
        "environment": environment_info(),
        "setup": {
            **vars(a),
            "criterion": "l2 + compensation",
            "weights": a.weights or "runs/baselines/<model>_fashion_e6.pt",
        },
        "rows": rows,
        "summary": {
            **summary,
            "targets": {
                "speedup_over_macs_b32": ">= 0.9",
                "speedup_over_macs_b1": ">= 0.8",
                "accuracy": "latency-aware >= round_to=8 - 0.2 point (one-shot and recovered)",
                "latency_targets": "within 5%",
            },
        },
    }
    atomic_write_json(result, a.out)
    render(result, Path(a.out).with_suffix(".md"))


def render(result: dict, path: Path) -> None:
    """The README's table 2c (markdown, as tools/bench_summary.py writes it) from a result."""
    from bench_summary import latency_aware_md

    path.write_text("\n".join(latency_aware_md(result)) + "\n")


def prune_rule(base: torch.nn.Module, example, level: float, rule: str, probe: list, threads: int):
    """``base`` pruned as table 2c prunes it: ``l2`` + compensation to ``level`` times fewer MACs
    with the width rule ``rule`` (a key of RULES; latency plans for ``threads`` ORT threads), then
    BatchNorm re-estimated on the probe batches (the one-shot model). Returns the PruneResult."""
    res = prune_model(
        base,
        example,
        criterion="l2",
        target=Target(macs_reduction=level, latency_threads=threads),
        data=probe,
        compensate=True,
        bn_batches=0,
        refit_classifier=False,  # as the published numbers were measured
        progress=False,
        **RULES[rule],
    )
    reestimate_batchnorm(res.model, probe, max_batches=20)
    return res


def _recover(model: torch.nn.Module, source: torch.nn.Module, train_dl, steps: int) -> None:
    """``steps`` SGD steps at lr 0.01 distilled from ``source`` (the benchmark's recovery)."""
    from _common import first_n_loader

    dl = first_n_loader(train_dl, steps * train_dl.batch_size, train_dl.batch_size, 0)
    ic.Trainer(
        model.train(),
        dl,
        epochs=1,
        lr=0.01,
        seed=0,
        progress=False,
        distill=ic.Distillation(ic.frozen_copy(source)),
    ).fit()
    model.eval()


if __name__ == "__main__":
    main()
