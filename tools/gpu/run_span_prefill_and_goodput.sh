#!/usr/bin/env bash
# A prefill pool spanning two processes checked against colocated tokens,
# beside a goodput sweep, in one device-tool call on the four-GPU kind
# (nvidia-h100-x4), two chains at once:
#   GPUs 0,1: the CUDA IPC GPU test, the hand-off bandwidth table (both
#     sender signals, single hand-offs and back-to-back streams), the
#     disaggregated-over-IPC tokens against colocated
#     ones, then the same with a prefill worker spanning two processes
#     (multi-controller JAX, TP=2 over GPUs 0 and 1; its decode worker shares
#     GPU 0: the tiny model needs little memory);
#   GPUs 2,3: run_goodput.sh's SWEEP_CONFIGS (default tp2) sweep, with the
#     run_goodput.sh knobs given (CHAT_RATES, CHAT_DUR, ...).
#
#   bash tools/gpu/run_span_prefill_and_goodput.sh OUT_DIR        (carry .whl)
#
# OUT_DIR: ipc.tar.gz (ipc.json, overheads.json, ipc_tokens.json,
# span_tokens.json and their logs), the sweep's goodput_runs.tar.gz, plots
# and summary.txt, env.txt, logs.tar.gz.
set -u
OUT=${1:?usage: run_span_prefill_and_goodput.sh OUT_DIR}
SWEEP_CONFIGS=${SWEEP_CONFIGS:-tp2}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
start_call "$OUT"
S=/tmp/pdjax_span_goodput; rm -rf "$S"; mkdir -p "$S/ipc"
(
  export CUDA_VISIBLE_DEVICES=0,1
  STEPS=test,bw,tokens BUDGET_S=400 bash tools/gpu/run_ipc_and_goodput.sh "$S/ipc"
  echo "=== spanning prefill pool (2 processes, TP=2) vs colocated tokens"
  CUDA_VISIBLE_DEVICES=0,1,0 DISAGG_ARGS="--num_prefill=1 --num_decode=1 \
--prefill_mesh=tp=2 --prefill_processes=2 --decode_mesh=dp=1 --kv_transport=device" \
    timeout 200 bash tools/gpu/check_ipc_tokens.sh "$S/span" > "$S/ipc/span_tokens.log" 2>&1
  echo "exit $?"; tail -6 "$S/ipc/span_tokens.log"
  cp "$S/span/ipc_tokens.json" "$S/ipc/span_tokens.json" 2>/dev/null
  for f in /tmp/pdjax_ipc_tokens/*/cluster/*.log; do
    echo "--- $f"; grep -v "^W0000\|^I0000" "$f" | tail -5
  done >> "$S/ipc/span_tokens.log" 2>&1
) > "$S/chain_a.log" 2>&1 &
PA=$!
CUDA_VISIBLE_DEVICES=2,3 PORT=50251 RUNS=$S/runs BUDGET_S=${BUDGET_S:-540} \
  bash tools/gpu/run_goodput.sh "$S/sweep" "$SWEEP_CONFIGS" > "$S/chain_b.log" 2>&1 &
PB=$!
wait $PA; echo "chain A exit $?"; grep -v "^W0000\|^I0000" "$S/chain_a.log" | tail -60
wait $PB; echo "chain B exit $?"
tar -C "$S/ipc" -czf "$OUT/ipc.tar.gz" .
cp "$S"/sweep/* "$OUT/" 2>/dev/null
tar -C "$S" -czf "$OUT/logs.tar.gz" chain_a.log chain_b.log
grep -h "^#####\|rate    attain" -A7 "$OUT/summary.txt" 2>/dev/null | grep -v "^--$" | head -40
echo "done after $((SECONDS-START)) s"
