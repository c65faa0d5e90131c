"""The headline benchmark: every pruning criterion, with and without compensation, on Fashion-MNIST.

For each model and each of ``--bases`` independently trained baselines (tools/bench_fashion.py,
training seeds 0, 1, ..., cached), the baseline is fine-tuned for the same budget without and with
the interpretable filter loss (cached), the loss as the recipes apply it by default: on the top
layer (``layers="auto"``), masks and loss for the first half of the epochs, the second half with
the masks off and cross-entropy only. The baselines prune the model fine-tuned without the loss;
``icnn-cluster`` is reported from both (``icnn-cluster`` = from the model fine-tuned with the loss,
``icnn-cluster@plain`` = from the plain one; any ``<criterion>@icnn``, e.g. ``l2@icnn``, prunes the
model fine-tuned with the loss, to tell a fragile model from a poor ranking). Each row is pruned to
2x, 3x and 4x fewer MACs and measured:

* one-shot: pruned (compensated where ``+comp``), BatchNorm re-estimated on 20 batches, the
  classifier refit to the unpruned model's logits on 20 probe batches (``prune_model``'s default;
  ``--refit-teacher base``: to the base model's; ``--no-refit``: not), no training; over several
  seeds (probe subsets and the random criterion), mean and spread; also recorded before the
  BatchNorm re-estimation (seed 0) and before the refit (every seed), to show what each adds;
* recovered (not with ``--recover-steps 0``): each seed's one-shot model *before the classifier
  refit* (the recipes refit only when they do not recover) fine-tuned for the same short budget for
  everyone (``--recover-steps`` SGD steps, data order from the seed), distilled from the unpruned
  model it was pruned from unless ``--no-kd`` (as the recipes' recovery does by default;
  ``--kd-teacher base``: from the base model both fine-tunes started from); then, unless
  ``--no-refit``, the classifier refit on the recovered model (``recovered_then_refit``).

Means and spreads are over bases x seeds: a margin between two criteria that one base model gives
can flip on another, so rows carry every base's values.

Accuracy is top-1 of the exported ONNX model in ONNX Runtime (CPU) on the first ``--eval-size``
test images; the latency of the seed-0 one-shot model is measured in the same session (batch 1
and 32, median of ``--latency-repeats`` after 5 warm-up calls, ``--threads`` intra-op threads).
Results are cached per row in ``runs/bench_criteria/rows_<model>.json`` (re-runs resume, across
sessions) and written to tools/results/criteria.json and criteria.md. ``--worker K/N`` lets N
processes share one cache (each its own rows file; a fine-tune is trained once, the other workers
wait for it); a second run of the same worker on the same cache stops at once.

    .venv/bin/python tools/bench_criteria.py [--models vgg_small,resnet_cifar20] [--bases 2] [--seeds 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import baseline_path, command_line, exclusive, first_n_loader, log_to_stdout
from _common import frozen as frozen_params
from filelock import FileLock
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Subset

import icnn_compress as ic
from icnn_compress.export import export_onnx
from icnn_compress.io import atomic_save, atomic_write_json, environment_info
from icnn_compress.measure import ort_accuracy, ort_latency, ort_session
from icnn_compress.prune import Target, prune_model, reestimate_batchnorm, refit_classifier

CRITERIA = ["icnn-cluster", "icnn-cluster@plain", "l1", "l2", "fpgm", "taylor", "bn-scale", "lamp", "random"]
LEVELS = {"2x": 2.0, "3x": 3.0, "4x": 4.0}
COMPENSATION = {"both": (True, False), "on": (True,), "off": (False,)}  # --compensation -> rows
CACHE_VERSION = 5  # cached rows written by another version of this script are ignored


def onnx_eval(model: nn.Module, loader: DataLoader, threads: int, latency_repeats: int = 0) -> dict:
    """Top-1 of the exported model in ONNX Runtime (CPU) and, if ``latency_repeats``, its median
    latency in ms at batch 1 and 32."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.onnx"
        export_onnx(model.eval(), path, torch.rand(1, 1, 28, 28))
        sess = ort_session(path, provider="cpu", threads=threads)
        out = {"acc": ort_accuracy(sess, loader)}
        for b in (1, 32) if latency_repeats else ():
            out[f"latency_b{b}_ms"] = ort_latency(
                path, b, session=sess, warmup=5, repeats=latency_repeats, threads=threads
            ).median_ms
        return out


