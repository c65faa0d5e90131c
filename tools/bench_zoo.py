"""Model coverage: every torchvision CNN family pruned to 2x fewer MACs, exported and reloaded.

For each model (random init, ``--size`` px inputs, 10 classes) and each criterion (with
compensation): ``prune_model(..., target=2.0, compensate=True)`` on ``--probe-batches`` random
batches, ``export_onnx`` (checker + parity against PyTorch in ONNX Runtime), and
``save_pruned``/``load_pruned`` (the reloaded model must give the same outputs). Each case runs in
its own process, so ``peak_rss_mb`` is that case's peak resident memory. A model that cannot be
pruned is recorded with the one-line reason the library gives.
timm models (``timm:<name>``, the optional extra) are in the default list. Writes
tools/results/zoo.json with ``summary.<model>.<criterion>`` = {ok, macs_reduction, prune_s,
peak_rss_mb, prune_peak_rss_mb, parity, reason} (``prune_peak_rss_mb``: the peak up to the end of
pruning, before export and reload); a run of some models replaces only their rows.

    .venv/bin/python tools/bench_zoo.py [--models resnet18,...] [--criteria l2,icnn-cluster]
        [--readme docs/benchmarks.md]   # also writes tools/results/zoo.md (--write-only: just the table)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

from _common import command_line

RESULTS = Path(__file__).parent / "results"
FAMILIES = (
    "resnet18,resnet50,resnext50_32x4d,wide_resnet50_2,vgg11,vgg11_bn,alexnet,squeezenet1_0,densenet121,"
    "googlenet,inception_v3,mobilenet_v2,mobilenet_v3_small,efficientnet_b0,efficientnet_v2_s,"
    "regnet_x_400mf,shufflenet_v2_x0_5,mnasnet0_5,convnext_tiny"
)
# the common timm CNN families (random init; the optional extra icnn-compress[timm])
TIMM_FAMILIES = (
    "timm:resnet50,timm:efficientnet_b0,timm:convnext_nano,timm:regnety_002,timm:mobilenetv3_large_100,"
    "timm:cspdarknet53,timm:darknet53,timm:cspresnet50"
)
# inception_v3's stem needs at least 75 px; VGG and AlexNet end in an adaptive pool to 7x7 / 6x6
# that ONNX can only export when it divides the map, i.e. at 224 px
MIN_SIZE = {
    "inception_v3": 96,
    "alexnet": 224,
    **{f"vgg{d}{bn}": 224 for d in (11, 13, 16, 19) for bn in ("", "_bn")},
}


def case(name: str, criterion: str, size: int, probe_batches: int, threads: int) -> dict:
    """One model and criterion, in a fresh process."""
    import torch

    import icnn_compress as ic
    from icnn_compress.errors import IcnnCompressError
    from icnn_compress.prune import prune_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    size = max(size, MIN_SIZE.get(name, 0))
    model = ic.models.create(name, num_classes=10, in_channels=3).eval()
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.rand(8, 3, size, size, generator=g), torch.randint(0, 10, (8,), generator=g))
        for _ in range(probe_batches)
    ]
    example = torch.rand(1, 3, size, size, generator=g)
    row: dict = {"model": name, "criterion": criterion, "size": size}
    t0 = time.perf_counter()
    try:
        res = prune_model(
            model, example, criterion=criterion, target=2.0, data=data, compensate=True, progress=False
        )
    except IcnnCompressError as exc:
        row.update(ok=False, reason=str(exc), prune_s=time.perf_counter() - t0)
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return row
    row["prune_s"] = time.perf_counter() - t0
    # the peak so far: building the model and pruning it (export and reload come next)
    row["prune_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row["macs_reduction"] = res.macs_reduction
    pruned = res.model.eval()
    try:
        _export_and_reload(row, name, res, pruned, example, size)
    except Exception as exc:  # a failure is a row of the table, not the end of the benchmark
        row.update(ok=False, reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def _export_and_reload(row: dict, name: str, res, pruned, example, size: int) -> None:
    """Export (parity) and save/reload the pruned model; fills ``row``."""
    import torch

    from icnn_compress.export import export_onnx
    from icnn_compress.prune import load_pruned, save_pruned

    with tempfile.TemporaryDirectory() as tmp:
        exported = export_onnx(pruned, Path(tmp) / "m.onnx", example)
        row["parity"] = exported.max_abs_diff
        path = Path(tmp) / "m.pt"
        save_pruned(
            pruned,
            path,
            arch=name,
            history=res.history,
            input_shape=(3, size, size),
            arch_kwargs={"num_classes": 10, "in_channels": 3},
        )
        loaded, _ = load_pruned(path)
        with torch.no_grad():
            row["reload_max_diff"] = float((loaded.eval()(example) - pruned(example)).abs().max())
    row["ok"] = row["reload_max_diff"] < 1e-4 and res.macs_reduction >= 2.0


def _earlier(out: Path) -> tuple[list, dict]:
    """The rows and summary already in ``out``: a run of some models replaces only their rows
    (each row keeps the command that measured it)."""
    import json

    if not out.is_file():
        return [], {}
    try:
        old = json.loads(out.read_text())
    except ValueError:
        return [], {}
    if old.get("benchmark") != "zoo":
        return [], {}
    rows = [{"command": old.get("command"), **r} for r in old.get("rows", [])]
    return rows, dict(old.get("summary", {}))


def table(rows: list[dict], criteria: tuple[str, ...] = ("l2", "icnn-cluster")) -> str:
    """The coverage table (Markdown): one line per model, one cell per criterion."""
    by_model: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["criterion"]] = row
    head = "| model | input | " + " | ".join(f"`{c}` + compensation" for c in criteria) + " |"
    lines = [head, "|" + "---|" * (2 + len(criteria))]
    for model, cells in by_model.items():
        size = next((r["size"] for r in cells.values() if r.get("size")), None)
        shown = []
        for crit in criteria:
            r = cells.get(crit)
            if r is None:
                shown.append("not run")
            elif r.get("ok"):
                shown.append(
                    f"ok, {r['macs_reduction']:.2f}x, {r['prune_s']:.1f} s, "
                    f"{r['peak_rss_mb'] / 1024:.1f} GB{_pruning_peak(r)}, "
                    f"parity {r['parity']:.0e}"
                )
            else:
                reason = " ".join(str(r.get("reason", "")).split()).replace("|", "/")
                shown.append(f"**refused/failed**: {reason[:160]}")
        lines.append(f"| {model} | {size} px | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def _pruning_peak(row: dict) -> str:
    peak = row.get("prune_peak_rss_mb")
    return f" ({peak / 1024:.1f} GB to the end of pruning)" if peak else ""


def write_table(out: Path, readme: str | None) -> None:
    """``<name>.md`` beside ``out`` (``<name>.json``) and, with ``readme``, the block between
    ``<!-- <name>:start -->`` and ``<!-- <name>:end -->`` of that file."""
    import json

    text = table(json.loads(out.read_text())["rows"])
    out.with_suffix(".md").write_text(text)
    if readme:
        path = Path(readme)
        body = path.read_text()
        start, end = f"<!-- {out.stem}:start -->\n", f"<!-- {out.stem}:end -->"
        if start not in body or end not in body:
            raise SystemExit(f"{readme} has no {start.strip()} ... {end} block to replace")
        head, rest = body.split(start, 1)
        path.write_text(head + start + text + end + rest.split(end, 1)[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=f"{FAMILIES},{TIMM_FAMILIES}")
    p.add_argument("--criteria", default="l2,icnn-cluster")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--probe-batches", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "zoo.json"))
    p.add_argument("--write-only", action="store_true", help="only write the table from --out")
    p.add_argument("--readme", default=None, help="replace the zoo block of this file with the table")
    a = p.parse_args()
    from icnn_compress.io import atomic_write_json, environment_info

    if a.write_only:
        write_table(Path(a.out), a.readme)
        return

    rows, summary = _earlier(Path(a.out))
    command = command_line("bench_zoo.py", a, skip=("out",))
    ctx = mp.get_context("spawn")
    for name in a.models.split(","):
        for crit in a.criteria.split(","):
            with ctx.Pool(1, maxtasksperchild=1) as pool:
                try:
                    row = pool.apply(case, (name, crit, a.size, a.probe_batches, a.threads))
                except Exception as exc:  # a raw exception from a dependency: recorded as such
                    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                    row = {
                        "model": name,
                        "criterion": crit,
                        "ok": False,
                        "reason": f"{type(exc).__name__}: {first}",
                        "raw_exception": True,
                    }
            row["command"] = command
            rows = [r for r in rows if (r.get("model"), r.get("criterion")) != (name, crit)] + [row]
            summary.setdefault(name, {})[crit] = {
                k: row.get(k)
                for k in (
                    "ok",
                    "macs_reduction",
                    "prune_s",
                    "peak_rss_mb",
                    "prune_peak_rss_mb",
                    "parity",
                    "reason",
                )
            }
            if row["ok"]:
                shown = f"{row['macs_reduction']:.2f}x in {row['prune_s']:.1f} s, {row['peak_rss_mb']:.0f} MB"
            else:
                shown = row.get("reason", "")[:150]
            print(f"{name:<20} {crit:<13} {'ok ' if row['ok'] else 'NO '} {shown}", flush=True)
            atomic_write_json(
                {
                    "benchmark": "zoo",
                    "command": command,
                    "environment": environment_info(),
                    "setup": {
                        **vars(a),
                        "weights": "random init",
                        "target": "2x fewer MACs, compensation, default round_to=8",
                    },
                    "rows": rows,
                    "summary": summary,
                },
                a.out,
            )
    write_table(Path(a.out), a.readme)


if __name__ == "__main__":
    main()
