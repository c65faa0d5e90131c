"""Category-aware compression on Fashion-MNIST: specialise a model to the classes a deployment needs.

For each base model and each kept set of classes (``--kept``), at each MACs level, two ways to
reach the same MACs with compensation:

* ``category``: ``prune_model(..., keep_classes=kept)``: the head keeps the kept classes and the
  filters whose category is outside the kept set go first, in the criterion's order;
* ``relevance``: the same with ``keep_classes_mode="relevance"`` (each filter's score weighed by
  its response to the kept classes over its response to all);
* ``head+<criterion>``: the head restricted to the same classes, then ``<criterion>`` alone,
  ranked and compensated on the probe of every class;
* ``head+<criterion>@kept``: the same on the probe of the kept classes only;
* ``--modes`` entries ``<mode>:<criterion>`` run ``keep_classes`` with another criterion (e.g.
  ``criterion:taylor``: the kept classes' loss gradients through the restricted head), and
  ``full:<criterion>`` prunes the unrestricted model with it on every class, then restricts the
  head (the control: the same criterion without the kept classes).

``keep_classes`` ranks on the probe of every class (the categories need them all) and compensates
on its kept classes' images (``kept_class_batches``). Every model is measured one-shot
(BatchNorm re-estimated on the kept classes' probe images) and after ``--recover-steps`` SGD
steps (lr 0.01, cosine) on kept-class training images. Top-1 in PyTorch on every kept-class test
image. ``summary.<model>.<k>.<level>.<method>`` = {oneshot, recovered} mean
and std over bases x sets; ``tools/results/specialise.json``.

    .venv/bin/python tools/bench_specialise.py --weights runs/bench_icnn_cost/quick/base_vgg_small_s0.pt,...
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _common import command_line, log_to_stdout, top1
from torch.utils.data import DataLoader, RandomSampler

import icnn_compress as ic
from icnn_compress.data import ClassSubset
from icnn_compress.io import environment_info
from icnn_compress.prune import Target, criterion_spec, prune_model, reestimate_batchnorm, restrict_classifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vgg_small")
    p.add_argument("--weights", help="comma-separated state dicts, one per base model (required to run)")
    p.add_argument(
        "--kept",
        default="0,6;2,4;0,2,3,4,6;1,3,5,7,9",
        help="kept class sets, ';'-separated (default: the hardest pairs, T-shirt/shirt and "
        "pullover/coat, the five upper-body garments, and five easy classes)",
    )
    p.add_argument("--levels", default="2,4,8")
    p.add_argument("--criterion", default="l2")
    p.add_argument(
        "--modes",
        default="category,relevance",
        help="keep_classes_mode values to compare; <mode>:<criterion> with another criterion, "
        "full:<criterion> for that criterion on every class, then the head restricted",
    )
    p.add_argument("--recover-steps", type=int, default=100)
    p.add_argument("--step-ratio", type=float, default=0.1)
    p.add_argument(
        "--probe-seed",
        type=int,
        default=0,
        help="draw other probe images (0: the draw of the published tables); the spread over draws "
        "is part of a criterion's variance",
    )
    p.add_argument(
        "--criterion-options",
        type=json.loads,
        default={},
        help="JSON options for the keep_classes runs' criterion, where it takes them (e.g. "
        "'{\"residual\": false}': Fisher on the channels themselves, as table 8d was measured)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "specialise.json"))
    p.add_argument("--write-only", action="store_true", help="only rewrite the .md from the .json")
    p.add_argument(
        "--merge",
        help="comma-separated results of runs that differ only in --probe-seed: write them as one "
        "result (rows concatenated, gains paired within each run) to --out",
    )
    a = p.parse_args()
    log_to_stdout()
    if a.write_only:
        Path(a.out).with_suffix(".md").write_text(markdown(json.loads(Path(a.out).read_text())) + "\n")
        return
    if a.merge:
        merged = merge(a.merge.split(","))
        write(merged, merged["setup"]["model"], Path(a.out))
        return
    if not a.weights:
        p.error("--weights is required (unless --merge or --write-only)")
    torch.set_num_threads(a.threads)
    train_aug = ic.data.loaders("fashion-mnist", batch_size=64)[0].dataset
    train_plain, test = (d.dataset for d in ic.data.loaders("fashion-mnist", batch_size=64, augment=False))
    sets: dict[int, list[list[int]]] = {}
    for text in a.kept.split(";"):
        kept = sorted(int(c) for c in text.split(","))
        sets.setdefault(len(kept), []).append(kept)
    rows: dict = {}
    example = torch.rand(1, 1, 28, 28)
    # pruning and compensation read a probe of every class (the categories need them all); BatchNorm
    # re-estimation and recovery the kept classes only
    everything = list(
        DataLoader(
            train_plain,
            batch_size=64,
            sampler=RandomSampler(
                train_plain, num_samples=64 * 20, generator=torch.Generator().manual_seed(7 + a.probe_seed)
            ),
        )
    )
    for b, weights in enumerate(a.weights.split(",")):
        base = ic.models.create(a.model, num_classes=10, in_channels=1, weights=weights).eval()
        for k, kept_sets in sets.items():
            for kept in kept_sets:
                probe_ds, test_ds = ClassSubset(train_plain, kept), ClassSubset(test, kept)
                probe = list(
                    DataLoader(
                        probe_ds,
                        batch_size=64,
                        sampler=RandomSampler(
                            probe_ds,
                            num_samples=64 * 20,
                            generator=torch.Generator().manual_seed(b + 100 * a.probe_seed),
                        ),
                    )
                )
                test_dl = DataLoader(test_ds, batch_size=500)
                for level in a.levels.split(","):
                    heads = (f"head+{a.criterion}", f"head+{a.criterion}@kept")
                    for method in (*a.modes.split(","), *heads):
                        t0 = time.perf_counter()
                        mode, _, crit = method.partition(":")
                        common = dict(
                            target=Target(macs_reduction=float(level)),
                            compensate=True,
                            bn_batches=0,
                            step_ratio=a.step_ratio,
                            round_to=None,  # free widths, as when the published numbers were measured
                            refit_classifier=False,  # as the published numbers were measured
                            progress=False,
                        )
                        if mode == "full":  # the criterion on every class, the head restricted after
                            res = prune_model(base, example, criterion=crit, data=everything, **common)
                            res.model = restrict_classifier(res.model, kept)
                        elif not method.startswith("head+"):
                            takes = criterion_spec(crit or a.criterion).options
                            res = prune_model(
                                base,
                                example,
                                criterion=crit or a.criterion,
                                data=everything,
                                keep_classes=kept,
                                keep_classes_mode=mode,
                                criterion_options={
                                    k: v for k, v in a.criterion_options.items() if k in takes
                                },
                                **common,
                            )
                        else:
                            res = prune_model(
                                restrict_classifier(base, kept),
                                example,
                                criterion=a.criterion,
                                # @kept: ranked and compensated on the kept classes' images, as
                                # keep_classes compensates
                                data=probe if method.endswith("@kept") else everything,
                                **common,
                            )
                        reestimate_batchnorm(res.model, probe, max_batches=20)
                        oneshot = top1(res.model, test_dl)
                        train = DataLoader(
                            ClassSubset(train_aug, kept),
                            batch_size=64,
                            sampler=RandomSampler(
                                ClassSubset(train_aug, kept),
                                num_samples=64 * a.recover_steps,
                                generator=torch.Generator().manual_seed(100 + b),
                            ),
                        )
                        ic.Trainer(res.model.train(), train, epochs=1, lr=0.01, seed=b, progress=False).fit()
                        recovered = top1(res.model, test_dl)
                        row = rows.setdefault(f"{k}/{level}x/{method}", {"oneshot": [], "recovered": []})
                        row["oneshot"].append(oneshot)
                        row["recovered"].append(recovered)
                        print(
                            f"base{b} keep {kept} {level}x {method}: one-shot {oneshot:.4f} recovered "
                            f"{recovered:.4f} [{res.macs_reduction:.2f}x, {time.perf_counter() - t0:.0f} s]",
                            flush=True,
                        )
    result = {
        "benchmark": "specialise",
        "command": command_line("bench_specialise.py", a, skip=("out",)),
        "environment": environment_info(),
        "setup": {**vars(a), "kept_sets": sets, "eval": "every kept-class test image, PyTorch CPU"},
        "rows": rows,
    }
    write(result, a.model, Path(a.out))


def write(result: dict, model: str, out: Path) -> None:
    """Adds the summary (mean, std and paired gain per kept count, level and method) to ``result``
    and writes it as ``out`` (JSON) and its table beside it (``.md``)."""
    rows, summary = result["rows"], {}
    reference = f"head+{result['setup']['criterion']}"
    for key, row in rows.items():
        k, level, method = key.split("/")
        gain = {} if method == reference else paired(rows, key, reference)
        stats = {
            f"{r}_{f}": fn(row[r])
            for r in ("oneshot", "recovered")
            for f, fn in (("mean", statistics.fmean), ("std", statistics.pstdev))
        }
        stats.update({f"{r}_gain_over_head_points": g[0] for r, g in gain.items()})
        stats.update({f"{r}_gain_over_head_points_std": g[1] for r, g in gain.items()})
        summary.setdefault(k, {}).setdefault(level, {})[method] = stats
    for k, levels in summary.items():
        for level, methods in levels.items():
            print(k, level, {m: round(v["recovered_mean"], 4) for m, v in methods.items()})
    result["summary"] = {model: summary}
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result) + "\n")


def merge(paths: list[str]) -> dict:
    """One result from runs that differ only in ``--probe-seed``: each row's values concatenated
    (base-major within a run, runs in the given order); the setup records every seed."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    keys = (
        "model",
        "weights",
        "kept",
        "levels",
        "criterion",
        "recover_steps",
        "step_ratio",
        "criterion_options",
    )
    for path, run in zip(paths[1:], runs[1:]):
        for k in keys:
            if run["setup"].get(k) != runs[0]["setup"].get(k):
                raise SystemExit(f"--merge: {path} has another {k} ({run['setup'].get(k)!r}) than {paths[0]}")
    common = set.intersection(*(set(r["rows"]) for r in runs))
    rows = {
        key: {r: [v for run in runs for v in run["rows"][key][r]] for r in ("oneshot", "recovered")}
        for key in sorted(common)
    }
    seeds = [run["setup"].get("probe_seed", 0) for run in runs]
    setup = {**runs[0]["setup"], "probe_seed": seeds, "merged": list(paths)}
    command = " ".join(["python tools/bench_specialise.py --merge", ",".join(paths)])
    return {
        "benchmark": "specialise",
        "command": command,
        "environment": runs[0].get("environment"),
        "setup": setup,
        "rows": rows,
    }


