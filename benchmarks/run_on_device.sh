#!/usr/bin/env bash
# Everything the GPU machine does, in one call from the repository root:
#   1. install the carried wheels (.whl/: the nvidia-cutlass wheel; carry ".whl" with the call),
#   2. build flash_attn2._C in place, 3. run the tests, 4. (SANITIZE=1) compute-sanitizer memcheck and
#   racecheck on benchmarks/sanitize_fwd.py and sanitize_bwd.py, 5. (MEMORY=1) peak memory of the forward
#   and of forward + backward, 6. the benchmark.
# A failed build stops the run; failed tests or sanitizer runs do not stop the benchmark, but the exit
# code is 1 when any stage failed.
#
# Environment (all optional):
#   FLASH_ATTN2_HEAD_DIMS  head dims to build (default 64,128)     FLASH_ATTN2_ARCHS  default 90
#   FLASH_ATTN2_DTYPES     dtypes to build (default bf16,fp16)     MAX_JOBS           default 16
#   FLASH_ATTN2_PTXAS_VERBOSE=1  ptxas register/spill report in build.log
#   TEST_ARGS   pytest arguments (default "-q -x tests");          TESTS=0 skips the tests
#   SANITIZE=1  run compute-sanitizer (default 0)
#   MEMORY      1 (default) runs benchmark_attention.py --memory (--pass fwd, fwd_bwd) when head dim 128 is built
#   BENCH_ARGS  benchmark arguments (default: --hdims/--dtypes of the build); BENCH=0 skips it
#   OUT         folder for logs, CSV and PNG (default: bench_out/ in the checkout)
#   PACK=1      pack that folder into one results.tgz at the end
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export PYTHONUNBUFFERED=1
export FLASH_ATTN2_HEAD_DIMS="${FLASH_ATTN2_HEAD_DIMS:-64,128}"
export FLASH_ATTN2_DTYPES="${FLASH_ATTN2_DTYPES:-bf16,fp16}"
export FLASH_ATTN2_ARCHS="${FLASH_ATTN2_ARCHS:-90}"
export MAX_JOBS="${MAX_JOBS:-16}"
TEST_ARGS="${TEST_ARGS:--q -x tests}"
# The benchmark and the memory run default to what is built ("all" is the benchmark's own default).
BUILT_HDIMS_ARG="" BUILT_DTYPES_ARG=""
if [ "$FLASH_ATTN2_HEAD_DIMS" != "all" ]; then BUILT_HDIMS_ARG="--hdims $FLASH_ATTN2_HEAD_DIMS"; fi
if [ "$FLASH_ATTN2_DTYPES" != "all" ]; then BUILT_DTYPES_ARG="--dtypes $FLASH_ATTN2_DTYPES"; fi
BENCH_ARGS="${BENCH_ARGS:-$BUILT_HDIMS_ARG $BUILT_DTYPES_ARG}"
OUT_DIR="${OUT:-$PWD/bench_out}"
mkdir -p "$OUT_DIR"

RUN_START=$SECONDS
SUMMARY=()
FAILED=0

# finish NAME RC START: records a stage's result for the summary printed at the end.
finish() {
  local line
  line="$(printf '%-22s rc=%-3s %5ss' "$1" "$2" "$((SECONDS - $3))")"
  SUMMARY+=("$line")
  echo "==== $line"
  if [ "$2" -ne 0 ]; then FAILED=1; fi
}

print_summary() {
  echo
  echo "==== stages (logs in $OUT_DIR)"
  printf '  %s\n' "${SUMMARY[@]}"
  echo "  total $((SECONDS - RUN_START))s"
}

echo "==== [1/6] install carried wheels"
start=$SECONDS
rc=0
if compgen -G ".whl/*.whl" > /dev/null; then
  # A fixed folder (build/ is git-ignored and kept on a warm machine) installed once per set of wheels:
  # a new path or fresh mtimes on the CUTLASS headers would make ninja rebuild every kernel.
  SITE_DIR="$PWD/build/carried_site"
  stamp="$(cksum .whl/*.whl)"
  if [ "$(cat "$SITE_DIR/.stamp" 2> /dev/null)" != "$stamp" ]; then
    rm -rf "$SITE_DIR"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE_DIR" .whl/*.whl \
      && echo "$stamp" > "$SITE_DIR/.stamp" || rc=$?
  fi
  export PYTHONPATH="$SITE_DIR:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no wheels under .whl/ (name \".whl\" in the call's carry); using what python3 has"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 third_party/find_cutlass.py > /dev/null || rc=1
