"""tools/li_reference.py places a measured location-instability row between the floor and a fixed position."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_rows_get_their_floor_best_ratio_and_gap_closed(tmp_path):
    setup = {"syn_classes": 3, "syn_size": 32, "syn_probe": 48}
    rows = {
        "resnet_cifar8/synthetic/top1@e1": {"location_instability": 0.030, "layers": ["layer3.0"]},
        "resnet_cifar8/synthetic/plain@e1:layer3.0": {"location_instability": 0.036},
        "resnet_cifar8/synthetic-s1/top1@e1": {"location_instability": 0.031, "layers": ["layer3.0"]},
        "resnet_cifar8/fashion/b0/top1@e1": {"top1": 0.9},  # not a synthetic row: left out
    }
    results = tmp_path / "cost.json"
    results.write_text(json.dumps({"setup": setup, "rows": rows}))
    out = tmp_path / "ref.json"
    tool = str(ROOT / "tools" / "li_reference.py")
    done = subprocess.run(
        [sys.executable, tool, "--results", str(results), "--variants", "top1@e1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    (row,) = data["rows"]  # synthetic-s1 has no plain reference
    assert row["synthetic"] == "synthetic" and row["ratio"] == pytest.approx(0.030 / 0.036)
    assert 0 < row["floor"] <= row["part_mean"] < row["fixed"]
    assert row["best_ratio"] == pytest.approx(row["floor"] / 0.036)
    assert row["gap_closed"] == pytest.approx((0.036 - 0.030) / (0.036 - row["floor"]))
    assert data["summary"]["resnet_cifar8"]["top1@e1"]["n"] == 1


def test_a_missing_results_file_is_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "li_reference.py"), "--results", str(tmp_path / "none.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        done.returncode == 1 and done.stderr.strip() == f"--results: no such file: {tmp_path / 'none.json'}"
    )
