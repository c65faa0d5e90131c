"""The interpretable route end to end, over independently trained bases (issue 13).

For each base model of tools/bench_icnn_cost.py (same cache, same quick/full budget), fine-tune it
as each ``--sources`` variant says, then prune the fine-tuned model with each ``--criteria`` entry
(``criterion@variant``) to each level, with compensation, BatchNorm re-estimated on 20 probe
batches: that is the one-shot top-1. Then ``--recover-steps`` SGD steps (lr 0.01) without and
with distillation from the unpruned source model (weight 0.5, T=4): the recovered top-1. Top-1 in
PyTorch (eval mode) on the first ``--eval-size`` Fashion-MNIST test images.

Writes tools/results/route.json (``summary.<model>.<level>.<entry>``: one-shot and recovered
mean/std over bases) and route.md. Rows are cached in the cost benchmark's cache.

    .venv/bin/python tools/bench_route.py --quick --models vgg_small
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _common import command_line, log_to_stdout
from bench_icnn_cost import (
    VARIANTS,
    apply_budget,
    fine_tune,
    load_rows,
    save_rows,
    subset_loader,
    top1,
    train_base,
)
from torch.utils.data import DataLoader, RandomSampler, Subset

import icnn_compress as ic
from icnn_compress.io import atomic_write_json, environment_info
from icnn_compress.prune import Target, prune_model, reestimate_batchnorm

LEVELS = {"2x": 2.0, "3x": 3.0, "4x": 4.0}


def run_model(model_name: str, a, rows: dict, cache: Path, rows_path: Path) -> None:
    train_ds = ic.data.FashionMNIST("train", transform=ic.data.fashion_transforms(True))
    plain_ds = ic.data.FashionMNIST("train", transform=ic.data.fashion_transforms(False))
    test_ds = ic.data.FashionMNIST("test", transform=ic.data.fashion_transforms(False))
    eval_dl = DataLoader(Subset(test_ds, range(a.eval_size)), batch_size=500)
    entries = a.criteria.split(",")
    for b in range(a.bases):
        base = train_base(model_name, train_ds, 1, 10, a, b, cache / f"base_{model_name}_s{b}.pt")
        sources: dict[str, torch.nn.Module] = {}
        for entry in entries:
            criterion, source = entry.split("@", 1)
            if source not in sources:
                sources[source] = fine_tune(base, VARIANTS[source], train_ds, 10, a, 0)[0]
            for level in a.levels.split(","):
                key = f"{model_name}/route/base{b}/{level}/{entry}"
                if key in rows:
                    continue
                t0 = time.perf_counter()
                g = torch.Generator().manual_seed(1000 + b)
                probe = DataLoader(
                    plain_ds, batch_size=64, sampler=RandomSampler(plain_ds, num_samples=64 * 20, generator=g)
                )
                res = prune_model(
                    sources[source],
                    torch.rand(1, 1, 28, 28),
                    criterion=criterion,
                    target=Target(macs_reduction=LEVELS[level]),
                    data=probe,
                    compensate=True,
                    bn_batches=0,
                    probe_batches=8,
                    step_ratio=0.1,
                    round_to=None,  # free widths, as when the published numbers were measured
                    refit_classifier=False,  # as the published numbers were measured
                    progress=False,
                )
                reestimate_batchnorm(res.model, probe, max_batches=20)
                row = {"oneshot": top1(res.model, eval_dl), "macs_reduction": res.macs_reduction}
                state = {k: v.clone() for k, v in res.model.state_dict().items()}
                for kd in (False, True):
                    res.model.load_state_dict(state)
                    teacher = ic.frozen_copy(sources[source]) if kd else None
                    ic.Trainer(
                        res.model.train(),
                        subset_loader(train_ds, 64 * a.recover_steps, 2000 + b),
                        epochs=1,
                        lr=0.01,
                        seed=b,
                        distill=ic.Distillation(teacher) if kd else None,
                        progress=False,
                    ).fit()
                    row["recovered_kd" if kd else "recovered"] = top1(res.model, eval_dl)
                row["seconds"] = time.perf_counter() - t0
                rows[key] = row
                save_rows(rows_path, rows)
                print(
                    f"{key}: one-shot {row['oneshot']:.4f} recovered {row['recovered']:.4f} "
                    f"(kd {row['recovered_kd']:.4f}) [{row['macs_reduction']:.2f}x, {row['seconds']:.0f} s]",
                    flush=True,
                )


def summarise(rows: dict, a) -> dict:
    summary: dict = {}
    for model_name in a.models.split(","):
        for level in a.levels.split(","):
            for entry in a.criteria.split(","):
                found = [rows.get(f"{model_name}/route/base{b}/{level}/{entry}") for b in range(a.bases)]
                found = [r for r in found if r]
                if not found:
                    continue
                out = {"n": len(found)}
                for m in ("oneshot", "recovered", "recovered_kd"):
                    vals = [r[m] for r in found]
                    out[f"{m}_mean"] = statistics.fmean(vals)
                    out[f"{m}_std"] = statistics.pstdev(vals)
                summary.setdefault(model_name, {}).setdefault(level, {})[entry] = out
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vgg_small,resnet_cifar20")
    p.add_argument(
        "--criteria",
        default="icnn-cluster@top1@e1,icnn-cluster@plain@e1,l2@plain@e1,icnn-cluster@top1+unmask-ce@e2,"
        "icnn-cluster@plain@e2",
        help="criterion@variant entries (variants of bench_icnn_cost.py; top1@e1: attach_icnn defaults)",
    )
    p.add_argument("--levels", default="2x,3x,4x")
    p.add_argument("--bases", type=int, default=2)
    p.add_argument("--base-epochs", type=int, default=6)
    p.add_argument("--base-images", type=int, default=60000)
    p.add_argument("--ft-images", type=int, default=60000)
    p.add_argument("--ft-lr", type=float, default=0.01)
    p.add_argument("--recover-steps", type=int, default=150)
    p.add_argument("--eval-size", type=int, default=10000)
    p.add_argument("--quick", action="store_true", help="the quick budget of bench_icnn_cost.py")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=str(Path(__file__).resolve().parents[1] / "runs" / "bench_icnn_cost"))
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    p.add_argument("--write-only", action="store_true")
    a = p.parse_args()
    log_to_stdout()
    cache = apply_budget(a)
    cache.mkdir(parents=True, exist_ok=True)
    rows: dict = {}
    for path in sorted(cache.glob("route_*.json")):
        rows.update(load_rows(path))
    if not a.write_only:
        for model_name in a.models.split(","):
            rows_path = cache / f"route_{model_name}.json"
            own = {k: v for k, v in rows.items() if k.startswith(f"{model_name}/")}
            run_model(model_name, a, own, cache, rows_path)
            rows.update(own)
    if not rows:
        raise SystemExit(f"no results in {cache}: nothing written (run without --write-only first)")
    summary = summarise(rows, a)
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    skip = ("cache", "out_dir", "write_only")
    atomic_write_json(
        {
            "benchmark": "route",
            "command": command_line("bench_route.py", a, skip=skip),
            "environment": environment_info(),
            "setup": {k: v for k, v in vars(a).items() if k not in skip},
            "rows": rows,
            "summary": summary,
        },
        out_dir / "route.json",
    )
    md = []
    for model_name, levels in summary.items():
        md += [
            f"**{model_name}**",
            "",
            "| level | criterion@fine-tune | one-shot | recovered | recovered (KD) |",
        ]
        md.append("|---|---|---|---|---|")
        for level, entries in levels.items():
            for entry, e in entries.items():
                md.append(
                    f"| {level} | {entry} | {e['oneshot_mean']:.4f} ± {e['oneshot_std']:.4f} | "
                    f"{e['recovered_mean']:.4f} ± {e['recovered_std']:.4f} | "
                    f"{e['recovered_kd_mean']:.4f} ± {e['recovered_kd_std']:.4f} |"
                )
        md.append("")
    (out_dir / "route.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
