#!/usr/bin/env bash
# Does decode stay as fast as a fresh engine's under long mixed traffic?
# (tools/bench_decode_churn.py, Llama-3-8B shapes, gpu-8b's decode pool, one
# GPU.) Parts (PARTS, default "mixed"):
#   scatter the KV write alone (tools/gpu/probe_scatter_duplicates.py):
#           rows sharing the null page's slot with equal or different
#           values, indices declared unique or not;
#   cause   the slowdown's cause: every call running all 128 rows (the
#           engine before row programs), 240 chat requests, then the probe
#           again after setting each part of the free rows' device state
#           back to a fresh engine's, one part more per probe;
#   mixed   one probe (1 row, then 33 rows: the 128-row program padded with
#           free rows) before and after 2,400 requests of chat, summarize and
#           multiturn, a fifth of them cancelled part-way; target: after /
#           before within 1.05x;
#   soak    rounds of SOAK_CHURN (400) such requests and a probe of
#           SOAK_ROWS (1) rows for SOAK_MINUTES (default 480: hours), each
#           round a record and a point of soak.png.
# The device tool's calls end after 10 minutes: run the soak on a machine of
# your own (`bash tools/gpu/run_decode_soak.sh OUT_DIR`, PARTS=soak).
set -u
OUT=${1:?usage: run_decode_soak.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
start_call "$OUT"
use_compile_cache
MIX="--churn_presets=chat,summarize,multiturn --cancel_share=0.2"
for part in ${PARTS:-mixed}; do
  case $part in
    scatter)
      echo "=== [$((SECONDS-START)) s] scatter"
      timeout 120 python3 tools/gpu/probe_scatter_duplicates.py \
        --out="$OUT/scatter.json" 2>&1 | grep -v "^[WI][0-9]" ;;
    cause)
      echo "=== [$((SECONDS-START)) s] cause, every call all 128 rows"
      timeout ${PART_TIMEOUT:-300} python3 tools/bench_decode_churn.py \
        --model=llama3-8b --churn_requests=240 --probe_calls=12 \
        --row_buckets=MAX \
        --reset_after_churn=tokens,positions,generated,done,null_page \
        --out="$OUT/cause.jsonl" > "$OUT/cause.log" 2>&1
      echo "exit $?"; grep -v "^W0000\|^I0000" "$OUT/cause.log" | tail -16 ;;
    mixed)
      for rows in ${MIXED_ROWS:-1 33}; do
        echo "=== [$((SECONDS-START)) s] mixed, probe of $rows row(s)"
        timeout ${PART_TIMEOUT:-600} python3 tools/bench_decode_churn.py \
          --model=llama3-8b $MIX --churn_kv=${CHURN_KV:-fresh} \
          --churn_requests=${CHURN:-2400} --probe_rows=$rows --probe_context=2048 \
          --out="$OUT/mixed.jsonl" > "$OUT/mixed_$rows.log" 2>&1
        echo "exit $?"; awk '/^== /{p=1} p' "$OUT/mixed_$rows.log"
      done ;;
    soak)
      echo "=== [$((SECONDS-START)) s] soak, ${SOAK_MINUTES:-480} min"
      python3 tools/bench_decode_churn.py --model=llama3-8b $MIX \
        --churn_kv=${CHURN_KV:-fresh} --probe_rows=${SOAK_ROWS:-1} \
        --churn_requests=${SOAK_CHURN:-400} --probe_context=2048 \
        --soak_minutes="${SOAK_MINUTES:-480}" --chart="$OUT/soak.png" \
        --out="$OUT/soak.jsonl" 2>&1 | tee "$OUT/soak.log" | grep round ;;
  esac
done
echo "done after $((SECONDS-START)) s"
