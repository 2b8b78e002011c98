#!/usr/bin/env bash
# The hand-off bandwidth table, then goodput sweeps of two KV transports
# side by side (default `xfer`, i.e. jax.experimental.transfer, against
# `grpc`), in one device-tool call on the four-GPU kind (nvidia-h100-x4),
# two chains at once:
#   GPUs 0,1: the CUDA IPC GPU test and the hand-off bandwidth table (sender
#     sync / event, with each hand-off's phases), then run_goodput.sh's
#     CONFIGS_A sweep (default xfer: the device transport with the CUDA IPC
#     fast path off, so jax.experimental.transfer);
#   GPUs 2,3: the CONFIGS_B sweep (default grpc).
#
#   bash tools/gpu/run_transport_sweeps.sh OUT_DIR        (carry .whl)
#
# run_goodput.sh's knobs (CHAT_DUR, SUM_DUR, ...) apply to both sweeps; the
# rates are per chain (CHAT_RATES_A, SUM_RATES_A, CHAT_RATES_B, SUM_RATES_B:
# the host-staged grpc transport saturates far earlier), and so are the
# presets (PRESETS_A, PRESETS_B) and the IPC steps (IPC_STEPS, default
# test,bw: run_ipc_and_goodput.sh's STEPS); BUDGET_S (default 560) bounds the call.
# OUT_DIR gets ipc.tar.gz, one chart per preset with both sweeps on it,
# goodput_runs.tar.gz, summary.txt, env.txt and logs.tar.gz (the device tool
# returns 8 files).
set -u
OUT=${1:?usage: run_transport_sweeps.sh OUT_DIR}
CONFIGS_A=${CONFIGS_A:-xfer}
CONFIGS_B=${CONFIGS_B:-grpc}
BUDGET_S=${BUDGET_S:-560}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
start_call "$OUT"
S=/tmp/pdjax_transport_sweeps; rm -rf "$S"; mkdir -p "$S/ipc"
left() { echo $(( BUDGET_S - (SECONDS - START) )); }
(
  export CUDA_VISIBLE_DEVICES=0,1
  STEPS=${IPC_STEPS:-test,bw} BUDGET_S=200 bash tools/gpu/run_ipc_and_goodput.sh "$S/ipc"
  echo "=== [$((SECONDS - START)) s] sweep $CONFIGS_A"
  CHAT_RATES=${CHAT_RATES_A:-8,16,24,32} SUM_RATES=${SUM_RATES_A:-2,4,8,12} \
  PRESETS=${PRESETS_A:-chat summarize} PORT=50151 RUNS=$S/runs_a BUDGET_S=$(( $(left) - 15 )) \
    bash tools/gpu/run_goodput.sh "$S/a" "$CONFIGS_A"
) > "$S/chain_a.log" 2>&1 &
PA=$!
(
  CHAT_RATES=${CHAT_RATES_B:-1,2,4,8} SUM_RATES=${SUM_RATES_B:-0.5,1,2,4} \
  PRESETS=${PRESETS_B:-chat summarize} CUDA_VISIBLE_DEVICES=2,3 PORT=50251 RUNS=$S/runs_b BUDGET_S=$(( $(left) - 15 )) \
    bash tools/gpu/run_goodput.sh "$S/b" "$CONFIGS_B"
) > "$S/chain_b.log" 2>&1 &
PB=$!
wait $PA; echo "chain A exit $?"
wait $PB; echo "chain B exit $?"
grep -v "^W0000\|^I0000" "$S/chain_a.log" | head -40
grep -v "^W0000\|^I0000" "$S/chain_b.log" | head -100
tar -C "$S/ipc" -czf "$OUT/ipc.tar.gz" .
PY=${PYTHON:-python3}
. tools/gpu/deploy_lib.sh
collect_pair "$OUT" "$S" chain_a.log chain_b.log
echo "done after $((SECONDS - START)) s"
