#!/usr/bin/env bash
# A/B of kernel versions in one device call: each version's csrc/ is built side by side (one build folder
# each, the cores shared), then one benchmark runs for every version in turn, ROUNDS times, so that drift
# on the machine hits every version alike. What PERF_LOG's same-run comparisons come from.
#
# Here (packs each version's csrc/ into .ab/, which git ignores; carry ".ab" and ".whl" with the call):
#   bash benchmarks/ab_builds.sh pack NAME=REV [NAME=REV ...]     e.g. base=main try=next/spread-in-gemm
#   (REV "-" packs the working tree's csrc/)
# On the device machine:
#   AB_BENCH="--hdims 64,96 --dtypes bf16 --pass bwd --seqlens 4096,16384" bash benchmarks/ab_builds.sh run base try
# Environment of `run`: FLASH_ATTN2_HEAD_DIMS/DTYPES/MASKS/MODIFIERS/DIRECTIONS (what each version builds;
# default: the head dims of AB_BENCH's --hdims, bf16, none,causal, plain, fwd,bwd), ROUNDS (default 2),
# AB_BACKENDS (default ours,sdpa_flash). Results: $OUT/ab.tgz (the CSVs, logs and ab_summary.py's table).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mode="${1:-}"
shift || true

if [ "$mode" = pack ]; then
  mkdir -p .ab
  grep -qx '/.ab/' .git/info/exclude 2> /dev/null || echo '/.ab/' >> .git/info/exclude
  for spec in "$@"; do
    name="${spec%%=*}" rev="${spec#*=}"
    if [ "$rev" = "-" ]; then
      tar czf ".ab/$name.tgz" csrc
    else
      git archive "$rev" csrc | gzip > ".ab/$name.tgz"
    fi
    echo "packed $name ($rev): .ab/$name.tgz"
  done
  exit 0
fi
if [ "$mode" != run ] || [ "$#" -lt 1 ]; then
  echo "usage: ab_builds.sh pack NAME=REV... | ab_builds.sh run NAME..." >&2
  exit 2
fi

export PYTHONUNBUFFERED=1
OUT_DIR="${OUT:-$PWD/bench_out}/ab"
mkdir -p "$OUT_DIR"
AB_BENCH="${AB_BENCH:---hdims 128 --dtypes bf16 --pass fwd --seqlens 4096}"
hdims="$(sed -n 's/.*--hdims[ =]\([0-9,]*\).*/\1/p' <<< "$AB_BENCH")"
export FLASH_ATTN2_HEAD_DIMS="${FLASH_ATTN2_HEAD_DIMS:-${hdims:-128}}"
export FLASH_ATTN2_DTYPES="${FLASH_ATTN2_DTYPES:-bf16}"
export FLASH_ATTN2_MASKS="${FLASH_ATTN2_MASKS:-none,causal}"
export FLASH_ATTN2_MODIFIERS="${FLASH_ATTN2_MODIFIERS:-plain}"
export FLASH_ATTN2_DIRECTIONS="${FLASH_ATTN2_DIRECTIONS:-fwd,bwd}"
export FLASH_ATTN2_ARCHS="${FLASH_ATTN2_ARCHS:-90}"
ROUNDS="${ROUNDS:-2}"
SITE=/tmp/ab_site
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl 2>&1 | grep -v "^WARNING: Running pip" || true

start=$SECONDS
jobs_each=$(( (${MAX_JOBS:-16} + $# - 1) / $# ))
for name in "$@"; do
  tree="/tmp/ab/$name"
  rm -rf "$tree" && mkdir -p "$tree"
  tar cf - --exclude=./build --exclude=./.whl --exclude=./.ab --exclude=./scratch . | tar xf - -C "$tree"
  rm -rf "$tree/csrc" && tar xzf ".ab/$name.tgz" -C "$tree"
  (cd "$tree" && PYTHONPATH="$SITE" MAX_JOBS=$jobs_each python3 setup.py build_ext --inplace > "$OUT_DIR/build_$name.log" 2>&1
   echo "build $name rc=$?") &
done
wait
echo "builds $((SECONDS - start))s"

for round in $(seq 1 "$ROUNDS"); do
  for name in "$@"; do
    s=$SECONDS
    # shellcheck disable=SC2086  # AB_BENCH is a list of arguments
    PYTHONPATH="$SITE:/tmp/ab/$name" python3 benchmarks/benchmark_attention.py $AB_BENCH \
      --backends "${AB_BACKENDS:-ours,sdpa_flash}" --csv "$OUT_DIR/${name}_$round.csv" > "$OUT_DIR/${name}_$round.log" 2>&1
    echo "bench $name round $round rc=$? $((SECONDS - s))s"
  done
done
python3 benchmarks/ab_summary.py "$OUT_DIR" "$@" | tee "$OUT_DIR/summary.txt"
# PyTorch's warnings carry the device machine's paths: drop them before the logs leave it.
for log in "$OUT_DIR"/*.log; do grep -v "Warning\|warnings.warn" "$log" > "$log.tmp" && mv "$log.tmp" "$log"; done
tar czf "$OUT_DIR/../ab.tgz" -C "$OUT_DIR/.." ab && rm -rf "$OUT_DIR"