def onnx_acc(model: nn.Module, loader: DataLoader, threads: int) -> float:
    return onnx_eval(model, loader, threads)["acc"]


def finetune(
    model: nn.Module,
    train_dl,
    *,
    steps: int | None,
    epochs: int,
    lr: float,
    handle=None,
    seed: int = 0,
    distill=None,
    masked_epochs: int | None = None,
    frozen: list | None = None,
    device: str = "cpu",
) -> None:
    """The same short fine-tune for everyone (SGD, cosine). With an ICNN ``handle``: masks and loss
    for ``masked_epochs`` (``None``: the first half of the epochs), then the masks off and
    cross-entropy only (the recipes' ``icnn.unmask_epochs``); ``distill``: an ``ic.Distillation``
    (recovery); ``frozen``: parameters that do not train during the masked epochs; ``device``: where
    to train (float32, no AMP); the model is back on the CPU afterwards."""
    if steps is not None:
        train_dl = first_n_loader(train_dl, steps * train_dl.batch_size, train_dl.batch_size, seed)
    if handle is None:
        unmask = 0
    elif masked_epochs is None:
        unmask = epochs // 2 if epochs >= 2 else 0
    else:
        unmask = epochs - masked_epochs
    if epochs - unmask:
        with frozen_params(frozen):
            ic.Trainer(
                model,
                train_dl,
                epochs=epochs - unmask,
                lr=lr,
                extra_loss=handle.loss if handle else None,
                seed=seed,
                distill=distill,
                progress=False,
                device=device,
                amp=False,
            ).fit()
    if unmask:
        handle.set_masks(False)
        ic.Trainer(
            model, train_dl, epochs=unmask, lr=lr, seed=seed + 1, progress=False, device=device, amp=False
        ).fit()
    model.cpu()


def load_base(model_name: str, b: int, cache: Path, train_dl, a) -> dict[str, nn.Module]:
    """Base ``b`` (training seed ``b``, trained by bench_fashion.py if missing) fine-tuned without
    (``plain``) and with (``icnn``) the filter loss, both cached."""
    base_path = baseline_path(model_name, a.baseline_epochs, a.train_size, b)
    # workers (--worker) wait for each other here: the first to come trains, the others load
    with FileLock(f"{base_path}.wait.lock"):
        if not base_path.exists():
            cmd = [sys.executable, "tools/bench_fashion.py", "--model", model_name, "--seed", str(b)]
            cmd += ["--epochs", str(a.baseline_epochs), "--threads", str(a.threads), "--device", a.device]
            cmd += ["--train-size", str(a.train_size)] if a.train_size else []
            subprocess.run(cmd, check=True)
    variants = {}
    for variant in ("plain", "icnn"):
        path = cache / f"{model_name}_base{b}_{variant}.pt"
        model = ic.models.create(model_name, num_classes=10, in_channels=1, weights=str(base_path))
        handle = ic.attach_icnn(model, "auto", num_classes=10) if variant == "icnn" else None
        with FileLock(f"{path}.lock"):  # one worker trains, the others wait and load
            cached = path.exists()
            if not cached:
                finetune(
                    model,
                    train_dl,
                    steps=a.finetune_steps,
                    epochs=a.finetune_epochs,
                    lr=0.01,
                    handle=handle,
                    seed=b,
                    masked_epochs=a.masked_epochs,
                    device=a.device,
                )
            if handle is not None:
                handle.set_masks(False)
                handle.freeze()
            if cached:
                model.load_state_dict(torch.load(path, weights_only=True))
            else:
                atomic_save(model.state_dict(), path)
        variants[variant] = model.eval()
    if {"base", "auto"} & {a.kd_teacher, a.refit_teacher}:  # the model both fine-tunes started from
        variants["base"] = ic.models.create(
            model_name, num_classes=10, in_channels=1, weights=str(base_path)
        ).eval()
    return variants


