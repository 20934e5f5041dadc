#!/usr/bin/env bash
# One pass over a lent H100/H200 (no network there): build with CUDA, GPU
# tests, full tests, compute-sanitizer, quick benchmark. From the repo root:
#
#   OUT=/some/dir tools/gpu_check.sh        # default OUT=./gpu_check_out
#
# Every step runs even if an earlier one failed; exit codes and times go to
# $OUT/summary.txt, and the script exits non-zero if any step failed. The
# device tool returns at most 8 files, so $OUT holds exactly these:
#   env.txt build.log tests.log bench.log bench.json bench.md attn.json summary.txt
# (the attention benchmark's table is appended to summary.txt).
#
# Knobs (environment):
#   MIXKIT_GPU_CHECK_SKIP_BUILD=1   use the mixkit already installed
#   MIXKIT_GPU_CHECK_BUDGET_S=460   whole-script budget; steps get what is left
#   MIXKIT_SANITIZER_TESTS="..."    pytest arguments for the compute-sanitizer runs
#   PYTHON=python3                  interpreter holding torch
#   MIXKIT_COMMIT=<sha>             recorded when the tree arrives without .git
#   MIXKIT_GPU_CHECK_SUITE=models   instead of the sanitizer and the kernel
#                                   benchmarks, run the model-level checks:
#                                   bench.models (Mistral 7B decode/prefill,
#                                   Mixtral stack) -> bench.json/.md and
#                                   bench.train (1B Mistral, small Mixtral
#                                   training MFU) -> attn.json (second pass)
set -u  # no -e: a failing step is recorded, not fatal

OUT=${OUT:-./gpu_check_out}
PY=${PYTHON:-python3}
BUDGET_S=${MIXKIT_GPU_CHECK_BUDGET_S:-460}  # a device command may run 600 s; keep well inside 8 min
# The kernels' short GPU tests; the 32k-token attention test is left to the plain run.
SANITIZER_TESTS=${MIXKIT_SANITIZER_TESTS:-tests/test_norms.py tests/test_rope.py tests/test_decode.py tests/test_moe_route.py tests/test_moe_mlp.py tests/test_flash_attn.py -m gpu -k "not long" -x -q}
START=$(date +%s)
STEPS=$(mktemp)
FAILED=0

mkdir -p "$OUT"
export MAX_JOBS=16 CMAKE_BUILD_PARALLEL_LEVEL=16 PYTHONUNBUFFERED=1

# step NAME CAP RESERVE LOG CMD...: run CMD with a timeout of
# min(CAP, time left - RESERVE), RESERVE being what later steps need, so a
# slow step cannot starve the benchmark at the end.
step() {
  local name=$1 cap=$2 reserve=$3 log=$4
  shift 4
  local left=$((BUDGET_S - ($(date +%s) - START) - reserve))
  local limit=$((cap < left ? cap : left))
  if ((limit < 15)); then
    printf '%-16s %-8s %5s  %s\n' "$name" "skipped" "-" "time budget spent" >>"$STEPS"
    FAILED=1
    return
  fi
  echo "=== $name (limit ${limit}s): $*" >>"$log"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local dt=$(($(date +%s) - t0))
  local note=""
  ((rc == 124 || rc == 137)) && note="timed out"
  ((rc != 0)) && FAILED=1
  echo "=== $name: rc=$rc in ${dt}s $note" >>"$log"
  printf '%-16s rc=%-5s %4ss  %s %s\n' "$name" "$rc" "$dt" "$(basename "$log")" "$note" >>"$STEPS"
}

# ---- a. environment ------------------------------------------------------------
COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo "${MIXKIT_COMMIT:-unknown}")
[[ $COMMIT != unknown ]] && export MIXKIT_COMMIT=$COMMIT
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)

env_info() {
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  commit: $COMMIT"
  echo "--- nvidia-smi"
  nvidia-smi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv
  echo "--- nvcc"
  nvcc --version || /usr/local/cuda/bin/nvcc --version
  echo "--- compute-sanitizer: ${SANITIZER:-not found}"
  echo "--- python and packages"
  "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name())'
  "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|triton|nanobind|scikit.build.core|cmake|ninja|pytest|liger.kernel|matplotlib) '
  cmake --version | head -1
}
# Not through step(): timeout cannot run a shell function, and these are quick.
t0=$(date +%s)
env_info >"$OUT/env.txt" 2>&1
printf '%-16s rc=%-5s %4ss  %s\n' env "$?" "$(($(date +%s) - t0))" env.txt >>"$STEPS"

# ---- b. build and install ------------------------------------------------------
if [[ ${MIXKIT_GPU_CHECK_SKIP_BUILD:-0} == 1 ]]; then
  printf '%-16s %-8s %5s  %s\n' build skipped - "MIXKIT_GPU_CHECK_SKIP_BUILD=1" >>"$STEPS"
