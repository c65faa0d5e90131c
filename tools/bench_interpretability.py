"""Interpretability with and without the loss, on synthetic parts (docs/method.md sections 7, 8).

The same vgg_small (same seed, data, schedule) is trained twice, once plain and once with masks +
the filter loss on its top ``--layers`` conv layers: from scratch (``--protocol scratch``), or
fine-tuned from one plain model trained from scratch (``--protocol finetune``, the route of a user
who starts from trained weights; the plain fine-tune of the same epochs is the reference). On those
layers of both models we measure location instability (lower is better), part interpretability
(higher is better), the ARI of the filter clusters against ground-truth parts, and top-1 on
``--test-size`` test images; the accuracy drop is paired (same images) with its standard error.
Writes tools/results/<name>.json (summary.location_instability_ratio,
summary.part_interpretability_ratio, summary.accuracy_drop_points, summary.ari, ...) and a
Markdown table.

    .venv/bin/python tools/bench_interpretability.py [--epochs 4] [--image-size 48] [--name NAME]
"""

from __future__ import annotations

import argparse
import copy
import json
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


LOSS_KEYS = ("weight", "warmup", "categories")  # what shapes a phase trained with the loss


def _fit(
    model,
    a,
    loaders: tuple,
    out: Path,
    phase: str,
    *,
    epochs: int,
    lr: float,
    seed: int,
    handle=None,
    shaping=(),
):
    """``epochs`` epochs at ``lr`` (cosine), with the filter loss when ``handle`` is given. Each
    phase has its own folder under ``out`` and a run key of every setting that shapes it (the
    common ones and the arguments named in ``shaping``), so a later run with other settings trains
    again while one with the same settings resumes (or reuses the finished phase: e.g. the plain
    model shared by two fine-tune variants)."""
    keys = ("difficulty", "seed", "image_size", "classes", "train_size", "epochs", "lr", "layers", *shaping)
    run_key = json.dumps({"phase": phase, "phase_epochs": epochs, **{k: getattr(a, k) for k in keys}})
    trainer = ic.Trainer(
        model,
        *loaders,
        epochs=epochs,
        lr=lr,
        seed=seed,
        extra_loss=handle.loss if handle else None,
        out_dir=out / phase,
        resume=True,
        run_key=run_key,
    )
    trainer.fit()
    return trainer


def train(with_loss: bool, a, train_dl, val_dl, out: Path, start: torch.nn.Module | None = None):
    """One model of the comparison and the seconds it took.

    ``--protocol scratch``: ``a.epochs`` from scratch, with the loss (masks on, then off for the last
    ``a.unmask_epochs``) or without. ``--protocol finetune``: ``start`` (the plain model trained
    from scratch) fine-tuned ``a.finetune_epochs`` more at ``a.finetune_lr``, with the loss or
    without; the plain fine-tune is the reference, so both models train the same epochs."""
    torch.manual_seed(a.seed)
    if start is None:
        model = ic.models.create("vgg_small", num_classes=a.classes, in_channels=3)
        epochs, lr, tag = a.epochs, a.lr, ""
    else:
        model = copy.deepcopy(start)
        epochs, lr, tag = a.finetune_epochs, a.finetune_lr, f"ft{a.finetune_epochs}_"
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
    masked = epochs - unmask
    phase = tag + (f"icnn_m{masked}" if with_loss else f"plain_e{epochs}")
    shaping = (("finetune_lr",) if start is not None else ()) + (LOSS_KEYS if with_loss else ())
    kw = dict(lr=lr, shaping=shaping)
    _fit(model, a, (train_dl, val_dl), out, phase, epochs=masked, seed=a.seed, handle=handle, **kw)
    if unmask:
        handle.set_masks(False)
        _fit(model, a, (train_dl, val_dl), out, f"{phase}_u{unmask}", epochs=unmask, seed=a.seed + 1, **kw)
    if handle is not None:
        handle.freeze()
    return model, handle, convs, time.perf_counter() - t0


@torch.no_grad()
def correct_per_image(model: torch.nn.Module, loader: DataLoader) -> torch.Tensor:
    """1.0 where ``model`` (eval mode) classifies the image right, else 0.0; shape ``(N,)``."""
    model.eval()
    return torch.cat([(model(x).argmax(1) == y).double() for x, y, *_ in loader])


def paired_drop(plain: torch.Tensor, icnn: torch.Tensor) -> tuple[float, float]:
    """Accuracy drop in points (plain minus icnn) on the same images, and its standard error."""
    d = 100.0 * (plain - icnn)
    return float(d.mean()), float(d.std(unbiased=True) / len(d) ** 0.5)


MERGED = (
    "location_instability_ratio",
    "part_interpretability_ratio",
    "accuracy_drop_points",
    "ari",
    "ari_plain",
    "plain_accuracy",
    "icnn_accuracy",
)


