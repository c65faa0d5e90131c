#!/usr/bin/env bash
# Create the environment (as tools/test.sh does) and run the quickstart recipe end to end:
# synthetic parts, fine-tune with the interpretable filter loss, analyse, prune 2x, recover,
# export to ONNX, measure in ONNX Runtime, report. Ends with where the report is.
# Usage: tools/demo.sh [prune-recipe run options...]
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/_venv.sh
exec .venv/bin/prune-recipe run quickstart --out "${OUT:-runs/quickstart}" --force "$@"
