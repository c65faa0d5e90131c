"""Fisher pruning with compensation, without ``keep_classes``: which channels' loss to score.

Every row prunes a Fashion-MNIST base model to the same MACs with ``prune_model(...,
compensate=True)`` (each removed channel rebuilt by least squares from the kept ones and folded
into its readers) and one of four rankings:

* ``l2``: the filters' L2 norm (the reference);
* ``fisher-plain``: Fisher on the channels themselves (``criterion_options={"residual": False}``);
* ``fisher-loo``: Fisher on each channel's least-squares residual on the other channels of its
  input, leave-one-out (``{"eliminate": False}``);
* ``fisher``: the default with compensation: the residuals re-fitted by backward elimination on
  the channels still kept.

One-shot: compensation, BatchNorm re-estimated and the classifier refit on the probe (20 batches of
64 training images, ``probe_batches`` seed ``1000 + seed``), no training; top-1 in PyTorch on the
first ``--eval-size`` test images. Over ``--bases`` independently trained quick bases
(tools/bench_fashion.py, ``--baseline-epochs`` / ``--train-size``, seeds 0..) x ``--seeds`` probe
draws: ``summary.<model>.<level>.<variant>`` = mean and std of top-1, the paired gains over ``l2``
and ``fisher-plain`` (mean, std over the cells) and the median pruning time (s, one thread).

    .venv/bin/python tools/bench_fisher.py --models resnet_cifar20 --out tools/results/fisher_resnet.json
    .venv/bin/python tools/bench_fisher.py --merge tools/results/fisher_resnet.json,... \
        --out tools/results/fisher.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _common import baseline_path, command_line, load_fashion_model, log_to_stdout, probe_batches, top1
from bench_summary import fisher_md
from torch.utils.data import DataLoader, Subset

import icnn_compress as ic
from icnn_compress.io import atomic_write_json, environment_info
from icnn_compress.prune import Target, prune_model

VARIANTS = {
    "l2": ("l2", None),
    "fisher-plain": ("fisher", {"residual": False}),
    "fisher-loo": ("fisher", {"eliminate": False}),
    "fisher": ("fisher", None),
}
REFERENCES = ("l2", "fisher-plain")  # paired gains are reported over these


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vgg_small,resnet_cifar20")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--levels", default="2,4", help="MACs reduction factors")
    p.add_argument("--bases", type=int, default=2, help="independently trained baselines (seeds 0..)")
    p.add_argument("--seeds", default="0,1", help="probe draws")
    p.add_argument("--baseline-epochs", type=int, default=4)
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--eval-size", type=int, default=5000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="tools/results/fisher.json")
    p.add_argument("--merge", default=None, help="comma-separated result files to merge into --out")
    a = p.parse_args()
    log_to_stdout()
    if a.merge:
        write(merge(a.merge.split(",")), Path(a.out))
        return
    for v in a.variants.split(","):
        if v not in VARIANTS:
            p.error(f"--variants: unknown variant {v!r} (allowed: {', '.join(VARIANTS)})")
    torch.set_num_threads(a.threads)
    train, test = (d.dataset for d in ic.data.loaders("fashion-mnist", batch_size=64, augment=False))
    test_dl = DataLoader(Subset(test, range(min(a.eval_size, len(test)))), batch_size=500)
    rows = []
    for model_name in a.models.split(","):
        for base in range(a.bases):
            weights = baseline_path(model_name, a.baseline_epochs, a.train_size, base)
            if not weights.exists():
                raise SystemExit(
                    f"no base model at {weights}: train it with python tools/bench_fashion.py --model "
                    f"{model_name} --epochs {a.baseline_epochs} --train-size {a.train_size} --seed {base}"
                )
            model = load_fashion_model(model_name, str(weights))
            unpruned = top1(model, test_dl)
            for seed in (int(s) for s in a.seeds.split(",")):
                probe = probe_batches(train, seed)
                for level in (float(v) for v in a.levels.split(",")):
                    for variant in a.variants.split(","):
                        criterion, options = VARIANTS[variant]
                        t0 = time.perf_counter()
                        result = prune_model(
                            model,
                            torch.rand(1, 1, 28, 28),
                            criterion=criterion,
                            target=Target(macs_reduction=level),
                            data=probe,
                            compensate=True,
                            criterion_options=options,
                            progress=False,
                        )
                        seconds = time.perf_counter() - t0
                        row = {
                            "model": model_name,
                            "base": base,
                            "seed": seed,
                            "level": level,
                            "variant": variant,
                            "unpruned": unpruned,
                            "oneshot": top1(result.model, test_dl),
                            "macs_reduction": result.macs_reduction,
                            "seconds": seconds,
                        }
                        rows.append(row)
                        print(
                            f"{model_name} base {base} seed {seed} {level:g}x {variant}: "
                            f"{row['oneshot']:.4f} ({row['macs_reduction']:.2f}x, {seconds:.0f} s)",
                            flush=True,
                        )
    result = {
        "benchmark": "fisher",
        "command": command_line("bench_fisher.py", a, skip=("merge",)),
        "environment": environment_info(),
        "setup": {k: v for k, v in vars(a).items() if k not in ("out", "merge")},
        "rows": rows,
    }
    write(result, Path(a.out))


def summarise(rows: list[dict]) -> dict:
    """``{model: {level: {variant: stats}}}``: top-1 mean/std, paired gains, median seconds."""
    cells: dict = {}
    for r in rows:
        cells.setdefault(r["model"], {}).setdefault(f"{r['level']:g}x", {}).setdefault(r["variant"], {})[
            (r["base"], r["seed"])
        ] = r
    summary: dict = {}
    for model, levels in cells.items():
        for level, variants in levels.items():
            for variant, by_cell in variants.items():
                acc = [r["oneshot"] for r in by_cell.values()]
                stats = {
                    "oneshot": round(statistics.mean(acc), 4),
                    "std": round(statistics.stdev(acc), 4) if len(acc) > 1 else 0.0,
                    "cells": len(acc),
                    "seconds_median": round(statistics.median(r["seconds"] for r in by_cell.values()), 1),
                }
                for ref in REFERENCES:
                    if ref == variant or ref not in variants:
                        continue
                    gains = [
                        100 * (r["oneshot"] - variants[ref][c]["oneshot"])
                        for c, r in by_cell.items()
                        if c in variants[ref]
                    ]
                    if gains:
                        stats[f"gain_over_{ref}_points"] = round(statistics.mean(gains), 2)
                        stats[f"gain_over_{ref}_std"] = (
                            round(statistics.stdev(gains), 2) if len(gains) > 1 else 0.0
                        )
                summary.setdefault(model, {}).setdefault(level, {})[variant] = stats
    return summary


def write(result: dict, out: Path) -> None:
    """Adds the summary to ``result`` and writes it to ``out`` (and README table 6's rows to
    ``out`` .md)."""
    result["summary"] = summarise(result["rows"])
    atomic_write_json(result, out)
    lines = fisher_md(result)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def merge(paths: list[str]) -> dict:
    """One result from several runs of this script (e.g. one per model) with the same settings
    otherwise."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    keys = ("levels", "bases", "seeds", "baseline_epochs", "train_size", "eval_size", "threads")
    for path, run in zip(paths[1:], runs[1:]):
        for k in keys:
            if run["setup"].get(k) != runs[0]["setup"].get(k):
                raise SystemExit(f"--merge: {path} has another {k} ({run['setup'].get(k)!r}) than {paths[0]}")
    models = ",".join(dict.fromkeys(m for run in runs for m in run["setup"]["models"].split(",")))
    return {
        "benchmark": "fisher",
        "command": "python tools/bench_fisher.py --merge " + ",".join(paths),
        "commands": [run["command"] for run in runs],
        "environment": runs[0].get("environment"),
        "setup": {**runs[0]["setup"], "models": models, "merged": list(paths)},
        "rows": [r for run in runs for r in run["rows"]],
    }


if __name__ == "__main__":
    main()
