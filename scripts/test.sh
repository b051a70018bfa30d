#!/usr/bin/env bash
# Sets up .venv if needed, then runs ruff and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export OMP_WAIT_POLICY=PASSIVE
.venv/bin/ruff check snncompile tests examples benchmarks
.venv/bin/python -m pytest "$@"
