#!/usr/bin/env bash
# FP8 weights with an FP8 KV pool against bf16, the decode step on ONE GPU
# (Llama-3-8B shapes, random weights, joined projections, runs
# alternating): bf16 weights and pool; FP8 weights read by bf16 rows
# (W8A16) over an FP8 pool (the Pallas kernel, its products in float16);
# FP8 weights and activations (W8A8) over an FP8 pool; at 1K and 4K
# context, 8 and 32 rows. The FP8 target is a step 1.7x faster than bf16
# at 8-32 rows: with bf16 pages the bytes alone allow 1.57x at 32 x 1K
# (the weights read 8.2 GB against 15.3, the pages 4.3 GB either way),
# so the pool's bytes must halve too (1.90x).
#
#   bash tools/gpu/probe_fp8_weights_and_pool.sh OUT_DIR
# ROUNDS: rounds of the alternation (default 1); ROWS (default 8,32);
# CONTEXTS (default "1024 4096").
set -u
OUT=${1:?usage: probe_fp8_weights_and_pool.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
start_call "$OUT" > /dev/null
use_compile_cache
rows=${ROWS:-8,32}
for i in $(seq "${ROUNDS:-1}"); do
  for ctx in ${CONTEXTS:-1024 4096}; do
    decode_at $ctx bf16_${ctx}_$i "$rows"
    decode_at $ctx w8a16_fp8kv_${ctx}_$i "$rows" --weight_dtype=fp8 --kv_dtype=fp8
    decode_at $ctx w8a8_fp8kv_${ctx}_$i "$rows" --weight_dtype=fp8 \
      --fp8_activations --kv_dtype=fp8
  done
done
echo "done after $((SECONDS - START)) s"
