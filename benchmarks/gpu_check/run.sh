#!/usr/bin/env bash
# The GPU verification kit's one script, run ON THE GPU MACHINE from the repository root
# (README.md beside this file has the device-tool calls around it):
#
#     bash benchmarks/gpu_check/run.sh core [BUDGET_S]   # pycuda, kernels, executor, overlap, torch reference
#     bash benchmarks/gpu_check/run.sh stash             # keep a carried part: .carry/NN/* -> .stash/
#     bash benchmarks/gpu_check/run.sh full [BUDGET_S]   # DALI + polars: DALI GPU tests, engine run --device gpu, benchmark
#
# Steps run in order of what they tell us, each under min(its cap, time left of BUDGET_S)
# (default 540 s, so a call with timeout_s=600 still returns its files); a step that
# would get under 20 s is skipped and says so. Every call ends with a short table.
#
# Installs into .stash/site (inside the repo copy, git-ignored, never named in carry, so
# a warm machine keeps it between calls). Results go under $OUT (at most 8 files come
# back): summary.txt, run.log, env.txt, junit-*.xml, overlap.json, pycuda wheel (core);
# dali_check.json, bench.json (full).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT" .stash
SITE="$ROOT/.stash/site"
PY=${PY:-python3}
KIT=benchmarks/gpu_check
export PYTHONUNBUFFERED=1
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/run.log"
SUMMARY="$OUT/summary.txt"
STEPS="$OUT/.steps"
: >"$SUMMARY"
: >"$STEPS"
DEADLINE=$((SECONDS + ${2:-540}))

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME CAP_S CMD...: CMD under min(CAP_S, time left), output to the log; records
# ok / FAILED / TIMEOUT / SKIPPED and the seconds taken.
step() {
    local name=$1 cap=$2; shift 2
    local left=$((DEADLINE - SECONDS)) limit=$cap
    (( left < limit )) && limit=$left
    if (( limit < 20 )); then
        printf '%-24s %-18s %5s\n' "$name" "SKIPPED(no time)" "-" >>"$STEPS"
        return 99
    fi
    local start=$SECONDS rc status=ok
    echo "=== $name (${limit}s): $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    if (( rc == 124 )); then status="TIMEOUT(${limit}s)"; elif (( rc != 0 )); then status="FAILED(rc=$rc)"; fi
    printf '%-24s %-18s %5ds\n' "$name" "$status" "$((SECONDS - start))" >>"$STEPS"
    return "$rc"
}

env_info() {
    {
        date -u +%Y-%m-%dT%H:%M:%SZ
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
        "$PY" -c "import sys, torch, numpy, onnxruntime; print('python', sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__, 'ort', onnxruntime.__version__)" 2>&1
        nproc
        git log --oneline -1 2>&1
    } >"$OUT/env.txt"
    tee -a "$LOG" <"$OUT/env.txt"
}

pytest_gpu() {  # pytest_gpu NAME CAP_S PATHS...: the gpu-marked tests of PATHS, junit to $OUT
    local name=$1 cap=$2; shift 2
    step "$name" "$cap" "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$OUT/junit-$name.xml" "$@"
}

install_core() {
    local core=.stash/core
    [[ -d .carry/01/core ]] && { rm -rf "$core"; mv .carry/01/core "$core"; }
    [[ -d "$core" ]] || { note "core: no .carry/01/core or .stash/core (run pack.py here and carry .carry/01)"; return 1; }
    step pip_install_core 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" "$core"/*.whl || return 1
    if ! "$PY" -c "import pycuda" 2>/dev/null; then
        local sdist
        sdist=$(ls "$core"/pycuda-*.tar.gz 2>/dev/null | head -1)
        [[ -n "$sdist" ]] || { note "core: pycuda is neither a wheel nor an sdist in $core"; return 1; }
        step pycuda_build 240 "$PY" "$KIT/build_pycuda.py" "$sdist" "$OUT" || return 1
        step pycuda_install 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$SITE" "$OUT"/pycuda-*.whl || return 1
    fi
    step import_pycuda 30 "$PY" -c "import pycuda.driver as cu; cu.init(); d = cu.Device(0); \
print('pycuda', __import__('pycuda').VERSION_TEXT, d.name(), 'cc', d.compute_capability())"
}

