#!/usr/bin/env bash
# Disaggregated vs colocated goodput on two GPUs (Llama-3-8B-shaped random
# bf16 weights), in one call of the device tool:
#
#   bash tools/gpu/run_goodput.sh OUT_DIR CONFIG[,CONFIG...]
#
# CONFIG names (each a deployment started by pdjax.launch.local, then the
# batch-eval driver's `chat` and `summarize` presets swept over rates):
#   coloc2   two colocated replicas behind the router, one per GPU
#   disagg   one prefill worker (GPU 0) + one decode worker (GPU 1), device
#            transport (CUDA IPC fast path when available)
#   disagg_mem75  the same with XLA's default 0.75 memory share
#   grpc     the same over the grpc transport
#   xfer     the same over jax.experimental.transfer (fast path off)
#   tp2      one colocated engine with TP=2 over both GPUs
# Raw results (results.jsonl + summary.json per run), worker logs and plots
# go to OUT_DIR as a few files (the device tool returns at most 8).
# Knobs: BUDGET_S (default 540), PRESETS, CHAT_RATES, SUM_RATES, CHAT_N,
# SUM_N (requests per rate), CHAT_DUR, SUM_DUR (instead of a count: the
# arrival window per rate, seconds: batch_eval --duration_s), PORT (router,
# default 50151), RUNS (scratch dir, default /tmp/pdjax_goodput). GPUs: from
# 0 up, or those CUDA_VISIBLE_DEVICES lists (two sweeps can share a host:
# tools/gpu/run_goodput_pairs.sh).
set -u
OUT=${1:?usage: run_goodput.sh OUT_DIR CONFIGS}
CONFIGS=${2:-disagg,coloc2}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
PY=${PYTHON:-python3}
DEPLOY=${DEPLOY:-gpu-8b}
PLATFORM=${PLATFORM:-gpu}
VOCAB=${VOCAB:-128000}
MAX_LEN=${MAX_LEN:-8192}
EXTRA_EVAL=${EXTRA_EVAL:-}
CHAT_EVAL=${CHAT_EVAL:-}
SUM_EVAL=${SUM_EVAL:-}
BUDGET_S=${BUDGET_S:-540}
CHAT_RATES=${CHAT_RATES:-2,4,8,16}
SUM_RATES=${SUM_RATES:-0.5,1,2,4}
CHAT_N=${CHAT_N:-48}
SUM_N=${SUM_N:-24}
CHAT_DUR=${CHAT_DUR:-}
SUM_DUR=${SUM_DUR:-}
PORT=${PORT:-50151}
PRESETS=${PRESETS:-chat summarize}
. tools/gpu/gpu_env.sh
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PDJAX_CACHE=${PDJAX_CACHE:-/tmp/pdjax_cache}
install_carried_wheels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
. tools/gpu/deploy_lib.sh
RUNS=${RUNS:-/tmp/pdjax_goodput}; rm -rf "$RUNS"; mkdir -p "$RUNS"
START=$SECONDS
left() { echo $(( BUDGET_S - (SECONDS - START) )); }

for cfg in ${CONFIGS//,/ }; do
  if (( $(left) < 90 )); then echo "budget left $(left) s: skipping $cfg"; continue; fi
  echo "=== [$((SECONDS - START)) s] $cfg"
  dir=$RUNS/$cfg
  # shellcheck disable=SC2046
  deploy_up "$dir" "$PORT" $(( $(left) - 20 )) --config=$DEPLOY \
    --platform=$PLATFORM $(deploy_args "$cfg") || continue
  echo "  up after $((SECONDS - START)) s"
  for preset in $PRESETS; do
    if [ $preset = chat ]; then rates=$CHAT_RATES; n=$CHAT_N; dur=$CHAT_DUR; pe=$CHAT_EVAL
    else rates=$SUM_RATES; n=$SUM_N; dur=$SUM_DUR; pe=$SUM_EVAL; fi
    count="--num_requests=$n"; [ -n "$dur" ] && count="--duration_s=$dur"
    t=$(( $(left) - 30 )); (( t < 30 )) && { echo "  no time for $preset"; continue; }
    timeout $t $PY tools/batch_eval.py --target=127.0.0.1:$PORT --preset=$preset \
      --sweep_rates=$rates $count --vocab_size=$VOCAB --max_model_len=$MAX_LEN $EXTRA_EVAL $pe \
      --label=$cfg --out_dir="$dir/$preset" --noprogress > "$dir/$preset.log" 2>&1
    echo "  $preset: exit $? at $((SECONDS - START)) s"
    grep -A12 "max goodput\|Max goodput\|rate " "$dir/$preset.log" | tail -14
  done
  kill -INT $LPID 2>/dev/null; wait $LPID 2>/dev/null
done

plot_goodput "$OUT" "$RUNS" "$RUNS"
tar -C "$RUNS" -czf "$OUT/goodput_runs.tar.gz" --exclude='*.port' . 2>/dev/null
for d in "$RUNS"/*/; do for p in chat summarize; do
  [ -f "$d/$p.log" ] && { echo "##### $(basename "$d") $p"; tail -40 "$d/$p.log"; }
done; done > "$OUT/summary.txt"
cat "$OUT/summary.txt" | tail -120
echo "done after $((SECONDS - START)) s"
