#!/usr/bin/env bash
# The speed bars of the forward, backward and decode issues in one device call, after
# benchmarks/run_on_device.sh has built what they need (TESTS=0 BENCH=0 MEMORY=0 is enough there):
#   fwd, bwd, fwd_bwd  head dims 64 and 128, DTYPES, causal and not, 1k-16k, ours against sdpa_flash and cuDNN
#   other              head dims 96, 192, 256 (OTHER_HDIMS), forward and backward, against sdpa_flash
#                      (other_fwd, other_bwd: one of the two)
#   det                the backward with deterministic=True, DTYPES: backend ours_det, timed right after ours
#                      on each config (in the bwd bar's run when BARS has bwd too); det_cost.py prints
#                      det time / default time per config
#   decode             benchmark_decode.py --graph (needs the hdim 128 KV-cache kernels)
# Each benchmark writes $OUT/<name>.csv and .log; check_bars.py reads every CSV, its verdicts go to
# $OUT/bars.txt; the folder is packed into $OUT/bars.tgz (the device tool brings back at most 8 files).
# Environment: BARS (default "fwd bwd fwd_bwd other det decode"), DTYPES (default bf16,fp16), OTHER_HDIMS,
# BACKENDS (of the fwd, bwd and fwd_bwd bars; default ours,sdpa_flash,sdpa_cudnn).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
OUT_DIR="${OUT:-$PWD/bench_out}/bars"
BARS="${BARS:-fwd bwd fwd_bwd other det decode}"
DTYPES="${DTYPES:-bf16,fp16}"
OTHER_HDIMS="${OTHER_HDIMS:-96,192,256}"
BACKENDS="${BACKENDS:-ours,sdpa_flash,sdpa_cudnn}"
SEQLENS=1024,2048,4096,8192,16384
mkdir -p "$OUT_DIR"
: > "$OUT_DIR/bars.txt"

bench() {  # bench NAME ARGS...: one benchmark_attention.py run
  local name="$1" start=$SECONDS
  shift
  python3 benchmarks/benchmark_attention.py --seqlens "$SEQLENS" "$@" --csv "$OUT_DIR/$name.csv" \
    > "$OUT_DIR/$name.log" 2>&1
  echo "==== $name rc=$? $((SECONDS - start))s"
}
check() {  # check PASS CSV: the bar verdicts of one CSV
  python3 benchmarks/check_bars.py --pass "$1" "$2" >> "$OUT_DIR/bars.txt" 2>&1
}

for bar in $BARS; do
  case "$bar" in
    fwd | bwd | fwd_bwd)
      backends="$BACKENDS"
      if [ "$bar" = bwd ] && [[ " $BARS " == *" det "* ]]; then  # ours, ours_det, then BACKENDS' others
        others="$(echo ",$BACKENDS," | sed 's/,ours,/,/g; s/^,//; s/,$//')"
        backends="ours,ours_det${others:+,$others}"
      fi
      bench "$bar" --hdims 64,128 --dtypes "$DTYPES" --pass "$bar" --backends "$backends"
      check "$bar" "$OUT_DIR/$bar.csv" ;;
    other | other_fwd | other_bwd)
      passes="fwd bwd"
      if [ "$bar" != other ]; then passes="${bar#other_}"; fi
      for pass in $passes; do
        bench "other_$pass" --hdims "$OTHER_HDIMS" --dtypes "$DTYPES" --pass "$pass" --backends ours,sdpa_flash
        check "$pass" "$OUT_DIR/other_$pass.csv"
      done ;;
    det)
      det_csv="$OUT_DIR/bwd.csv"
      if [[ " $BARS " != *" bwd "* ]]; then
        det_csv="$OUT_DIR/det.csv"
        bench det --hdims 64,128 --dtypes "$DTYPES" --pass bwd --backends ours,ours_det
      fi
      python3 benchmarks/det_cost.py "$det_csv" >> "$OUT_DIR/bars.txt" 2>&1 ;;
    decode)
      start=$SECONDS
      python3 benchmarks/benchmark_decode.py --graph --rep 50 --warmup 10 --csv "$OUT_DIR/decode.csv" \
        > "$OUT_DIR/decode.log" 2>&1
      echo "==== decode rc=$? $((SECONDS - start))s"
      check decode "$OUT_DIR/decode.csv" ;;
    *) echo "unknown bar: $bar (of fwd bwd fwd_bwd other other_fwd other_bwd det decode)" ;;
  esac
done

grep -E "configs checked" "$OUT_DIR/bars.txt"
# PyTorch's warnings carry the device machine's paths: drop them before the logs leave it.
shopt -s nullglob
for log in "$OUT_DIR"/*.log; do grep -v "Warning\|warnings.warn" "$log" > "$log.tmp" && mv "$log.tmp" "$log"; done
tar czf "$OUT_DIR/../bars.tgz" -C "$OUT_DIR/.." bars && rm -rf "$OUT_DIR"
