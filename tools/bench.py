"""One command for every published number: runs the benchmarks in order, then the summary.

    .venv/bin/python tools/bench.py            # the published numbers (hours on 2 cores; cached)
    .venv/bin/python tools/bench.py --quick    # a reduced run, under 15 minutes on 2 cores
    .venv/bin/python tools/bench.py --only criteria,summary

Stages: the Fashion-MNIST baselines (trained once, cached in runs/baselines), the loss's
training-step overhead, interpretability on synthetic parts, ONNX Runtime latency, latency-aware
widths on trained models (bench_latency_aware.py), how far latency can follow MACs
(latency_reach.py), how repeatable a measured speedup is (bench_speedup_timer.py), INT8, the
torchvision model zoo (bench_zoo.py), the pruning criteria, where the loss's accuracy cost comes
from (bench_icnn_cost.py), the interpretable route over two independently trained bases
(bench_route.py), category-aware compression (bench_specialise.py, tables 8-8f) and Fisher's
residual scores without kept classes (bench_fisher.py, table 8g), then
``tools/bench_summary.py``
(results/summary.json, results/summary.md, the accuracy-vs-latency plot and, for the full run,
the table in README.md). Every stage caches what it trains under runs/ and the criteria, cost and
route stages resume row by row, so a re-run skips finished work.
The full run writes into tools/results/, ``--quick`` into tools/results/quick/ (and never touches
the README). Before each stage the time left is estimated from the last run's stage times
(tools/results[/quick]/bench_timings.json), or from built-in guesses on a first run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent

CRITERIA_FULL = [
    "--bases",
    "2",
    "--seeds",
    "2",
    "--step-ratio",
    "0.1",
    "--recover-steps",
    "150",
    "--threads",
    "1",
]
CRITERIA_FULL += ["--out-dir", "{results}"]

KEPT = "0,6;2,4;0,2,3,4,6;1,3,5,7,9"  # the kept-class sets of tables 8-8c
E4_BASES = "runs/baselines/vgg_small_fashion_e4_n20000.pt,runs/baselines/vgg_small_fashion_e4_n20000_s1.pt"
QUICK_BASES = (
    "runs/bench_icnn_cost/quick/base_vgg_small_s0.pt,runs/bench_icnn_cost/quick/base_vgg_small_s1.pt"
)


FISHER_MODES = "criterion:fisher,criterion:taylor,relevance"


def _specialise(weights: str, kept: str, levels: str, modes: str, out: str, *extra: str) -> list[str]:
    """A bench_specialise.py command writing ``{results}/<out>.json``."""
    return [
        *("bench_specialise.py", "--weights", weights, "--kept", kept, "--levels", levels),
        *("--modes", modes, *extra, "--out", f"{{results}}/{out}.json"),
    ]


# stage -> (commands of the full run, of --quick, guessed seconds full / quick); a command that
# starts with "&" runs in the background, and the next plain command waits for all of them
STAGES: dict[str, tuple[list[list[str]], list[list[str]], tuple[float, float]]] = {
    "baselines": (
        [
            ["bench_fashion.py", "--model", "vgg_small", "--epochs", "6"],
            ["bench_fashion.py", "--model", "resnet_cifar20", "--epochs", "6"],
        ],
        [["bench_fashion.py", "--model", "vgg_small", "--epochs", "1", "--train-size", "6000"]],
        (1700.0, 60.0),
    ),
    "overhead": (
        [["bench_icnn_overhead.py", "--threads", "2", "--out", "{results}/icnn_overhead.json"]],
        [
            [
                "bench_icnn_overhead.py",
                "--threads",
                "2",
                "--repeats",
                "10",
                "--out",
                "{results}/icnn_overhead.json",
            ]
        ],
        (120.0, 40.0),
    ),
    "interpretability": (
        [["bench_interpretability.py", "--epochs", "8", "--results-dir", "{results}"]],
        [
            [
                "bench_interpretability.py",
                "--epochs",
                "2",
                "--train-size",
                "1500",
                "--probe-size",
                "300",
                "--image-size",
                "32",
                "--out",
                "runs/bench_interpretability_quick",
                "--results-dir",
                "{results}",
            ]
        ],
        (1500.0, 150.0),
    ),
    "latency": (
        [["bench_latency.py", "--threads", "2", "--out", "{results}/latency.json"]],
        [
            [
                "bench_latency.py",
                "--models",
                "vgg_small",
                "--levels",
                "2,4",
                "--round-to",
                "8",
                "--repeats",
                "15",
                "--out",
                "{results}/latency.json",
            ]
        ],
        (60.0, 30.0),
    ),
    "latency_aware": (
        [["bench_latency_aware.py", "--threads", "2", "--out", "{results}/latency_aware.json"]],
        [
            [
                "bench_latency_aware.py",
                "--models",
                "vgg_small",
                "--levels",
                "3",
                "--speedups",
                "2",
                "--eval-size",
                "500",
                "--recover-steps",
                "10",
                "--repeats",
                "10",
                "--out",
                "{results}/latency_aware.json",
            ]
        ],
        (900.0, 120.0),
    ),
    "latency_reach": (
        [["latency_reach.py", "--threads", "2", "--out", "{results}/latency_reach.json"]],
        [
            [
                "latency_reach.py",
                "--models",
                "resnet_cifar20",
                "--levels",
                "2",
                "--scales",
                "0.75,0.5",
                "--repeats",
                "10",
                "--out",
                "{results}/latency_reach.json",
            ]
        ],
        (1500.0, 60.0),
    ),
    "speedup_timer": (
        [["bench_speedup_timer.py", "--out", "{results}/speedup_timer.json"]],
        [
            [
                "bench_speedup_timer.py",
                *("--models", "resnet_cifar20", "--trials", "3", "--repeats", "5"),
                *("--out", "{results}/speedup_timer.json"),
            ]
        ],
        (240.0, 20.0),
    ),
    "zoo": (
        [["bench_zoo.py", "--out", "{results}/zoo.json"]],
        [["bench_zoo.py", "--models", "resnet18", "--criteria", "l2", "--out", "{results}/zoo.json"]],
        (3600.0, 30.0),
    ),
    "channels_last": (
        [["bench_channels_last.py", "--threads", "2", "--out", "{results}/channels_last.json"]],
        [
            [
                "bench_channels_last.py",
                "--threads",
                "2",
                "--repeats",
                "2",
                "--out",
                "{results}/channels_last.json",
            ]
        ],
        (150.0, 60.0),
    ),
    "quickstart": (
        [["bench_quickstart.py", "--runs", "3", "--out", "{results}/quickstart.json"]],
        [["bench_quickstart.py", "--out", "{results}/quickstart.json"]],
        (180.0, 60.0),
    ),
    "cli": (
        [["bench_cli.py", "--out", "{results}/cli.json"]],
        [["bench_cli.py", "--repeats", "3", "--out", "{results}/cli.json"]],
        (10.0, 5.0),
    ),
    "int8": (
        [["bench_int8.py", "--threads", "2", "--out", "{results}/int8.json"]],
        [
            [
                "bench_int8.py",
                "--models",
                "vgg_small",
                "--levels",
                "2",
                "--base-epochs",
                "1",
                "--base-images",
                "5000",
                "--recover-steps",
                "30",
                "--repeats",
                "15",
                "--cache",
                "runs/bench_int8_quick",
                "--out",
                "{results}/int8.json",
            ]
        ],
        (900.0, 120.0),
    ),
    "criteria": (
        [  # one process per model, one thread each, then one table from both caches
            ["&", "bench_criteria.py", "--models", "vgg_small", *CRITERIA_FULL],
            ["&", "bench_criteria.py", "--models", "resnet_cifar20", *CRITERIA_FULL],
            ["bench_criteria.py", "--models", "vgg_small,resnet_cifar20", *CRITERIA_FULL, "--write-only"],
        ],
        [
            [
                "bench_criteria.py",
                "--models",
                "vgg_small",
                "--baseline-epochs",
                "1",
                "--train-size",
                "6000",
                "--finetune-steps",
                "60",
                "--criteria",
                "icnn-cluster,l2,taylor,random",
                "--levels",
                "2x,4x",
                "--seeds",
                "2",
                "--step-ratio",
                "0.1",
                "--recover-steps",
                "30",
                "--eval-size",
                "1000",
                "--latency-repeats",
                "10",
                "--cache",
                "runs/bench_criteria_quick",
                "--out-dir",
                "{results}",
            ]
        ],
        (5400.0, 300.0),
    ),
    "icnn_cost": (  # the published numbers use the script's --quick budget (see its docstring)
        [
            ["&", "bench_icnn_cost.py", "--quick", "--part", "fashion", "--models", "vgg_small"],
            ["&", "bench_icnn_cost.py", "--quick", "--part", "fashion", "--models", "resnet_cifar20"],
            ["bench_icnn_cost.py", "--quick", "--part", "synthetic"],
            ["bench_icnn_cost.py", "--quick", "--write-only", "--out-dir", "{results}"],
        ],
        [
            [
                "bench_icnn_cost.py",
                "--quick",
                "--models",
                "resnet_cifar20",
                "--variants",
                "plain@e1,full@e1,top1@e1",
                "--bases",
                "1",
                "--no-synthetic",
                "--cache",
                "runs/bench_icnn_cost_smoke",
                "--out-dir",
                "{results}",
            ]
        ],
        (5400.0, 300.0),
    ),
    "route": (
        [
            ["&", "bench_route.py", "--quick", "--models", "vgg_small"],
            ["&", "bench_route.py", "--quick", "--models", "resnet_cifar20"],
            ["bench_route.py", "--quick", "--write-only", "--out-dir", "{results}"],
        ],
        [
            [
                "bench_route.py",
                "--quick",
                "--models",
                "resnet_cifar20",
                "--criteria",
                "icnn-cluster@top1@e1,l2@plain@e1",
                "--levels",
                "2x",
                "--bases",
                "1",
                "--cache",
                "runs/bench_icnn_cost_smoke",
                "--out-dir",
                "{results}",
            ]
        ],
        (5400.0, 300.0),
    ),
    "specialise": (  # tables 8-8f; the e4/n20000 bases are trained here, the quick ones by icnn_cost
        [
            ["bench_fashion.py", "--model", "vgg_small", "--epochs", "4", "--train-size", "20000"],
            [
                "bench_fashion.py",
                "--model",
                "vgg_small",
                "--epochs",
                "4",
                "--train-size",
                "20000",
                "--seed",
                "1",
            ],
            _specialise(QUICK_BASES, KEPT, "2,4,8", "category,relevance", "specialise", "--threads", "1"),
            _specialise(E4_BASES, KEPT, "2,4", "category,relevance", "specialise_kept"),
            _specialise(E4_BASES, KEPT, "4", "criterion:taylor,full:taylor,relevance", "specialise_taylor"),
            *(  # tables 8d (Fisher on the channels themselves), 8e (on their leave-one-out residuals)
                # and 8f (residuals by backward elimination, the default with compensation): two
                # probe draws side by side, then merged
                step
                for name, modes, options in (
                    # (arguments are str.format-ted: braces doubled)
                    ("specialise_fisher", FISHER_MODES, '{{"residual": false}}'),
                    ("specialise_residual", "criterion:fisher", '{{"eliminate": false}}'),
                    ("specialise_eliminate", "criterion:fisher", "{{}}"),
                )
                for step in (
                    *(
                        [
                            "&",
                            *_specialise(E4_BASES, KEPT, "4", modes, f"{name}_p{s}", "--threads", "1"),
                            *("--probe-seed", str(s), "--criterion-options", options),
                        ]
                        for s in (0, 1)
                    ),
                    [
                        "bench_specialise.py",
                        "--merge",
                        f"{{results}}/{name}_p0.json,{{results}}/{name}_p1.json",
                        "--out",
                        f"{{results}}/{name}.json",
                    ],
                )
            ),
        ],
        [
            _specialise(
                "runs/baselines/vgg_small_fashion_e1_n6000.pt",
                "0,6",
                "4",
                "relevance",
                "specialise",
                "--recover-steps",
                "5",
            )
        ],
        (13000.0, 60.0),
    ),
    "fisher": (  # table 8g: Fisher's residual scores without keep_classes, on the e4/n20000 bases
        [
            ["bench_fashion.py", "--model", m, "--epochs", "4", "--train-size", "20000", "--seed", s]
            for m in ("vgg_small", "resnet_cifar20")
            for s in ("0", "1")
        ]
        + [
            ["&", "bench_fisher.py", "--models", m, "--out", f"{{results}}/fisher_{m}.json"]
            for m in ("vgg_small", "resnet_cifar20")
        ]
        + [
            [
                "bench_fisher.py",
                "--merge",
                "{results}/fisher_vgg_small.json,{results}/fisher_resnet_cifar20.json",
                "--out",
                "{results}/fisher.json",
            ]
        ],
        [
            ["bench_fashion.py", "--model", "resnet_cifar20", "--epochs", "1", "--train-size", "6000"],
            [
                "bench_fisher.py",
                *("--models", "resnet_cifar20", "--bases", "1", "--seeds", "0", "--levels", "2"),
                *("--baseline-epochs", "1", "--train-size", "6000", "--eval-size", "500"),
                *("--out", "{results}/fisher.json"),
            ],
        ],
        (3600.0, 60.0),
    ),
    "summary": (
        [["bench_summary.py", "--results", "{results}", "--readme", "README.md"]],
        [["bench_summary.py", "--results", "{results}"]],
        (20.0, 20.0),
    ),
}


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def run_stage(commands: list[list[str]], results: Path, dry_run: bool) -> int:
    """Run a stage's commands in order ("&": in the background); the first non-zero exit code."""
    background: list[subprocess.Popen] = []
    for args in commands:
        parallel = args[0] == "&"
        args = args[1:] if parallel else args
        cmd = [sys.executable, str(TOOLS / args[0]), *(x.format(results=results) for x in args[1:])]
        print("  $", " ".join(cmd[1:]), "&" if parallel else "", flush=True)
        if dry_run:
            continue
        if parallel:
            background.append(subprocess.Popen(cmd, cwd=ROOT))
            continue
        codes = [p.wait() for p in background]
        background.clear()
        if any(codes):
            return next(c for c in codes if c)
        rc = subprocess.call(cmd, cwd=ROOT)
        if rc:
            return rc
    codes = [p.wait() for p in background]
    return next((c for c in codes if c), 0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced sizes, results in tools/results/quick/")
    p.add_argument("--only", default=None, help=f"comma-separated stages out of {','.join(STAGES)}")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    a = p.parse_args()
    stages = list(STAGES) if a.only is None else [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stage(s) {unknown}; the stages are {list(STAGES)}")
    results = TOOLS / "results" / ("quick" if a.quick else "")
    results.mkdir(parents=True, exist_ok=True)
    timings_path = results / "bench_timings.json"
    last = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    guess = {s: last.get(s, STAGES[s][2][1 if a.quick else 0]) for s in stages}
    timings = dict(last)
    t_start = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        left = sum(guess[s] for s in stages[i - 1 :])
        print(
            f"[bench {i}/{len(stages)}] {stage}: elapsed {_fmt(time.perf_counter() - t_start)}, "
            f"about {_fmt(left)} left",
            flush=True,
        )
        t0 = time.perf_counter()
        rc = run_stage(STAGES[stage][1 if a.quick else 0], results, a.dry_run)
        if rc != 0:
            print(f"[bench] stage {stage!r} failed (exit {rc}); finished stages are kept", flush=True)
            return rc
        if not a.dry_run:
            timings[stage] = time.perf_counter() - t0
            timings_path.write_text(json.dumps(timings, indent=2) + "\n")
    print(f"[bench] done in {_fmt(time.perf_counter() - t_start)}; results in {results}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
