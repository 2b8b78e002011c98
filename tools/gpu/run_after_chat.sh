#!/usr/bin/env bash
# Does a disaggregated deployment decode summarize requests slower after it
# has served chat? One deployment (CONFIG, default disagg, as run_goodput.sh
# starts it): summarize at SUM_RATE for SUM_DUR s, chat at CHAT_RATE for
# CHAT_DUR s, summarize again; prints each run's TPOT and the step gaps of
# its first request.
#
#   bash tools/gpu/run_after_chat.sh OUT_DIR      (carry .whl; two GPUs)
#
# OUT_DIR gets after_chat.tar.gz (every run and log) and env.txt.
set -u
OUT=${1:?usage: run_after_chat.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
PY=${PYTHON:-python3}
. tools/gpu/gpu_env.sh
export XLA_PYTHON_CLIENT_PREALLOCATE=false PDJAX_CACHE=${PDJAX_CACHE:-/tmp/pdjax_cache}
start_call "$OUT"
. tools/gpu/deploy_lib.sh
D=/tmp/pdjax_after_chat; rm -rf "$D"
# shellcheck disable=SC2046
deploy_up "$D" 50151 240 --config=gpu-8b --platform=gpu \
  $(deploy_args "${CONFIG:-disagg}") || exit 1
echo "up after $((SECONDS - START)) s"
run() {  # name preset rate dur
  $PY tools/batch_eval.py --target=127.0.0.1:50151 --preset=$2 --sweep_rates=$3 \
    --duration_s=$4 --vocab_size=128000 --max_model_len=8192 --label=$1 \
    --out_dir="$D/$1" --noprogress > "$D/$1.log" 2>&1
  echo "== $1 ($2 at $3 req/s): exit $? at $((SECONDS - START)) s"
  grep -A3 "rate    attain" "$D/$1.log" | tail -2
  $PY - "$D/$1" <<'PYEOF'
import glob, json, sys
for f in sorted(glob.glob(sys.argv[1] + "/rate_*/results.jsonl")):
  rows = [json.loads(l) for l in open(f)]
  r = rows[0]; t = r["token_times"]
  print("  first request", r["prompt_tokens"], "tokens; gaps of 4 steps (s):",
        [round(b - a, 3) for a, b in zip(t[::4], t[4::4])][:8])
PYEOF
}
run sum_before summarize ${SUM_RATE:-2} ${SUM_DUR:-10}
run chat chat ${CHAT_RATE:-16} ${CHAT_DUR:-10}
run sum_after summarize ${SUM_RATE:-2} ${SUM_DUR:-10}
kill -INT $LPID 2>/dev/null; wait $LPID 2>/dev/null
tar -C "$D" -czf "$OUT/after_chat.tar.gz" --exclude='*.port' .
echo "done after $((SECONDS - START)) s"
