#!/usr/bin/env bash
# The one prepared command for a short GPU lease: at most ~9 minutes in all (TOTAL_S), headline figures
# first, every stage under its own limit and the whole under one deadline, so that a slow stage cannot eat
# the next and whatever was measured is under $OUT when the command stops.
#
#   bash bench/gpu_session.sh [all|tests|rehearse]
#
#   all       build abp._C for sm_90/sm_90a (falls back to the CPU ops if the CUDA build fails: the Triton
#             kernels need no extension, and every bench row names the backend that ran), then
#             1. headline bench: bf16 masked linear fwd+bwd at BERT-base shapes, 1k and 4k tokens, the v2 kernels
#                (1-bit mask) and v1 (fp32 scores) side by side against dense cuBLAS, the eager masked linear and
#                torch.compile; the ABP step of BERT-base at 8x128 on v2 (default) and v1;
#             2. where a masked linear's host time goes (bench/host_profile.py: per-call wall and synced time,
#                host-device syncs, the Python functions with the most own time; eager, v1, v2 and v2 with
#                ABP_BITMASK_OPERAND=a at BERT-base 768->3072, 1k tokens) into host_profile.md;
#             3. the GPU tests (kernels, extension, layers, opcheck);
#             4. the rest of the goal subset while time is left (v2 with the masked weight as the MMA's left
#                operand, ABP_BITMASK_OPERAND=a, at the headline shapes; forward only, LLaMA-7B shapes at 4k/16k
#                tokens with both v2 forms, 1-bit serving with both forms of the Triton kernel, one MiniLM serving
#                1/4/16 task masks, the ABP step at 32x128 and on MiniLM);
#             5. the markdown report of every row measured.
#   tests     build, then the GPU tests only (ABP_GPU_TESTS: pytest arguments, default the list below), for a
#             short second lease or a lease's remaining minutes.
#   rehearse  the same stages on CPU with tiny shapes and no build (the quick bench grid, one small test file):
#             proves the plumbing (limits, logs, result files, report) without a GPU; tests/test_gpu_session.py
#             runs it in the CPU suite.
#
# From the device tool, carrying the embedded model and the GLUE files that ../shared/tools/device-carry.sh
# prepares (the MiniLM rows of abp_step are recorded as skipped without them):
#   run(command="ABP_BENCH_COMMIT=<git rev-parse --short HEAD here> bash bench/gpu_session.sh", carry=[".carry"], timeout_s=600)
# Afterwards, here: copy $OUT/results/<device>/*.json into bench/results/<device>/, run
# `python bench/report.py` and update the README's table.
#
# What comes back is at most 8 files: session.log (every stage's output), tests.log, host_profile.md, report.md
# and the result JSON of each bench stage.
#
# torch.compile runs in its default mode here (ABP_BENCH_COMPILE_MODE overrides): max-autotune tunes every
# static shape anew, about a minute per shape, which this lease cannot hold for four shapes x two directions.
#
# Environment: OUT (default /tmp/abp-gpu-out), TOTAL_S (default 520), PYTHON (default python3: on the lent
# machines that is the one holding torch and Triton). Python runs with -P everywhere: the repository root on
# sys.path would put its kernels/ in the place of Hugging Face's `kernels` package, which transformers probes.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-all}
case "$MODE" in all|tests|rehearse) ;; *) echo "usage: $0 [all|tests|rehearse]" >&2; exit 2 ;; esac
OUT=${OUT:-/tmp/abp-gpu-out}
PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-520}
mkdir -p "$OUT/results"
LOG="$OUT/session.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 ABP_BENCH_RESULTS="$OUT/results"
export ABP_BENCH_COMMIT=${ABP_BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export ABP_BENCH_COMPILE_MODE=${ABP_BENCH_COMPILE_MODE:-default} ABP_BENCH_COMPILE_TOKENS=${ABP_BENCH_COMPILE_TOKENS:-1024,4096}
[ -d .carry/glue ] && export ABP_GLUE_DIR=${ABP_GLUE_DIR:-$PWD/.carry/glue}
[ -d .carry/minilm ] && export ABP_MODEL_DIR=${ABP_MODEL_DIR:-$PWD/.carry/minilm}
if [ "$MODE" = rehearse ]; then
  export ABP_BENCH_QUICK=1 TRITON_INTERPRET=${TRITON_INTERPRET:-1}
  QUICK_FLAG=--include-quick
fi
t0=$(date +%s)
deadline=$(( t0 + TOTAL_S ))
say() { echo "== gpu_session +$(( $(date +%s) - t0 ))s: $*" | tee -a "$LOG"; }
# limit WANTED: WANTED seconds, or what is left before the deadline (less a margin for the report)
limit() { local left=$(( deadline - $(date +%s) - 20 )); (( left < $1 )) && echo $(( left > 0 ? left : 1 )) || echo "$1"; }

build() {
  say "build: abp._C for sm_90/sm_90a, editable install (offline, no deps)"
  { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
    "$PY" -c 'import torch, triton, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__, "| transformers", transformers.__version__)'
  } 2>&1 | tee -a "$LOG"
  if [ "$MODE" = rehearse ]; then
    say "build: skipped (rehearsal: the checkout's installed abp is used)"
    return 0
  fi
  if ! ABP_CUDA_ARCHS=${ABP_CUDA_ARCHS:-90} ABP_REQUIRE_EXT=1 MAX_JOBS=${MAX_JOBS:-16} \
      timeout -k 10 "$(limit 200)" "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1; then
    tail -30 "$OUT/build.log" | tee -a "$LOG"
    say "build: CUDA extension FAILED; installing with the CPU ops only (ABP_SKIP_CUDA_BUILD=1), Triton still runs"
    ABP_SKIP_CUDA_BUILD=1 timeout -k 10 "$(limit 120)" "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e . \
      >>"$OUT/build.log" 2>&1 || { say "build: FAILED twice"; return 1; }
  fi
  rm -f "$OUT/build.log"
  "$PY" -P -m abp info 2>&1 | tee -a "$LOG"
}

# bench NAME WANTED_S KEXPR: one pytest session over bench/ (one result JSON), stopped by SIGINT at its limit
bench() {
  local name=$1 want=$2 kexpr=$3 lim
  lim=$(limit "$want")
  say "bench $name (limit ${lim}s): -k \"$kexpr\""
  timeout -s INT -k 30 "$lim" "$PY" -P -m pytest bench/ --import-mode=importlib -q -p no:cacheprovider \
    --benchmark-disable-gc -k "$kexpr" 2>&1 | grep -v "^bench/" | tail -25 | tee -a "$LOG"
  say "bench $name: exit ${PIPESTATUS[0]}"
}

gpu_tests() {
  local lim files
  lim=$(limit "${ABP_GPU_TEST_S:-120}")
  if [ "$MODE" = rehearse ]; then
    files=(tests/test_maskio.py -k "pack")
  elif [ -n "${ABP_GPU_TESTS:-}" ]; then
    read -r -a files <<<"$ABP_GPU_TESTS"
  else
    files=(tests/test_bitmask_kernels.py tests/test_triton_kernels.py tests/test_bits_path.py tests/test_csrc.py
           tests/test_functional.py tests/test_serving.py tests/test_maskio.py tests/test_patch.py -m "not slow")
  fi
  say "tests (limit ${lim}s): ${files[*]}"
  timeout -s INT -k 15 "$lim" "$PY" -P -m pytest --import-mode=importlib -q -p no:cacheprovider -rs \
    "${files[@]}" --durations=15 >"$OUT/tests.log" 2>&1
  local rc=$?
  tail -25 "$OUT/tests.log" | tee -a "$LOG"
  say "tests: exit $rc"
}

host_profile() {
  local lim args=()
  lim=$(limit 60)
  [ "$MODE" = rehearse ] && args=(--rehearse --calls 5)
  say "host profile (limit ${lim}s)"
  timeout -k 10 "$lim" "$PY" -P bench/host_profile.py --out "$OUT/host_profile.md" "${args[@]}" >>"$LOG" 2>&1
  local rc=$?
  head -12 "$OUT/host_profile.md" 2>/dev/null | tee -a "$LOG"
  say "host profile: exit $rc"
}

report() {
  say "report"
  "$PY" bench/report.py --markdown ${QUICK_FLAG:-} $(find "$OUT/results" -name "*.json" | sort) >"$OUT/report.md" 2>&1
  tail -60 "$OUT/report.md" | tee -a "$LOG"
}

if [ "$MODE" = rehearse ]; then
  HEADLINE="linear_fwd_bwd and not reference"
  MORE="(linear_fwd- or bitmask or multitask_serve) and not reference"
  STEP="abp_step and not reference"
else
  HEADLINE="not reference and not abp_v2_a and ((linear_fwd_bwd and bf16 and (t1024- or t4096-) and (768x768 or 768x3072 or 3072x768)) or (abp_step and bert-base and b8-s128))"
  MORE="not reference and ((abp_v2_a and linear_fwd_bwd and bf16 and (t1024- or t4096-) and (768x768 or 768x3072 or 3072x768)) or (linear_fwd- and bf16 and (t1024- or t4096-) and (768x3072 or 3072x768)) or (linear_fwd_bwd and bf16 and (t4096- or t16384-) and 4096x11008 and not compile) or (bitmask and bf16 and 4096x11008) or (multitask_serve and minilm))"
  STEP="not reference and abp_step and ((bert-base and b32-s128) or (minilm and b8-s128))"
fi

build || { say "no build, nothing to measure"; exit 1; }
if [ "$MODE" = tests ]; then
  gpu_tests
  say "done; files under $OUT: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
  exit 0
fi
bench headline 210 "$HEADLINE"
host_profile
gpu_tests
bench more 150 "$MORE"
bench step 90 "$STEP"
report
say "done; files under $OUT: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
