"""Per-group diagnosis: where two pruning criteria choose different channels, and what each choice costs.

Both criteria prune the same model to the same MACs target (compensated, the same probe). Then,
for every dependency group (a conv's output channels and everything coupled to them, e.g. all the
convs that write one residual stream), the channels each criterion removed *in that group only*
are removed from the unpruned model (compensated, BatchNorm re-estimated) and the model is
evaluated. A group where one criterion's choice costs clearly more than the other's is where that
criterion misjudges. Per-class accuracy of the whole pruned models shows a class wiped out.

Top-1 in PyTorch (CPU) on the first ``--eval-size`` Fashion-MNIST test images; results in
``tools/results/diagnose_<model>.json`` (``summary.groups.<group>.<criterion>`` = top-1 with only
that group pruned; ``summary.per_class.<criterion>`` = per-class top-1 of the whole pruned model).

    .venv/bin/python tools/diagnose_groups.py --model resnet_cifar20 --level 3 \\
        --weights runs/baselines/resnet_cifar20_fashion_e6.pt
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch_pruning as tp
from _common import command_line, load_fashion_model, parse_options, probe_batches
from torch import nn
from torch.utils.data import DataLoader, Subset

import icnn_compress as ic
from icnn_compress.prune import Target, criterion_spec, prune_filters, prune_model, reestimate_batchnorm


@torch.no_grad()
def per_class_top1(model: nn.Module, loader: DataLoader, classes: int) -> list[float]:
    """Top-1 of each class (``classes`` values) on ``loader``."""
    model.eval()
    correct, seen = torch.zeros(classes), torch.zeros(classes)
    for x, y, *_ in loader:
        hit = (model(x).argmax(1) == y).float()
        correct.index_add_(0, y, hit)
        seen.index_add_(0, y, torch.ones_like(hit))
    return (correct / seen.clamp_min(1)).tolist()


def dependency_groups(model: nn.Module, example: torch.Tensor) -> dict[str, list[str]]:
    """Each group of coupled conv outputs, keyed by its first conv's name: ``key -> conv names``."""
    names = {m: n for n, m in model.named_modules()}
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    groups: dict[str, list[str]] = {}
    seen: set[str] = set()
    for name, conv in model.named_modules():
        if not isinstance(conv, nn.Conv2d) or name in seen:
            continue
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[0])
        members = sorted(
            {names[d.target.module] for d, _ in group if d.pruning_fn == tp.prune_conv_out_channels}
        )
        seen.update(members)
        groups[name] = members
    return groups


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet_cifar20")
    p.add_argument("--weights", required=True, help="a state dict of the model trained on Fashion-MNIST")
    p.add_argument("--criteria", default="icnn-cluster,l2")
    p.add_argument("--level", type=float, default=3.0, help="MACs reduction of the whole-model runs")
    p.add_argument("--eval-size", type=int, default=2000)
    p.add_argument("--probe-seed", type=int, default=0)
    p.add_argument("--step-ratio", type=float, default=0.1)
    p.add_argument(
        "--criterion-options", default="", help="key=value,... passed to the criteria that take them"
    )
    p.add_argument(
        "--icnn",
        action="store_true",
        help="the weights are of a model fine-tuned with the loss (bench_criteria.py's *_icnn.pt)",
    )
    p.add_argument(
        "--round-to",
        type=int,
        default=0,
        help="channel multiple of the whole-model runs (0: free widths, as when the first "
        "diagnosis was measured; the criteria benchmark uses 8)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="default tools/results/diagnose_<model>.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    options = parse_options(a.criterion_options, sep=",")
    model = load_fashion_model(a.model, a.weights, icnn=a.icnn)
    _, test_dl = ic.data.loaders("fashion-mnist", batch_size=64, val_batch_size=500)
    plain_train = ic.data.loaders("fashion-mnist", batch_size=64, augment=False)[0].dataset
    eval_dl = DataLoader(Subset(test_dl.dataset, range(a.eval_size)), batch_size=500)
    probe = probe_batches(plain_train, a.probe_seed)
    example = torch.rand(1, 1, 28, 28)
    base_per_class = per_class_top1(model, eval_dl, 10)
    base = sum(base_per_class) / 10
    groups = dependency_groups(model, example)
    criteria = a.criteria.split(",")
    runs, per_class = {}, {}
    for crit in criteria:
        t0 = time.perf_counter()
        res = prune_model(
            model,
            example,
            criterion=crit,
            target=Target(macs_reduction=a.level),
            data=probe,
            compensate=True,
            step_ratio=a.step_ratio,
            criterion_options={  # each criterion gets the options it takes
                k: v
                for k, v in {**options, "seed": a.probe_seed}.items()
                if k in criterion_spec(crit).options
            },
            round_to=a.round_to or None,
            refit_classifier=False,  # as the published numbers were measured
            progress=False,
        )
        runs[crit] = res.removed
        per_class[crit] = per_class_top1(res.model, eval_dl, 10)
        print(
            f"{crit}: whole model {sum(per_class[crit]) / 10:.4f} "
            f"(worst class {min(per_class[crit]):.3f}), {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    table = {}
    for key, members in groups.items():
        row = {"members": members}
        chosen = {c: sorted(runs[c].get(key, [])) for c in criteria}
        row["removed"] = {c: len(v) for c, v in chosen.items()}
        if not any(chosen.values()):
            continue
        if len(criteria) >= 2:
            s0, s1 = set(chosen[criteria[0]]), set(chosen[criteria[1]])
            row["jaccard"] = len(s0 & s1) / max(len(s0 | s1), 1)
        for c, idx in chosen.items():
            if not idx:
                row[c] = base
                continue
            m = prune_filters(
                copy.deepcopy(model), example, key, idx, compensate=True, data=probe, inplace=True
            ).model
            reestimate_batchnorm(m, probe, max_batches=20)
            row[c] = sum(per_class_top1(m, eval_dl, 10)) / 10
        table[key] = row
        print(
            f"{key:28s} n={row['removed']} jaccard={row.get('jaccard', 1.0):.2f} "
            + " ".join(f"{c}={row[c]:.4f}" for c in criteria),
            flush=True,
        )
    result = {
        "benchmark": f"diagnose_{a.model}",
        "command": command_line("diagnose_groups.py", a, skip=("out",)),
        "setup": {
            **vars(a),
            "eval": f"first {a.eval_size} test images, PyTorch CPU, balanced per-class mean",
        },
        "summary": {
            "unpruned": base,
            "unpruned_per_class": base_per_class,
            "groups": table,
            "per_class": per_class,
        },
    }
    out = Path(a.out) if a.out else Path(__file__).parent / "results" / f"diagnose_{a.model}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
