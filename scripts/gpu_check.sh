#!/usr/bin/env bash
# One-command check of snncompile's CUDA kernels on a CUDA machine without network access.
#
#   bash scripts/gpu_check.sh [--wheels DIR] [--full] [--cpu-dry-run]
#   bash scripts/gpu_check.sh --fetch-wheels [DIR]     (on a machine with the package registry)
#
# Steps, each under its own time limit inside an overall budget of 460 s (the whole check must end
# within 8 minutes), each guarded so that a failing step never stops the ones after it:
#   1. env      python/torch/CUDA/CuPy/Triton versions and the GPU (no GPU: the GPU steps are
#               skipped and the summary says so; exit status 2)
#   2. install  what is missing of SpikingJelly 2.0.0, snnTorch 1.0.0 and loguru, offline:
#               pip install --no-index --no-deps --find-links WHEELS --target $SITE
#   3. pytest   pytest -m cuda tests/test_cuda.py tests/test_time_chunks_bn_review.py (the neuron
#               grid vs torch on the GPU, modules, streams, torch.compile, compiled training steps
#               equal to eager; time chunks with training BatchNorm on GPU tensors)
#   4. bench    benchmarks/bench_neuron_kernels.py --device cuda --quick (snncompile vs
#               SpikingJelly's own GPU kernels vs snnTorch vs the torch loop, copy bandwidth)
#   5. summary  printed last, always (also after failures), and written to summary.txt
#
# Results go to $OUT when it is set (the device tool's folder), else $GPU_CHECK_OUT, else
# /tmp/snncompile_gpu_check: summary.txt env.txt install.log pytest.log junit.xml bench.log
# bench.json (7 files, no sub-folders).
#
# Wheels: --wheels DIR, else $SNNCOMPILE_WHEELS, else the first of .whl/ shared/wheels/ wheels/
# that holds a .whl file. Fetch them where the registry is reachable with --fetch-wheels (into
# .whl/, which it adds to .git/info/exclude), and carry that folder to the GPU machine.
# --full runs the full neuron grid (SNNCOMPILE_FULL_GRID=1; slower). --cpu-dry-run runs the same
# steps on the CPU (tests with SNNCOMPILE_CUDA_TESTS_DEVICE=cpu, the bench on the CPU without its
# CNN) to check this script and the tests' logic on a machine without a GPU.
# GPU_CHECK_FORCE_INSTALL=1 installs the wheels into $SITE even when the packages are importable
# (to check the offline install).
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1

BUDGET_S=460
START_S=$(date +%s)
WHEELS=${SNNCOMPILE_WHEELS:-}
FULL=0
DRY=0
FETCH=""

while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS=${2:-}; shift 2 ;;
        --full) FULL=1; shift ;;
        --cpu-dry-run) DRY=1; shift ;;
        --fetch-wheels) FETCH=${2:-.whl}; if [ $# -ge 2 ]; then shift 2; else shift; fi ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)"; exit 64 ;;
    esac
done

PACKAGES=("spikingjelly==2.0.0" "snntorch==1.0.0" "loguru")

pick_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    local p
    for p in python3 "$ROOT/.venv/bin/python" python; do
        if command -v "$p" >/dev/null 2>&1 && "$p" -c "import torch" >/dev/null 2>&1; then
            echo "$p"; return
        fi
    done
    echo python3
}
PY=$(pick_python)

if [ -n "$FETCH" ]; then
    # Where the package registry is reachable: download the pure-Python wheels to carry.
    mkdir -p "$FETCH"
    if [ -d .git ] || [ -f .git ]; then
        exclude=$(git rev-parse --git-path info/exclude 2>/dev/null)
        if [ -n "$exclude" ] && ! grep -qx "/${FETCH%/}/" "$exclude" 2>/dev/null; then
            echo "/${FETCH%/}/" >>"$exclude"
        fi
    fi
    "$PY" -m pip download --no-deps --only-binary=:all: -d "$FETCH" "${PACKAGES[@]}"
    rc=$?
    ls -l "$FETCH"
    exit $rc
fi

OUTDIR=${OUT:-${GPU_CHECK_OUT:-/tmp/snncompile_gpu_check}}
mkdir -p "$OUTDIR" || { echo "gpu_check: cannot create $OUTDIR"; exit 1; }
for f in summary.txt env.txt install.log pytest.log junit.xml bench.log bench.json; do
    rm -f "${OUTDIR:?}/$f"  # never report an earlier run's results as this one's
