"""How the classifier refit depends on its ridge: resnet_cifar20 fine-tuned with the loss (the
criteria benchmark's two bases), pruned one-shot with compensation to 3x / 4x fewer MACs (two probe
seeds, BatchNorm re-estimated, no refit), then the classifier refit with each ridge; top-1 in
PyTorch on the first 5000 Fashion-MNIST test images (mean of the per-class top-1).

    .venv/bin/python tools/sweep_refit_ridge.py   # ~15 min, 2 cores: tools/results/refit_ridge_resnet.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
from _common import command_line, load_fashion_model, probe_batches
from diagnose_groups import per_class_top1
from torch.utils.data import DataLoader, Subset

import icnn_compress as ic
from icnn_compress.io import atomic_write_json, environment_info
from icnn_compress.prune import Target, prune_model, refit_classifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--weights",
        default="runs/bench_criteria/resnet_cifar20_base0_icnn.pt,runs/bench_criteria/resnet_cifar20_base1_icnn.pt",
        help="comma-separated state dicts of the loss model (bench_criteria.py's *_icnn.pt)",
    )
    p.add_argument("--ridges", default="1e-5,1e-3,1e-1,1")
    p.add_argument("--levels", default="3,4")
    p.add_argument("--criteria", default="icnn-cluster,l2")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "refit_ridge_resnet.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    _, test_dl = ic.data.loaders("fashion-mnist", batch_size=64, val_batch_size=500)
    plain_train = ic.data.loaders("fashion-mnist", batch_size=64, augment=False)[0].dataset
    eval_dl = DataLoader(Subset(test_dl.dataset, range(5000)), batch_size=500)
    ridges = [float(r) for r in a.ridges.split(",")]
    rows: dict = {}
    for b, weights in enumerate(a.weights.split(",")):
        model = load_fashion_model("resnet_cifar20", weights, icnn=True)
        for seed in range(a.seeds):
            probe = probe_batches(plain_train, seed)
            for level in a.levels.split(","):
                for crit in a.criteria.split(","):
                    res = prune_model(
                        model,
                        torch.rand(1, 1, 28, 28),
                        criterion=crit,
                        target=Target(macs_reduction=float(level)),
                        data=probe,
                        compensate=True,
                        step_ratio=0.1,
                        round_to=8,
                        refit_classifier=False,
                        progress=False,
                    )
                    row = {}
                    for ridge in ridges:
                        refit = copy.deepcopy(res.model)
                        refit_classifier(refit, model, probe, ridge=ridge)
                        row[str(ridge)] = sum(per_class_top1(refit.eval(), eval_dl, 10)) / 10
                    rows[f"base{b}/seed{seed}/{level}x/{crit}"] = row
                    print(b, seed, level, crit, {k: round(v, 4) for k, v in row.items()}, flush=True)
    summary: dict = {}
    for key, row in rows.items():
        _, _, level, crit = key.split("/")
        for ridge, acc in row.items():
            summary.setdefault(level, {}).setdefault(crit, {}).setdefault(ridge, []).append(acc)
    for crits in summary.values():
        for by_ridge in crits.values():
            for ridge, accs in by_ridge.items():
                by_ridge[ridge] = {
                    "mean": statistics.fmean(accs),
                    "std": statistics.pstdev(accs),
                    "n": len(accs),
                }
    atomic_write_json(
        {
            "benchmark": "refit_ridge",
            "command": command_line("sweep_refit_ridge.py", a, skip=("out",)),
            "environment": environment_info(),
            "rows": rows,
            "summary": summary,
        },
        Path(a.out),
    )


if __name__ == "__main__":
    main()