def paired(rows: dict, key: str, reference: str) -> dict:
    """Points gained over ``reference`` at the same base, set and level (mean and std), per regime."""
    k, level, _ = key.split("/")
    ref = rows[f"{k}/{level}/{reference}"]
    out = {}
    for r in ("oneshot", "recovered"):
        diff = [100 * (x - y) for x, y in zip(rows[key][r], ref[r])]
        out[r] = (statistics.fmean(diff), statistics.pstdev(diff))
    return out


def markdown(result: dict) -> str:
    """Kept classes x level: each method's top-1 and its paired gain over head restriction."""
    rows, lines = result["rows"], []
    reference = f"head+{result['setup']['criterion']}"
    methods = sorted({k.split("/")[2] for k in rows} - {reference})
    draws = result["setup"].get("probe_seed", 0)
    over = (
        "bases x probe draws x kept sets"
        if isinstance(draws, list) and len(draws) > 1
        else "bases x kept sets"
    )
    lines += [
        f"Top-1 on the kept classes' test images, one-shot / recovered, mean over {over}; "
        f"in brackets the paired gain over `{reference}` at the same base, set and level (points, "
        "mean ± std).",
        "",
        f"| kept | level | {reference} | " + " | ".join(methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    keys = sorted({tuple(k.split("/")[:2]) for k in rows}, key=lambda t: (int(t[0]), float(t[1].rstrip("x"))))
    for k, level in keys:
        ref = rows[f"{k}/{level}/{reference}"]
        cells = [f"{statistics.fmean(ref['oneshot']):.4f} / {statistics.fmean(ref['recovered']):.4f}"]
        for m in methods:
            key = f"{k}/{level}/{m}"
            g = paired(rows, key, reference)
            one, rec = statistics.fmean(rows[key]["oneshot"]), statistics.fmean(rows[key]["recovered"])
            cells.append(
                f"{one:.4f} / {rec:.4f} ({g['oneshot'][0]:+.2f} ± {g['oneshot'][1]:.2f} / "
                f"{g['recovered'][0]:+.2f} ± {g['recovered'][1]:.2f})"
            )
        lines.append(f"| {k} | {level} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
