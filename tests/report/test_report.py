import json
from html.parser import HTMLParser

import torch
from torch import nn

from icnn_compress import models
from icnn_compress.export import export_onnx
from icnn_compress.measure import latency_guard, measure
from icnn_compress.prune import prune_model
from icnn_compress.report import SCHEMA_VERSION, build_report, write_report


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.srcs += [v for k, v in attrs if k in ("src", "href")]


def test_latency_guard():
    assert latency_guard(2.0, 1.02) is not None and "2.00x fewer MACs" in latency_guard(2.0, 1.02)
    assert latency_guard(2.0, 1.5) is None
    assert latency_guard(1.2, 1.0) is None


def test_report_json_html_markdown(tmp_path):
    base = models.create("resnet_cifar8", num_classes=3, in_channels=1).eval()
    pruned = prune_model(base, torch.rand(1, 1, 16, 16), target=2.0, round_to=4, progress=False).model.eval()
    data = [(torch.rand(4, 1, 16, 16), torch.randint(0, 3, (4,)))]
    entries = []
    for name, model in (("unpruned", base), ("l1-2x", pruned)):
        path = tmp_path / f"{name}.onnx"
        export_onnx(model, path, torch.rand(1, 1, 16, 16))
        entry = measure(
            path,
            data,
            name=name,
            batch_sizes=(1, 8),
            threads=1,
            provider="cpu",
            torch_model=model,
            example=torch.rand(1, 1, 16, 16),
            warmup=1,
            repeats=3,
        )
        entry["widths"] = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        entries.append(entry)
    picture = tmp_path / "gallery.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n")  # a stand-in analysis picture
    report = build_report(entries, speedup_batch=8)
    assert report["schema_version"] == SCHEMA_VERSION and report["baseline"] == "unpruned"
    assert report["models"][1]["macs_reduction"] >= 2.0
    paths = write_report(report, tmp_path / "report", analysis_pictures=[picture], batch=8)
    doc = json.loads(paths["json"].read_text())
    assert set(doc["figures"]) == {"accuracy_vs_latency", "layer_widths", "per_class_accuracy"}
    assert all(len(m["per_class_accuracy"]) == 3 == len(m["class_names"]) for m in doc["models"])
    for f in [*doc["figures"].values(), *doc["analysis_pictures"]]:
        assert (tmp_path / "report" / f).is_file()
    parser = _Collect()
    parser.feed(paths["html"].read_text())
    assert "table" in parser.tags and parser.srcs
    for src in parser.srcs:  # self-contained: every image is embedded, nothing points to a missing file
        assert src.startswith("data:image/png;base64,") or (tmp_path / "report" / src).is_file()
    md = paths["md"].read_text()
    assert "| l1-2x |" in md and "accuracy_vs_latency.png" in md


def _entry(name, per_class, latency_ms=10.0):
    acc = sum(per_class) / len(per_class)
    return {
        "name": name,
        "onnx": f"{name}.onnx",
        "provider": "CPUExecutionProvider",
        "accuracy": acc,
        "per_class_accuracy": per_class,
        "class_names": ["shirt", "coat", "bag"],
        "latency": {"32": {"median_ms": latency_ms}},
    }


def test_a_class_that_collapses_is_named_in_the_warnings_and_the_table(tmp_path):
    base = _entry("unpruned", [0.90, 0.90, 0.90])
    wiped = _entry("pruned", [0.88, 0.20, 0.89], latency_ms=5.0)
    even = _entry("even", [0.80, 0.80, 0.80], latency_ms=5.0)  # uniform loss: no class singled out
    report = build_report([base, wiped, even])
    pruned, uniform = report["models"][1], report["models"][2]
    assert [d["class"] for d in pruned["class_drops"]] == ["coat"]
    assert "coat (0.90 -> 0.20)" in pruned["warning"]
    assert "class_drops" not in uniform and "warning" not in uniform
    paths = write_report(report, tmp_path, batch=32)
    md = paths["md"].read_text()
    assert "## Accuracy per class" in md and "| coat | 0.9000 | 0.2000 | 0.8000 | -10.0 pt |" in md
    page = paths["html"].read_text()
    # the main table keeps one row per model; the per-class table follows with one row per class
    main = page.split("<table>")[1]
    assert main.count("<tr>") == 1 + 3 and "Accuracy per class" in page
    assert page.split("<table>")[2].count("<tr>") == 1 + 3


def test_an_int8_model_with_float_convolutions_says_so(tmp_path):
    base = _entry("unpruned", [0.9, 0.9, 0.9])
    mixed = {**_entry("pruned-int8", [0.9, 0.9, 0.9], latency_ms=4.0), "precision": "int8"}
    mixed["kept_float"] = ["/conv1/Conv", "/layer1/layer1.0/conv1/Conv"]
    full = {**_entry("all-int8", [0.9, 0.9, 0.9], latency_ms=5.0), "precision": "int8", "kept_float": []}
    paths = write_report(build_report([base, mixed, full]), tmp_path, batch=32)
    md = paths["md"].read_text()
    assert "| pruned-int8 | int8 (2 convs fp32) |" in md and "| all-int8 | int8 |" in md
    assert "int8 (2 convs fp32)" in paths["html"].read_text()


def test_an_int8_copy_that_is_not_faster_is_a_warning(tmp_path):
    base = _entry("unpruned", [0.9, 0.9, 0.9])
    pruned = {**_entry("pruned", [0.9, 0.9, 0.9], latency_ms=4.0), "precision": "fp32"}
    slow = {**_entry("pruned-int8", [0.9, 0.9, 0.9], latency_ms=3.9), "precision": "int8"}
    report = build_report([base, pruned, slow])
    assert (
        "The INT8 copy is not faster than its float model 'pruned' at batch 32"
        in report["models"][2]["warning"]
    )
    fast = {**slow, "latency": {"32": {"median_ms": 2.0}}}
    assert "warning" not in build_report([base, pruned, fast])["models"][2]
