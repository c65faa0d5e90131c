"""The HTML report in a real browser: headless Chromium loads it and every embedded image decodes;
a page with a broken image is caught. CI installs Debian's chromium (.ci/run)."""

import subprocess
import sys
from pathlib import Path

from icnn_compress.report import build_report, write_report

TOOL = Path(__file__).resolve().parents[2] / "tools" / "check_report_browser.py"


def _entry(name, per_class, latency_ms):
    return {
        "name": name,
        "onnx": f"{name}.onnx",
        "provider": "CPUExecutionProvider",
        "accuracy": sum(per_class) / len(per_class),
        "per_class_accuracy": per_class,
        "class_names": ["shirt", "coat", "bag"],
        "latency": {"32": {"median_ms": latency_ms}},
        "widths": {"conv1": 16 if name == "unpruned" else 8, "conv2": 32 if name == "unpruned" else 16},
    }


def _report(tmp_path: Path) -> Path:
    report = build_report([_entry("unpruned", [0.9, 0.9, 0.9], 10.0), _entry("pruned", [0.9, 0.3, 0.9], 5.0)])
    return write_report(report, tmp_path / "report", batch=32)["html"]


def _check(html: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), str(html), *extra], capture_output=True, text=True, timeout=180
    )


def test_report_loads_in_chromium_and_every_image_decodes(tmp_path):
    html = _report(tmp_path)
    shot = tmp_path / "shot.png"
    done = _check(html, "--screenshot", str(shot))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3/3 images decoded, 2 tables" in done.stdout  # figures: accuracy/latency, widths, per class
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_a_broken_image_is_reported(tmp_path):
    html = _report(tmp_path)
    page = html.read_text()
    start = page.index("data:image/png;base64,") + len("data:image/png;base64,")
    html.write_text(page[:start] + "AAAA" + page[start + 400 :])  # corrupt the first image
    done = _check(html)
    assert done.returncode == 1 and "2/3 images decoded" in done.stdout, done.stdout + done.stderr
