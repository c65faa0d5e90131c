"""Run reports: a versioned JSON document, a self-contained HTML page and a Markdown summary.

JSON schema (``schema_version`` 1):

    {
      "schema_version": 1,
      "title": str,
      "created": ISO 8601 UTC time,
      "producer": "icnn-compress <version>",
      "environment": {...},                 # machine, versions, threads (``_io.environment_info``)
      "baseline": name of the reference model or null,
      "models": [                           # one entry per measured model (``measure.measure``)
        {"name", "onnx", "file_bytes", "provider", "threads",
         "accuracy"?, "macs"?, "params"?,
         "per_class_accuracy"?: [float | null], "class_names"?: [str],   # top-1 per true class
         "latency": {"<batch>": LatencyStats}, "eager_latency": {"<batch>": LatencyStats},
         "widths"?: {"<conv>": int},        # output channels per conv layer
         "macs_reduction"?, "speedup_b<batch>"?, "warning"?,
         "class_drops"?: [{"class", "baseline", "accuracy", "drop"}]}  # classes that lost the most
      ],
      "removed_filters": [                  # filters of the analysed layers that pruning removed
        {"layer", "filter", "cluster"?, "category"?,
         "absorbed_by": [[kept filter, compensation coefficient, its cluster or null], ...]}
      ],
      "interpretability": [                 # the analysed layers (from the analysis stage)
        {"layer", "filters", "clusters", "ari"?,   # ARI of the clusters against the true parts
         "location_instability"?, "location_instability_floor"?, "location_instability_fixed"?,
         "part_interpretability"?}        # where the probe data has part annotations
      ],
      "figures": {"<name>": "<file name>"}, # PNGs written next to the report
      "analysis_pictures": ["<file name>"]  # copied from the analysis stage when given
    }
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import itertools
import os
import shutil
from pathlib import Path

from icnn_compress._io import atomic_write_bytes, atomic_write_json, environment_info
from icnn_compress._version import __version__
from icnn_compress.measure import latency_guard

__all__ = ["SCHEMA_VERSION", "build_report", "write_report"]

SCHEMA_VERSION = 1
REMOVED_TITLE = "Removed filters and the kept filters that absorbed them"
CLASS_DROP_WARN = 0.10  # a class that loses this much more top-1 than the model as a whole is named


def build_report(
    models: list[dict],
    *,
    title: str = "icnn-compress report",
    baseline: str | None = None,
    speedup_batch: int = 32,
    removed_filters: list[dict] | None = None,
    interpretability: list[dict] | None = None,
) -> dict:
    """Assemble the JSON document; adds MACs reduction, speedup and the latency guard per model
    relative to ``baseline`` (default: the first model). ``removed_filters``, ``interpretability``:
    see the schema."""
    if not models:
        raise ValueError("build_report needs at least one measured model.")
    base = next((m for m in models if m["name"] == baseline), models[0])
    out = []
    floats: dict | None = None  # the last float model before an INT8 one: the model it was made from
    for m in models:
        m = dict(m)
        b = str(speedup_batch)
        if m is not base and b in m.get("latency", {}) and b in base.get("latency", {}):
            m[f"speedup_b{b}"] = base["latency"][b]["median_ms"] / m["latency"][b]["median_ms"]
        if m.get("macs") and base.get("macs"):
            m["macs_reduction"] = base["macs"] / m["macs"]
        warning = latency_guard(m.get("macs_reduction"), m.get(f"speedup_b{b}"))
        if m is not base:
            drops = class_drops(base, m)
            if drops:
                m["class_drops"] = drops
                names = ", ".join(f"{d['class']} ({d['baseline']:.2f} -> {d['accuracy']:.2f})" for d in drops)
                line = f"Some classes lost much more accuracy than the model as a whole: {names}."
                warning = f"{warning} {line}" if warning else line
        if m.get("int8_refused"):
            line = f"No INT8 copy: {m['int8_refused']}."
            warning = f"{warning} {line}" if warning else line
        if m.get("precision") == "int8" and floats is not None:
            line = _int8_guard(floats, m, b)
            warning = f"{warning} {line}" if warning and line else (line or warning)
        elif m.get("precision", "fp32") == "fp32":
            floats = m
        if warning:
            m["warning"] = warning
        out.append(m)
    return {
        "schema_version": SCHEMA_VERSION,
        "title": title,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "producer": f"icnn-compress {__version__}",
        "environment": environment_info(),
        "baseline": base["name"],
        "models": out,
        "removed_filters": list(removed_filters or []),
        "interpretability": list(interpretability or []),
        "figures": {},
        "analysis_pictures": [],
    }


def class_drops(base: dict, model: dict, threshold: float = CLASS_DROP_WARN) -> list[dict]:
    """The classes whose top-1 fell by more than ``threshold`` beyond the model's overall drop
    (worst first), comparing per-class accuracies of ``base`` and ``model`` entries."""
    a, b = base.get("per_class_accuracy"), model.get("per_class_accuracy")
    if not a or not b or len(a) != len(b) or "accuracy" not in base or "accuracy" not in model:
        return []
    names = model.get("class_names") or [str(i) for i in range(len(b))]
    overall = base["accuracy"] - model["accuracy"]
    out = [
        {"class": names[i], "baseline": x, "accuracy": y, "drop": x - y}
        for i, (x, y) in enumerate(zip(a, b))
        if x is not None and y is not None and x - y > overall + threshold
    ]
    return sorted(out, key=lambda d: -d["drop"])


def _class_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-class accuracy table (one column per model with per-class data)."""
    models = [m for m in report["models"] if m.get("per_class_accuracy")]
    if not models:
        return [], []
    names = models[0].get("class_names") or [str(i) for i in range(len(models[0]["per_class_accuracy"]))]
    head = ["class", *(m["name"] for m in models)]
    if len(models) >= 2:
        head.append(f"change ({models[-1]['name']} - {models[0]['name']})")
    rows = []
    for i, name in enumerate(names):
        vals = [m["per_class_accuracy"][i] if i < len(m["per_class_accuracy"]) else None for m in models]
        row = [name, *("" if v is None else f"{v:.4f}" for v in vals)]
        if len(models) >= 2:
            first, last = vals[0], vals[-1]
            row.append("" if first is None or last is None else f"{100 * (last - first):+.1f} pt")
        rows.append(row)
    return head, rows


