#!/usr/bin/env bash
# The deployment-wide KV store on one GPU: two prefill workers and a decode
# worker sharing the card (Llama-3.2-1B shapes, random bf16: three
# processes' weights fit one card), the `multiturn` and `shared-prefix`
# presets with load-only routing, per-worker caches (kv0) against fetching
# from the peer (share0) and against peer + KV store (store0)
# (tools/bench_prefix_cache.py): prompt tokens computed, KV bytes moved,
# TTFT p50/p90.
#
#   bash tools/gpu/run_shared_kv_one_gpu.sh OUT_DIR
#
# PRESETS (default "multiturn shared-prefix"), SCENARIOS (kv0,share0,store0).
set -u
OUT=${1:?usage: run_shared_kv_one_gpu.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
start_call "$OUT"
use_compile_cache
# Three processes on one card: their memory shares add up to 0.9.
cat > "$OUT/shared-kv-1gpu.toml" <<'TOML'
checkpoint = "random:llama3-1b"
dtype = "bfloat16"
kv_transport = "device"
page_size = 16
max_seq_len = 8192

[prefill]
mesh = "tp=1"
sharding = "prefill_tp"
buckets = [128, 512, 1024, 2048, 4096, 8192]
max_batch = 4
max_batch_tokens = 8192
gpu_memory_fraction = 0.25

[decode]
mesh = "dp=1"
sharding = "decode_dp"
max_seqs = 64
num_pages = 8192
steps_per_call = 4
table_buckets = [32, 128]
buckets = [128, 512, 1024, 2048, 4096, 8192]
max_batch = 4
max_batch_tokens = 8192
gpu_memory_fraction = 0.4

[router]
local_prefill_threshold = 0
TOML
for preset in ${PRESETS:-multiturn shared-prefix}; do
  echo "=== [$((SECONDS-START)) s] $preset"
  timeout ${PART_TIMEOUT:-270} python3 tools/bench_prefix_cache.py \
    --config="$OUT/shared-kv-1gpu.toml" --platform=gpu --preset=$preset \
    --scenarios=${SCENARIOS:-kv0,share0,store0} --num_requests=48 --rate=4 \
    --length_scale=0.5 --max_model_len=8192 --vocab_size=128000 \
    --cache_pages=2048 --out="$OUT/shared_kv_$preset.json" \
    > "$OUT/shared_kv_$preset.log" 2>&1
  echo "exit $?"; grep -A4 "^scenario" "$OUT/shared_kv_$preset.log"
done
echo "done after $((SECONDS-START)) s"
