#!/usr/bin/env bash
# Does decode stay as fast as a fresh engine's under long mixed traffic?
# (tools/bench_decode_churn.py, Llama-3-8B shapes, gpu-8b's decode pool, one
# GPU.) Two parts:
#   mixed   one probe (1 row, then 33 rows: the 128-row program padded with
#           free rows) before and after 2,400 requests of chat, summarize and
#           multiturn, a fifth of them cancelled part-way; target: after /
#           before within 1.05x;
#   soak    rounds of 400 such requests and a probe for SOAK_MINUTES (default
#           480: hours), each round a record and a point of soak.png.
# The device tool's calls end after 10 minutes: run the soak on a machine of
# your own (`bash tools/gpu/run_decode_soak.sh OUT_DIR`, PARTS=soak).
set -u
OUT=${1:?usage: run_decode_soak.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
start_call "$OUT"
MIX="--churn_presets=chat,summarize,multiturn --cancel_share=0.2"
for part in ${PARTS:-mixed}; do
  case $part in
    mixed)
      for rows in 1 33; do
        echo "=== [$((SECONDS-START)) s] mixed, probe of $rows row(s)"
        python3 tools/bench_decode_churn.py --model=llama3-8b $MIX \
          --churn_requests=2400 --probe_rows=$rows --probe_context=2048 \
          --out="$OUT/mixed.jsonl" > "$OUT/mixed_$rows.log" 2>&1
        echo "exit $?"; awk '/^== /{p=1} p' "$OUT/mixed_$rows.log"
      done ;;
    soak)
      echo "=== [$((SECONDS-START)) s] soak, ${SOAK_MINUTES:-480} min"
      python3 tools/bench_decode_churn.py --model=llama3-8b $MIX \
        --churn_requests=400 --probe_context=2048 \
        --soak_minutes="${SOAK_MINUTES:-480}" --chart="$OUT/soak.png" \
        --out="$OUT/soak.jsonl" 2>&1 | tee "$OUT/soak.log" | grep round ;;
  esac
done
echo "done after $((SECONDS-START)) s"