def _grouped_bars(
    plt, path: Path, labels: list[str], series: dict, ylabel: str, title: str, ylim=None
) -> None:
    """One bar per (label, series), the series side by side; saved as a PNG at ``path``."""
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(labels)), 3.5))
    step = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        ax.bar([i + k * step for i in range(len(labels))], values, width=step, label=name)
    ax.set_xticks([i + 0.4 - step / 2 for i in range(len(labels))], labels, rotation=60, fontsize=6)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


INTERPRETABILITY_TITLE = "Interpretability of the analysed layers"


def _interpretability_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the analysed layers' table; the localisation columns only where the
    probe had part annotations."""
    layers = report.get("interpretability", [])
    parts = any("location_instability" in r for r in layers)

    def num(v, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    head = ["layer", "filters", "clusters", "ARI of the clusters vs the true parts"]
    if parts:
        head += [
            "location instability (lower is better)",
            "ideal part detectors / a fixed position",
            "part interpretability",
        ]
    rows = []
    for r in layers:
        row = [r["layer"], str(r["filters"]), str(r["clusters"]), num(r.get("ari"), ".3f")]
        if parts:
            floor, fixed = r.get("location_instability_floor"), r.get("location_instability_fixed")
            row += [
                num(r.get("location_instability"), ".4f"),
                "" if floor is None or fixed is None else f"{floor:.4f} / {fixed:.4f}",
                num(r.get("part_interpretability"), ".3f"),
            ]
        rows.append(row)
    return head, rows


def _removed_table(report: dict, limit: int = 64) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the removed-filters table (at most ``limit`` rows)."""
    rows = []
    for r in report.get("removed_filters", [])[:limit]:
        absorbed = ", ".join(
            f"f{k} ({w:+.2f}" + (f", c{c}" if c is not None else "") + ")"
            for k, w, c in r.get("absorbed_by", [])
        )
        rows.append(
            [
                r["layer"],
                f"f{r['filter']}",
                "" if r.get("cluster") is None else f"c{r['cluster']}",
                "" if r.get("category") is None else str(r["category"]),
                absorbed or "(not compensated)",
            ]
        )
    return [
        "layer",
        "removed filter",
        "its cluster",
        "its category",
        "absorbed by (coefficient, cluster)",
    ], rows


