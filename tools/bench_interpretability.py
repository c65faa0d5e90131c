"""Interpretability with and without the loss, on synthetic parts (docs/method.md sections 7, 8).

The same vgg_small (same seed, data, schedule) is trained from scratch twice, once plain and once
with masks + the filter loss on its top two conv layers. On those layers of both models we measure
location instability (lower is better), part interpretability (higher is better), the ARI of the
filter clusters against ground-truth parts, and test accuracy. Writes
tools/results/interpretability.json (summary.location_instability_ratio,
summary.part_interpretability_ratio, summary.accuracy_drop_points, summary.ari) and a Markdown table.

    .venv/bin/python tools/bench_interpretability.py [--epochs 4] [--image-size 48]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import command_line, log_to_stdout
from torch.utils.data import DataLoader

import icnn_compress as ic
from icnn_compress.analysis import (
    cluster_filters,
    filter_signatures,
    location_instability,
    part_interpretability,
    plot_filter_gallery,
    plot_instability_histogram,
)
from icnn_compress.io import atomic_write_json, environment_info

PAPER = {
    "location_instability_ratio": [0.076 / 0.137, 0.085 / 0.144, 0.096 / 0.139],
    "part_interpretability_ratio": [0.770 / 0.495, 0.654 / 0.348, 0.708 / 0.357],
}


def train(with_loss: bool, a, train_dl, val_dl, out: Path):
    torch.manual_seed(a.seed)
    model = ic.models.create("vgg_small", num_classes=a.classes, in_channels=3)
    convs = ic.icnn.top_layers(model, a.layers)
    handle = None
    if with_loss:
        handle = ic.attach_icnn(
            model,
            convs,
            num_classes=a.classes,
            weight=a.weight,
            warmup_steps=a.warmup,
            categories=a.categories,
        )
    t0 = time.perf_counter()
    unmask = a.unmask_epochs if with_loss else 0  # the last epochs without masks or loss
    trainer = ic.Trainer(
        model,
        train_dl,
        val_dl,
        epochs=a.epochs - unmask,
        lr=a.lr,
        seed=a.seed,
        extra_loss=handle.loss if handle else None,
        out_dir=out / ("icnn" if with_loss else "plain"),
        resume=True,
    )
    trainer.fit()
    if unmask:
        handle.set_masks(False)
        trainer = ic.Trainer(
            model, train_dl, val_dl, epochs=unmask, lr=a.lr, seed=a.seed + 1, out_dir=out / "icnn_unmasked"
        )
        trainer.fit()
    if handle is not None:
        handle.freeze()
    return model, handle, convs, trainer.history[-1]["val_acc"], time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--train-size", type=int, default=6000)
    p.add_argument("--probe-size", type=int, default=1200)
    p.add_argument("--weight", type=float, default=0.5)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--categories", default="multi")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=2, help="the loss on the top N conv layers (recipes: 1)")
    p.add_argument(
        "--unmask-epochs", type=int, default=0, help="the last N epochs without masks or loss (recipes: half)"
    )
    p.add_argument("--difficulty", default="easy", choices=["easy", "hard"], help="the synthetic setting")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/bench_interpretability")
    p.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
    a = p.parse_args()
    log_to_stdout()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    kw = dict(num_classes=a.classes, image_size=a.image_size, seed=a.seed, difficulty=a.difficulty)
    train_dl, val_dl = ic.data.loaders(
        "synthetic-parts",
        batch_size=64,
        train_size=a.train_size,
        val_size=a.probe_size,
        seed=a.seed,
        **{k: kw[k] for k in ("num_classes", "image_size", "difficulty")},
    )
    probe = ic.data.SyntheticParts("test", a.probe_size, annotations=True, **kw)
    probe_dl = DataLoader(probe, batch_size=128)
    rows, record = {}, {}
    for with_loss in (False, True):
        name = "icnn" if with_loss else "plain"
        model, handle, convs, acc, secs = train(with_loss, a, train_dl, val_dl, out)
        sigs = filter_signatures(model, probe_dl, convs, num_classes=a.classes, handle=handle)
        layer_rows = {}
        for layer in convs:
            sig = sigs[layer]
            li = location_instability(sig)
            pi = part_interpretability(model, probe_dl, layer)
            cl = cluster_filters(sig)
            layer_rows[layer] = {
                "location_instability": li["score"],
                "part_interpretability": pi["score"],
                "ari": cl.ari,
                "clusters": cl.num_clusters,
                "alive_filters": int((sig.alive >= 0.01).sum()),
                "filters": sig.num_filters,
            }
            record.setdefault("per_filter_instability", {})[f"{name}:{layer}"] = li["per_filter"]
            if layer == convs[-1]:
                plot_filter_gallery(model, probe, sig, cl, out / f"gallery_{name}.png")
        mean = {
            k: sum(r[k] for r in layer_rows.values()) / len(layer_rows)
            for k in ("location_instability", "part_interpretability", "ari")
        }
        rows[name] = {"test_acc": acc, "train_seconds": secs, "layers": layer_rows, **mean}
        print(
            name,
            {k: round(v, 4) if isinstance(v, float) else v for k, v in rows[name].items() if k != "layers"},
        )
    plot_instability_histogram(record["per_filter_instability"], out / "instability_hist.png")
    plain, icnn = rows["plain"], rows["icnn"]
    summary = {
        "location_instability_ratio": icnn["location_instability"] / plain["location_instability"],
        "part_interpretability_ratio": icnn["part_interpretability"]
        / max(plain["part_interpretability"], 1e-9),
        "accuracy_drop_points": 100 * (plain["test_acc"] - icnn["test_acc"]),
        "ari": icnn["ari"],
        "ari_plain": plain["ari"],
        "plain_accuracy": plain["test_acc"],
        "icnn_accuracy": icnn["test_acc"],
        "targets": {
            "location_instability_ratio": "<= 0.6",
            "part_interpretability_ratio": ">= 1.5",
            "accuracy_drop_points": "<= 1",
        },
        "paper_ratios": PAPER,
    }
    result = {
        "benchmark": "interpretability",
        "command": command_line("bench_interpretability.py", a, skip=("out", "results_dir")),
        "environment": environment_info(),
        "setup": {**vars(a), "model": "vgg_small", "icnn_layers": convs, "dataset": "synthetic-parts"},
        "seeds": [a.seed],
        "results": rows,
        "summary": summary,
    }
    results_dir = Path(a.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(result, results_dir / "interpretability.json")
    md = [
        "| model | test acc | location instability | part interpretability | ARI (clusters vs parts) |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        md.append(
            f"| {name} | {r['test_acc']:.4f} | {r['location_instability']:.4f} | "
            f"{r['part_interpretability']:.4f} | {r['ari']:.3f} |"
        )
    md.append(
        f"| ratio / drop | {summary['accuracy_drop_points']:+.2f} pt | "
        f"{summary['location_instability_ratio']:.3f} | {summary['part_interpretability_ratio']:.3f} | |"
    )
    (results_dir / "interpretability.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