done
SITE=$(mktemp -d /tmp/snncompile_site.XXXXXX)
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
export SNNCOMPILE_CACHE_DIR=${SNNCOMPILE_CACHE_DIR:-/tmp/snncompile_cache}
[ "$FULL" = 1 ] && export SNNCOMPILE_FULL_GRID=1
if [ "$DRY" = 1 ]; then
    export SNNCOMPILE_CUDA_TESTS_DEVICE=cpu
fi

STEPS=()
GPU_OK=0
GPU_WHY="not checked"

elapsed() { echo $(($(date +%s) - START_S)); }

# run_step NAME MAX_SECONDS LOGFILE CMD...: runs CMD under a limit (its own or what is left of the
# budget), its output to the terminal and LOGFILE; records "NAME STATUS SECONDS".
run_step() {
    local name=$1 max=$2 log=$3
    shift 3
    local left=$((BUDGET_S - $(elapsed) - 15))
    local limit=$max
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        STEPS+=("$name SKIPPED(no-time-left) 0")
        echo "gpu_check: $name skipped: the ${BUDGET_S}s budget is spent" | tee -a "$log"
        return 124
    fi
    echo "== gpu_check: $name (limit ${limit}s) =="
    local t0 rc
    t0=$(date +%s)
    set -o pipefail
    if declare -F "$1" >/dev/null; then
        # A shell function: run it in a child bash (timeout runs programs, not functions), with
        # its definition and the variables it reads.
        timeout --kill-after=10 "$limit" bash -c \
            "$(declare -f "$1"); $(declare -p PY SITE WHEELS PACKAGES); GPU_CHECK_FORCE_INSTALL=${GPU_CHECK_FORCE_INSTALL:-0}; $*" 2>&1 | tee "$log"
    else
        timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
    fi
    rc=$?
    set +o pipefail
    local dt=$(($(date +%s) - t0))
    local status=PASS
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT(${limit}s)"
    elif [ "$rc" -ne 0 ]; then status="FAIL(rc=$rc)"; fi
    STEPS+=("$name $status $dt")
    return "$rc"
}

# shellcheck disable=SC2329  # invoked by the EXIT trap
summary() {
    local s="$OUTDIR/summary.txt"
    {
        echo "==================== snncompile gpu_check summary ===================="
        echo "when: $(date -u +%Y-%m-%dT%H:%M:%SZ)  total: $(elapsed)s (budget ${BUDGET_S}s)"
        echo "python: $PY"
        if [ "$DRY" = 1 ]; then echo "mode: --cpu-dry-run (no GPU used)"; fi
        if [ "$GPU_OK" = 1 ]; then echo "gpu: $GPU_WHY"; else echo "gpu: NO GPU: $GPU_WHY"; fi
        local row
        for row in "${STEPS[@]}"; do
            # shellcheck disable=SC2086
            set -- $row
            printf "  %-8s %-22s %5ss\n" "$1" "$2" "$3"
        done
        if [ -f "$OUTDIR/junit.xml" ]; then
            "$PY" - "$OUTDIR/junit.xml" <<'PYEOF' || echo "pytest: could not read junit.xml"
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
a = suite.attrib
print(f"pytest -m cuda: {a.get('tests')} tests, {a.get('failures')} failed, "
      f"{a.get('errors')} errors, {a.get('skipped')} skipped, {float(a.get('time', 0)):.0f}s")
PYEOF
        fi
        if [ -f "$OUTDIR/pytest.log" ]; then
            grep -E '^(FAILED|ERROR|XFAIL)' "$OUTDIR/pytest.log" | head -15 | cut -c1-220 \
                | sed 's/^/  /'
        fi
        if [ -f "$OUTDIR/bench.json" ]; then
            "$PY" - "$OUTDIR/bench.json" <<'PYEOF' || echo "bench: could not read bench.json"
import json, sys
r = json.load(open(sys.argv[1]))
print(f"bench: {r['device']}; copy bandwidth {r['copy_bandwidth_gb_s']:.0f} GB/s")
for c in r["cases"]:
    ms = c["ms"]
    peers = ", ".join(
        f"{n} {v['fwd_bwd']:.2f} ms ({c['ratio_vs_snncompile'][n]['fwd_bwd']:.1f}x)"
        for n, v in ms.items() if n != "snncompile"
    )
    pct = c["pct_of_copy_bandwidth"]
    print(f"  {c['case']}: snncompile fwd {ms['snncompile']['fwd']:.2f} ms, f+b "
          f"{ms['snncompile']['fwd_bwd']:.2f} ms = {pct['fwd_bwd']:.0f}% of copy bandwidth "
          f"(fwd {pct['fwd']:.0f}%); {peers}")
PYEOF
        fi
        echo "results: $OUTDIR"
        echo "======================================================================"
    } | tee "$s"
}
trap summary EXIT