def _figures(report: dict, out: Path, batch: int) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    pts = [
        (m["name"], m["latency"][str(batch)]["median_ms"], m["accuracy"])
        for m in report["models"]
        if "accuracy" in m and str(batch) in m.get("latency", {})
    ]
    if pts:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for name, lat, acc in pts:
            ax.scatter(lat, acc)
            ax.annotate(name, (lat, acc), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"ONNX Runtime latency, batch {batch} (ms, median)")
        ax.set_ylabel("top-1 accuracy")
        ax.set_title("accuracy vs latency", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "accuracy_vs_latency.png", dpi=90)
        plt.close(fig)
        figs["accuracy_vs_latency"] = "accuracy_vs_latency.png"
    widths = [m for m in report["models"] if m.get("widths")]
    if widths:
        layers = list(widths[0]["widths"])
        series = {m["name"]: [m["widths"].get(n, 0) for n in layers] for m in widths}
        _grouped_bars(plt, out / "layer_widths.png", layers, series, "output channels", "layer widths")
        figs["layer_widths"] = "layer_widths.png"
    per_class = [m for m in report["models"] if m.get("per_class_accuracy")]
    if per_class:
        k = len(per_class[0]["per_class_accuracy"])
        names = per_class[0].get("class_names") or [str(i) for i in range(k)]
        series = {m["name"]: [v or 0.0 for v in m["per_class_accuracy"][:k]] for m in per_class}
        path = out / "per_class_accuracy.png"
        _grouped_bars(plt, path, names, series, "top-1 of the class", "accuracy per class", ylim=(0, 1))
        figs["per_class_accuracy"] = "per_class_accuracy.png"
    return figs


def _int8_guard(fp32: dict, int8: dict, batch: str) -> str:
    """A warning when the INT8 copy is not at least 5% faster than its float model at ``batch``."""
    a = fp32.get("latency", {}).get(batch, {}).get("median_ms")
    q = int8.get("latency", {}).get(batch, {}).get("median_ms")
    if not a or not q or q < 0.95 * a:
        return ""
    return (
        f"The INT8 copy is not faster than its float model {fp32['name']!r} at batch {batch} "
        f"({q:.3g} ms against {a:.3g} ms): deploy the float model, or quantize with "
        "keep_float='auto' timed at your batch size."
    )


def _precision(entry: dict) -> str:
    """``fp32``, ``int8``, or ``int8 (N convs fp32)`` when the quantize stage left some in float."""
    kept = entry.get("kept_float") or []
    text = entry.get("precision", "fp32")
    return f"{text} ({len(kept)} convs fp32)" if kept else text


