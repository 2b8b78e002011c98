#!/usr/bin/env bash
# The same-host CUDA IPC hand-off and the goodput it serves, on two GPUs in
# one device-tool call: the GPU IPC test, the hand-off bandwidth table
# (128 MiB..4 GiB, every path against the raw copy), disaggregated-over-IPC
# tokens against colocated ones, then (time allowing) a `chat` goodput
# sweep.
#
#   bash tools/gpu/run_ipc_and_goodput.sh OUT_DIR        (carry .whl)
#
# STEPS (default test,bw,tokens,sweep; also probe: the per-call fixed costs)
# picks the parts; SWEEP_CONFIGS (default disagg) the run_goodput.sh
# configurations of the chat sweep, SWEEP_RATES (default 8,16,32) its rates.
# Logs come back as logs.tar.gz.
set -u
STEPS=${STEPS:-test,bw,tokens,sweep}
SWEEP_CONFIGS=${SWEEP_CONFIGS:-disagg}
has() { [[ ",$STEPS," == *",$1,"* ]]; }
OUT=${1:?usage: run_ipc_and_goodput.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
BUDGET_S=${BUDGET_S:-560}
start_call "$OUT"
has test && ipc_gpu_test "$OUT" 6
if has bw; then
echo "=== [$((SECONDS-START)) s] hand-off bandwidth"
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 150 python3 tools/gpu/ipc_bandwidth.py --out="$OUT/ipc.json" --budget_s=110 > "$OUT/ipc_bw.log" 2>&1
echo "exit $?"; grep -v "^W0000\|^I0000" "$OUT/ipc_bw.log" | tail -8
fi
if has probe; then
echo "=== [$((SECONDS-START)) s] fixed costs of a hand-off, call by call"
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 120 python3 tools/gpu/probe_ipc_overheads.py --out="$OUT/overheads.json" > "$OUT/overheads.log" 2>&1
echo "exit $?"; grep -v "^W0000\|^I0000" "$OUT/overheads.log" | tail -26
fi
if has tokens; then
echo "=== [$((SECONDS-START)) s] disaggregated (CUDA IPC) vs colocated tokens"
timeout 280 bash tools/gpu/check_ipc_tokens.sh "$OUT" > "$OUT/ipc_tokens.log" 2>&1
echo "exit $?"; tail -6 "$OUT/ipc_tokens.log"
fi
LEFT=$(( BUDGET_S - (SECONDS - START) ))
if has sweep && (( LEFT > 200 )); then
  echo "=== [$((SECONDS-START)) s] chat sweep $SWEEP_CONFIGS ($LEFT s left)"
  BUDGET_S=$(( LEFT - 10 )) CHAT_RATES=${SWEEP_RATES:-8,16,32} CHAT_N=96 CHAT_EVAL=--length_scale=0.25 PRESETS=chat \
    bash tools/gpu/run_goodput.sh /tmp/pdjax_ipc_goodput "$SWEEP_CONFIGS" > "$OUT/goodput.log" 2>&1
  cp /tmp/pdjax_ipc_goodput/goodput_runs.tar.gz "$OUT/goodput_${SWEEP_CONFIGS//,/_}.tar.gz" 2>/dev/null
  cp /tmp/pdjax_ipc_goodput/chat_goodput.png "$OUT/" 2>/dev/null
  cp /tmp/pdjax_ipc_goodput/summary.txt "$OUT/" 2>/dev/null
  grep -B1 -A6 "rate    attain" "$OUT/summary.txt" 2>/dev/null || tail -30 "$OUT/goodput.log"
fi
# The device tool returns at most 8 files: the logs travel as one archive.
(cd "$OUT" && ls ./*.log >/dev/null 2>&1 && tar czf logs.tar.gz ./*.log && rm -f ./*.log)
echo "done after $((SECONDS-START)) s"
