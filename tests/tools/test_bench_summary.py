"""The benchmark summary: tables, the verdict against the baselines, the plot and the README block."""

import json
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools"
ENV = {
    "cpu_count": 2,
    "processor": "x86_64",
    "torch": "2.14.1",
    "onnxruntime": "1.31.1",
    "torch_pruning": "1.6.1",
}


def criteria_result() -> dict:
    rows, summary = {}, {"m": {"unpruned": 0.9, "unpruned_icnn": 0.89, "unpruned_latency_b32_ms": 10.0}}
    for level, lat in (("2x", 6.0), ("3x", 4.0), ("4x", 3.0)):
        accs = {"icnn-cluster+comp": 0.85, "l1+comp": 0.87, "l1": 0.5}
        for name, acc in accs.items():
            rows[f"m/{level}/{name}"] = {"oneshot_mean": acc, "recovered_mean": acc + 0.01}
        summary["m"][level] = {
            "oneshot": accs,
            "oneshot_std": dict.fromkeys(accs, 0.01),
            "recovered": {k: v + 0.01 for k, v in accs.items()},
            "recovered_std": dict.fromkeys(accs, 0.0),
            "latency_b32_ms": dict.fromkeys(accs, lat),
            "macs_reduction": dict.fromkeys(accs, float(level[0])),
        }
    return {
        "command": "python tools/bench_criteria.py --models m",
        "environment": ENV,
        "setup": {"threads": 1, "eval_size": 100, "recover_steps": 5},
        "seeds": [0, 1, 2],
        "rows": rows,
        "summary": summary,
    }


def run_summary(tmp_path: Path, readme_text: str, **setup) -> subprocess.CompletedProcess:
    result = criteria_result()
    result["setup"].update(setup)
    (tmp_path / "criteria.json").write_text(json.dumps(result))
    (tmp_path / "README.md").write_text(readme_text)
    cmd = [sys.executable, str(TOOLS / "bench_summary.py"), "--results", ".", "--readme", "README.md"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)


def test_summary_tables_verdict_plot_and_readme(tmp_path):
    proc = run_summary(
        tmp_path, "# x\n\nbefore\n<!-- bench:start -->\nold table\n<!-- bench:end -->\nafter\n"
    )
    assert proc.returncode == 0, proc.stderr
    readme = tmp_path / "README.md"
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
    # the best of each column is bold, and the verdict says where icnn-cluster loses, by how much
    assert "| l1+comp | **0.8700 ± 0.0100** |" in text
    assert "icnn-cluster+comp trails the best baseline (l1+comp) by 2.00 pt" in text
    assert "seeds [0, 1, 2]" in text
    # results written before the classifier refit existed say so, and how to reproduce them
    assert "the classifier *not* refit" in text and "add `--no-refit`" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sections"]["criteria"]["seeds"] == [0, 1, 2]
    assert summary["sections"]["criteria"]["environment"] == ENV
    assert (tmp_path / "accuracy_vs_latency.png").stat().st_size > 1000
    assert "latency.json" in text  # sections that were not run are listed, not invented


def test_summary_refuses_a_readme_without_the_block(tmp_path):
    proc = run_summary(tmp_path, "# no block\n")
    assert proc.returncode != 0 and "bench:start" in proc.stderr
    assert (tmp_path / "README.md").read_text() == "# no block\n"


