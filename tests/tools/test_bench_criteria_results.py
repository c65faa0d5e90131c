"""bench_criteria --write-only: the results hold the rows the command names, not every row cached."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def row(acc: float) -> dict:
    return {
        "oneshot": [acc, acc],
        "oneshot_mean": acc,
        "oneshot_std": 0.0,
        "oneshot_before_bn": acc,
        "recovered": [acc + 0.01] * 2,
        "recovered_mean": acc + 0.01,
        "recovered_std": 0.0,
        "recovery": "kd",
        "macs_reduction": 2.0,
    }


def test_write_only_keeps_the_named_models_bases_and_criteria(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    rows = {"_version": 5}
    for b in range(3):  # a third base of another run: not asked for below
        rows[f"m/base{b}/unpruned"] = {"plain": 0.9, "icnn": 0.89}
        for name, acc in {"l1+comp": 0.8, "l2@icnn+comp": 0.7, "l1": 0.5}.items():
            rows[f"m/base{b}/2x/{name}"] = row(acc + b / 100)
    rows["other/base0/unpruned"] = {"plain": 0.5, "icnn": 0.5}
    (cache / "rows_m.json").write_text(json.dumps(rows))
    cmd = [sys.executable, str(ROOT / "tools" / "bench_criteria.py"), "--models", "m", "--criteria", "l1"]
    cmd += ["--levels", "2x", "--bases", "2", "--compensation", "on", "--cache", str(cache)]
    cmd += ["--write-only", "--out-dir", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "out" / "criteria.json").read_text())
    assert list(result["summary"]) == ["m"]
    level = result["summary"]["m"]["2x"]
    assert list(level["oneshot"]) == ["l1+comp"]  # not the uncompensated row, not the diagnostic one
    assert abs(level["oneshot"]["l1+comp"] - 0.805) < 1e-9  # bases 0 and 1, not base 2
    assert len(result["summary"]["m"]["unpruned_bases"]) == 2
