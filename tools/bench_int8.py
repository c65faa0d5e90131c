"""INT8 after pruning: accuracy and ONNX Runtime latency of unpruned fp32, pruned fp32 and pruned INT8.

For each model: a Fashion-MNIST base (``--base-epochs`` epochs on the first ``--base-images``
training images, seed 0, cached under ``--cache``; ``--base-weights`` reuses a file trained the
same way), pruned with ``--criterion`` + compensation to each MACs level (default widths,
``round_to=8``), recovered with ``--recover-steps`` SGD steps distilled from the base, exported to
ONNX and quantized with ``icnn_compress.quantize.quantize_onnx`` (static QDQ, per-channel weights,
min-max calibration on 16 training batches, guard on the test set). Top-1 on the whole test set
(10,000 images) in ONNX Runtime; latency: medians of ``--repeats`` runs after ``--warmup`` at batch
1 and 32, ``--threads`` intra-op threads, CPU provider, all models timed in one process. Every
speedup is measured as a ratio with ``SpeedupTimer``: ``--rounds`` alternating rounds of the two
files, the median ratio (a VM that drifts between two timings taken minutes apart moves both).
Writes tools/results/int8.json with ``summary.<model>.<level>`` = {fp32_top1, int8_top1,
speedup_int8_over_fp32_b32, speedup_vs_unpruned_b32, ...}.

    .venv/bin/python tools/bench_int8.py [--models vgg_small,resnet_cifar20] [--levels 2,3,4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from _common import command_line, first_n_loader, log_to_stdout

import icnn_compress as ic
from icnn_compress.export import export_onnx
from icnn_compress.io import atomic_write_json, environment_info
from icnn_compress.measure import SpeedupTimer, model_stats, ort_accuracy, ort_latency, ort_session
from icnn_compress.prune import prune_model
from icnn_compress.quantize import QuantizeOptions, quantize_onnx, reduce_range_needed

RESULTS = Path(__file__).parent / "results"


def base_model(name: str, train_dl, a) -> tuple[torch.nn.Module, str]:
    """The cached (or freshly trained) Fashion-MNIST base and where its weights are."""
    model = ic.models.create(name, num_classes=10, in_channels=1)
    path = Path(a.base_weights.format(model=name)) if a.base_weights else Path(a.cache) / f"base_{name}.pt"
    if not path.is_file():
        dl = first_n_loader(train_dl, a.base_images, train_dl.batch_size, 0)
        ic.Trainer(model, dl, epochs=a.base_epochs, lr=0.05, seed=0, progress=False).fit()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval(), str(path)


def timed(path: Path, a) -> dict:
    sess = ort_session(path, provider="cpu", threads=a.threads)
    out = {}
    for b in (1, 32):
        s = ort_latency(path, b, session=sess, threads=a.threads, warmup=a.warmup, repeats=a.repeats)
        out[f"b{b}"] = s.to_dict()
    return out


def ratios(fp32: Path, unpruned: Path, files: dict, a) -> dict:
    """Speedups measured as ratios in alternating rounds (``SpeedupTimer``, medians of ``a.rounds``):
    INT8 (chosen mix, and every conv) over this float model at batch 32 and 1, and INT8 and this
    float model over the unpruned float model at batch 32."""
    kw = dict(threads=a.threads, rounds=a.rounds, warmup=a.warmup, repeats=20, stop_spread=None)
    example = torch.rand(1, 1, 28, 28)  # unused: every model here is a file
    own32 = SpeedupTimer(fp32, example, batch=32, **kw)
    out = {}
    if "int8" in files:
        int8 = files["int8"]
        out["int8_over_fp32_b32"] = own32.speedup(int8)
        out["int8_over_fp32_b1"] = SpeedupTimer(fp32, example, batch=1, **kw).speedup(int8)
        out["int8_over_unpruned_b32"] = SpeedupTimer(unpruned, example, batch=32, **kw).speedup(int8)
    if "int8_all" in files:
        out["int8_all_over_fp32_b32"] = own32.speedup(files["int8_all"])
    out["fp32_over_unpruned_b32"] = SpeedupTimer(unpruned, example, batch=32, **kw).speedup(fp32)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vgg_small,resnet_cifar20")
    p.add_argument("--levels", default="2,3,4")
    p.add_argument("--criterion", default="l2")
    p.add_argument("--base-epochs", type=int, default=4)
    p.add_argument("--base-images", type=int, default=20000)
    p.add_argument("--base-weights", default=None, help="weights file pattern with {model}, trained as above")
    p.add_argument("--cache", default="runs/bench_int8")
    p.add_argument("--recover-steps", type=int, default=150)
    p.add_argument("--method", default="minmax", choices=["minmax", "entropy", "percentile"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per measured speedup")
    p.add_argument("--out", default=str(RESULTS / "int8.json"))
    a = p.parse_args()
    log_to_stdout()
    torch.set_num_threads(a.threads)
    train_dl, val_dl = ic.data.loaders("fashion-mnist", batch_size=64, seed=0)
    example = torch.rand(1, 1, 28, 28)
    options = QuantizeOptions(method=a.method, timing_threads=a.threads)  # keep_float="auto"
    all_int8 = QuantizeOptions(method=a.method, keep_float="none")
    rows, summary, bases = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            base, bases[name] = base_model(name, train_dl, a)
            variants = [("1x", base, None)]
            for level in a.levels.split(","):
                torch.manual_seed(0)
                res = prune_model(
                    base,
                    example,
                    criterion=a.criterion,
                    target=float(level),
                    data=train_dl,
                    compensate=True,
                    step_ratio=0.05,
                    refit_classifier=False,  # as the published numbers were measured
                    progress=False,
                )
                pruned = res.model
                dl = first_n_loader(train_dl, a.recover_steps * 64, 64, 0)
                ic.Trainer(
                    pruned.train(),
                    dl,
                    epochs=1,
                    lr=0.01,
                    seed=0,
                    distill=ic.Distillation(ic.frozen_copy(base)),
                    progress=False,
                ).fit()
                variants.append((f"{level}x", pruned.eval(), res.macs_reduction))
            unpruned_fp32 = None  # the first variant's file
            for level, model, reduction in variants:
                fp32 = Path(tmp) / f"{name}_{level}.onnx"
                export_onnx(model, fp32, example)
                row = {
                    "model": name,
                    "level": level,
                    "macs_reduction": reduction,
                    **model_stats(model, example),
                }
                row["fp32"] = {"top1": ort_accuracy(fp32, val_dl, threads=a.threads), **timed(fp32, a)}
                files = {}  # the INT8 files the guard accepted
                for key, opts in (("int8", options), ("int8_all", all_int8)):
                    q = quantize_onnx(fp32, Path(tmp) / f"{name}_{level}.{key}.onnx", train_dl, val_dl, opts)
                    row[key] = {
                        "accepted": q.accepted,
                        "top1_agreement": q.top1_agreement,
                        "reason": q.reason,
                        "reduce_range": q.reduce_range,
                        "kept_float": q.kept_float,
                        "precision": q.precision,
                    }
                    if q.accepted:
                        row[key].update({"top1": q.int8_top1, **timed(Path(q.path), a)})
                        files[key] = q.path
                row["ratios"] = ratios(fp32, unpruned_fp32 or fp32, files, a)
                unpruned_fp32 = unpruned_fp32 or fp32
                rows.append(row)
                f = row["fp32"]
                msg = f"{name} {level}: fp32 top-1 {f['top1']:.4f} b32 {f['b32']['median_ms']:.2f} ms"
                for key in ("int8", "int8_all"):
                    if row[key]["accepted"]:
                        q = row[key]
                        msg += f"; {key} top-1 {q['top1']:.4f} b32 {q['b32']['median_ms']:.2f} ms"
                print(msg, flush=True)
            unpruned = rows[[r["model"] for r in rows].index(name)]
            summary[name] = {"unpruned_fp32_top1": unpruned["fp32"]["top1"]}
            if unpruned["int8"]["accepted"]:
                own = unpruned["ratios"]["int8_over_fp32_b32"]
                summary[name]["unpruned_speedup_int8_over_fp32_b32"] = own
            for r in rows:
                if r["model"] != name or r["level"] == "1x" or not r["int8"]["accepted"]:
                    continue
                f, q = r["fp32"], r["int8"]
                summary[name][r["level"]] = {
                    "macs_reduction": r["macs_reduction"],
                    "fp32_top1": f["top1"],
                    "int8_top1": q["top1"],
                    "top1_agreement": q["top1_agreement"],
                    "speedup_int8_over_fp32_b32": r["ratios"]["int8_over_fp32_b32"],
                    "speedup_int8_over_fp32_b1": r["ratios"]["int8_over_fp32_b1"],
                    "speedup_vs_unpruned_b32": r["ratios"]["int8_over_unpruned_b32"],
                    "speedup_fp32_vs_unpruned_b32": r["ratios"]["fp32_over_unpruned_b32"],
                    "int8_top1_vs_unpruned": q["top1"] - unpruned["fp32"]["top1"],
                    "kept_float_convs": len(q["kept_float"]),
                    "speedup_all_int8_over_fp32_b32": r["ratios"].get("int8_all_over_fp32_b32"),
                }
    targets = {
        "int8_top1_within_fp32": 0.005,
        "speedup_int8_over_fp32_b32": 1.8,
        "pruned_2x_int8_speedup_vs_unpruned_b32": 3.5,
        "pruned_2x_int8_top1_vs_unpruned": -0.01,
    }
    met = {}
    for name, s in summary.items():
        levels = [v for k, v in s.items() if isinstance(v, dict)]
        met[name] = {  # None where the guard refused every level (nothing to judge)
            "int8_top1_within_fp32": all(v["fp32_top1"] - v["int8_top1"] <= 0.005 for v in levels)
            if levels
            else None,
            "speedup_int8_over_fp32_b32": all(v["speedup_int8_over_fp32_b32"] >= 1.8 for v in levels)
            if levels
            else None,
            "pruned_2x": "2x" in s
            and s["2x"]["speedup_vs_unpruned_b32"] >= 3.5
            and s["2x"]["int8_top1_vs_unpruned"] >= -0.01,
            "median_speedup_int8_over_fp32_b32": statistics.median(
                v["speedup_int8_over_fp32_b32"] for v in levels
            )
            if levels
            else None,
        }
    result = {
        "benchmark": "int8",
        "command": command_line("bench_int8.py", a, skip=("out",)),
        "environment": environment_info(),
        "setup": {
            **vars(a),
            "bases": bases,
            "data": "Fashion-MNIST; top-1 on the 10,000 test images in ONNX Runtime (CPU)",
            "pruning": f"{a.criterion} + compensation, round_to=8 (default), step_ratio 0.05",
            "recovery": f"{a.recover_steps} SGD steps (batch 64, lr 0.01), distilled from the base",
            "quantization": "onnxruntime.quantization.quantize_static, QDQ, int8 weights per channel, "
            f"uint8 activations, {a.method} on 16 training batches; weights 7-bit where "
            f"reduce_range='auto' resolves so (x86 without VNNI; here: {reduce_range_needed()}); "
            "BN folded by the pre-processing; "
            "int8: keep_float='auto' (stages that make the model faster in float stay float, timed at "
            "batch 32), int8_all: every convolution quantized",
            "timing": f"ORT_ENABLE_ALL, sequential, intra_op {a.threads}, CPUExecutionProvider; ms columns: "
            f"median of {a.repeats} after {a.warmup} warm-up runs, each model on its own, one process; "
            f"speedups (x): SpeedupTimer, median ratio of {a.rounds} alternating rounds of 20 runs after "
            f"{a.warmup}, 0.1 s apart",
        },
        "rows": rows,
        "summary": {**summary, "targets": targets, "met": met},
    }
    atomic_write_json(result, a.out)
    print(met)


if __name__ == "__main__":
    main()
