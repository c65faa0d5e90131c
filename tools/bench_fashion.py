"""Train a small model on Fashion-MNIST on the CPU and record accuracy and wall time.

The trained weights are cached (``--cache``, default ``runs/baselines/<model>_fashion_e<epochs>.pt``)
for the pruning benchmarks, which then skip training. Writes tools/results/fashion_<model>.json
(``--out``: elsewhere, e.g. for a base that the published tables did not use).

    .venv/bin/python tools/bench_fashion.py --model vgg_small --epochs 6
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import baseline_path, exclusive, first_n_loader, log_to_stdout

import icnn_compress as ic
from icnn_compress.io import atomic_save, atomic_write_json, environment_info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vgg_small")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where to train: cpu, cuda (float32, no AMP)")
    p.add_argument("--cache", default=None)
    p.add_argument("--train-size", type=int, default=None, help="train on the first N images (quick runs)")
    p.add_argument("--force", action="store_true", help="train again even if the cached weights exist")
    p.add_argument(
        "--out",
        default=None,
        help="result JSON (default tools/results/fashion_<model>[_s<seed>].json; quick runs on a "
        "subset write none unless given)",
    )
    a = p.parse_args()
    log_to_stdout()
    torch.set_num_threads(a.threads)
    cache = Path(a.cache) if a.cache else baseline_path(a.model, a.epochs, a.train_size, a.seed)
    with exclusive(cache.with_suffix(".lock")):
        train(a, cache)


def train(a: argparse.Namespace, cache: Path) -> None:
    """Train the base model into ``cache`` (skipped when it exists, unless ``--force``) and write
    tools/results/fashion_<model>.json."""
    if cache.exists() and not a.force:
        print(f"{a.model}: cached weights in {cache} (--force trains again)")
        return
    train_dl, val_dl = ic.data.loaders("fashion-mnist", batch_size=a.batch, seed=a.seed, val_batch_size=512)
    if a.train_size:
        train_dl = first_n_loader(train_dl, a.train_size, a.batch, a.seed)
    model = ic.models.create(a.model, num_classes=10, in_channels=1)
    t0 = time.perf_counter()
    trainer = ic.Trainer(
        model,
        train_dl,
        val_dl,
        epochs=a.epochs,
        lr=a.lr,
        weight_decay=5e-4,
        schedule="cosine",
        seed=a.seed,
        out_dir=cache.parent / f"{cache.stem}_run",
        resume=True,
        device=a.device,
        amp=False,
    )
    trainer.fit()
    wall = time.perf_counter() - t0
    atomic_save(model.cpu().state_dict(), cache)
    result = {
        "benchmark": f"fashion_{a.model}",
        "command": f"python tools/bench_fashion.py --model {a.model} --epochs {a.epochs}"
        + (f" --train-size {a.train_size}" if a.train_size else "")
        + (f" --seed {a.seed}" if a.seed else ""),
        "environment": environment_info(),
        "setup": {
            "model": a.model,
            "epochs": a.epochs,
            "batch": a.batch,
            "lr": a.lr,
            "optimizer": "sgd",
            "schedule": "cosine",
            "augment": "random crop (pad 2) + horizontal flip",
            "seed": a.seed,
            "threads": a.threads,
            "device": a.device,
            "train_size": a.train_size or len(train_dl.dataset),
            "params": sum(p.numel() for p in model.parameters()),
        },
        "history": trainer.history,
        "summary": {"test_acc": trainer.history[-1]["val_acc"], "wall_seconds": wall, "epochs": a.epochs},
    }
    if a.out:
        atomic_write_json(result, Path(a.out))
    elif not a.train_size:  # quick runs on a subset do not replace the published result
        name = f"fashion_{a.model}" + (f"_s{a.seed}" if a.seed else "")
        atomic_write_json(result, Path(__file__).parent / "results" / f"{name}.json")
    print(f"{a.model}: test acc {result['summary']['test_acc']:.4f} after {a.epochs} epochs, {wall:.0f} s")


if __name__ == "__main__":
    main()