def merge_seeds(results_dir: Path, name: str, seeds: list[int]) -> dict:
    """``<name>.json`` from the runs ``<name>_s<seed>.json``: every summary key as the mean over
    the seeds, with ``<key>_std`` (sample standard deviation) and ``per_seed`` beside it."""
    runs = [json.loads((results_dir / f"{name}_s{seed}.json").read_text()) for seed in seeds]
    per_seed = {str(seed): r["summary"] for seed, r in zip(seeds, runs)}
    summary: dict = {}
    for key in MERGED:
        values = torch.tensor([r["summary"][key] for r in runs], dtype=torch.float64)
        summary[key] = float(values.mean())
        summary[f"{key}_std"] = float(values.std()) if len(values) > 1 else 0.0
    first = runs[0]
    summary["targets"] = {**first["summary"]["targets"], "ari": ">= 0.7", "plain_accuracy": "0.85-0.95"}
    summary["paper_ratios"] = PAPER
    summary["per_seed"] = per_seed
    merged = {
        "benchmark": "interpretability",
        "command": first["command"].replace(f"--seed {seeds[0]}", "--seed S"),
        "merged_from": [f"{name}_s{seed}.json" for seed in seeds],
        "environment": first["environment"],
        "setup": {k: v for k, v in first["setup"].items() if k != "seed"},
        "seeds": seeds,
        "summary": summary,
    }
    atomic_write_json(merged, results_dir / f"{name}.json")
    return merged


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
    p.add_argument(
        "--protocol",
        default="scratch",
        choices=["scratch", "finetune"],
        help="scratch: both models trained --epochs from scratch; finetune: a plain model trained "
        "--epochs, then fine-tuned --finetune-epochs more with the loss and without (the reference)",
    )
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--test-size", type=int, default=6000, help="test images the accuracies are measured on")
    p.add_argument("--name", default="interpretability", help="results file stem under --results-dir")
    p.add_argument("--difficulty", default="easy", choices=["easy", "hard"], help="the synthetic setting")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--out",
        default=None,
        help="training phases, shared by the runs of one seed (runs/bench_interpretability/DIFFICULTY_sSEED)",
    )
    p.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
    p.add_argument(
        "--merge",
        default=None,
        metavar="SEEDS",
        help="train nothing: merge the runs NAME_s<seed>.json of these comma-separated seeds into NAME.json",
    )
    a = p.parse_args()
    if a.merge:
        merged = merge_seeds(Path(a.results_dir), a.name, [int(x) for x in a.merge.split(",")])
        print(json.dumps({k: round(v, 4) for k, v in merged["summary"].items() if isinstance(v, float)}))
        return
    log_to_stdout()
    torch.set_num_threads(a.threads)
    out = Path(a.out or f"runs/bench_interpretability/{a.difficulty}_s{a.seed}")
    figures = out / a.name
    budget = a.finetune_epochs if a.protocol == "finetune" else a.epochs
    if not 0 <= a.unmask_epochs < budget:
        p.error(f"--unmask-epochs must be in [0, {budget - 1}] (the masked epochs come first)")
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
    test_dl = DataLoader(ic.data.SyntheticParts("test", a.test_size, **kw), batch_size=256)
    start = base_acc = None
    if a.protocol == "finetune":  # the plain model from scratch: where both fine-tunes start
        start, *_ = train(False, a, train_dl, val_dl, out)
        base_acc = float(correct_per_image(start, test_dl).mean())
        print(f"plain base ({a.epochs} epochs from scratch): test acc {base_acc:.4f}")
    rows, record, correct = {}, {}, {}
    for with_loss in (False, True):
        name = "icnn" if with_loss else "plain"
        model, handle, convs, secs = train(with_loss, a, train_dl, val_dl, out, start)
        correct[name] = correct_per_image(model, test_dl)
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
                plot_filter_gallery(model, probe, sig, cl, figures / f"gallery_{name}.png")
        mean = {
            k: sum(r[k] for r in layer_rows.values()) / len(layer_rows)
            for k in ("location_instability", "part_interpretability", "ari")
        }
        rows[name] = {
            "test_acc": float(correct[name].mean()),
            "train_seconds": secs,
            "layers": layer_rows,
            **mean,
        }
        print(
            name,
            {k: round(v, 4) if isinstance(v, float) else v for k, v in rows[name].items() if k != "layers"},
        )
    plot_instability_histogram(record["per_filter_instability"], figures / "instability_hist.png")
    plain, icnn = rows["plain"], rows["icnn"]
    drop, drop_se = paired_drop(correct["plain"], correct["icnn"])
    summary = {
        "location_instability_ratio": icnn["location_instability"] / plain["location_instability"],
        "part_interpretability_ratio": icnn["part_interpretability"]
        / max(plain["part_interpretability"], 1e-9),
        "accuracy_drop_points": drop,
        "accuracy_drop_se_points": drop_se,
        "ari": icnn["ari"],
        "ari_plain": plain["ari"],
        "plain_accuracy": plain["test_acc"],
        "icnn_accuracy": icnn["test_acc"],
        "test_images": a.test_size,
        "protocol": a.protocol,
        "base_accuracy": base_acc,  # finetune: the plain model both fine-tunes start from
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
    atomic_write_json(result, results_dir / f"{a.name}.json")
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
    (results_dir / f"{a.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
