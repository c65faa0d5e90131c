"""How far measured location-instability scores are from what their layer can reach.

``analysis.location_instability_reference`` scores filters whose behaviour is known, on the same
synthetic-parts probe and layer as a measured row: ideal detectors of each part (at the unit of the
layer's map nearest to it) and a filter that always fires at the map's centre. For each row of
``--variants`` in the tools/bench_icnn_cost.py files of ``--results``, and each layer of the
tools/bench_interpretability.py runs there, this puts the loss model's score, its plain reference,
the ideal detectors' floor and the fixed position side by side, with

* ``best_ratio`` = floor / plain: the lowest location-instability ratio any filters of that layer
  could reach against that plain model;
* ``gap_closed`` = (plain - loss) / (plain - floor): the share of the way from the plain model's
  score to the floor that the loss covers.

Only the architecture matters for the reference (receptive fields and map size), so no model is
trained here. Writes tools/results/li_reference.json (``summary.<model>.<variant>.<figure>`` = mean,
min and max over the rows: the results files and synthetic seeds) and prints one line per row.

    .venv/bin/python tools/li_reference.py [--results tools/results/icnn_cost_s10.json,...]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterator
from pathlib import Path

import torch
from _common import command_line, synthetic_seed
from torch.utils.data import DataLoader

import icnn_compress as ic
from icnn_compress.analysis import filter_signatures, location_instability_reference
from icnn_compress.io import atomic_write_json, environment_info

RESULTS = ",".join(
    f"tools/results/{name}.json"
    for name in (
        "icnn_cost",
        "icnn_cost_gpu",
        "icnn_cost_s10",
        "interpretability",
        "interpretability_hard",
        "interpretability_hard_s1",
        "interpretability_hard_s2",
    )
)


def reference(model_name: str, layers: list[str], probe_kw: dict, cache: dict) -> dict:
    """The reference scores of ``layers`` on the synthetic-parts test probe ``probe_kw`` (size,
    classes, image size, seed, difficulty), averaged over the layers as the benchmarks average."""
    key = (model_name, tuple(layers), tuple(sorted(probe_kw.items())))
    if key not in cache:
        kw = dict(probe_kw)
        probe = ic.data.SyntheticParts("test", kw.pop("size"), annotations=True, **kw)
        torch.manual_seed(0)
        model = ic.models.create(model_name, num_classes=kw["num_classes"], in_channels=3).eval()
        sigs = filter_signatures(
            model, DataLoader(probe, batch_size=128), layers, num_classes=kw["num_classes"], progress=False
        )
        refs = [location_instability_reference(sigs[n]) for n in layers]
        figures = ("floor", "part_mean", "floor_exact", "fixed")
        cache[key] = {k: statistics.fmean(r[k] for r in refs) for k in figures}
    return cache[key]


def measured_rows(data: dict, variants: list[str]) -> Iterator[tuple]:
    """``(model, probe, variant, layers, loss score, plain score, probe_kw)`` of every row of a
    results file: bench_icnn_cost's rows of ``variants`` that have a plain reference, or each layer
    of a bench_interpretability run (variant ``interpretability-<difficulty>:<layer>``)."""
    if data.get("benchmark") == "interpretability":
        setup = data["setup"]
        kw = dict(size=setup["probe_size"], num_classes=setup["classes"], image_size=setup["image_size"])
        kw |= dict(seed=setup["seed"], difficulty=setup.get("difficulty", "easy"))
        difficulty = kw["difficulty"]
        for layer, row in data["results"]["icnn"]["layers"].items():
            plain = data["results"]["plain"]["layers"][layer]["location_instability"]
            yield (
                setup["model"],
                f"synthetic-{difficulty}-{setup['image_size']}px-s{setup['seed']}",
                f"interpretability-{difficulty}:{layer}",
                [layer],
                row["location_instability"],
                plain,
                kw,
            )
        return
    setup = data["setup"]
    for key, row in data["rows"].items():
        model_name, part, variant = key.split("/", 2)
        if not part.startswith("synthetic") or variant not in variants:
            continue
        epochs = variant.rsplit("@", 1)[1]
        plain = data["rows"].get(f"{model_name}/{part}/plain@{epochs}:{'-'.join(row['layers'])}")
        if plain is None:
            continue
        kw = dict(size=setup["syn_probe"], num_classes=setup["syn_classes"], image_size=setup["syn_size"])
        kw["seed"] = synthetic_seed(part)
        yield (
            model_name,
            part,
            variant,
            row["layers"],
            row["location_instability"],
            plain["location_instability"],
            kw,
        )


def mean_range(values: list[float]) -> dict:
    """``{"mean", "min", "max"}`` of ``values``."""
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--results",
        default=RESULTS,
        help="comma-separated result files of bench_icnn_cost.py (rows of --variants) or "
        "bench_interpretability.py (every layer)",
    )
    p.add_argument("--variants", default="top1+unmask-ce@e3,top1@e1", help="the loss variants to place")
    p.add_argument("--out", default="tools/results/li_reference.json")
    a = p.parse_args()
    files = [Path(f) for f in a.results.split(",")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"--results: no such file: {', '.join(missing)}")
    variants = a.variants.split(",")
    rows, cache = [], {}
    for path in files:
        data = json.loads(path.read_text())
        for model_name, part, variant, layers, loss_li, plain_li, probe_kw in measured_rows(data, variants):
            ref = reference(model_name, layers, probe_kw, cache)
            rows.append(
                {
                    "file": str(path),
                    "model": model_name,
                    "synthetic": part,
                    "variant": variant,
                    "layers": layers,
                    "loss": loss_li,
                    "plain": plain_li,
                    "ratio": loss_li / plain_li,
                    **ref,
                    "best_ratio": ref["floor"] / plain_li,
                    "gap_closed": (plain_li - loss_li) / (plain_li - ref["floor"]),
                }
            )
            r = rows[-1]
            print(
                f"{path.name} {model_name} {part} {variant}: loss {loss_li:.4f}, plain {plain_li:.4f} "
                f"(ratio {r['ratio']:.3f}); floor {r['floor']:.4f}, fixed {r['fixed']:.4f}; "
                f"best ratio {r['best_ratio']:.3f}, gap closed {r['gap_closed']:.2f}",
                flush=True,
            )
    if not rows:
        raise SystemExit(f"no rows of {a.variants} with a plain reference in {a.results}")
    summary: dict = {}
    for r in rows:
        summary.setdefault(r["model"], {}).setdefault(r["variant"], []).append(r)
    keys = (
        "loss",
        "plain",
        "ratio",
        "floor",
        "part_mean",
        "floor_exact",
        "fixed",
        "best_ratio",
        "gap_closed",
    )
    for by_variant in summary.values():
        for variant, mine in by_variant.items():
            by_variant[variant] = {k: mean_range([r[k] for r in mine]) for k in keys} | {"n": len(mine)}
    atomic_write_json(
        {
            "benchmark": "li_reference",
            "command": command_line("li_reference.py", a),
            "environment": environment_info(),
            "rows": rows,
            "summary": summary,
        },
        Path(a.out),
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
