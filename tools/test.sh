#!/usr/bin/env bash
# Create .venv if missing, install icnn-compress with its test extra, lint, run the test suite.
# Usage: tools/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/_venv.sh
.venv/bin/ruff check icnn_compress tests tools
exec .venv/bin/python -m pytest "$@"
