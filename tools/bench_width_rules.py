"""Latency-aware widths against multiples of 8: accuracy over independently trained bases.

Table 2c (tools/bench_latency_aware.py) compares the two width rules on one base model, with
timings. A gap of a few tenths of a point on one base is within what a second base can flip, so
this tool measures only the accuracy side, on several bases: each base (``--weights``, one
pattern per base, ``{model}`` standing for the model's name) is pruned with ``l2`` +
compensation to each MACs level with ``round_to=8`` and with ``allocation="latency"`` (widths
planned for ONNX Runtime at batch 32 and ``--threads``; run tools/bench_latency_aware.py or any
latency-aware prune first on an idle machine, so that the conv latency tables are measured there
and read from the cache here). As in table 2c: BatchNorm re-estimated on 20 probe batches
(one-shot), then ``--recover-steps`` SGD steps at lr 0.01 distilled from the unpruned model
(recovered); top-1 in PyTorch on the first ``--eval-size`` test images.

Writes tools/results/width_rules.json: ``summary.<model>.<level>`` = {``oneshot_diff``,
``recovered_diff``: latency-aware minus ``round_to=8`` in points, mean and std over bases, and
the per-base values}.

    .venv/bin/python tools/bench_width_rules.py --models vgg_small \\
        --weights 'runs/baselines/{model}_fashion_e4_n20000.pt,runs/baselines/{model}_fashion_e4_n20000_s1.pt'
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from _common import conv_widths, fashion_width_data, log_to_stdout, top1
from bench_latency_aware import RULES, _recover, prune_rule

import icnn_compress as ic
from icnn_compress.io import atomic_write_json, environment_info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vgg_small,resnet_cifar20")
    p.add_argument("--weights", required=True, help="comma-separated weight paths, one per base")
    p.add_argument("--levels", default="2,3,4")
    p.add_argument("--threads", type=int, default=2, help="torch threads, and the latency plan's ORT threads")
    p.add_argument("--eval-size", type=int, default=5000)
    p.add_argument("--recover-steps", type=int, default=150)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "width_rules.json"))
    a = p.parse_args()
    log_to_stdout()
    patterns = a.weights.split(",")
    missing = [
        str(f)
        for m in a.models.split(",")
        for f in (Path(w.format(model=m)) for w in patterns)
        if not f.is_file()
    ]
    if missing:
        raise SystemExit(f"weights missing: {', '.join(missing)} (python tools/bench_fashion.py ...)")
    torch.set_num_threads(a.threads)
    train_dl, eval_dl, probe = fashion_width_data(a.eval_size)
    example = torch.rand(1, 1, 28, 28)
    rows, summary = [], {}
    for name in a.models.split(","):
        for pattern in patterns:
            weights = pattern.format(model=name)
            base = ic.models.create(name, num_classes=10, in_channels=1, weights=weights).eval()
            unpruned = top1(base, eval_dl)
            for level in a.levels.split(","):
                for rule in RULES:
                    res = prune_rule(base, example, float(level), rule, probe, a.threads)
                    oneshot = top1(res.model, eval_dl)
                    _recover(res.model, base, train_dl, a.recover_steps)
                    row = {
                        "model": name,
                        "weights": weights,
                        "unpruned": unpruned,
                        "level": f"{level}x",
                        "rule": rule,
                        "macs_reduction": res.macs_reduction,
                        "widths": conv_widths(res.model),
                        "oneshot": oneshot,
                        "recovered": top1(res.model, eval_dl),
                    }
                    rows.append(row)
                    print({k: v for k, v in row.items() if k != "widths"}, flush=True)
        for level in a.levels.split(","):
            entry = summary.setdefault(name, {})[f"{level}x"] = {}
            for stage in ("oneshot", "recovered"):
                pick = {
                    (r["weights"], r["rule"]): r[stage]
                    for r in rows
                    if r["model"] == name and r["level"] == f"{level}x"
                }
                diffs = [
                    100
                    * (
                        pick[(w.format(model=name), "latency-aware")]
                        - pick[(w.format(model=name), "round_to=8")]
                    )
                    for w in patterns
                ]
                entry[f"{stage}_diff"] = {
                    "mean": statistics.mean(diffs),
                    "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                    "per_base": diffs,
                }
            print(name, f"{level}x", entry, flush=True)
    result = {
        "benchmark": "width_rules",
        "command": f"python tools/bench_width_rules.py --models {a.models} --weights '{a.weights}' "
        f"--levels {a.levels} --threads {a.threads}",
        "environment": environment_info(),
        "setup": {
            **vars(a),
            "criterion": "l2 + compensation",
            "top1": "PyTorch, first eval_size test images",
        },
        "rows": rows,
        "summary": {
            **summary,
            "target": "latency-aware >= round_to=8 - 0.2 point (one-shot and recovered), issue 15",
        },
    }
    atomic_write_json(result, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
