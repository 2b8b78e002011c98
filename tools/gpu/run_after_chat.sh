#!/usr/bin/env bash
# Does a disaggregated deployment decode summarize requests slower after it
# has served chat? One deployment (CONFIG, default disagg, as run_goodput.sh
# starts it): summarize at SUM_RATE for SUM_DUR s, chat at CHAT_RATE for
# CHAT_DUR s, summarize again; prints each run's TPOT and the step gaps of
# its first request, and the decode worker's metrics after each run: its
# iterations' launch and delivery time (is the host or the device slower?)
# and its device memory.
#
#   bash tools/gpu/run_after_chat.sh OUT_DIR      (carry .whl; two GPUs)
#
# The same on this machine's CPUs (tiny model, the default local cluster):
#   PYTHON=.venv/bin/python PLATFORM=cpu DEPLOY_CONFIG=local VOCAB=512 \
#     MAX_LEN=1024 CONFIG=grpc SUM_RATE=1 SUM_DUR=4 CHAT_RATE=4 CHAT_DUR=8 \
#     bash tools/gpu/run_after_chat.sh OUT_DIR
#
# OUT_DIR gets after_chat.tar.gz (every run and log) and env.txt.
set -u
OUT=${1:?usage: run_after_chat.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
PY=${PYTHON:-python3}
PLATFORM=${PLATFORM:-gpu}
. tools/gpu/gpu_env.sh
export XLA_PYTHON_CLIENT_PREALLOCATE=false PDJAX_CACHE=${PDJAX_CACHE:-/tmp/pdjax_cache}
if [ "$PLATFORM" = gpu ]; then
  start_call "$OUT"
else
  START=$SECONDS; export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  { date -u +%FT%TZ; $PY -c 'import jax, sys; print(sys.version); print("jax", jax.__version__, jax.devices())'; } > "$OUT/env.txt" 2>&1
fi
. tools/gpu/deploy_lib.sh
D=/tmp/pdjax_after_chat; rm -rf "$D"
# Workers serve /metrics too (a free port each, in their port files): the
# decode worker's iteration phases and device memory after every run.
ARGS=$(deploy_args "${CONFIG:-disagg}") || exit 1
case $ARGS in
  *--worker_flags=*) ARGS=${ARGS/--worker_flags=/--worker_flags=--metrics_port=0,} ;;
  *) ARGS="$ARGS --worker_flags=--metrics_port=0" ;;
esac
# shellcheck disable=SC2086
deploy_up "$D" 50151 240 --config="${DEPLOY_CONFIG:-gpu-8b}" --platform="$PLATFORM" \
  $ARGS || exit 1
echo "up after $((SECONDS - START)) s"
scrape() {  # name: the decode worker's metrics since the last scrape
  $PY - "$D/cluster" "$D/$1.metrics" "$D/last.metrics" <<'PYEOF'
import glob, json, os, re, sys, urllib.request
run_dir, out, last = sys.argv[1:]
port = json.load(open(sorted(glob.glob(run_dir + "/decode*.port"))[0]))["metrics_port"]
text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
open(out, "w").write(text)
def values(t):
  return {m[0]: float(m[1]) for m in re.findall(r"^(pdjax_\S+) (\S+)$", t, re.M)}
now, before = values(text), values(open(last).read()) if os.path.exists(last) else {}
open(last, "w").write(text)
for phase in ("launch", "deliver"):
  key = 'pdjax_decode_iteration_seconds_%s{phase="' + phase + '"}'
  n = now.get(key % "count", 0) - before.get(key % "count", 0)
  s = now.get(key % "sum", 0) - before.get(key % "sum", 0)
  print(f"  decode iterations: {phase} {1e3 * s / max(n, 1):.2f} ms mean over {n:.0f}")
mem = {k.split('stat="')[1][:-2]: v for k, v in now.items()
       if k.startswith("pdjax_device_memory_bytes")}
print("  decode device memory (GiB):", {k: round(v / 2**30, 2) for k, v in sorted(mem.items())})
PYEOF
}
run() {  # name preset rate dur
  $PY tools/batch_eval.py --target=127.0.0.1:50151 --preset=$2 --sweep_rates=$3 \
    --duration_s=$4 --vocab_size=${VOCAB:-128000} --max_model_len=${MAX_LEN:-8192} --label=$1 \
    --out_dir="$D/$1" --noprogress > "$D/$1.log" 2>&1
  echo "== $1 ($2 at $3 req/s): exit $? at $((SECONDS - START)) s"
  grep -A1 "rate    attain" "$D/$1.log"
  $PY - "$D/$1" <<'PYEOF'
import glob, json, sys
for f in sorted(glob.glob(sys.argv[1] + "/rate_*/results.jsonl")):
  rows = [json.loads(l) for l in open(f)]
  r = rows[0]; t = r["token_times"]
  print("  first request", r["prompt_tokens"], "tokens; gaps of 4 steps (s):",
        [round(b - a, 3) for a, b in zip(t[::4], t[4::4])][:8])
PYEOF
}
scrape up
run sum_before summarize ${SUM_RATE:-2} ${SUM_DUR:-10}; scrape sum_before
run chat chat ${CHAT_RATE:-16} ${CHAT_DUR:-10}; scrape chat
run sum_after summarize ${SUM_RATE:-2} ${SUM_DUR:-10}; scrape sum_after
kill -INT $LPID 2>/dev/null; wait $LPID 2>/dev/null
tar -C "$D" -czf "$OUT/after_chat.tar.gz" --exclude='*.port' .
echo "done after $((SECONDS - START)) s"
