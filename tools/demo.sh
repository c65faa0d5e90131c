#!/usr/bin/env bash
# Create the environment (as tools/test.sh does) and run the quickstart recipe end to end:
# synthetic parts, fine-tune with the interpretable filter loss, analyse, prune 2x, recover,
# export to ONNX, measure in ONNX Runtime, report. Ends with where the report is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
exec .venv/bin/prune-recipe run quickstart --out "${OUT:-runs/quickstart}" --force "$@"
