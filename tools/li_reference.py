"""How far the location-instability scores of the loss-cost benchmark are from what a layer can reach.

``analysis.location_instability_reference`` scores filters whose behaviour is known, on the same
synthetic-parts probe and layer as a measured row: ideal detectors of each part (at the unit of the
layer's map nearest to it) and a filter that always fires at the map's centre. For each measured
row of ``--variants`` in ``--results`` (files written by tools/bench_icnn_cost.py), this puts the
loss model's score, its plain reference, the ideal detectors' floor and the fixed position side
by side, with

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
from pathlib import Path

import torch
from _common import command_line
from torch.utils.data import DataLoader

import icnn_compress as ic
from icnn_compress.analysis import filter_signatures, location_instability_reference
from icnn_compress.io import atomic_write_json, environment_info

RESULTS = "tools/results/icnn_cost.json,tools/results/icnn_cost_gpu.json,tools/results/icnn_cost_s10.json"


def synthetic_seed(part: str) -> int:
    """The synthetic-parts seed of a rows' key part (``synthetic`` = 0, ``synthetic-s2`` = 2)."""
    return 0 if part == "synthetic" else int(part.removeprefix("synthetic-s"))


def reference(model_name: str, layers: list[str], setup: dict, seed: int, cache: dict) -> dict:
    """The reference scores of ``layers`` on the probe of synthetic seed ``seed``, averaged over the
    layers as the benchmark averages its scores."""
    key = (model_name, tuple(layers), setup["syn_classes"], setup["syn_size"], setup["syn_probe"], seed)
    if key not in cache:
        kw = dict(num_classes=setup["syn_classes"], image_size=setup["syn_size"], seed=seed)
        probe = ic.data.SyntheticParts("test", setup["syn_probe"], annotations=True, **kw)
        torch.manual_seed(0)
        model = ic.models.create(model_name, num_classes=setup["syn_classes"], in_channels=3).eval()
        sigs = filter_signatures(
            model, DataLoader(probe, batch_size=128), layers, num_classes=setup["syn_classes"], progress=False
        )
        refs = [location_instability_reference(sigs[n]) for n in layers]
        cache[key] = {k: statistics.fmean(r[k] for r in refs) for k in ("floor", "part_mean", "fixed")}
    return cache[key]


def mean_range(values: list[float]) -> dict:
    """``{"mean", "min", "max"}`` of ``values``."""
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=RESULTS, help="comma-separated bench_icnn_cost result files")
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
        for key, row in data["rows"].items():
            model_name, part, variant = key.split("/", 2)
            if not part.startswith("synthetic") or variant not in variants:
                continue
            epochs = variant.rsplit("@", 1)[1]
            plain = data["rows"].get(f"{model_name}/{part}/plain@{epochs}:{'-'.join(row['layers'])}")
            if plain is None:
                continue
            ref = reference(model_name, row["layers"], data["setup"], synthetic_seed(part), cache)
            loss_li, plain_li = row["location_instability"], plain["location_instability"]
            rows.append(
                {
                    "file": str(path),
                    "model": model_name,
                    "synthetic": part,
                    "variant": variant,
                    "layers": row["layers"],
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
    keys = ("loss", "plain", "ratio", "floor", "part_mean", "fixed", "best_ratio", "gap_closed")
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
