#!/usr/bin/env bash
# Create .venv if missing, install icnn-compress with its test extra, lint, run the test suite.
# Usage: tools/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch/torchvision pinned to the builds available offline on this machine (see README)
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
.venv/bin/ruff check icnn_compress tests tools
exec .venv/bin/python -m pytest "$@"