def _markdown(report: dict, batch: int) -> str:
    lines = [
        f"# {report['title']}",
        "",
        f"{report['producer']}, {report['created']}; baseline `{report['baseline']}`.",
        "",
        "| model | precision | accuracy | MACs | MACs reduction | "
        f"ORT latency b{batch} (ms) | speedup | provider |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in report["models"]:
        lat = m.get("latency", {}).get(str(batch), {}).get("median_ms")
        lines.append(
            f"| {m['name']} | {_precision(m)} | {m.get('accuracy', float('nan')):.4f} | "
            f"{m.get('macs', '')} | "
            f"{m.get('macs_reduction', 1.0):.2f}x | {lat if lat is None else f'{lat:.3f}'} | "
            f"{m.get(f'speedup_b{batch}', 1.0):.2f}x | {m['provider']} |"
        )
    warnings = [f"- **{m['name']}**: {m['warning']}" for m in report["models"] if m.get("warning")]
    if warnings:
        lines += ["", "## Warnings", "", *warnings]
    for title, (head, rows) in (
        ("Accuracy per class", _class_table(report)),
        (INTERPRETABILITY_TITLE, _interpretability_table(report)),
        (REMOVED_TITLE, _removed_table(report)),
    ):
        if rows:
            lines += ["", f"## {title}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
            lines += ["| " + " | ".join(r) + " |" for r in rows]
    for name, file in {**report["figures"], **{p: p for p in report["analysis_pictures"]}}.items():
        lines += ["", f"![{name}]({file})"]
    return "\n".join(lines) + "\n"


def _html_table(title: str, head: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return ""
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f"<h2>{html.escape(title)}</h2><table><tr>{header}</tr>{cells}</table>"


def _html(report: dict, md_table: str, out: Path) -> str:
    def img(file: str) -> str:
        data = base64.b64encode((out / file).read_bytes()).decode()
        return f'<img alt="{html.escape(file)}" src="data:image/png;base64,{data}">'

    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|")) + "</tr>"
        for line in itertools.takewhile(lambda t: t.startswith("| "), md_table.splitlines()[6:])
    )
    head = "".join(
        f"<th>{html.escape(c.strip())}</th>" for c in md_table.splitlines()[4].strip("|").split("|")
    )
    warnings = "".join(
        f"<li><b>{html.escape(m['name'])}</b>: {html.escape(m['warning'])}</li>"
        for m in report["models"]
        if m.get("warning")
    )
    figures = "".join(
        f"<figure>{img(f)}<figcaption>{html.escape(n)}</figcaption></figure>"
        for n, f in report["figures"].items()
    )
    class_table = _html_table("Accuracy per class", *_class_table(report))
    removed_table = _html_table(REMOVED_TITLE, *_removed_table(report))
    pictures = "".join(
        f"<figure>{img(p)}<figcaption>{html.escape(p)}</figcaption></figure>"
        for p in report["analysis_pictures"]
    )
    interpretability = _html_table(INTERPRETABILITY_TITLE, *_interpretability_table(report))
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(report['title'])}</title><style>body{{font-family:sans-serif;margin:2em}}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}img{max-width:100%}"
        f"</style></head><body><h1>{html.escape(report['title'])}</h1>"
        f"<p>{html.escape(report['producer'])}, {html.escape(report['created'])}; baseline "
        f"<code>{html.escape(report['baseline'])}</code>; schema version {report['schema_version']}.</p>"
        f"<table><tr>{head}</tr>{rows}</table>"
        + (f"<h2>Warnings</h2><ul>{warnings}</ul>" if warnings else "")
        + class_table
        + figures
        + interpretability
        + removed_table
        + (f"<h2>Filter analysis</h2>{pictures}" if pictures else "")
        + "</body></html>\n"
    )


def write_report(
    report: dict,
    out_dir: str | os.PathLike,
    *,
    analysis_pictures: list[str | os.PathLike] = (),
    batch: int = 32,
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and a self-contained ``report.html`` (figures embedded)
    with their PNG figures into ``out_dir``. Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(report)
    report["figures"] = _figures(report, out, batch)
    pics = []
    for p in analysis_pictures:
        p = Path(p)
        if p.is_file():
            if p.resolve() != (out / p.name).resolve():
                shutil.copyfile(p, out / p.name)
            pics.append(p.name)
    report["analysis_pictures"] = pics
    md = _markdown(report, batch)
    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    atomic_write_json(report, paths["json"])
    atomic_write_bytes(md.encode(), paths["md"])
    atomic_write_bytes(_html(report, md, out).encode(), paths["html"])
    return paths