def test_bench_lists_its_stages_and_rejects_unknown_ones():
    proc = subprocess.run(
        [sys.executable, str(TOOLS / "bench.py"), "--quick", "--dry-run"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    for stage in ("baselines", "overhead", "interpretability", "latency", "criteria", "summary"):
        assert f"] {stage}:" in proc.stdout
    assert "tools/results/quick" in proc.stdout
    bad = subprocess.run(
        [sys.executable, str(TOOLS / "bench.py"), "--only", "criterai"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "criterai" in bad.stderr


def test_criteria_measured_with_the_refit_say_so(tmp_path):
    proc = run_summary(tmp_path, "<!-- bench:start -->\n<!-- bench:end -->\n", no_refit=False)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "README.md").read_text()
    assert "the classifier refit to the unpruned model's logits" in text and "*not* refit" not in text


def test_goals_are_measured_from_the_results(tmp_path):
    """The issue-13 lines: the loss's cost per base, icnn-cluster against @plain and the best row,
    the best row below the unpruned model, each with met/missed computed, not written."""
    result = criteria_result()
    lv = result["summary"]["m"]
    lv["unpruned_bases"] = [{"plain": 0.9, "icnn": 0.895}, {"plain": 0.9, "icnn": 0.885}]
    for level in ("2x", "3x", "4x"):
        for regime in ("oneshot", "recovered"):
            lv[level][regime]["icnn-cluster@plain+comp"] = lv[level][regime]["icnn-cluster+comp"] + 0.0005
        lv[level]["recovery"] = {"icnn-cluster+comp": "kd-base", "l1+comp": "kd", "l1": "kd"}
    result["setup"].update(no_kd=False, kd_teacher="auto", finetune_epochs=3, masked_epochs=1)
    (tmp_path / "criteria.json").write_text(json.dumps(result))
    (tmp_path / "README.md").write_text("<!-- bench:start -->\n<!-- bench:end -->\n")
    cmd = [sys.executable, str(TOOLS / "bench_summary.py"), "--results", ".", "--readme", "README.md"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "README.md").read_text()
    assert (
        "- m: the fine-tune with the loss costs 1.00 pt (per base 0.50 / 1.50); goal <= 0.3: missed." in text
    )
    assert (
        "icnn-cluster+comp distilled from the base model; l1, l1+comp distilled from the unpruned model"
        in text
    )
    # -0.05 pt against @plain meets the -0.1 margin at every level; l1+comp stays the best row
    assert "-0.05 / -0.05 / -0.05 pt at 2x / 3x / 4x (goal >= -0.1: met at 3 of 3)" in text
    assert "the best row at 3x l1+comp (2.00 pt ahead)" in text
    assert "one-shot at 2x 3.00 pt (l1+comp; goal <= 0.5: missed)" in text
    assert "1 with masks + loss on the top layer" in text


def test_the_default_split_is_stated_as_bench_criteria_runs_it(tmp_path):
    """Without --masked-epochs, bench_criteria masks the first half of the epochs (2 of 3)."""
    proc = run_summary(tmp_path, "<!-- bench:start -->\n<!-- bench:end -->\n", finetune_epochs=3)
    assert proc.returncode == 0, proc.stderr
    assert (
        "fine-tuned for 3 epochs, without the loss and with it (2 with masks"
        in (tmp_path / "README.md").read_text()
    )


def test_latency_aware_and_reach_tables_are_part_of_the_readme_block(tmp_path):
    """Tables 2c and 2d are generated with the rest: a README regenerated from the results keeps
    them (2c was once lost that way, leaving the README pointing at a table it no longer had)."""
    aware = {
        "command": "python tools/bench_latency_aware.py --threads 2",
        "environment": ENV,
        "setup": {
            "weights": "w.pt",
            "criterion": "l2 + compensation",
            "threads": 2,
            "recover_steps": 5,
            "eval_size": 100,
            "repeats": 3,
        },
        "rows": [
            {
                "model": "m",
                "level": "2x",
                "rule": "latency-aware",
                "macs_reduction": 2.0,
                "speedup_b32": 1.9,
                "speedup_b1": 1.5,
                "speedup_over_macs_b32": 0.95,
                "speedup_over_macs_b1": 0.75,
                "oneshot": 0.8,
                "recovered": 0.85,
            }
        ],
        "summary": {"m": {"latency_targets": {"2": {"measured": 2.1, "error": 0.05, "macs_reduction": 2.4}}}},
    }
    cell = {
        "hard_bound": 1.5,
        "linear_model": 0.7,
        "round_to=8": 0.5,
        "latency-aware": 0.6,
        "reachable": True,
    }
    reach = {
        "command": "python tools/latency_reach.py --models m --levels 2 --threads 2",
        "environment": ENV,
        "setup": {"input": "1x28x28"},
        "summary": {
            "m": {
                "floor_share_b32": 0.25,
                "floor_share_b1": 0.4,
                "b32": {"2x": {**cell, "uniform": 0.8}},
                "b1": {"2x": cell},
            },
            "targets": {"speedup_over_macs_b32": ">= 0.9", "speedup_over_macs_b1": ">= 0.8"},
        },
    }
    (tmp_path / "latency_aware.json").write_text(json.dumps(aware))
    (tmp_path / "latency_reach.json").write_text(json.dumps(reach))
    proc = run_summary(tmp_path, "<!-- bench:start -->\n<!-- bench:end -->\n")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "README.md").read_text()
    assert "#### 2c. Latency-aware widths" in text
    assert "| m | 2x | latency-aware | 2.00x | 1.90x / 1.50x | 0.95 / 0.75 | 0.8000 | 0.8500 |" in text
    assert "| m | 2x | 2.10x | +5.0% | 2.40x |" in text
    assert "#### 2d. How far latency can follow MACs" in text
    assert "| m | 32 | 25.0% | 2x | 1.50 | 0.70 | 0.80 | 0.50 | 0.60 | >= 0.9 |" in text
    assert "| m | 1 | 40.0% | 2x | 1.50 | 0.70 | - | 0.50 | 0.60 | >= 0.8 |" in text


def test_specialise_table_pairs_each_method_with_the_head_restriction(tmp_path):
    """Table 5 reads the three specialisation results: Fisher's residuals by elimination, the
    earlier leave-one-out ones and Fisher on the channels, labelled by their criterion options, the
    elimination first; the target verdict follows the one-shot gain."""

    def result(gain: float, options: dict) -> dict:
        stats = {"oneshot_mean": 0.8, "recovered_mean": 0.85}
        gains = {
            "oneshot_gain_over_head_points": gain,
            "oneshot_gain_over_head_points_std": 0.5,
            "recovered_gain_over_head_points": 0.1,
            "recovered_gain_over_head_points_std": 0.2,
        }
        return {
            "command": "python tools/bench_specialise.py --merge a,b",
            "setup": {
                "model": "m",
                "weights": "a.pt,b.pt",
                "probe_seed": [0, 1],
                "kept_sets": {"5": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]},
                "recover_steps": 100,
                "criterion_options": options,
            },
            "summary": {"m": {"5": {"4x": {"head+l2": stats, "criterion:fisher": {**stats, **gains}}}}},
        }

    (tmp_path / "specialise_eliminate.json").write_text(json.dumps(result(1.8, {})))
    (tmp_path / "specialise_residual.json").write_text(json.dumps(result(1.5, {"eliminate": False})))
    (tmp_path / "specialise_fisher.json").write_text(json.dumps(result(0.6, {"residual": False})))
    proc = run_summary(tmp_path, "<!-- bench:start -->\n<!-- bench:end -->\n")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "README.md").read_text()
    assert "#### 5. Category-aware compression" in text
    assert "2 independently trained bases x 2 probe draws" in text
    fisher = "| 5 | 4x | 0.8000 / 0.8500 | Fisher, `keep_classes_mode=criterion`"
    rows = [
        f"{fisher}, residuals by elimination (8f, the default) | +1.80 ± 0.50 | +0.10 ± 0.20 | met |",
        f"{fisher}, leave-one-out residuals (8e) | +1.50 ± 0.50 | +0.10 ± 0.20 | met |",
        f"{fisher}, on the channels (8d) | +0.60 ± 0.50 | +0.10 ± 0.20 | missed |",
    ]
    assert all(row in text for row in rows)
    assert [text.index(row) for row in rows] == sorted(text.index(row) for row in rows)
    assert text.count("| 5 | 4x |") == 3  # the head restriction is the reference, not a row