finish "install" "$rc" "$start"

echo "==== [2/6] build (head dims $FLASH_ATTN2_HEAD_DIMS; dtypes $FLASH_ATTN2_DTYPES; sm_$FLASH_ATTN2_ARCHS; $MAX_JOBS jobs)"
start=$SECONDS
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
} 2>&1 | tee "$OUT_DIR/build.log"
rc=0
python3 setup.py build_ext --inplace >> "$OUT_DIR/build.log" 2>&1 || rc=$?
if [ "$rc" -ne 0 ]; then
  tail -n 60 "$OUT_DIR/build.log"
  finish "build" "$rc" "$start"
  print_summary
  exit 1
fi
grep '^flash_attn2:' "$OUT_DIR/build.log"
finish "build" "$rc" "$start"

echo "==== [3/6] tests: python3 -m pytest $TEST_ARGS"
start=$SECONDS
if [ "${TESTS:-1}" = "1" ]; then
  # shellcheck disable=SC2086  # TEST_ARGS is a list of arguments
  python3 -m pytest $TEST_ARGS 2>&1 | tee "$OUT_DIR/tests.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: counted as a failure"; fi
  finish "tests" "$rc" "$start"
else
  echo "skipped (TESTS=${TESTS})"
fi

echo "==== [4/6] compute-sanitizer (SANITIZE=${SANITIZE:-0})"
if [ "${SANITIZE:-0}" = "1" ]; then
  sanitizer="$(command -v compute-sanitizer || true)"
  if [ -z "$sanitizer" ]; then
    cuda_home="$(python3 third_party/find_cuda.py 2> /dev/null)"
    sanitizer="$cuda_home/bin/compute-sanitizer"
  fi
  : > "$OUT_DIR/sanitize.log"
  for script in sanitize_fwd sanitize_bwd sanitize_modifiers; do
    for tool in memcheck racecheck; do
      start=$SECONDS
      echo "-- $script $tool" | tee -a "$OUT_DIR/sanitize.log"
      # Without the caching allocator each tensor is its own allocation, so memcheck sees every overrun.
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --error-exitcode 3 \
        python3 "benchmarks/$script.py" 2>&1 | tee -a "$OUT_DIR/sanitize.log" | tail -n 25
      finish "sanitize ${script#sanitize_} $tool" "${PIPESTATUS[0]}" "$start"
    done
  done
fi

echo "==== [5/6] peak memory (MEMORY=${MEMORY:-1})"
if [ "${MEMORY:-1}" = "1" ]; then
  if [[ ",$FLASH_ATTN2_HEAD_DIMS," == *",128,"* || "$FLASH_ATTN2_HEAD_DIMS" == "all" ]]; then
    : > "$OUT_DIR/memory.log"
    for pass in fwd fwd_bwd; do
      start=$SECONDS
      # shellcheck disable=SC2086  # one argument pair, or none
      python3 benchmarks/benchmark_attention.py --memory --pass "$pass" $BUILT_DTYPES_ARG 2>&1 \
        | tee -a "$OUT_DIR/memory.log"
      finish "memory $pass" "${PIPESTATUS[0]}" "$start"
    done
  else
    echo "skipped: head dim 128 is not built"
  fi
fi

echo "==== [6/6] benchmark: $BENCH_ARGS"
if [ "${BENCH:-1}" = "1" ]; then
  start=$SECONDS
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
  python3 benchmarks/benchmark_attention.py $BENCH_ARGS --csv "$OUT_DIR/bench.csv" --plot "$OUT_DIR/bench.png" \
    2>&1 | tee "$OUT_DIR/bench.log"
  finish "benchmark" "${PIPESTATUS[0]}" "$start"
fi

print_summary
# PACK=1: the logs, CSVs and plots as one results.tgz (the device tool brings back at most 8 files).
if [ "${PACK:-0}" = "1" ]; then
  (cd "$OUT_DIR" && tar czf results.tgz --exclude results.tgz -- * && find . -mindepth 1 ! -name results.tgz -delete)
fi
exit "$FAILED"
