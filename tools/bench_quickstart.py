"""How long the quickstart takes and what it gives: `prune-recipe run quickstart` in a fresh run
directory (a child process, as a user runs it), wall time, peak memory, seconds per stage and the
validation accuracy of the unpruned and the pruned model. With ``--runs N`` it runs N times and
reports the median wall time with the spread (the stage seconds and accuracy of the median run).
Writes tools/results/quickstart.json (``summary.wall_s``, ``summary.wall_s_min``/``_max``,
``summary.peak_rss_mb``, ``summary.accuracy``; goal: >= 0.9 accuracy in <= 60 s on an idle 2-core
machine).

    .venv/bin/python tools/bench_quickstart.py [--runs 3] [--set data.train_size=1024] [--out other.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from icnn_compress.io import atomic_write_json, environment_info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, as prune-recipe run --set (repeatable; recorded in the result)",
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quickstart.json")
    p.add_argument("--runs", type=int, default=1, help="runs; the median wall time is reported (default 1)")
    a = p.parse_args()
    if a.runs < 1:
        p.error(f"--runs must be >= 1, got {a.runs}")
    overrides = [x for kv in a.set for x in ("--set", kv)]
    runs = sorted((_one_run(overrides) for _ in range(a.runs)), key=lambda r: r["wall_s"])
    median = runs[len(runs) // 2]
    walls = [r["wall_s"] for r in runs]
    result = {
        "benchmark": "quickstart",
        "command": " ".join(
            ["python tools/bench_quickstart.py", *(["--runs", str(a.runs)] if a.runs > 1 else []), *overrides]
        ),
        "environment": environment_info(),
        "stage_seconds": median["stages"],
        "summary": {
            "wall_s": median["wall_s"],
            "wall_s_min": min(walls),
            "wall_s_max": max(walls),
            "runs": a.runs,
            "peak_rss_mb": max(r["peak_mb"] for r in runs),
            "accuracy": median["accuracy"],
            "goal": ">= 0.9 validation accuracy in <= 60 s on an idle 2-core machine",
        },
    }
    atomic_write_json(result, a.out)
    print(
        f"quickstart: {median['wall_s']:.1f} s wall (median of {a.runs}; {min(walls):.1f}-{max(walls):.1f}), "
        f"{result['summary']['peak_rss_mb']:.0f} MB peak, accuracy {median['accuracy']} -> {a.out}"
    )


def _one_run(overrides: list[str]) -> dict:
    """One ``prune-recipe run quickstart`` in a child process: wall seconds, its peak RSS (MB),
    seconds per stage and the measured accuracies."""
    exe = Path(sys.executable).parent / "prune-recipe"
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "qs"
        t0 = time.perf_counter()
        child = subprocess.Popen([str(exe), "run", "quickstart", "--out", str(run), "--quiet", *overrides])
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        if code:
            raise SystemExit(f"bench_quickstart: prune-recipe run quickstart failed (exit {code})")
        stages = {
            d.name.split("_", 1)[1]: json.loads((d / "manifest.json").read_text())["seconds"]
            for d in sorted(run.iterdir())
            if (d / "manifest.json").is_file()
        }
        measured = json.loads((run / "7_measure" / "measurements.json").read_text())
    return {
        "wall_s": wall,
        "peak_mb": usage.ru_maxrss / 1024,
        "stages": stages,
        "accuracy": {m["name"]: m["accuracy"] for m in measured},
    }


if __name__ == "__main__":
    main()