def test_fisher_table_shows_each_ranking_with_its_paired_gains(tmp_path):
    stats = {"oneshot": 0.81, "std": 0.01, "cells": 4, "seconds_median": 65.0}
    gains = {"gain_over_l2_points": 3.1, "gain_over_l2_std": 0.9}
    gains |= {"gain_over_fisher-plain_points": 1.28, "gain_over_fisher-plain_std": 0.7}
    result = {
        "command": "python tools/bench_fisher.py --merge a,b",
        "setup": {"bases": 2, "seeds": "0,1", "baseline_epochs": 4, "train_size": 20000, "eval_size": 5000},
        "summary": {
            "resnet_cifar20": {"4x": {"l2": {**stats, "oneshot": 0.78}, "fisher": {**stats, **gains}}}
        },
    }
    (tmp_path / "fisher.json").write_text(json.dumps(result))
    proc = run_summary(tmp_path, "<!-- bench:start -->\n<!-- bench:end -->\n")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "README.md").read_text()
    assert "#### 6. Fisher pruning with compensation, without kept classes" in text
    assert "2 independently trained quick bases (4 epochs on 20000 images) x 2 probe draws" in text
    assert "| resnet_cifar20 | 4x | `l2` | 0.7800 ± 0.0100 |  |  | 65 |" in text
    row = "| resnet_cifar20 | 4x | Fisher, residuals by elimination (the default) | 0.8100 ± 0.0100 |"
    assert f"{row} +3.10 ± 0.90 | +1.28 ± 0.70 | 65 |" in text
