"""bench_fisher --merge: one result from per-model runs, with paired gains over the references."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(model: str, accs: dict, levels: str = "4") -> dict:
    rows = [
        {"model": model, "base": b, "seed": s, "level": 4.0, "variant": v, "unpruned": 0.9,
         "oneshot": acc + b / 100 + s / 1000, "macs_reduction": 4.1, "seconds": 10.0 * (i + 1)}
        for i, (v, acc) in enumerate(accs.items()) for b in (0, 1) for s in (0, 1)
    ]  # fmt: skip
    setup = {"models": model, "levels": levels, "bases": 2, "seeds": "0,1", "baseline_epochs": 4}
    setup |= {"train_size": 20000, "eval_size": 5000, "threads": 1}
    return {
        "benchmark": "fisher",
        "command": f"python tools/bench_fisher.py --models {model}",
        "setup": setup,
        "rows": rows,
    }


def merge(tmp_path: Path, *runs: dict) -> subprocess.CompletedProcess:
    paths = []
    for i, r in enumerate(runs):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(r))
    cmd = [sys.executable, str(ROOT / "tools" / "bench_fisher.py"), "--merge", ",".join(map(str, paths))]
    return subprocess.run(
        [*cmd, "--out", str(tmp_path / "fisher.json")], capture_output=True, text=True, timeout=120
    )


def test_merge_summarises_every_model_with_paired_gains(tmp_path):
    done = merge(
        tmp_path,
        run("vgg_small", {"l2": 0.80, "fisher-plain": 0.81, "fisher": 0.83}),
        run("resnet_cifar20", {"l2": 0.70, "fisher-plain": 0.75, "fisher": 0.74}),
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "fisher.json").read_text())
    assert result["setup"]["models"] == "vgg_small,resnet_cifar20" and len(result["rows"]) == 24
    vgg, resnet = result["summary"]["vgg_small"]["4x"], result["summary"]["resnet_cifar20"]["4x"]
    assert (
        vgg["fisher"]["gain_over_l2_points"] == 3.0 and vgg["fisher"]["gain_over_fisher-plain_points"] == 2.0
    )
    assert resnet["fisher"]["gain_over_fisher-plain_points"] == -1.0 and resnet["fisher"]["cells"] == 4
    assert resnet["l2"]["oneshot"] == 0.7055 and resnet["fisher"]["seconds_median"] == 30.0
    table = (tmp_path / "fisher.md").read_text()
    assert "| resnet_cifar20 | 4x | Fisher, residuals by elimination (the default) | 0.7455" in table


def test_merge_refuses_runs_with_other_settings(tmp_path):
    done = merge(tmp_path, run("vgg_small", {"l2": 0.8}), run("resnet_cifar20", {"l2": 0.7}, levels="2"))
    assert done.returncode != 0 and "has another levels ('2')" in done.stderr
    assert not (tmp_path / "fisher.json").exists()
