#!/usr/bin/env bash
# The GPU suite in ONE device call (under 10 minutes): build for sm_90, benchmark --size large
# on CUDA, compute-sanitizer memcheck + racecheck on a small focal / sigmoid_focal driver, the test
# suite on CUDA. Every step is time-boxed, so a slow step cannot eat the call; a failed step does
# not stop the later ones. See benchmarks/README.md for how to call it and commit its results.
#
#   device tool:  run(command="BENCH_COMMIT=<git short sha> bash benchmarks/gpu_suite.sh", timeout_s=600)
#
# Writes under $OUT (at most 8 files come back from the device tool; this writes 8):
#   suite.log      environment, backends, one line per step (status, rc, seconds)
#   build.log      pip install --no-build-isolation -e .
#   bench.log      bench.py progress and table
#   large-<gpu>-<date>-<HHMM>.csv/.md/.png   the benchmark results
#   sanitizer.log  compute-sanitizer memcheck and racecheck
#   pytest.log     the test suite on CUDA
# Knobs (environment): SUITE_TOTAL_S (default 560: seconds for all steps), SUITE_SKIP (e.g.
# "pytest sanitizer"), BENCH_ARGS (extra bench.py arguments, appended so they win, e.g. "--dtype
# bfloat16 --cases cityscapes_ohem,cityscapes_ghmc"), BENCH_CAP_S, PYTEST_ARGS (default "tests";
# replaces the paths too), PYTHON.
set -u
cd "$(dirname "$0")/.." || exit 1
: "${OUT:=$PWD/gpu_suite_out}"
mkdir -p "$OUT"
T0=$(date +%s)
TOTAL_S=${SUITE_TOTAL_S:-560}
SKIP=" ${SUITE_SKIP:-} "
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export FUSED_LOSSES_BUILD_CUDA=${FUSED_LOSSES_BUILD_CUDA:-1}
export MAX_JOBS=${MAX_JOBS:-16}
export PATH="$CUDA_HOME/bin:$PATH"
LOG=$OUT/suite.log

elapsed() { echo $(( $(date +%s) - T0 )); }

# step NAME CAP_S RESERVE_S LOGFILE CMD...: CMD with a time limit of min(CAP_S, time left - RESERVE_S),
# output appended to LOGFILE, one status line to suite.log.
step() {
  local name=$1 cap=$2 reserve=$3 log=$4; shift 4
  if [[ "$SKIP" == *" $name "* ]]; then echo "[$(elapsed)s] $name: skipped (SUITE_SKIP)" >> "$LOG"; return 0; fi
  local limit=$(( TOTAL_S - $(elapsed) - reserve ))
  (( limit > cap )) && limit=$cap
  if (( limit < 10 )); then echo "[$(elapsed)s] $name: NOT RUN (no time left)" >> "$LOG"; return 0; fi
  echo "[$(elapsed)s] $name: start, limit ${limit}s: $*" >> "$LOG"
  echo "===== $name ($(date -u +%FT%TZ)), limit ${limit}s: $*" >> "$log"
  local t=$(date +%s) rc
  STEP_LIMIT=$limit timeout --signal=TERM --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  local what=ok
  (( rc == 124 || rc == 137 )) && what=TIMEOUT
  (( rc != 0 && rc != 124 && rc != 137 )) && what=FAILED
  echo "[$(elapsed)s] $name: $what (rc=$rc) in $(( $(date +%s) - t ))s -> $(basename "$log")" >> "$LOG"
  return 0
}

env_info() {
  date -u +%FT%TZ
  echo "commit: ${BENCH_COMMIT:-unknown}"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  nvcc --version | tail -n 2
  compute-sanitizer --version | head -n 2
  echo "cpus: $(nproc)"
  "$PY" -c "import torch, triton, torchvision; print('python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'torchvision', torchvision.__version__)"
}

backends() {
  "$PY" -c "import fused_losses as fl; [print(f'backend {k}: {v}') for k, v in fl.backends().items()]"
}

pytest_cuda() {
  # conftest.py switches the Triton interpreter on only without a GPU; here the tests see CUDA.
  "$PY" -m pytest -q -rfEs -n 8 -p no:cacheprovider --durations=15 ${PYTEST_ARGS:-tests}
}

sanitize() {
  local cs; cs=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1   # one cudaMalloc per tensor: no OOB hidden in a cached block
  local half=$(( STEP_LIMIT / 2 ))
  echo "--- memcheck"
  timeout "$half" "$cs" --tool memcheck --error-exitcode 1 --leak-check no --print-limit 30 \
    "$PY" -m benchmarks.sanitize_driver
  local rc1=$?
  echo "--- memcheck rc=$rc1"
  echo "--- racecheck"
  timeout $(( STEP_LIMIT - half - 5 )) "$cs" --tool racecheck --error-exitcode 1 --racecheck-report analysis \
    --print-limit 30 "$PY" -m benchmarks.sanitize_driver --dtypes float32
  local rc2=$?
  echo "--- racecheck rc=$rc2"
  (( rc1 == 0 && rc2 == 0 ))
}

bench() {
  # stop starting new cases 45 s before the limit, so the table and plot are written in time
  # (a SIGTERM from timeout also makes bench.py write what it measured).
  "$PY" -m benchmarks.bench --size large --device cuda --dtype float32,bfloat16 --out-dir "$OUT" \
    --budget-s $(( STEP_LIMIT - 45 )) ${BENCH_ARGS:-}
}

export -f env_info backends pytest_cuda sanitize bench
export PY CUDA_HOME

echo "gpu_suite: total ${TOTAL_S}s, out $OUT" > "$LOG"
step env      30    0  "$LOG"            bash -c env_info
step build    240   0  "$OUT/build.log"  "$PY" -m pip install --no-build-isolation --no-deps --no-index \
                                           --progress-bar off -e .
# The editable install should leave fused_losses/_C*.so in the tree (setuptools builds extensions in
# place in editable mode); bench.py and the tests import the package from the repo root, so check,
# and build in place if it did not.
if [[ "$SKIP" != *" build "* ]] && ! "$PY" -c "import fused_losses._C" >> "$LOG" 2>&1; then
  step build_inplace 240 150 "$OUT/build.log" "$PY" setup.py build_ext --inplace
fi
step backends 30    0  "$LOG"            bash -c backends
# bench first: it is the result this call exists for; the steps after it take what is left.
step bench    ${BENCH_CAP_S:-240} 100 "$OUT/bench.log" bash -c bench
step sanitizer 90   40 "$OUT/sanitizer.log" bash -c sanitize
step pytest   300   0  "$OUT/pytest.log" bash -c pytest_cuda
echo "[$(elapsed)s] done" >> "$LOG"
cat "$LOG"
tail -n 40 "$OUT"/large-*.md 2>/dev/null
grep -hE "^(ok|FAIL)|failure|ERROR SUMMARY|RACECHECK SUMMARY|NOTHING" "$OUT/sanitizer.log" 2>/dev/null | tail -n 20
tail -n 5 "$OUT/pytest.log" 2>/dev/null
