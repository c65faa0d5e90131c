"""Open a run's report.html in a real browser (headless Chromium) and check it as a person sees it.

A copy of the page with a small script is loaded from a temporary folder: the script waits for the
page to load and writes into the DOM how many images there are and how many decoded (complete,
with a natural width > 0) and the number of tables. Chromium dumps the DOM, which this tool reads;
``--screenshot`` also saves what the page looks like. Exit status 0 when the page loaded and every
image decoded, 1 otherwise, 2 when no browser is found.

    apt-get install -y chromium          # Debian's package
    .venv/bin/python tools/check_report_browser.py runs/quickstart/report/report.html --screenshot shot.png
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const out = document.createElement('pre');
  out.id = 'icnn-browser-check';
  out.textContent = JSON.stringify({images: imgs.length, decoded: ok,
    tables: document.querySelectorAll('table').length, title: document.title});
  document.body.appendChild(out);
});
</script>"""
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> str | None:
    """The path of a Chromium-family browser on PATH, or ``None``."""
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def check_page(html_path: Path, screenshot: Path | None = None, timeout: float = 60.0) -> dict:
    """Load ``html_path`` in headless Chromium; returns ``{images, decoded, tables, title}``.
    Raises ``RuntimeError`` when no browser is found or the page did not report back."""
    browser = find_browser()
    if browser is None:
        raise RuntimeError(f"no browser found (looked for {', '.join(BROWSERS)}); apt-get install chromium")
    page = html_path.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "page.html"
        probe.write_text(page.replace("</body>", PROBE + "</body>", 1), encoding="utf-8")
        base = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp}/profile"]
        base += ["--virtual-time-budget=10000", "--hide-scrollbars"]
        dom = subprocess.run(
            [*base, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=timeout
        ).stdout
        if screenshot is not None:
            subprocess.run(
                [
                    *base,
                    f"--screenshot={screenshot.resolve()}",
                    "--window-size=1280,2400",
                    html_path.resolve().as_uri(),
                ],
                capture_output=True,
                timeout=timeout,
            )
    found = re.search(r'<pre id="icnn-browser-check">(.*?)</pre>', dom, re.S)
    if not found:
        raise RuntimeError(f"the page {html_path} did not finish loading in the browser")
    return json.loads(found.group(1).replace("&quot;", '"'))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("html", type=Path, help="a report.html")
    p.add_argument("--screenshot", type=Path, default=None, help="also save a PNG of the page")
    a = p.parse_args()
    if not a.html.is_file():
        print(f"error: {a.html} is not a file", file=sys.stderr)
        return 2
    try:
        result = check_page(a.html, a.screenshot)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ok = result["images"] == result["decoded"]
    print(
        f"{a.html}: {result['decoded']}/{result['images']} images decoded, {result['tables']} tables"
        + ("" if ok else " -- SOME IMAGES DID NOT DECODE")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
