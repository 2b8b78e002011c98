#!/usr/bin/env bash
# An FP8 KV pool's decode step with the Pallas kernel's products in float16
# (the kernel's choice for bf16 queries over float8 pages) against bf16
# products (`--pallas_widen_to=bfloat16`, the kernel before) and a bf16
# pool, on ONE GPU (Llama-3-8B shapes, random bf16, joined projections,
# runs alternating); first the kernel alone against the float32 reference
# on the card (its error bound), which also shows it compiles there; last,
# a bf16 pool's step with its program's memory analysis.
#
#   bash tools/gpu/probe_fp8_pool_products.sh OUT_DIR
# ROUNDS: pairs of runs (default 2); SHORT=1: the 4K pair only, a
# smaller kernel check.
set -u
OUT=${1:?usage: probe_fp8_pool_products.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
start_call "$OUT" > /dev/null
use_compile_cache
echo "=== [$((SECONDS - START)) s] kernel against the reference"
if [ "${SHORT:-0}" = 1 ]; then
  shape="--rows=8,32 --contexts=4096 --iters=5"
else
  shape="--rows=1,8,32,128 --contexts=1024,4096 --iters=10"
fi
# shellcheck disable=SC2086
timeout 150 python3 tools/gpu/probe_pallas_attention.py $shape \
  --pool_dtypes=float8_e4m3fn --variants=pallas \
  --out="$OUT/kernel.jsonl" > "$OUT/kernel.log" 2>&1
echo "exit $?"; tail -12 "$OUT/kernel.log"
for i in $(seq "${ROUNDS:-2}"); do
  decode_at 4096 f16_4k_$i 8,32,64 --kv_dtype=fp8
  decode_at 4096 bf16prod_4k_$i 8,32,64 --kv_dtype=fp8 --pallas_widen_to=bfloat16
  [ "${SHORT:-0}" = 1 ] && continue
  decode_at 1024 f16_1k_$i 32,128 --kv_dtype=fp8
  decode_at 1024 bf16prod_1k_$i 32,128 --kv_dtype=fp8 --pallas_widen_to=bfloat16
done
# A bf16 pool beside them, with its program's memory analysis (temp
# bytes against the pool's: 32 x 8K and 64 x 4K did not fit a card
# whose budget held the pool and the weights, a pool-sized allocation
# failing in the generate program).
# cuDNN's paged attention (the default) and the Pallas kernel on the same
# pool: cuDNN gets the whole pool with a table padded to blocks / rows
# columns, and a workspace sized by that width would be pool-sized.
decode_at 4096 bf16pool_4k 8,32 --memory_analysis
decode_at 4096 bf16pool_4k_pallas 8,32 --memory_analysis --attention=pallas
python3 - "$OUT"/decode_bf16pool_4k*.jsonl <<'PY'
import json, sys
for path in sys.argv[1:]:
  for line in open(path):
    r = json.loads(line)["results"]
    if "memory_analysis" in r:
      print(path.rsplit("/", 1)[-1],
            {k: r.get(k) for k in ("memory_analysis", "pool_bytes")})
PY
echo "done after $((SECONDS - START)) s"
