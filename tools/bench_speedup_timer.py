"""How repeatable a measured speedup is: the evidence behind ``SpeedupTimer``'s five rounds.

For each model, ``l1``-pruned to 2x fewer MACs (``round_to=8``, random weights: latency depends
only on the widths), the speedup over the unpruned model is measured ``--trials`` times with
``measure.SpeedupTimer`` (each trial ``--rounds`` alternating rounds of ``--repeats`` calls after
``--warmup``, ONNX Runtime CPU provider, ``--threads`` threads, batch ``--batch``). Every trial is
scored three ways from the same timings:

- ``median<k>``: the median ratio of the first ``k`` rounds (k = 3 and ``--rounds``);
- ``adaptive``: what ``SpeedupTimer.speedup`` returns with its default ``stop_spread`` (2%): the
  median of the first ``--rounds // 2 + 1`` rounds when they agree within it, else of all rounds;
  ``adaptive_rounds`` is the mean number of rounds it would have timed;
- ``min<rounds>``: the fastest reference timing over the fastest candidate timing.

Reported per estimator: the median over trials and the spread of the trials around it (min and max,
in percent). Writes tools/results/speedup_timer.json.

    .venv/bin/python tools/bench_speedup_timer.py [--trials 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import icnn_compress as ic
from icnn_compress.io import atomic_write_json, environment_info
from icnn_compress.measure import SpeedupTimer
from icnn_compress.prune import Target, prune_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vgg_small,resnet_cifar20")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "speedup_timer.json"))
    a = p.parse_args()
    if a.rounds < 3 or a.trials < 2:
        p.error("--rounds must be >= 3 and --trials >= 2")
    torch.set_num_threads(a.threads)
    example = torch.rand(1, 1, 28, 28)
    summary, trials = {}, {}
    for name in a.models.split(","):
        torch.manual_seed(0)
        base = ic.models.create(name, num_classes=10, in_channels=1).eval()
        pruned = prune_model(
            base,
            example,
            criterion="l1",
            target=Target(macs_reduction=2.0),
            refit_classifier=False,
            progress=False,
        ).model
        timer = SpeedupTimer(
            base,
            example,
            batch=a.batch,
            threads=a.threads,
            rounds=a.rounds,
            warmup=a.warmup,
            repeats=a.repeats,
        )
        scores: dict[str, list[float]] = {
            "median3": [],
            f"median{a.rounds}": [],
            f"min{a.rounds}": [],
            "adaptive": [],
        }
        used = []
        first = a.rounds // 2 + 1
        for t in range(a.trials):
            pairs = timer.rounds_ms(pruned)
            stop = SpeedupTimer.agree(pairs[:first], timer.stop_spread)
            used.append(first if stop else a.rounds)
            scores["adaptive"].append(SpeedupTimer.median_ratio(pairs[:first] if stop else pairs))
            scores["median3"].append(SpeedupTimer.median_ratio(pairs[:3]))
            scores[f"median{a.rounds}"].append(SpeedupTimer.median_ratio(pairs))
            scores[f"min{a.rounds}"].append(min(r for r, _ in pairs) / min(c for _, c in pairs))
            print(
                name, f"trial {t + 1}/{a.trials}", {k: round(v[-1], 3) for k, v in scores.items()}, flush=True
            )
        trials[name] = scores
        summary[name] = {}
        for key, values in scores.items():
            med = statistics.median(values)
            summary[name][key] = {
                "median": med,
                "spread_low_pct": 100 * (min(values) / med - 1),
                "spread_high_pct": 100 * (max(values) / med - 1),
            }
        summary[name]["adaptive_rounds"] = statistics.mean(used)
        print(name, summary[name], flush=True)
    result = {
        "benchmark": "speedup_timer",
        "command": "python tools/bench_speedup_timer.py "
        + " ".join(f"--{k} {getattr(a, k)}" for k in ("models", "trials", "rounds", "batch", "threads")),
        "environment": environment_info(),
        "setup": {**vars(a), "pruned": "l1, 2x fewer MACs, round_to=8, random weights"},
        "trials": trials,
        "summary": summary,
    }
    atomic_write_json(result, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
