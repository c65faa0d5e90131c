"""Time of a `Trainer` epoch with the passes channels-last (the CPU default) against the default
memory format, through the public API, as a user's fine-tune runs it.

For each model and stage: the same random images (``--steps`` batches of ``--batch``), the same
seed, one `Trainer.fit` of one epoch, as the fine-tune trains (``finetune``: the filter loss and
masks on the top layer) and as recovery does (``recover``: distilled from a frozen teacher, no
filter loss), alternating the two formats ``--repeats`` times after one warm-up fit of each;
medians compared. Writes tools/results/channels_last.json (``summary.<model>.<stage>.ratio``:
channels-last time / default-format time, below 1 is faster; ``max_weight_diff``: the largest
difference of the trained weights between the two formats).

    .venv/bin/python tools/bench_channels_last.py [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _common import command_line
from torch.utils.data import DataLoader, TensorDataset

import icnn_compress as ic
from icnn_compress.io import atomic_write_json, environment_info

MODELS = {"vgg_small": (3, 32), "resnet_cifar20": (1, 28)}  # (input channels, side in pixels)


def one_fit(name: str, data: DataLoader, channels_last: bool, stage: str) -> tuple[float, dict]:
    """Seconds of one epoch's ``fit`` and the trained weights."""
    in_channels = data.dataset.tensors[0].shape[1]
    torch.manual_seed(0)
    model = ic.models.create(name, num_classes=10, in_channels=in_channels)
    handle = ic.attach_icnn(model, "auto", num_classes=10, warmup_steps=0) if stage == "finetune" else None
    distill = stage == "recover"
    teacher = ic.Distillation(ic.frozen_copy(model), weight=0.5, temperature=4.0) if distill else None
    trainer = ic.Trainer(
        model,
        data,
        epochs=1,
        lr=0.01,
        extra_loss=handle.loss if handle else None,
        distill=teacher,
        progress=False,
        device="cpu",
        channels_last=channels_last,
    )
    t0 = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - t0, model.state_dict()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--steps", type=int, default=12, help="batches per fit")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed fits per format (after one warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stages", default="finetune,recover")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "channels_last.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    summary, rows = {}, {}
    for name in a.models.split(","):
        in_channels, side = MODELS[name]
        g = torch.Generator().manual_seed(0)
        n = a.steps * a.batch
        ds = TensorDataset(
            torch.rand(n, in_channels, side, side, generator=g), torch.randint(0, 10, (n,), generator=g)
        )
        data = DataLoader(ds, batch_size=a.batch)
        for stage in a.stages.split(","):
            times: dict[bool, list[float]] = {False: [], True: []}
            weights = {}
            for fmt in (False, True):  # warm-up
                _, weights[fmt] = one_fit(name, data, fmt, stage)
            for _ in range(a.repeats):
                for fmt in (False, True):
                    times[fmt].append(one_fit(name, data, fmt, stage)[0])
            med = {fmt: statistics.median(t) for fmt, t in times.items()}
            diff = max(
                float((weights[True][k].float() - v.float()).abs().max()) for k, v in weights[False].items()
            )
            rows[f"{name}/{stage}"] = {"seconds_default": times[False], "seconds_channels_last": times[True]}
            summary.setdefault(name, {})[stage] = {
                "median_s_default": med[False],
                "median_s_channels_last": med[True],
                "ratio": med[True] / med[False],
                "max_weight_diff": diff,
            }
            print(
                f"{name} {stage}: default {med[False]:.2f} s, channels-last {med[True]:.2f} s "
                f"(ratio {med[True] / med[False]:.3f}; weights differ by at most {diff:.1e})",
                flush=True,
            )
    result = {
        "benchmark": "channels_last",
        "command": command_line("bench_channels_last.py", a, skip=("out",)),
        "environment": environment_info(),
        "setup": {
            "steps": a.steps,
            "batch": a.batch,
            "threads": a.threads,
            "repeats": a.repeats,
            "finetune": "the filter loss and masks on the top layer (layers='auto'), SGD lr 0.01",
            "recover": "distillation from a frozen copy (weight 0.5, T 4), no filter loss, SGD lr 0.01",
            "timing": "one Trainer.fit of one epoch, the two formats alternated, median",
        },
        "rows": rows,
        "summary": summary,
    }
    atomic_write_json(result, a.out)
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
