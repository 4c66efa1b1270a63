#!/usr/bin/env bash
# The device check for an NVIDIA GPU (written for the occasional H200; docs/kernels.md): builds nothing, needs
# no network, finishes in under 5 minutes (issue #17's limit).
#   1. the kernel tests compiled for the GPU: every fp32 case of tests/unit/kernels plus the `gpu` (bf16, FP8,
#      MXFP4) cases the Triton interpreter cannot run; the Ascend tests are left out (they download a wheel);
#   2. bench/kernels_gpu.py: each Triton kernel timed against the PyTorch reference and the H200 roofline; then
#      its --decode cases (issue #17's aims: grouped FP8/MXFP4 at batch 1 and 64 over 256 experts, wo_a, mHC at
#      batch 1, the fused mHC boundary beside the two kernels it replaces, the fused sampler), whose first calls
#      also compile the decode kernel variants;
#   3. bench/engine_gpu.py: LLMEngine tokens/s, tiny-flash and small-flash in bf16, batch 1/8/32/64, with CUDA
#      graphs (overlapped scheduling on and off), eager Triton and the reference backend (small-flash first: the
#      aims are its; it skips what does not fit its own 40 s budget);
#      then tiny-flash with MTP verification steps in graphs beside the same run without MTP;
#   4. bench/decode_gpu.py: the width-true model's engine decode step (Flash's layer widths, weights packed
#      FP8/MXFP4, bf16, the paged pool, CUDA graphs) at batch 1 and 64: ms per step against the bytes it must read
#      at the measured copy bandwidth, and the MTP verification step's ms beside it;
#   5. bench/nccl_smoke.py: a one-GPU nccl process group through the rank launcher (all-reduce, all-gather).
# Output: JSON lines on stdout and in $OUT/gpu.jsonl; pytest logs and JUnit XML per step in $OUT.
# Time limits per step (75 + 45 + 30 + 50 + 50 + 10 + 25 + 10 = 295 s) keep the whole check under 5 minutes. The GPU
# cases compile the grouped-GEMV and sampler kernels first (~10 s for the sampler's pick kernel on sm_90) into
# Triton's cache, so the benchmarks after them mostly reuse cubins; a step that runs out of time still leaves its
# log and the JSON lines it wrote, and the check goes on with the next step.
# Usage: OUT=/some/dir bench/gpu.sh          (PYTHON=python3 by default; its torch and triton are used as-is)
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-build/gpu}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
JSONL="$OUT/gpu.jsonl"
: >"$JSONL"

emit() { printf '%s\n' "$1" | tee -a "$JSONL"; }
status=0 # the exit status: 1 if any step failed

# The distribution maps folders to dsv4.* (pyproject.toml); without installing it, a farm of links does.
PYPATH="build/gpu-pythonpath"
mkdir -p "$PYPATH/dsv4"
for d in kernels model_runtime protocol; do ln -sfn "../../../$d" "$PYPATH/dsv4/$d"; done
export PYTHONPATH="$PWD/$PYPATH${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET DSV4_KERNEL_BACKEND

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  emit '{"bench": "gpu.sh", "error": "no CUDA device visible to torch"}'
  exit 1
fi

# run_tests NAME SECONDS PYTEST_ARGS...: one pytest run, its JUnit XML and log under $OUT, one JSON line
run_tests() {
  local name=$1 limit=$2
  shift 2
  local start rc summary
  start=$(date +%s)
  # -c /dev/null: the device's pytest may predate the project's pinned minversion and plugins
  timeout "$limit" "$PYTHON" -m pytest -c /dev/null --rootdir=. --import-mode=importlib -p no:cacheprovider -q \
    --junitxml="$OUT/$name.xml" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] || status=1
  summary=$(tail -n 1 "$OUT/$name.log" | tr -d '"=' | sed 's/^ *//')
  local seconds=$(($(date +%s) - start))
  emit "{\"bench\": \"gpu.sh\", \"step\": \"$name\", \"exit\": $rc, \"summary\": \"$summary\", \"seconds\": $seconds}"
}

if "$PYTHON" -c 'import pytest' 2>/dev/null; then
  # the cases only a GPU can check first (bf16, FP8, MXFP4), then the fp32 suite compiled for the GPU; the
  # Ascend tests (they download a wheel) and the CPU-only compile/interpreter/fake-device checks are left out
  run_tests gpu_cases 75 -m gpu tests/unit/kernels/test_gpu_numerics.py
  # (tests/unit/test_gpu_import_set.py checks on CPU that all of these collect with only the device's packages)
  run_tests fp32_cases 45 -m unit tests/unit/kernels \
    --ignore=tests/unit/kernels/ascend --ignore=tests/unit/kernels/test_compile_sm90.py \
    --ignore=tests/unit/kernels/test_interpreter_canary.py --ignore=tests/unit/kernels/test_decode_capture.py
else
  emit '{"bench": "gpu.sh", "step": "kernel tests", "error": "pytest is not installed for '"$PYTHON"'"}'
  status=1
fi

# run_bench NAME SECONDS SCRIPT ARGS...: a benchmark script's JSON lines into $JSONL, then one line for the step
run_bench() {
  local name=$1 limit=$2
  shift 2
  local start rc
  start=$(date +%s)
  timeout "$limit" "$PYTHON" "$@" | tee -a "$JSONL"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || status=1
  emit "{\"bench\": \"gpu.sh\", \"step\": \"$name\", \"exit\": $rc, \"seconds\": $(($(date +%s) - start))}"
}

run_bench "kernel timings" 30 bench/kernels_gpu.py --out "$OUT/kernels_gpu.jsonl"
run_bench "decode kernel timings" 50 bench/kernels_gpu.py --decode --out "$OUT/kernels_decode_gpu.jsonl"
run_bench "engine timings" 50 bench/engine_gpu.py --presets small-flash,tiny-flash --budget 40 --out "$OUT/engine_gpu.jsonl"
run_bench "engine MTP" 10 bench/engine_gpu.py --presets tiny-flash --batches 1,8 --tokens 16 \
  --runs cuda+graphs,cuda+graphs+mtp --budget 6 --out "$OUT/engine_mtp_gpu.jsonl"
run_bench "decode step" 25 bench/decode_gpu.py --out "$OUT/decode_gpu.jsonl"
run_bench "nccl group" 10 bench/nccl_smoke.py
exit "$status"
