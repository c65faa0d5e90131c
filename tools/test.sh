#!/usr/bin/env bash
# Create .venv if missing, install icnn-compress with its test extra, lint, run the test suite.
# Usage: tools/test.sh [pytest args...]
# The tests run in one process per core (pytest-xdist; each worker uses one torch thread);
# TEST_WORKERS=0 (or -n 0) runs them in this process, e.g. to debug with --pdb.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/_venv.sh
.venv/bin/ruff check icnn_compress tests tools
exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-auto}" --dist worksteal "$@"
