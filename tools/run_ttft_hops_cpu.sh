#!/usr/bin/env bash
# Where one stream's time to first token goes, hop by hop, on the CPU: the
# tiny model's test deployment (`pdjax.launch.local --config=test`), one
# request at a time through tools/batch_eval.py, with
# tools/gpu/ttft_hops.patch applied to this tree for the run (reverted on
# exit) and tools/gpu/ttft_hops.py's table over the last N - 20 requests.
# DEPLOYMENT: coloc (default; the decode worker prefills) or disagg (one
# prefill worker, KV over the host-staged grpc transport). BASELINE=1:
# serve from the earlier tree tools/gpu/stage_baseline.sh put in .baseline
# (its own marks applied there) instead of this one. EVAL_FLAGS: flags added
# to batch_eval's (e.g. --sessions: the requests on one session with the
# router).
#
#   bash tools/run_ttft_hops_cpu.sh OUT_DIR [N=300]
set -u
OUT=${1:?usage: run_ttft_hops_cpu.sh OUT_DIR [N]}
N=${2:-300}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-$PWD/.venv/bin/python}
if [ "${BASELINE:-0}" = 1 ]; then
  [ -f .baseline/COMMIT ] || { echo "no .baseline: stage_baseline.sh"; exit 1; }
  cd .baseline || exit 1
  export GIT_CEILING_DIRECTORIES=$(dirname "$PWD")  # not the enclosing repo
fi
git apply tools/gpu/ttft_hops.patch || exit 1
pid=
cleanup() {
  [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid"
  git apply -R tools/gpu/ttft_hops.patch
}
trap cleanup EXIT
$PY - "$OUT" <<'PY'
import json, sys
import numpy as np
rng = np.random.default_rng(0)
with open(f"{sys.argv[1]}/prompts.jsonl", "w") as f:
  for _ in range(400):
    ids = rng.integers(5, 250, 100).tolist()
    f.write(json.dumps({"prompt_token_ids": ids, "max_tokens": 8}) + "\n")
PY
num_prefill=0
[ "${DEPLOYMENT:-coloc}" = disagg ] && num_prefill=1
rm -rf "$OUT/trace"; mkdir -p "$OUT/trace"
PYTHONPATH=$PWD PDJAX_TRACE=$OUT/trace/t $PY -m pdjax.launch.local \
  --platform=cpu --config=test --serve --num_prefill=$num_prefill \
  --run_dir="$OUT/run" > "$OUT/launch.log" 2>&1 &
pid=$!
addr=
for _ in $(seq 1 240); do
  addr=$(grep -o 'router ready at [0-9.:]*' "$OUT/launch.log" | awk '{print $4}')
  [ -n "$addr" ] && break
  kill -0 $pid 2>/dev/null || break
  sleep 1
done
[ -z "$addr" ] && { echo "not ready"; tail -20 "$OUT/launch.log"; exit 1; }
PYTHONPATH=$PWD PDJAX_TRACE=$OUT/trace/t $PY tools/batch_eval.py \
  --target="$addr" --input="$OUT/prompts.jsonl" --num_requests="$N" \
  --concurrency=1 --ignore_eos --label=cpu --noprogress ${EVAL_FLAGS:-} \
  --out_dir="$OUT/batch_eval" > "$OUT/batch_eval.log" 2>&1
awk '/=====/{p=1} p' "$OUT/batch_eval.log" | grep -v "^results in"
$PY tools/gpu/ttft_hops.py "$OUT/trace/t" --last=$((N - 20)) |
  tee "$OUT/hops.txt"