TEACHER_WORDS = {
    "base": "base model",
    "unpruned": "unpruned model",
    "auto": "base model for rows that prune the loss model, the unpruned model for the others",
}


def teacher_kind(choice: str, with_loss: bool) -> str:
    """``"base"`` or ``"unpruned"``: what ``--kd-teacher`` / ``--refit-teacher`` ``choice`` means for a
    row that prunes the model fine-tuned with the loss (``with_loss``) or the plain one. ``auto`` is
    the recipes' default: the base model for the loss model, the unpruned model otherwise."""
    return "base" if choice == "base" or (choice == "auto" and with_loss) else "unpruned"


def run_row(
    variants: dict, crit: str, level: str, comp: bool, b: int, plain_train, train_dl, eval_dl, a
) -> dict:
    """One criterion at one level on one base: ``--seeds`` probe seeds, one-shot and recovered."""
    # icnn-cluster and any "<criterion>@icnn" prune the model fine-tuned with the loss
    with_loss = crit == "icnn-cluster" or crit.endswith("@icnn")
    source = variants["icnn" if with_loss else "plain"]
    oneshot, recovered, recovered_refit, pre_bn, pre_refit, stats, lat = [], [], [], None, [], None, {}
    refit_kind, kd_kind = (teacher_kind(choice, with_loss) for choice in (a.refit_teacher, a.kd_teacher))
    refit_to = variants["base"] if refit_kind == "base" else source  # whose logits the refit fits
    for seed in range(a.seeds):
        g = torch.Generator().manual_seed(1000 + 100 * b + seed)
        probe = DataLoader(
            plain_train, batch_size=64, sampler=RandomSampler(plain_train, num_samples=64 * 20, generator=g)
        )
        res = prune_model(
            source,
            torch.rand(1, 1, 28, 28),
            criterion=crit.split("@")[0],
            target=Target(macs_reduction=LEVELS[level]),
            data=probe,
            compensate=comp,
            bn_batches=0,
            probe_batches=a.probe_batches,
            criterion_options={"seed": seed} if crit == "random" else None,
            step_ratio=a.step_ratio,
            round_to=a.round_to or None,
            refit_classifier=False,  # below, after BatchNorm re-estimation, as prune_model does it
            progress=False,
        )
        if seed == 0:
            pre_bn = onnx_acc(res.model, eval_dl, a.threads)
            stats = res.summary()
        reestimate_batchnorm(res.model, probe, max_batches=20)
        # recovery starts from the model before the refit, as the recipes' recovery does
        start = copy.deepcopy(res.model) if a.recover_steps else None
        if not a.no_refit:
            pre_refit.append(onnx_acc(res.model, eval_dl, a.threads))
            refit_classifier(res.model, refit_to, probe, max_batches=20)
        ev = onnx_eval(res.model, eval_dl, a.threads, a.latency_repeats if seed == 0 else 0)
        oneshot.append(ev.pop("acc"))
        lat = lat or ev
        if a.recover_steps == 0:  # one-shot only
            continue
        teacher = variants["base"] if kd_kind == "base" else source
        distill = None if a.no_kd else ic.Distillation(ic.frozen_copy(teacher))
        finetune(
            start.train(),
            train_dl,
            steps=a.recover_steps,
            epochs=1,
            lr=0.01,
            seed=seed,
            distill=distill,
            device=a.device,
        )
        recovered.append(onnx_acc(start, eval_dl, a.threads))
        if not a.no_refit:  # the classifier refit after recovery, on the same probe
            refit_classifier(start, refit_to, probe, max_batches=20)
            recovered_refit.append(onnx_acc(start, eval_dl, a.threads))
    return {
        "oneshot": oneshot,
        "oneshot_mean": statistics.fmean(oneshot),
        "oneshot_std": statistics.pstdev(oneshot),
        "oneshot_before_bn": pre_bn,
        "oneshot_before_refit": pre_refit or None,
        "refit": not a.no_refit,
        "refit_teacher": refit_kind,
        "recovered": recovered or None,
        "recovered_mean": statistics.fmean(recovered) if recovered else None,
        "recovered_std": statistics.pstdev(recovered) if recovered else None,
        "recovered_then_refit": recovered_refit or None,
        "recovery": "plain" if a.no_kd else ("kd-base" if kd_kind == "base" else "kd"),
        **lat,
        **stats,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vgg_small,resnet_cifar20")
    p.add_argument("--criteria", default=",".join(CRITERIA))
    p.add_argument("--levels", default="2x,3x,4x")
    p.add_argument("--bases", type=int, default=2, help="independently trained baselines (seeds 0..)")
    p.add_argument("--seeds", type=int, default=2, help="probe seeds per base")
    p.add_argument("--baseline-epochs", type=int, default=6)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--finetune-steps", type=int, default=None, help="cap the fine-tune (quick runs)")
    p.add_argument(
        "--masked-epochs",
        type=int,
        default=None,
        help="fine-tune epochs with masks + loss (default: half); the rest without (use a new --cache)",
    )
    p.add_argument(
        "--compensation",
        choices=("both", "on", "off"),
        default="both",
        help="rows with compensation, without, or both (compensated first)",
    )
    p.add_argument("--recover-steps", type=int, default=150, help="0: one-shot rows only")
    p.add_argument(
        "--no-kd", action="store_true", help="recover without distillation from the unpruned model"
    )
    p.add_argument(
        "--kd-teacher",
        choices=("unpruned", "base", "auto"),
        default="unpruned",
        help="recovery distils from the unpruned model each row pruned (default) or from the base "
        "model both fine-tunes started from; auto: the base for rows that prune the loss model, the "
        "unpruned model for the others, as the recipes do (use a new --cache)",
    )
    p.add_argument(
        "--refit-teacher",
        choices=("unpruned", "base", "auto"),
        default="unpruned",
        help="the classifier refit fits the logits of the unpruned model each row pruned (default) or "
        "of the base model both fine-tunes started from; auto: as --kd-teacher auto (use a new --cache)",
    )
    p.add_argument(
        "--no-refit",
        action="store_true",
        help="one-shot rows without the classifier refit (as measured before it existed); a cached row "
        "measured the other way is measured again",
    )
    p.add_argument("--latency-repeats", type=int, default=30)
    p.add_argument("--train-size", type=int, default=None, help="baseline trained on a subset (quick runs)")
    p.add_argument("--eval-size", type=int, default=5000)
    p.add_argument("--probe-batches", type=int, default=8)
    p.add_argument("--step-ratio", type=float, default=0.1, help="channel ratio pruned per step")
    p.add_argument(
        "--round-to", type=int, default=8, help="widths multiples of this (prune_model's default); 0: free"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--device",
        default="cpu",
        help="where the base models, fine-tunes and recoveries train (cpu, cuda; float32, no AMP); "
        "pruning and ONNX measurements stay on the CPU",
    )
    p.add_argument("--cache", default="runs/bench_criteria")
    p.add_argument(
        "--note", default=None, help="a sentence kept in the results' setup (e.g. where each model trained)"
    )
    p.add_argument(
        "--worker",
        default=None,
        metavar="K/N",
        help="compute only every N-th row (cached or not), starting at the K-th (0-based), so that N "
        "processes share one --cache; fine-tunes are trained once, by whichever worker comes first",
    )
    p.add_argument("--write-only", action="store_true", help="only write the results of the cached rows")
    p.add_argument("--out-dir", default=None, help="where criteria.json/.md go (default tools/results)")
    a = p.parse_args()
    log_to_stdout()
    if a.masked_epochs is not None and not 1 <= a.masked_epochs <= a.finetune_epochs:
        p.error(
            f"--masked-epochs must be in [1, --finetune-epochs={a.finetune_epochs}]; got {a.masked_epochs}"
        )
    worker = parse_worker(p, a.worker)
    torch.set_num_threads(a.threads)
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    rows = load_rows(cache)
    if a.write_only:
        write_results(rows, a, Path(a.out_dir) if a.out_dir else None)
        return
    train_dl, test_dl = ic.data.loaders("fashion-mnist", batch_size=64, val_batch_size=500)
    eval_dl = DataLoader(Subset(test_dl.dataset, range(a.eval_size)), batch_size=500)
    # probe batches come from the training set, without augmentation-free guarantees: same as users
    plain_train = ic.data.loaders("fashion-mnist", batch_size=64, augment=False)[0].dataset
    t_start = time.perf_counter()
    for model_name in a.models.split(","):
        rows_file = cache / f"rows_{model_name}{worker_suffix(worker)}.json"
        with exclusive(rows_file.with_suffix(".lock")):
            run_model(model_name, rows, rows_file, worker, plain_train, train_dl, eval_dl, a, t_start)
    write_results(load_rows(cache), a, Path(a.out_dir) if a.out_dir else None)


def parse_worker(p: argparse.ArgumentParser, text: str | None) -> tuple[int, int]:
    """``--worker K/N`` as ``(K, N)``; ``(0, 1)`` without it."""
    if text is None:
        return 0, 1
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        k, n = -1, 0
    if not 0 <= k < n:
        p.error(f"--worker must be K/N with 0 <= K < N (e.g. 0/2); got {text!r}")
    return k, n


def worker_suffix(worker: tuple[int, int]) -> str:
    """Where a worker's rows go: ``rows_<model>.json`` alone, ``rows_<model>.w<K>of<N>.json`` as one of N."""
    k, n = worker
    return "" if n == 1 else f".w{k}of{n}"


def run_model(
    model_name: str,
    rows: dict,
    rows_file: Path,
    worker: tuple[int, int],
    plain_train,
    train_dl,
    eval_dl,
    a,
    t_start: float,
) -> None:
    """Every missing row of one model (its bases, fine-tunes and criteria rows) that falls to
    ``worker`` = (K, N), saved to ``rows_file`` as it goes. Worker K fine-tunes base K first."""
    k, n = worker
    order = [(k + i) % a.bases for i in range(a.bases)]
    loaded = {b: load_base(model_name, b, rows_file.parent, train_dl, a) for b in order}
    bases = [loaded[b] for b in range(a.bases)]
    for b, variants in enumerate(bases):
        key = f"{model_name}/base{b}/unpruned"
        if key not in rows:
            evals = {v: onnx_eval(m, eval_dl, a.threads, a.latency_repeats) for v, m in variants.items()}
            rows[key] = {v: e["acc"] for v, e in evals.items()}
            rows[key].update({k: v for k, v in evals["plain"].items() if k.startswith("latency")})
            save_rows(rows_file, model_name, rows)
        print(model_name, f"base{b}", "unpruned", rows[key], flush=True)
    index = -1  # of every row in the same order in every worker, cached or not
    # the compensated rows first (the ones the recipes use), all bases of a row together
    for comp in COMPENSATION[a.compensation]:
        for level in a.levels.split(","):
            for crit in a.criteria.split(","):
                name = crit + ("+comp" if comp else "")
                for b, variants in enumerate(bases):
                    key = f"{model_name}/base{b}/{level}/{name}"
                    index += 1
                    if index % n != k:  # another worker's row
                        continue
                    if key in rows and rows[key].get("refit", False) == (not a.no_refit):
                        continue
                    t0 = time.perf_counter()
                    rows[key] = run_row(variants, crit, level, comp, b, plain_train, train_dl, eval_dl, a)
                    rows[key]["seconds"] = time.perf_counter() - t0
                    save_rows(rows_file, model_name, rows)
                    r = rows[key]
                    print(
                        f"{key}: oneshot {r['oneshot_mean']:.4f}±{r['oneshot_std']:.4f} "
                        f"(before BN {r['oneshot_before_bn']:.4f}) "
                        f"recovered {r['recovered_mean'] or float('nan'):.4f} "
                        f"[{r['macs_reduction']:.2f}x, {time.perf_counter() - t0:.0f}s, "
                        f"total {time.perf_counter() - t_start:.0f}s]",
                        flush=True,
                    )


def load_rows(cache: Path) -> dict:
    """The cached rows of every model (one ``rows_<model>.json`` each, so that models can run in
    parallel processes); files written by another version of this script are ignored."""
    rows: dict = {}
    for path in sorted(cache.glob("rows_*.json")):
        data = json.loads(path.read_text())
        if data.pop("_version", None) != CACHE_VERSION:
            print(f"{path} was written by another version of this benchmark: ignored", flush=True)
            continue
        rows.update(data)
    return rows


def save_rows(rows_file: Path, model_name: str, rows: dict) -> None:
    """``model_name``'s rows into ``rows_file`` (atomically), with this script's cache version."""
    mine = {k: v for k, v in rows.items() if k.split("/")[0] == model_name}
    atomic_write_json({"_version": CACHE_VERSION, **mine}, rows_file)


def summarise(rows: dict, bases: int) -> dict:
    """``summary.<model>.<level>.<regime>.<criterion>``: mean over bases x seeds, ``<regime>_std``
    the spread over them, ``<regime>_base_means`` one mean per base, ``bases`` how many bases a row
    has (a row short of ``bases`` is marked ``partial``); ``unpruned``/``unpruned_icnn`` mean over
    the bases."""
    summary: dict = {}
    pooled: dict = {}
    for key, row in rows.items():
        model, _base, *rest = key.split("/")
        if rest == ["unpruned"]:
            pooled.setdefault((model, "unpruned"), []).append(row)
            continue
        pooled.setdefault((model, *rest), []).append(row)
    for key, group in pooled.items():
        model = key[0]
        if key[1] == "unpruned":
            top = summary.setdefault(model, {})
            top["unpruned"] = statistics.fmean(r["plain"] for r in group)
            top["unpruned_icnn"] = statistics.fmean(r["icnn"] for r in group)
            top["unpruned_bases"] = [{"plain": r["plain"], "icnn": r["icnn"]} for r in group]
            for k in ("latency_b1_ms", "latency_b32_ms"):
                if all(k in r for r in group):
                    top[f"unpruned_{k}"] = statistics.median(r[k] for r in group)
            continue
        level, name = key[1], key[2]
        lv = summary.setdefault(model, {}).setdefault(level, {})
        for field in ("oneshot", "recovered"):
            if not all(r.get(field) for r in group):  # recovered: not with --recover-steps 0
                continue
            values = [v for r in group for v in r[field]]
            lv.setdefault(field, {})[name] = statistics.fmean(values)
            lv.setdefault(f"{field}_std", {})[name] = statistics.pstdev(values)
            lv.setdefault(f"{field}_base_means", {})[name] = [r[f"{field}_mean"] for r in group]
        # one-shot before the classifier refit; recovered, then the classifier refit
        for field in ("oneshot_before_refit", "recovered_then_refit"):
            if all(r.get(field) for r in group):
                values = [v for r in group for v in r[field]]
                lv.setdefault(field, {})[name] = statistics.fmean(values)
                lv.setdefault(f"{field}_std", {})[name] = statistics.pstdev(values)
        lv.setdefault("bases", {})[name] = len(group)
        if len(group) < bases:
            lv.setdefault("partial", []).append(name)
        lv.setdefault("recovery", {})[name] = group[0].get("recovery", "plain")
        lv.setdefault("refit_teacher", {})[name] = group[0].get("refit_teacher", "unpruned")
        for k in ("latency_b1_ms", "latency_b32_ms", "macs_reduction"):
            if all(k in r for r in group):
                lv.setdefault(k, {})[name] = statistics.median(r[k] for r in group)
    return summary


def _named(key: str, a) -> bool:
    """Whether the row ``key`` (``model/base<b>/unpruned`` or ``model/base<b>/<level>/<criterion>``)
    is one that the options ``a`` ask for."""
    model, base, *rest = key.split("/")
    if model not in a.models.split(",") or int(base.removeprefix("base")) >= a.bases:
        return False
    if rest == ["unpruned"]:
        return True
    level, name = rest
    return (
        level in a.levels.split(",")
        and name.removesuffix("+comp") in a.criteria.split(",")
        and name.endswith("+comp") in COMPENSATION[a.compensation]
    )


def write_results(rows: dict, a, out_dir: Path | None = None) -> dict:
    """Write criteria.json (``summary.<model>.<level>.<regime>.<criterion>`` = mean top-1, with
    ``<regime>_std`` beside it) and criteria.md into ``out_dir`` (default tools/results), from the
    cached rows that the command names: its models, bases, levels and criteria (a cache can hold
    more, e.g. diagnostic rows of another run)."""
    out_dir = out_dir or Path(__file__).parent / "results"
    rows = {k: v for k, v in rows.items() if not k.startswith("_") and _named(k, a)}
    summary = summarise(rows, a.bases)
    result = {
        "benchmark": "criteria",
        "command": command_line("bench_criteria.py", a, skip=("write_only", "out_dir", "note")),
        "environment": environment_info(),
        "setup": {
            **vars(a),
            "dataset": "fashion-mnist",
            "eval": f"first {a.eval_size} test images, ONNX Runtime CPU provider, {a.threads} threads",
            "bn_reestimation_batches": 20,
            "probe": "20 batches of 64 training images per seed",
            "recovery": f"{a.recover_steps} SGD steps (batch 64, lr 0.01, cosine) per seed from the one-shot "
            "model before the classifier refit"
            + (
                "" if a.no_kd else f", distilled from the {TEACHER_WORDS[a.kd_teacher]} (KL, T=4, weight 0.5)"
            ),
            "finetune": f"{a.finetune_epochs} epochs; with the loss: layers='auto', masks and loss for "
            f"{a.masked_epochs or a.finetune_epochs - a.finetune_epochs // 2}, then masks off and "
            "cross-entropy only",
        },
        "bases": list(range(a.bases)),
        "seeds": list(range(a.seeds)),
        "rows": rows,
        "summary": summary,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(result, out_dir / "criteria.json")
    md = []
    for model, levels in summary.items():
        md.append(
            f"\n### {model} (unpruned {levels.get('unpruned', float('nan')):.4f}, "
            f"fine-tuned with the loss {levels.get('unpruned_icnn', float('nan')):.4f})\n"
        )
        regimes = ["oneshot", "recovered"]
        if any(levels.get(lv, {}).get("oneshot_before_refit") for lv in LEVELS):
            regimes.insert(0, "oneshot_before_refit")
        if any(levels.get(lv, {}).get("recovered_then_refit") for lv in LEVELS):
            regimes.append("recovered_then_refit")
        title = {"oneshot_before_refit": "one-shot, no refit", "oneshot": "one-shot"}
        title.update(recovered="recovered", recovered_then_refit="recovered + refit")
        md.append("| criterion | " + " | ".join(f"{lv} {title[r]}" for lv in LEVELS for r in regimes) + " |")
        md.append("|---|" + "---|" * (len(regimes) * len(LEVELS)))
        names = sorted({n for lv in LEVELS for n in levels.get(lv, {}).get("oneshot", {})})
        for n in names:
            cells = []
            for lv in LEVELS:
                s = levels.get(lv, {})
                mark = "*" if n in s.get("partial", []) else ""
                cells += [
                    f"{s[r][n]:.4f} ± {s[r + '_std'][n]:.4f}{mark}" if n in s.get(r, {}) else ""
                    for r in regimes
                ]
            md.append(f"| {n} | " + " | ".join(cells) + " |")
        md.append("\nMean ± std over bases x probe seeds; * = not every base measured yet.")
    (out_dir / "criteria.md").write_text("\n".join(md) + "\n")
    return result


if __name__ == "__main__":
    main()
