#!/usr/bin/env bash
# Serving latency on ONE GPU (Llama-3-8B shapes, random bf16): where the time
# to first token goes, one stream's TPOT, and TPOT at 32 streams, for the
# same card shared by a prefill and a decode worker (disaggregated, KV over
# CUDA IPC on the card) and for one colocated worker, through
# `python -m pdjax.launch.local --platform=gpu` and tools/batch_eval.py.
# Workload: prompts of 512 random ids, 128 output tokens, greedy, EOS
# ignored; 24 requests one at a time, then 128 at 32 concurrent.
#   disagg      1 prefill + 1 decode worker, 4 steps per generate call
#   disagg_s1   the same, 1 step per call (every token streamed as its step
#               finishes)
#   coloc       1 decode worker that prefills its own requests
#   disagg_lg1  disagg with the prefill in one program (no layer groups)
#   coloc_budget  coloc with a prefill token budget of 512 per iteration
# (gpu-8b-1gpu runs the prefill in one program; disagg_lg4 in 4 layer groups.)
# AFTER_CHURN=N (default 0): after those runs, N chat-shaped requests at 96
# concurrent (lengths scaled to the 1K context), then the 32-stream run again
# (label -c32after): does the serving loop stay as fast as it was fresh?
# DECODE_BOUND=1: then 64 requests of 16 prompt ids and 512 output tokens at
# 32 concurrent (label -c32decode): the serving loop's own overhead, with
# little prefill work sharing the card (prefill compute about 1% of the
# decode's), to set beside `bench_decode.py` at 32 rows and 256-512 context.
# DECODE_SETTINGS: TOML lines added to every deployment's [decode] table
# (e.g. 'fuse_projections = "off"'), PREFILL_SETTINGS the same for
# [prefill]; WORKER_FLAGS: flags added to every
# worker's (comma-separated, e.g. --gil_switch_interval_ms=5);
# ROUTER_FLAGS the same for the router's (e.g. --noworker_sessions);
# EVAL_FLAGS: flags added to the concurrency runs' batch_eval (e.g.
# --sessions).
# PATHS (default "grpc"): how batch_eval reaches the deployment, each a run
# of its own per concurrency, in this order: "grpc" (the router, pdjax's
# client), "router_http" (OpenAI HTTP served by the router's process:
# --gateway_port), "gateway" (OpenAI HTTP through a pdjax.launch.gateway
# process in front of the router).
# PROMPT_LEN (default 512): the prompts' length (the context grows to the
# next power of two above prompt + 128 tokens, the prefill bucket to the
# prompt); CONCURRENCIES (default "1 32"): the batch_eval runs per deployment.
# Per deployment: batch_eval's results (TTFT by stage from the router's
# usage), the decode worker's metrics after the runs, the launch log.
#
#   bash tools/gpu/run_serving_one_gpu.sh OUT_DIR
set -u
OUT=${1:?usage: run_serving_one_gpu.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
start_call "$OUT"
BUDGET_S=${BUDGET_S:-560}
export JAX_COMPILATION_CACHE_DIR=/tmp/pdjax_jax_cache
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export PDJAX_CACHE=/tmp/pdjax_cache
DEPLOYMENTS=${DEPLOYMENTS:-disagg coloc disagg_s1}
export PROMPT_LEN=${PROMPT_LEN:-512}
CONCURRENCIES=${CONCURRENCIES:-1 32}

python3 - "$OUT" <<'EOF'
import json, os, re, sys
import numpy as np
out = sys.argv[1]
rng = np.random.default_rng(0)
prompt_len = int(os.environ["PROMPT_LEN"])
context = 1 << (prompt_len + 128 - 1).bit_length()
with open(f"{out}/prompts.jsonl", "w") as f:
  for _ in range(160):
    ids = rng.integers(1000, 120000, prompt_len).tolist()
    f.write(json.dumps({"prompt_token_ids": ids, "max_tokens": 128}) + "\n")
with open(f"{out}/prompts_decode_bound.jsonl", "w") as f:
  for _ in range(64):
    ids = rng.integers(1000, 120000, 16).tolist()
    f.write(json.dumps({"prompt_token_ids": ids, "max_tokens": 512}) + "\n")
base = open("pdjax/configs/deployments/gpu-8b-1gpu.toml").read()
for steps in (4, 1):
  cfg = (re.sub(r"^buckets = \[[0-9, ]*\]$", f"buckets = [{prompt_len}]",
                base, flags=re.M)
         .replace("max_seq_len = 8192", f"max_seq_len = {context}")
         .replace("max_seqs = 128", "max_seqs = 64")
         .replace("table_buckets = [32, 128]",
                  f"table_buckets = [{context // 16}]")
         .replace("steps_per_call = 4", f"steps_per_call = {steps}")
         .replace("[decode]\n", "[decode]\n" + os.environ.get(
             "DECODE_SETTINGS", "").replace("\\n", "\n").strip() + "\n", 1)
         .replace("[prefill]\n", "[prefill]\n" + os.environ.get(
             "PREFILL_SETTINGS", "").replace("\\n", "\n").strip() + "\n", 1))
  open(f"{out}/serving_s{steps}.toml", "w").write(cfg)
  if steps == 4:
    open(f"{out}/serving_budget.toml", "w").write(cfg.replace(
        "[decode]\n", "[decode]\nprefill_token_budget = 512\n", 1))
EOF

PATHS=${PATHS:-grpc}
http_flag=
[[ " $PATHS " == *" router_http "* || " $PATHS " == *" gateway "* ]] &&
  http_flag=--gateway_port=0

run_deployment() {  # run_deployment NAME CONFIG LAUNCH_FLAGS...
  local name=$1 cfg=$2 left; shift 2
  left=$(( BUDGET_S - (SECONDS - START) ))
  (( left < 90 )) && { echo "=== $name: skipped (budget spent)"; return; }
  echo "=== [$((SECONDS - START)) s] $name"
  python3 -m pdjax.launch.local --platform=gpu --config="$cfg" --serve \
    --run_dir="$OUT/$name" \
    --worker_flags=--metrics_port=0${WORKER_FLAGS:+,$WORKER_FLAGS} \
    ${ROUTER_FLAGS:+--router_flags=$ROUTER_FLAGS} $http_flag "$@" \
    > "$OUT/$name.launch.log" 2>&1 &
  local pid=$! addr=""
  for _ in $(seq 1 $(( left - 60 ))); do
    addr=$(grep -o 'router ready at [0-9.:]*' "$OUT/$name.launch.log" | awk '{print $4}')
    [[ -n "$addr" ]] && break
    kill -0 $pid 2>/dev/null || break
    sleep 1
  done
  if [[ -z "$addr" ]]; then
    echo "    not ready"; tail -20 "$OUT/$name.launch.log"
    kill -TERM $pid 2>/dev/null; wait $pid; return
  fi
  echo "    ready at $addr after $((SECONDS - START)) s"
  local router_http="" gateway="" gw_pid=""
  if [[ -n "$http_flag" ]]; then
    router_http=$(grep -o 'API at http://[0-9.:]*' "$OUT/$name.launch.log" |
                  awk '{print $3}')
  fi
  if [[ " $PATHS " == *" gateway "* ]]; then
    python3 -m pdjax.launch.gateway --router="$addr" --config="$cfg" \
      --port=0 --port_file="$OUT/$name/gateway.port" \
      > "$OUT/$name/gateway.log" 2>&1 &
    gw_pid=$!
    for _ in $(seq 1 60); do
      [[ -f "$OUT/$name/gateway.port" ]] && break
      sleep 1
    done
    gateway=http://127.0.0.1:$(python3 -c "import json; print(json.load(open('$OUT/$name/gateway.port'))['port'])")
  fi
  for c in $CONCURRENCIES; do
    local n=24; (( c > 1 )) && n=128
    for path in $PATHS; do
      local target=$addr backend=pdjax run=c$c
      [[ $path != grpc ]] && run=$path-c$c backend=openai
      [[ $path == router_http ]] && target=$router_http
      [[ $path == gateway ]] && target=$gateway
      timeout 150 python3 tools/batch_eval.py --target="$target" \
        --backend=$backend --input="$OUT/prompts.jsonl" --num_requests=$n \
        --concurrency=$c --ignore_eos --label="$name-$run" --noprogress \
        $([[ $path == grpc ]] && echo ${EVAL_FLAGS:-}) \
        --out_dir="$OUT/$name/$run" > "$OUT/$name/$run.log" 2>&1
      echo "    $run: exit $?"
      awk '/=====/{p=1} p' "$OUT/$name/$run.log" | grep -v "^$" | head -40
    done
  done
  [[ -n "$gw_pid" ]] && { kill -TERM $gw_pid; wait $gw_pid; }
  if (( ${DECODE_BOUND:-0} > 0 )); then
    timeout 150 python3 tools/batch_eval.py --target="$addr" \
      --input="$OUT/prompts_decode_bound.jsonl" --num_requests=64 \
      --concurrency=32 --ignore_eos --label="$name-c32decode" --noprogress \
      --out_dir="$OUT/$name/c32decode" > "$OUT/$name/c32decode.log" 2>&1
    echo "    c=32, decode-bound: exit $?"
    awk '/=====/{p=1} p' "$OUT/$name/c32decode.log" | grep -v "^$" | head -40
  fi
  if (( ${AFTER_CHURN:-0} > 0 )); then
    timeout 200 python3 tools/batch_eval.py --target="$addr" --preset=chat \
      --length_scale=0.25 --max_model_len=1024 --vocab_size=128256 \
      --num_requests="$AFTER_CHURN" --concurrency=96 --ignore_eos \
      --label="$name-churn" --noprogress --out_dir="$OUT/$name/churn" \
      > "$OUT/$name/churn.log" 2>&1
    echo "    churn of $AFTER_CHURN chat requests: exit $?"
    grep -E "Requests (completed|failed)|Duration" "$OUT/$name/churn.log"
    timeout 150 python3 tools/batch_eval.py --target="$addr" \
      --input="$OUT/prompts.jsonl" --num_requests=128 --concurrency=32 \
      --ignore_eos --label="$name-c32after" --noprogress \
      --out_dir="$OUT/$name/c32after" > "$OUT/$name/c32after.log" 2>&1
    echo "    c=32 after the churn: exit $?"
    awk '/=====/{p=1} p' "$OUT/$name/c32after.log" | grep -v "^$" | head -40
  fi
  for f in "$OUT/$name"/decode0.port "$OUT/$name"/pd0.port; do
    [[ -f "$f" ]] || continue
    mp=$(python3 -c "import json,sys; print(json.load(open('$f')).get('metrics_port', ''))")
    [[ -n "$mp" ]] && curl -s "http://127.0.0.1:$mp/metrics" > "$OUT/$name/decode_metrics.txt"
  done
  grep '^pdjax_decode_iteration_seconds_\(sum\|count\)' "$OUT/$name/decode_metrics.txt" 2>/dev/null
  kill -TERM $pid 2>/dev/null; wait $pid
  (cd "$OUT/$name" && tar czf ../"$name"_logs.tar.gz ./*.log 2>/dev/null)
}

for d in $DEPLOYMENTS; do
  case $d in
    disagg) run_deployment disagg "$OUT/serving_s4.toml" --num_prefill=1 ;;
    disagg_s1) run_deployment disagg_s1 "$OUT/serving_s1.toml" --num_prefill=1 ;;
    coloc) run_deployment coloc "$OUT/serving_s4.toml" --num_prefill=0 ;;
    disagg_lg4) run_deployment disagg_lg4 "$OUT/serving_s4.toml" \
      --num_prefill=1 \
      --worker_flags=--metrics_port=0,--prefill_layer_groups=4${WORKER_FLAGS:+,$WORKER_FLAGS} ;;

    coloc_budget) run_deployment coloc_budget "$OUT/serving_budget.toml" \
      --num_prefill=0 ;;
  esac
done
echo "done after $((SECONDS - START)) s"
