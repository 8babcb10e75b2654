#!/usr/bin/env bash
# One prepared GPU check for a short lease (one ~9-minute command): build abp._C for Hopper, run the
# GPU tests, then the benchmark subset that the issues' goals are judged on, and leave every log and
# result file under $OUT. Stages have their own time limits, so a slow stage cannot eat the next one;
# a stage stopped at its limit still writes what it measured (pytest gets SIGINT and writes its JSON).
#
#   bash bench/gpu_session.sh [all|build|test|bench|bench-full]      (default: all = build, test, bench)
#
# From the device tool, carrying the embedded model and the GLUE files that ../shared/tools/device-carry.sh
# prepares (the MiniLM rows of abp_step are recorded as skipped without them):
#   run(command="ABP_BENCH_COMMIT=<git rev-parse --short HEAD here> bash bench/gpu_session.sh", carry=[".carry"], timeout_s=600)
# (the copy sent there may have no .git; the commit is recorded in every result file).
# Afterwards, here: copy $OUT/results/<device>/*.json into bench/results/<device>/, run
# `python bench/report.py` and update the README's table.
#
# Environment: OUT (default /tmp/abp-gpu-out), ABP_GPU_TEST_S / ABP_GPU_BENCH_S (stage limits, seconds),
# PYTHON (default python3: on the lent machines that is the one holding torch and Triton).
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-all}
OUT=${OUT:-/tmp/abp-gpu-out}
PY=${PYTHON:-python3}
TEST_S=${ABP_GPU_TEST_S:-150}
BENCH_S=${ABP_GPU_BENCH_S:-290}
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1 ABP_BENCH_RESULTS="$OUT/results" ABP_BENCH_COMMIT=${ABP_BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
[ -d .carry/glue ] && export ABP_GLUE_DIR=${ABP_GLUE_DIR:-$PWD/.carry/glue}
[ -d .carry/minilm ] && export ABP_MODEL_DIR=${ABP_MODEL_DIR:-$PWD/.carry/minilm}
t0=$(date +%s)
say() { echo "== gpu_session +$(( $(date +%s) - t0 ))s: $*"; }

build() {
  say "build: abp._C for sm_90/sm_90a, editable install (offline, no deps)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
  "$PY" -c 'import torch, triton, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__, "| transformers", transformers.__version__)'
  if ! ABP_CUDA_ARCHS=${ABP_CUDA_ARCHS:-90} ABP_REQUIRE_EXT=1 MAX_JOBS=${MAX_JOBS:-16} \
      "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1; then
    tail -30 "$OUT/build.log"; say "build FAILED"; return 1
  fi
  "$PY" -m abp info 2>&1 | tee "$OUT/abp-info.txt"
}

gpu_tests() {
  say "test: kernels, extension, layers and a training step on CUDA (limit ${TEST_S}s)"
  timeout -s INT -k 15 "$TEST_S" "$PY" -m pytest --import-mode=importlib -q -p no:cacheprovider -x -rs \
    tests/test_triton_kernels.py tests/test_csrc.py tests/test_functional.py tests/test_serving.py tests/test_maskio.py \
    tests/test_patch.py \
    -m "not slow" --durations=15 2>&1 | tee "$OUT/tests.log" | tail -40
  say "test: exit ${PIPESTATUS[0]}"
}

bench() {
  # The goals: masked linear fwd+bwd in bf16 at BERT-base and LLaMA-7B shapes, 1k-16k tokens, against
  # cuBLAS (dense), eager and torch.compile; the ABP step at the paper's batch 8×128 and at 32×128;
  # 1-bit serving. compile (max-autotune) is timed at 1k tokens only (each static shape is tuned anew, about a
  # minute each); the reference backend is left out (it is eager by another name). bench-full runs the rest.
  say "bench: goal subset (limit ${BENCH_S}s)"
  ABP_BENCH_COMPILE_TOKENS=${ABP_BENCH_COMPILE_TOKENS:-1024} \
  timeout -s INT -k 30 "$BENCH_S" "$PY" -m pytest bench/ --import-mode=importlib -q -p no:cacheprovider \
    --benchmark-disable-gc -k "not reference and ((linear_fwd and bf16 and (t1024- or t4096- or t16384-) and (768x3072 or 3072x768 or 4096x11008)) or (abp_step and bert-base and s128) or (bitmask and bf16 and 4096x11008))" \
    2>&1 | tee "$OUT/bench.log" | grep -v "^bench/" | tail -25
  say "bench: exit ${PIPESTATUS[0]}"
  "$PY" bench/report.py --markdown $(find "$OUT/results" -name "*.json" | sort) 2>&1 | tee "$OUT/report.md" | tail -60
}

bench_full() {
  say "bench-full: the whole GPU grid (limit ${BENCH_S}s; split it with -k across calls)"
  timeout -s INT -k 30 "$BENCH_S" "$PY" -m pytest bench/ --import-mode=importlib -q -p no:cacheprovider ${ABP_BENCH_K:+-k "$ABP_BENCH_K"} \
    2>&1 | tee "$OUT/bench.log" | tail -25
  "$PY" bench/report.py --markdown $(find "$OUT/results" -name "*.json" | sort) 2>&1 | tee "$OUT/report.md" | tail -60
}

case "$STAGE" in
  build) build ;;
  test) build && gpu_tests ;;
  bench) build && bench ;;
  bench-full) build && bench_full ;;
  all) build && { gpu_tests; bench; } ;;
  *) echo "usage: $0 [all|build|test|bench|bench-full]" >&2; exit 2 ;;
esac
say "done; files under $OUT: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
