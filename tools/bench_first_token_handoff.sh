#!/usr/bin/env bash
# Does the first token wait for the KV hand-off? One stream at a time
# through a disaggregated deployment (test.toml: the tiny model, KV over the
# host-staged grpc transport), the router forwarding the prefill's first
# token at once (kv_failure_policy=recompute, the default) or after the
# hand-off (=fail), ROUNDS alternating runs each; TTFT and TPOT from
# tools/batch_eval.py per run.
#
#   bash tools/bench_first_token_handoff.sh OUT_DIR
#
# ROUNDS (3), REQUESTS (150), PROMPT (100 ids), MAX_TOKENS (8).
set -u
OUT=${1:?usage: bench_first_token_handoff.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-.venv/bin/python}
PDJAX=${PDJAX:-.venv/bin/pdjax}
REQUESTS=${REQUESTS:-150}
"$PY" - "$OUT/prompts.jsonl" "$REQUESTS" "${PROMPT:-100}" "${MAX_TOKENS:-8}" <<'PY'
import json, sys
import numpy as np
path, n, length, max_tokens = sys.argv[1], *map(int, sys.argv[2:])
rng = np.random.default_rng(0)
with open(path, "w") as f:
  for _ in range(n):
    f.write(json.dumps({"prompt_token_ids": rng.integers(10, 500, length)
                        .tolist(), "max_tokens": max_tokens}) + "\n")
PY
run() {  # run NAME POLICY
  local name=$1 dir=$OUT/$1 pid port
  mkdir -p "$dir"
  "$PDJAX" serve --config=test --serve --port=0 --run_dir="$dir/run" \
    --kv_failure_policy="$2" > "$dir/serve.log" 2>&1 &
  pid=$!
  for _ in $(seq 300); do
    grep -q "^serving" "$dir/serve.log" && break; sleep 1
  done
  port=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["port"])' \
    "$dir/run/router.port")
  "$PY" tools/batch_eval.py --target="127.0.0.1:$port" \
    --input="$OUT/prompts.jsonl" --concurrency=1 --rate=inf \
    --num_requests="$REQUESTS" --out_dir="$dir/eval" > "$dir/eval.txt" 2>&1
  kill -TERM $pid; wait $pid
  echo "$name: $(grep -h '^TTFT \|^TPOT ' "$dir/eval.txt" | awk '{printf "%s p50 %s ms  ", $1, $3}')"
}
for i in $(seq "${ROUNDS:-3}"); do
  run "early$i" recompute
  run "after_handoff$i" fail
done | tee "$OUT/summary.txt"