# The tier that needs neither DALI nor polars.
core() {
    env_info
    stash >/dev/null  # keep the first part of the full pack that rode along with core
    if install_core; then
        pytest_gpu kernels 90 tests/kernels
        pytest_gpu executor 180 tests/engine/test_executor.py tests/engine/test_gpu_backends.py tests/engine/test_frames.py tests/benchmarks/test_machine.py
        step overlap 120 "$PY" "$KIT/overlap.py" "$OUT"
    else
        note "core: no pycuda, so no kernel, executor or overlap checks; the PyTorch reference still runs"
    fi
    rm -rf /tmp/gpu_ref  # a warm machine's earlier results must not come back as this call's
    step torch_reference 120 "$PY" -m benchmarks run --device cuda --pipeline reference --frames 16 --crops 16 \
        --batch-size 16 --repeats 3 --warmup-batches 1 --rounds 1 --workers 4 --no-plot --no-engine-run --out /tmp/gpu_ref
    [[ -f /tmp/gpu_ref/results.json ]] && cp /tmp/gpu_ref/results.json "$OUT/reference.json"
    table
}

stash() {
    local moved=0
    for d in .carry/*/; do
        [[ -d "$d" ]] || continue
        find "$d" -maxdepth 1 -type f -exec mv {} .stash/ \; && moved=1
    done
    ls -la .stash | tee -a "$SUMMARY"
    (( moved )) || note "stash: nothing under .carry/"
}

install_full() {
    stash >/dev/null
    if [[ ! -f .stash/full.ok ]]; then
        step unpack_full 90 "$PY" "$KIT/pack.py" unpack .stash "$SITE" || return 1
        touch .stash/full.ok
    fi
    "$PY" -c "import pycuda" 2>/dev/null || install_core || return 1
    step import_full 60 "$PY" -c "import nvidia.dali as d, polars as pl; \
print('dali', d.__version__, 'polars', pl.__version__)"
}

full() {
    env_info
    install_full || { table; return 1; }
    pytest_gpu dali 150 -s tests/engine/preprocess/test_dali_gpu.py
    pytest_gpu gpu_run 180 tests/engine/test_gpu_run.py
    step dali_throughput 60 "$PY" "$KIT/dali_check.py" "$OUT/dali_check.json"
    step bench_images 45 "$PY" -m benchmarks images --out /tmp/gpu_check_images --frames 192 --crops 192
    # `engine run` itself on the GPU path (PyTorch backend: no TensorRT here), twice:
    # the first run exports the random-weight models; the second is the figure.
    for pass in 1 2; do
        step "engine_run_gpu_$pass" 90 "$PY" -m engine run /tmp/gpu_check_images --device gpu \
            --gpu-backend torch --precision fp16 --random-weights --no-download --batch-size 32 \
            --no-progress --overwrite --cache-dir /tmp/gpu_check_cache --out /tmp/gpu_check_run.parquet
    done
    rm -rf /tmp/gpu_check_bench
    step benchmark 200 "$PY" -m benchmarks run --device cuda --frames 16 --crops 16 --batch-size 16 \
        --repeats 2 --warmup-batches 1 --rounds 1 --no-plot --out /tmp/gpu_check_bench
    [[ -f /tmp/gpu_check_bench/results.json ]] && cp /tmp/gpu_check_bench/results.json "$OUT/bench.json"
    table
}

table() {
    {
        echo
        echo "== gpu_check summary ($(head -2 "$OUT/env.txt" 2>/dev/null | tr '\n' ' '))"
        cat "$STEPS"
        grep -E '(passed|failed|skipped|error|deselected).* in [0-9.]+s' "$LOG" | tail -6
        grep -E '^(build_pycuda|full pack): built|^full pack:' "$LOG" | tail -2
        grep -E '^dali (cpu|gpu)' "$LOG" | tail -15
        grep -E '^overlap ' "$LOG" | tail -6
        grep -E '^(speed:|path:|executor )' "$LOG" | tail -4
    } | tee -a "$SUMMARY"
    rm -f "$STEPS"
}

case "${1:-}" in
    core) core ;;
    stash) stash ;;
    full) full ;;
    *) echo "usage: $0 core|stash|full [BUDGET_S]" >&2; exit 2 ;;
esac
