#!/usr/bin/env bash
# Does a cached prefix make the first token sooner on one GPU? The
# gpu-8b-1gpu deployment (Llama-3-8B shapes, random bf16; a prefill and a
# decode worker sharing the card), the `multiturn` and `shared-prefix`
# presets at each of RATES, without prefix caching (off) and with the
# prefill's block store and the decode side's reuse (both)
# (tools/bench_prefix_cache.py): TTFT p50/p90 overall, and of the requests a
# cache served part of against the same requests uncached.
#
#   bash tools/gpu/run_prefix_ttft_one_gpu.sh OUT_DIR
#
# PRESETS (default "multiturn shared-prefix"), RATES (req/s, default "2 6"),
# NUM_REQUESTS (32), CACHE_PAGES (2048: 4.3 GB of 8B KV beside the prefill
# worker's weights in its third of the card), PART_TIMEOUT (s per run, 240).
set -u
OUT=${1:?usage: run_prefix_ttft_one_gpu.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
start_call "$OUT"
use_compile_cache
for preset in ${PRESETS:-multiturn shared-prefix}; do
  for rate in ${RATES:-2 6}; do
    name=${preset}_r$rate
    echo "=== [$((SECONDS-START)) s] $preset at $rate req/s"
    timeout ${PART_TIMEOUT:-240} python3 tools/bench_prefix_cache.py \
      --config=gpu-8b-1gpu --platform=gpu --preset=$preset \
      --scenarios=off,both --num_requests=${NUM_REQUESTS:-32} --rate=$rate \
      --length_scale=0.5 --max_model_len=8192 --vocab_size=128000 \
      --cache_pages=${CACHE_PAGES:-2048} --out="$OUT/$name.json" \
      > "$OUT/$name.log" 2>&1
    echo "exit $?"
    grep -A3 "^scenario" "$OUT/$name.log"
    grep -A4 "^the requests a cache" "$OUT/$name.log"
  done
done
echo "done after $((SECONDS-START)) s"
