#!/usr/bin/env bash
# pdjax's engines beside the transformers peer on one GPU, in one device
# call (Llama-3-8B shapes, random bf16 weights):
#   check    the engine correctness check (prefill + decode against a full
#            forward pass, bf16, the GPU kernels' paths);
#   decode   bench_decode at context 1024, 1-128 live rows, 4 steps per call
#            (the serving default), each in the program serving runs them in;
#   peer     tools/bench_peer.py: prefill 512 / 2048, compiled decode steps;
#   prefill  bench_prefill 512 / 2048, TP=1;
#   churn    bench_decode_churn: one 6K-token request before and after a
#            churn of chat requests, first with the engine as it was
#            (first-in-first-out pages, every call running all rows), then
#            as it is (lowest pages first, row programs).
# Each part runs under `timeout` within BUDGET_S (default 560 s); records
# are JSON lines in OUT_DIR, logs beside them.
#
#   bash tools/gpu/run_engines_beside_peer.sh OUT_DIR
set -u
OUT=${1:?usage: run_engines_beside_peer.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
start_call "$OUT"
BUDGET_S=${BUDGET_S:-560}
export JAX_COMPILATION_CACHE_DIR=/tmp/pdjax_jax_cache
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9

part() {  # part NAME WANTED_S CMD...: runs CMD within what the budget has left
  local name=$1 want=$2 left; shift 2
  left=$(( BUDGET_S - (SECONDS - START) ))
  (( left < 20 )) && { echo "=== $name: skipped (budget spent)"; return; }
  (( want > left )) && want=$left
  echo "=== [$((SECONDS - START)) s] $name (timeout ${want} s)"
  timeout --kill-after=5 "$want" "$@" > "$OUT/$name.log" 2>&1
  echo "    exit $?"
  grep -v '^[IWE][0-9]\{4\} \|Warning\|warn(' "$OUT/$name.log" | awk '/^== /{p=1} p' | tail -40
}

M=--model=llama3-8b
part check 70 python3 tools/bench_common.py --out="$OUT/check.jsonl"
part decode 130 python3 tools/bench_decode.py $M --context_lengths=1024 \
  --batch_sizes=1,2,8,32,128 --steps_per_call=4 --calls_per_sample=4 \
  --warmup=1 --repeat=3 --out="$OUT/decode.jsonl"
XLA_PYTHON_CLIENT_MEM_FRACTION= part peer 190 python3 tools/bench_peer.py $M \
  --prefill_lengths=512,2048 --decode_batches=1,8,32 --decode_modes=compiled \
  --generate_batch=0 --warmup=2 --repeat=5 --budget_s=150 \
  --out="$OUT/peer.jsonl"
part prefill 70 python3 tools/bench_prefill.py $M --prompt_lengths=512,2048 \
  --tp=1 --warmup=2 --repeat=5 --out="$OUT/prefill.jsonl"
part churn_before_fix 130 python3 tools/bench_decode_churn.py $M \
  --page_order=fifo --row_buckets=MAX --churn_requests=240 --probe_calls=12 \
  --out="$OUT/churn.jsonl"
part churn 130 python3 tools/bench_decode_churn.py $M --churn_requests=240 \
  --probe_calls=12 --out="$OUT/churn.jsonl"
echo "done after $((SECONDS - START)) s"
