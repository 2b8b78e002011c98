#!/usr/bin/env bash
# Follow-ups on one GPU, in one device call (Llama-3-8B shapes, random bf16):
#   churn_fifo       the churn probe with first-in-first-out pages and row
#                    programs,
#   churn_all_rows   ... with lowest-first pages and every call running all
#                    128 rows: which of the two changes ends the slowdown
#                    after a chat load (tools/bench_decode_churn.py);
#   decode_long      decode steps at 4K and 8K context, 1-128 rows;
#   serving          run_serving_one_gpu.sh's disagg_lg1 (the prefill in one
#                    program) and coloc_budget (512 prompt tokens per
#                    iteration) deployments.
# Everything lands in OUT_DIR/results.tar.gz (and the console).
#
#   bash tools/gpu/run_churn_cause_and_serving_variants.sh OUT_DIR
set -u
OUT=${1:?usage: run_churn_cause_and_serving_variants.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
start_call "$OUT"
export JAX_COMPILATION_CACHE_DIR=/tmp/pdjax_jax_cache
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
M=--model=llama3-8b
churn() {  # churn NAME FLAGS...
  local name=$1; shift
  echo "=== [$((SECONDS - START)) s] $name"
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 120 python3 \
    tools/bench_decode_churn.py $M --churn_requests=240 --probe_calls=12 \
    --out="$OUT/churn.jsonl" "$@" > "$OUT/$name.log" 2>&1
  echo "    exit $?"; awk '/^== /{p=1} p' "$OUT/$name.log"
}
churn churn_fifo --page_order=fifo
churn churn_all_rows --row_buckets=MAX
echo "=== [$((SECONDS - START)) s] decode_long"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 100 python3 tools/bench_decode.py $M \
  --context_lengths=4096,8192 --batch_sizes=1,32,128 --steps_per_call=4 \
  --calls_per_sample=4 --warmup=1 --repeat=3 --out="$OUT/decode_long.jsonl" \
  > "$OUT/decode_long.log" 2>&1
echo "    exit $?"; awk '/^== /{p=1} p' "$OUT/decode_long.log"
BUDGET_S=$(( ${BUDGET_S:-560} - (SECONDS - START) )) \
  DEPLOYMENTS="disagg_lg1 coloc_budget" \
  bash tools/gpu/run_serving_one_gpu.sh "$OUT/serving"
(cd "$OUT" && tar czf /tmp/results.tar.gz . && mv /tmp/results.tar.gz .)
echo "done after $((SECONDS - START)) s"