# -- 1. environment -------------------------------------------------------------------------------
# shellcheck disable=SC2329  # invoked through run_step
env_probe() {
    "$PY" - <<'PYEOF'
import os, sys
print("python", sys.version.split()[0], sys.executable)
try:
    import torch
except Exception as exc:
    print("torch: not importable:", exc)
    sys.exit(3)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs")
for name in ("cupy", "triton", "torchvision", "spikingjelly", "snntorch", "loguru", "onnx"):
    try:
        mod = __import__(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as exc:
        print(name, "missing", type(exc).__name__)
from snncompile.runtime.fused_backends import unavailable_reason
why = unavailable_reason("cuda")
print("snncompile cuda backend:", "ready" if why is None else why)
sys.exit(0 if why is None else 2)
PYEOF
    local rc=$?
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L
    command -v g++ >/dev/null 2>&1 && g++ --version | head -1
    return "$rc"
}
run_step env 60 "$OUTDIR/env.txt" env_probe
env_rc=$?
if [ "$env_rc" -eq 2 ]; then STEPS[-1]="env NO-GPU ${STEPS[-1]##* }"; fi
if [ "$env_rc" -eq 0 ]; then
    GPU_OK=1
    GPU_WHY=$(grep -E '^device ' "$OUTDIR/env.txt" | head -1)
else
    GPU_WHY=$(grep -E '^snncompile cuda backend:|^torch: ' "$OUTDIR/env.txt" | head -1)
    [ -z "$GPU_WHY" ] && GPU_WHY="environment probe failed (rc=$env_rc), see env.txt"
fi

if [ "$GPU_OK" = 0 ] && [ "$DRY" = 0 ]; then
    echo "gpu_check: no usable CUDA GPU here ($GPU_WHY); the GPU steps are skipped."
    STEPS+=("install SKIPPED(no-GPU) 0" "pytest SKIPPED(no-GPU) 0" "bench SKIPPED(no-GPU) 0")
    exit 2
fi

# -- 2. offline install of what is missing ---------------------------------------------------------
# shellcheck disable=SC2329  # invoked through run_step
install_missing() {
    local missing=()
    local spec mod
    for spec in "${PACKAGES[@]}"; do
        mod=${spec%%==*}
        if [ "${GPU_CHECK_FORCE_INSTALL:-0}" = 1 ] || ! "$PY" -c "import $mod" >/dev/null 2>&1
        then
            missing+=("$spec")
        fi
    done
    if [ ${#missing[@]} -eq 0 ]; then echo "all of ${PACKAGES[*]} are importable"; return 0; fi
    echo "missing: ${missing[*]}"
    local dir=$WHEELS cand
    if [ -z "$dir" ]; then
        for cand in .whl shared/wheels wheels; do
            if compgen -G "$cand/*.whl" >/dev/null; then dir=$cand; break; fi
        done
    fi
    if [ -z "$dir" ] || ! compgen -G "$dir/*.whl" >/dev/null; then
        echo "no wheels found (looked in ${WHEELS:-.whl shared/wheels wheels}); on a machine with"
        echo "the registry run: bash scripts/gpu_check.sh --fetch-wheels  and carry .whl"
        echo "(the tests that need SpikingJelly skip; the bench leaves its peers out)"
        return 1
    fi
    echo "installing from $dir into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --find-links "$dir" --target "$SITE" "${missing[@]}"
    local rc=$?
    for spec in "${missing[@]}"; do
        mod=${spec%%==*}
        "$PY" -c "import $mod; print('$mod', getattr($mod, '__version__', '?'), 'from', $mod.__file__)" \
            || rc=1
    done
    return "$rc"
}
run_step install 60 "$OUTDIR/install.log" install_missing

# -- 3. the CUDA tests ---------------------------------------------------------------------------------
run_step pytest 250 "$OUTDIR/pytest.log" \
    "$PY" -m pytest -p no:cacheprovider -m cuda tests/test_cuda.py \
    tests/test_time_chunks_bn_review.py -rsxf \
    --junitxml="$OUTDIR/junit.xml"

# -- 4. the benchmark -------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
    BENCH=(--device cpu --quick --no-cnn)
else
    BENCH=(--device cuda --quick)
fi
run_step bench 150 "$OUTDIR/bench.log" \
    "$PY" benchmarks/bench_neuron_kernels.py "${BENCH[@]}" --json "$OUTDIR/bench.json"

failed=0
for row in "${STEPS[@]}"; do
    case "$row" in *" PASS "*) ;; "env NO-GPU "*) [ "$DRY" = 1 ] || failed=1 ;; *) failed=1 ;; esac
done
exit $failed
