#!/usr/bin/env bash
# Decode (KV-cache) kernel variants in one device call: each variant is this checkout with the hdim 128 ring row of
# kvcache_tile() (csrc/common/tile_config.h) replaced and, optionally, FLASH_ATTN2_KVCACHE_EVICT_FIRST=1; the
# variants are built side by side (the cores shared), then benchmark_decode.py --attn-only runs for each in turn,
# ROUNDS times, so that drift on the machine hits every variant alike. Then, with READ_FLUSH=1, one more round
# with --flush read (L2 cleared by a read: the streaming rate without the zero flush's write-backs).
#
# On the device machine (carry ".whl"):
#   bash benchmarks/decode_variants.sh main=64,64,4,3 deep=64,64,4,6 ef=64,64,4,3,ef
# A spec is block_m,block_n,warps,stages with ",ef" to add the evict-first loads. Environment: ROUNDS (default
# 2), DECODE_ARGS (default: --batches 1,8,64 --seqlens 4096,32768,131072 --rep 50 --warmup 10), READ_FLUSH
# (default 1), MASKS (the kvcache masks each variant builds; default none), TEST_VARIANTS (names whose build then
# runs tests/test_kvcache_gpu.py; build them with MASKS=none,causal,local for the whole file, as the other masks'
# tests skip). Results: $OUT/decode_variants.tgz
# (per variant and round the CSV and log; summary.txt: decode_variants_summary.py's table).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "$#" -lt 1 ]; then
  echo "usage: decode_variants.sh NAME=BLOCK_M,BLOCK_N,WARPS,STAGES[,ef] ..." >&2
  exit 2
fi
export PYTHONUNBUFFERED=1
OUT_DIR="${OUT:-$PWD/bench_out}/decode_variants"
mkdir -p "$OUT_DIR"
ROUNDS="${ROUNDS:-2}"
DECODE_ARGS="${DECODE_ARGS:---batches 1,8,64 --seqlens 4096,32768,131072 --rep 50 --warmup 10}"
SITE=/tmp/dv_site
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl 2>&1 | grep -v "^WARNING: Running pip" || true
ROW='case 128: return compact ? KVCacheTile{64, 64, 4, 2} : KVCacheTile{'

start=$SECONDS
names=()
jobs_each=$(( (${MAX_JOBS:-16} + $# - 1) / $# ))
for spec in "$@"; do
  name="${spec%%=*}" tile="${spec#*=}" ef=0
  if [[ "$tile" == *,ef ]]; then ef=1 tile="${tile%,ef}"; fi
  names+=("$name")
  tree="/tmp/dv/$name"
  rm -rf "$tree" && mkdir -p "$tree"
  tar cf - --exclude=./build --exclude=./.whl --exclude=./.ab --exclude=./scratch --exclude=./bench_out . | tar xf - -C "$tree"
  header="$tree/csrc/common/tile_config.h"
  sed -i "s/\(${ROW}\)[0-9, ]*}/\1${tile//,/, }}/" "$header"
  if ! grep -qF "${ROW}${tile//,/, }}" "$header"; then
    echo "variant $name: the hdim 128 ring row of kvcache_tile() was not found in $header" >&2
    exit 2
  fi
  echo "variant $name: tile {${tile//,/, }}, evict-first $ef"
  (cd "$tree" && PYTHONPATH="$SITE" MAX_JOBS=$jobs_each FLASH_ATTN2_KVCACHE_EVICT_FIRST=$ef FLASH_ATTN2_HEAD_DIMS=128 \
     FLASH_ATTN2_DTYPES=bf16 FLASH_ATTN2_MASKS="${MASKS:-none}" FLASH_ATTN2_MODIFIERS=mod FLASH_ATTN2_DIRECTIONS=kvcache \
     FLASH_ATTN2_ARCHS="${FLASH_ATTN2_ARCHS:-90}" python3 setup.py build_ext --inplace > "$OUT_DIR/build_$name.log" 2>&1
   echo "build $name rc=$?") &
done
wait
echo "builds $((SECONDS - start))s"

bench() {  # bench NAME TAG ARGS...
  local name="$1" tag="$2" s=$SECONDS
  shift 2
  # shellcheck disable=SC2086  # DECODE_ARGS is a list of arguments
  PYTHONPATH="$SITE:/tmp/dv/$name" python3 benchmarks/benchmark_decode.py --attn-only $DECODE_ARGS "$@" \
    --csv "$OUT_DIR/${name}_$tag.csv" > "$OUT_DIR/${name}_$tag.log" 2>&1
  echo "bench $name $tag rc=$? $((SECONDS - s))s"
}
for round in $(seq 1 "$ROUNDS"); do
  for name in "${names[@]}"; do bench "$name" "$round"; done
done
if [ "${READ_FLUSH:-1}" = 1 ]; then
  for name in "${names[@]}"; do bench "$name" read --flush read; done
fi
for name in ${TEST_VARIANTS:-}; do
  s=$SECONDS
  (cd "/tmp/dv/$name" && PYTHONPATH="$SITE:/tmp/dv/$name" python3 -m pytest -q -p no:cacheprovider \
     tests/test_kvcache_gpu.py > "$OUT_DIR/tests_$name.log" 2>&1)
  echo "tests $name rc=$? $((SECONDS - s))s: $(tail -n 1 "$OUT_DIR/tests_$name.log")"
done
python3 benchmarks/decode_variants_summary.py "$OUT_DIR" "${names[@]}" | tee "$OUT_DIR/summary.txt"
# PyTorch's warnings carry the device machine's paths: drop them before the logs leave it.
for log in "$OUT_DIR"/*.log; do grep -v "Warning\|warnings.warn" "$log" > "$log.tmp" && mv "$log.tmp" "$log"; done
tar czf "$OUT_DIR/../decode_variants.tgz" -C "$OUT_DIR/.." decode_variants && rm -rf "$OUT_DIR"
