#!/usr/bin/env bash
# The GPU verification kit's one script, run ON THE GPU MACHINE from the repository root
# (see benchmarks/gpu_check/README.md for the device-tool calls around it):
#
#     bash benchmarks/gpu_check/run.sh install   # reassemble .stash/ parts, install wheels, build pycuda
#     bash benchmarks/gpu_check/run.sh tests     # pytest -m gpu (kernels, DALI GPU vs CPU, the rest)
#     bash benchmarks/gpu_check/run.sh measure   # DALI throughput, executor overlap, benchmark
#     bash benchmarks/gpu_check/run.sh check     # tests + measure (over 600 s worst case: use two calls)
# Each ends with a short table. One device call may run 600 s at most; the timeouts
# below keep install <= 550 s, tests <= 470 s, measure <= 545 s.
#
# Installs into .stash/site (inside the repo copy, git-ignored, never named in carry, so
# a warm machine keeps it between calls). Full results go under $OUT (at most 8 files
# come back): run.log, env.txt, pytest_gpu.xml, dali_check.json, overlap.json (if the
# executor provides its entry point), bench/results.json, bench/summary.md, summary.txt.
# THIS SCRIPT HAS NOT RUN YET (written on a machine without a GPU).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
SITE="$ROOT/.stash/site"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/run.log"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME TIMEOUT_S CMD...: runs CMD (output to the log), records ok/FAILED/TIMEOUT and the time.
step() {
    local name=$1 limit=$2; shift 2
    local start=$SECONDS rc
    echo "=== $name: $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    local took=$((SECONDS - start)) status=ok
    if (( rc == 124 )); then status="TIMEOUT(${limit}s)"; elif (( rc != 0 )); then status="FAILED(rc=$rc)"; fi
    printf '%-26s %-16s %5ds\n' "$name" "$status" "$took" >>"$OUT/.steps"
    return "$rc"
}

install() {
    mkdir -p .stash "$SITE"
    # Reassemble split files: NAME.part-00, NAME.part-01, ... -> NAME
    for first in .stash/*.part-00; do
        [[ -e "$first" ]] || continue
        whole=${first%.part-00}
        cat "$whole".part-* >"$whole.tmp" && mv "$whole.tmp" "$whole" && rm -f "$whole".part-*
        echo "reassembled $(basename "$whole") ($(stat -c %s "$whole") bytes)" | tee -a "$LOG"
    done
    step pip_install 150 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" .stash/*.whl || return 1
    # pycuda from its sdist with the machine's nvcc; setuptools, wheel and numpy are there.
    export CUDA_ROOT=${CUDA_ROOT:-$(dirname "$(dirname "$(command -v nvcc)")")}
    export MAKEFLAGS="-j$(nproc)"
    step pycuda_build 400 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
        --target "$SITE" .stash/pycuda-*.tar.gz || return 1
    step import_check 120 "$PY" -c "import nvidia.dali as d, polars as pl, pycuda.driver as cu, tqdm; \
cu.init(); print('dali', d.__version__, 'polars', pl.__version__, 'pycuda ok,', cu.Device(0).name())"
}

env_info() {
    {
        date -u +%Y-%m-%dT%H:%M:%SZ
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
        "$PY" -c "import torch, numpy, onnxruntime; print('torch', torch.__version__, 'numpy', numpy.__version__, 'ort', onnxruntime.__version__)" 2>&1
        "$PY" -c "import nvidia.dali as d; print('dali', d.__version__)" 2>&1
        git log --oneline -1 2>&1
    } >"$OUT/env.txt"
    tee -a "$LOG" <"$OUT/env.txt"
}

tests() {
    env_info
    # pytest -m gpu, in three parts whose union is the whole: the kernels, the DALI GPU
    # pipeline (-s prints its GPU vs CPU table), everything else.
    step pytest_kernels_gpu 120 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests/kernels
    step pytest_dali_gpu 150 "$PY" -m pytest -m gpu -q -s -rs -p no:cacheprovider \
        tests/engine/preprocess/test_dali_gpu.py --junitxml="$OUT/pytest_gpu.xml"
    step pytest_other_gpu 200 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests \
        --ignore=tests/kernels --ignore=tests/engine/preprocess/test_dali_gpu.py
}

measure() {
    env_info
    step dali_throughput 60 "$PY" benchmarks/gpu_check/dali_check.py "$OUT/dali_check.json"
    step executor_overlap 60 "$PY" benchmarks/gpu_check/overlap.py "$OUT"
    # `engine run` itself on the GPU path (PyTorch backend: no TensorRT here), twice:
    # the first run exports the random-weight models; the second is the figure.
    step bench_images 45 "$PY" -m benchmarks images --out /tmp/gpu_check_images --frames 192 --crops 192
    for pass in 1 2; do
        step "engine_run_gpu_$pass" 90 "$PY" -m engine.cli run /tmp/gpu_check_images --device gpu \
            --gpu-backend torch --precision fp16 --random-weights --no-download --batch-size 32 \
            --no-progress --overwrite --cache-dir /tmp/gpu_check_cache --out /tmp/gpu_check_run.parquet
    done
    rm -rf /tmp/gpu_check_bench
    step benchmark 200 "$PY" -m benchmarks run --device cuda --frames 16 --crops 16 --batch-size 16 \
        --repeats 2 --warmup-batches 1 --rounds 1 --no-plot --out /tmp/gpu_check_bench
    mkdir -p "$OUT/bench"
    for f in results.json summary.md; do
        [[ -f /tmp/gpu_check_bench/$f ]] && cp /tmp/gpu_check_bench/$f "$OUT/bench/"
    done
}

table() {
    {
        echo
        echo "== gpu_check summary ($(head -2 "$OUT/env.txt" 2>/dev/null | tr '\n' ' '))"
        [[ -f "$OUT/.steps" ]] && cat "$OUT/.steps"
        grep -E '(passed|failed|skipped|error|deselected).* in [0-9.]+s' "$LOG" | tail -5
        grep -E '^dali (cpu|gpu)' "$LOG" | tail -12
        grep -E '^overlap:' "$LOG" | tail -1
        grep -E '^(speed|path|executor) ' "$LOG" | tail -4
        [[ -f "$OUT/bench/summary.md" ]] && head -30 "$OUT/bench/summary.md"
    } | tee -a "$SUMMARY"
    rm -f "$OUT/.steps"
}

case "${1:-all}" in
    install) install; table ;;
    tests) tests; table ;;
    measure) measure; table ;;
    check) tests; measure; table ;;
    *) echo "usage: $0 install|tests|measure|check" >&2; exit 2 ;;
esac
