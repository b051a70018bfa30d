#!/usr/bin/env bash
# Creates .venv (once) with the CPU build of torch 2.13.0, snncompile in editable mode with its
# test extras, and SpikingJelly 2.0.0 as the differential-test oracle (installed --no-deps because
# its own requirements pull a multi-GB CUDA torch). Safe to re-run: a stamp file skips the work.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.snncompile-setup-v1
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pip install -q --no-deps "spikingjelly==2.0.0"
touch "$stamp"
