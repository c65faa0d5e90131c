"""How long the quickstart takes and what it gives: `prune-recipe run quickstart` in a fresh run
directory (a child process, as a user runs it), wall time, peak memory, seconds per stage and the
validation accuracy of the unpruned and the pruned model. Writes tools/results/quickstart.json
(``summary.wall_s``, ``summary.peak_rss_mb``, ``summary.accuracy``; goal: >= 0.9 accuracy in <= 60 s
on an idle 2-core machine).

    .venv/bin/python tools/bench_quickstart.py [--set data.train_size=1024] [--out other.json]
"""

from __future__ import annotations

import argparse
import json
import resource
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
    a = p.parse_args()
    exe = Path(sys.executable).parent / "prune-recipe"
    overrides = [x for kv in a.set for x in ("--set", kv)]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "qs"
        t0 = time.perf_counter()
        subprocess.run([str(exe), "run", "quickstart", "--out", str(run), "--quiet", *overrides], check=True)
        wall = time.perf_counter() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        stages = {
            d.name.split("_", 1)[1]: json.loads((d / "manifest.json").read_text())["seconds"]
            for d in sorted(run.iterdir())
            if (d / "manifest.json").is_file()
        }
        measured = json.loads((run / "7_measure" / "measurements.json").read_text())
    accuracy = {m["name"]: m["accuracy"] for m in measured}
    result = {
        "benchmark": "quickstart",
        "command": " ".join(["python tools/bench_quickstart.py", *overrides]),
        "environment": environment_info(),
        "stage_seconds": stages,
        "summary": {
            "wall_s": wall,
            "peak_rss_mb": peak_mb,
            "accuracy": accuracy,
            "goal": ">= 0.9 validation accuracy in <= 60 s on an idle 2-core machine",
        },
    }
    out = a.out
    atomic_write_json(result, out)
    print(f"quickstart: {wall:.1f} s wall, {peak_mb:.0f} MB peak, accuracy {accuracy} -> {out}")


if __name__ == "__main__":
    main()
