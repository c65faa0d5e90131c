"""Start-up time of the CLI: ``prune-recipe --help``, ``--version`` and ``run --help``.

Each command runs ``--repeats`` times as a fresh process after one warm-up run (which fills the
OS file cache); the median and the maximum wall time are recorded. Writes tools/results/cli.json
with ``summary.<command>.median_s``.

    .venv/bin/python tools/bench_cli.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import command_line

from icnn_compress.io import atomic_write_json, environment_info

COMMANDS = (["--help"], ["--version"], ["run", "--help"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "cli.json"))
    a = p.parse_args()
    exe = shutil.which("prune-recipe", path=str(Path(sys.executable).parent)) or "prune-recipe"
    summary = {}
    for args in COMMANDS:
        times = []
        for i in range(a.repeats + 1):
            t = time.perf_counter()
            subprocess.run([exe, *args], capture_output=True, check=True)
            if i:  # the first run only warms the file cache
                times.append(time.perf_counter() - t)
        name = " ".join(["prune-recipe", *args])
        summary[name] = {"median_s": statistics.median(times), "max_s": max(times), "runs": len(times)}
        print(f"{name:<28} median {summary[name]['median_s']:.3f} s, max {summary[name]['max_s']:.3f} s")
    atomic_write_json(
        {
            "benchmark": "cli",
            "command": command_line("bench_cli.py", a, skip=("out",)),
            "environment": environment_info(),
            "setup": {**vars(a), "timing": "wall time of a fresh process, after one warm-up run"},
            "summary": {**summary, "targets": {"median_s": "< 1"}},
        },
        a.out,
    )


if __name__ == "__main__":
    main()
