#!/usr/bin/env bash
# The feature benchmarks of issue 4 in one go, after benchmarks/run_on_device.sh has built the extension
# (hdim 128 kernels: plain and "mod", every mask). Each line is one same-run comparison:
#   window skipping (causal 32k vs window 4096 + causal), the cost of each modifier at 4k (ours vs
#   ours_plain), varlen with equal lengths vs the dense path, varlen with mixed lengths vs SDPA on the
#   padded batch and PyTorch's own varlen attention. Logs and CSVs land in $OUT (default bench_out/).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
OUT_DIR="${OUT:-$PWD/bench_out}"
DTYPES="${DTYPES:-bf16}"
PASSES="${PASSES:-fwd bwd}"
mkdir -p "$OUT_DIR"
FAILED=0
bench() {  # bench NAME ARGS...: one benchmark run, its table to the log
  local name="$1"
  shift
  echo "==== $name: $*"
  python3 benchmarks/benchmark_attention.py --hdims 128 --dtypes "$DTYPES" "$@" --csv "$OUT_DIR/$name.csv" \
    2>&1 | tee -a "$OUT_DIR/features.log" || FAILED=1
}
for pass in $PASSES; do
  bench "window_$pass" --pass "$pass" --seqlens 32768 --causal true --window 4096,0 --backends ours,ours_plain
  bench "softcap_$pass" --pass "$pass" --seqlens 4096 --softcap 30 --backends ours,ours_plain,sdpa_flash
  bench "alibi_$pass" --pass "$pass" --seqlens 4096 --alibi --backends ours,ours_plain,sdpa_flash
  bench "window_noskip_$pass" --pass "$pass" --seqlens 4096 --causal false --window 4096,4096 \
    --backends ours,ours_plain,sdpa_flash
  bench "varlen_equal_$pass" --pass "$pass" --varlen equal --seqlens 1024,4096,16384 \
    --backends ours,ours_dense,sdpa_flash
  bench "varlen_mixed_$pass" --pass "$pass" --varlen mixed --backends ours,sdpa_flash,sdpa_cudnn,torch_varlen
done
exit "$FAILED"
