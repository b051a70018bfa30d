#!/usr/bin/env bash
# Sets up .venv if needed, then runs the main demo (a spiking CNN trained on sklearn's digits).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export OMP_WAIT_POLICY=PASSIVE
.venv/bin/python examples/digits_demo.py "$@"