else
  BUILD=("$PY" -m pip install --no-build-isolation --no-deps -v .
    -Ccmake.define.MIXKIT_CUDA=ON "-Ccmake.define.MIXKIT_CUDA_ARCHS=90a-real;80-virtual")
  step build 240 230 "$OUT/build.log" "${BUILD[@]}"
  # The device's Python is 3.12, so the build above is the abi3 (stable ABI)
  # one, which the 3.11 machines here cannot try. If it fails, record that and
  # build the version-specific module, so the GPU minutes still test kernels.
  if ! "$PY" -c 'import mixkit._core' 2>/dev/null; then
    step build_no_abi3 200 230 "$OUT/build.log" "${BUILD[@]}" -Cwheel.py-api=
  fi
fi
# Which mixkit the tests will import, and what it was built with. From the repo
# root, as pytest runs, so a source tree shadowing the install would show here.
# Fails without a CUDA backend: the GPU tests would all skip and look green.
step build_info 30 200 "$OUT/env.txt" "$PY" -c '
import torch, mixkit, mixkit._core as c
print(mixkit.__file__); print(c.build_info())
assert "cuda" in c.backends() and torch.cuda.is_available(), "no CUDA backend or no GPU visible"'

# ---- c. tests ------------------------------------------------------------------
# The model/training benchmark tests compile models with inductor: they run
# in the models suite only.
SUITE=${MIXKIT_GPU_CHECK_SUITE:-ops}
if [[ $SUITE == models ]]; then
  GPU_TEST_FILES=(tests/test_models.py tests/test_bench_models.py tests/test_bench_train.py tests/test_train.py)
else
  GPU_TEST_FILES=(tests --ignore=tests/test_bench_models.py --ignore=tests/test_bench_train.py)
fi
step gpu_tests 120 190 "$OUT/tests.log" "$PY" -m pytest -m gpu -q "${GPU_TEST_FILES[@]}" -p no:cacheprovider -rf

if [[ $SUITE == models ]]; then
  step bench_models 200 150 "$OUT/bench.log" "$PY" -m mixkit.bench.models --quick --device cuda --out "$OUT/bench.json"
  step bench_train 150 5 "$OUT/bench.log" "$PY" -m mixkit.bench.train --quick --device cuda --out "$OUT/attn.json"
fi

# ---- d. compute-sanitizer ------------------------------------------------------
# torch's caching allocator hands out slices of large blocks, so an overrun
# into a neighbouring tensor is invisible to memcheck. Without caching every
# tensor is its own cudaMalloc and overruns are caught.
if [[ $SUITE == models ]]; then
  :
elif [[ -n $SANITIZER ]]; then
  # shellcheck disable=SC2086  # SANITIZER_TESTS is a list of pytest arguments
  step memcheck 100 130 "$OUT/tests.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool memcheck --target-processes all --error-exitcode 1 \
    "$PY" -m pytest -p no:cacheprovider $SANITIZER_TESTS
  # racecheck only looks at shared memory, and instrumenting torch's own
  # kernels costs time for nothing: check only kernels in namespace mixkit.
  # shellcheck disable=SC2086
  step racecheck 80 100 "$OUT/tests.log" \
    "$SANITIZER" --tool racecheck --target-processes all --error-exitcode 1 --kernel-name kns=mixkit \
    "$PY" -m pytest -p no:cacheprovider $SANITIZER_TESTS
else
  printf '%-16s %-8s %5s  %s\n' sanitizer missing - "compute-sanitizer not found" >>"$STEPS"
  FAILED=1
fi

# ---- e. benchmark --------------------------------------------------------------
# Two runs, so that a slow attention sweep cannot cost the memory-bound ops
# their results (each run writes its JSON only at the end). No plots.
if [[ $SUITE == ops ]]; then
  ATTN_OPS=$("$PY" -c 'from mixkit.bench import CASES; print(",".join(o for o in CASES if o.startswith("flash_attn")))' 2>/dev/null)
  OTHER_OPS=$("$PY" -c 'from mixkit.bench import CASES; print(",".join(o for o in CASES if not o.startswith("flash_attn")))' 2>/dev/null)
  step bench 120 80 "$OUT/bench.log" \
    "$PY" -m mixkit.bench --quick --device cuda --no-plot --ops "$OTHER_OPS" --out "$OUT/bench.json"
  step bench_attn 150 5 "$OUT/bench.log" \
    "$PY" -m mixkit.bench --quick --device cuda --no-plot --ops "$ATTN_OPS" --out "$OUT/attn.json"
fi

# ---- f. summary ----------------------------------------------------------------
{
  echo "gpu_check  $(date -u +%FT%TZ)  commit $COMMIT  total $(($(date +%s) - START))s of ${BUDGET_S}s"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
  echo
  cat "$STEPS"
  echo
  echo "--- pytest and sanitizer results (tests.log)"
  grep -E '^=== |(passed|failed|skipped|deselected|error|no tests ran).* in [0-9.]+s|ERROR SUMMARY|RACECHECK SUMMARY' \
    "$OUT/tests.log" 2>/dev/null
  echo
  echo "--- copy ceiling and failures (bench.log)"
  grep -E 'copy ceiling|ERROR' "$OUT/bench.log" 2>/dev/null
  echo
  echo "--- attention benchmark (attn.json)"
  cat "$OUT/attn.md" 2>/dev/null
} >"$OUT/summary.txt"
rm -f "$OUT/attn.md"
rm -f "$STEPS"
cat "$OUT/summary.txt"
exit $FAILED
