"""Compare variants of one criterion's options (and other criteria) one-shot, over bases and probe seeds.

Each entry is ``name=criterion[:key=value[;key=value...]]``, e.g.
``old=icnn-cluster:keep_categories=false`` or ``l2=l2``. Every entry prunes each base model to each
MACs level with compensation (probe: 20 batches of 64 un-augmented training images from the seed,
BatchNorm re-estimated on them) and is evaluated in PyTorch on the first ``--eval-size`` test
images: overall top-1 and the worst class's top-1. Mean and std over bases x seeds.

    Q=runs/bench_icnn_cost/quick
    .venv/bin/python tools/compare_criterion_options.py --model resnet_cifar20 \\
        --weights $Q/base_resnet_cifar20_s0.pt,$Q/base_resnet_cifar20_s1.pt \\
        --entries used=icnn-cluster,own=icnn-cluster:cluster_maps=own,l2=l2 --out runs/opts.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _common import command_line, load_fashion_model, log_to_stdout, parse_options, probe_batches
from bench_icnn_cost import VARIANTS, fine_tune
from diagnose_groups import per_class_top1
from torch.utils.data import DataLoader, Subset

import icnn_compress as ic
from icnn_compress.prune import Target, prune_model


def parse_entry(text: str) -> tuple[str, str, dict]:
    """``name=criterion:key=value;key=value`` -> ``(name, criterion, options)``."""
    name, _, spec = text.partition("=")
    criterion, _, opts = spec.partition(":")
    return name, criterion or name, parse_options(opts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet_cifar20")
    p.add_argument("--weights", required=True, help="comma-separated state dicts, one per base model")
    p.add_argument("--entries", default="icnn-cluster=icnn-cluster,l2=l2")
    p.add_argument("--levels", default="3,4")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--eval-size", type=int, default=5000)
    p.add_argument("--step-ratio", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--source",
        default=None,
        help="first fine-tune each base as this variant of bench_icnn_cost.py (e.g. top1+unmask-ce@e2), "
        "on --ft-images training images",
    )
    p.add_argument(
        "--refit",
        action="store_true",
        help="refit the classifier after pruning (prune_model's default; the sweeps published before "
        "it existed ran without)",
    )
    p.add_argument(
        "--icnn",
        action="store_true",
        help="the weights are of a model fine-tuned with the loss (bench_criteria.py's *_icnn.pt): "
        "attach the masks (switched off) before loading them",
    )
    p.add_argument("--round-to", type=int, default=0, help="widths multiples of this; 0: free widths")
    p.add_argument("--ft-images", type=int, default=5000)
    p.add_argument("--ft-lr", type=float, default=0.01)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    log_to_stdout()
    torch.set_num_threads(a.threads)
    _, test_dl = ic.data.loaders("fashion-mnist", batch_size=64, val_batch_size=500)
    plain_train = ic.data.loaders("fashion-mnist", batch_size=64, augment=False)[0].dataset
    eval_dl = DataLoader(Subset(test_dl.dataset, range(a.eval_size)), batch_size=500)
    entries = [parse_entry(e) for e in a.entries.split(",")]
    rows: dict = {}
    for b, weights in enumerate(a.weights.split(",")):
        model = load_fashion_model(a.model, weights, icnn=a.icnn)
        if a.source:
            train_ds = ic.data.loaders("fashion-mnist", batch_size=64)[0].dataset
            model = fine_tune(model, VARIANTS[a.source], train_ds, 10, a, 0)[0]
        for seed in range(a.seeds):
            probe = probe_batches(plain_train, seed)
            for level in a.levels.split(","):
                for name, criterion, options in entries:
                    t0 = time.perf_counter()
                    res = prune_model(
                        model,
                        torch.rand(1, 1, 28, 28),
                        criterion=criterion,
                        target=Target(macs_reduction=float(level)),
                        data=probe,
                        compensate=True,
                        step_ratio=a.step_ratio,
                        criterion_options={**options, "seed": seed} if criterion == "random" else options,
                        round_to=a.round_to or None,  # default: free widths
                        refit_classifier=a.refit,  # off by default: as the published sweeps ran
                        progress=False,
                    )
                    pc = per_class_top1(res.model, eval_dl, 10)
                    row = rows.setdefault(f"{level}x/{name}", {"top1": [], "worst": []})
                    row["top1"].append(sum(pc) / len(pc))
                    row["worst"].append(min(pc))
                    print(
                        f"base{b} seed{seed} {level}x {name}: {row['top1'][-1]:.4f} "
                        f"(worst class {row['worst'][-1]:.3f}) {time.perf_counter() - t0:.0f} s",
                        flush=True,
                    )
    summary = {
        key: {
            "top1_mean": statistics.fmean(r["top1"]),
            "top1_std": statistics.pstdev(r["top1"]),
            "worst_class_mean": statistics.fmean(r["worst"]),
        }
        for key, r in rows.items()
    }
    for key, s in summary.items():
        print(
            f"{key:32s} {s['top1_mean']:.4f} ± {s['top1_std']:.4f}  worst class {s['worst_class_mean']:.3f}"
        )
    result = {
        "benchmark": "criterion_options",
        "command": command_line("compare_criterion_options.py", a),
        "setup": {
            **vars(a),
            "eval": f"first {a.eval_size} test images, PyTorch CPU, mean of per-class top-1",
        },
        "rows": rows,
        "summary": summary,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
