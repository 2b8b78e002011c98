#!/usr/bin/env bash
# How much of the KV hand-off hides under the prefill, on two GPUs in one
# device-tool call (prefill in layer groups, each group's KV copied over CUDA
# IPC while the next computes): the GPU IPC test, the overlap table on a
# Llama-3-8B-shaped model (tools/gpu/handoff_overlap.py), tokens through
# the real two-process path with the prefill in groups, then (time
# allowing) the disaggregated goodput at a few rates with the default
# (auto) layer groups.
#
#   bash tools/gpu/run_handoff_overlap.sh OUT_DIR        (carry .whl)
#
# STEPS (default test,overlap,tokens,sweep) picks the parts.
set -u
STEPS=${STEPS:-test,overlap,tokens,sweep}
has() { [[ ",$STEPS," == *",$1,"* ]]; }
OUT=${1:?usage: run_handoff_overlap.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
BUDGET_S=${BUDGET_S:-560}
start_call "$OUT"
has test && ipc_gpu_test "$OUT" 4
if has overlap; then
echo "=== [$((SECONDS-START)) s] hand-off under prefill (8B, layer groups)"
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout ${OVERLAP_TIMEOUT:-330} python3 tools/gpu/handoff_overlap.py \
  --lengths=${LENGTHS:-2048,8192} --groups=${GROUPS_LIST:-1,2,4,8} --reps=${REPS:-15} \
  --budget_s=${OVERLAP_BUDGET:-260} --out="$OUT/overlap.json" > "$OUT/overlap.log" 2>&1
echo "exit $?"; grep -v "^W0000\|^I0000\|^{" "$OUT/overlap.log" | tail -12
fi
if has tokens; then
echo "=== [$((SECONDS-START)) s] disaggregated (CUDA IPC, layer groups) vs colocated tokens"
timeout 280 bash tools/gpu/check_ipc_tokens.sh "$OUT" > "$OUT/ipc_tokens.log" 2>&1
echo "exit $?"; tail -4 "$OUT/ipc_tokens.log"
grep -h "layer group" /tmp/pdjax_ipc_tokens/disagg/cluster/*.log 2>/dev/null | head -2
fi
LEFT=$(( BUDGET_S - (SECONDS - START) ))
if has sweep && (( LEFT > 200 )); then
  echo "=== [$((SECONDS-START)) s] chat sweep disagg ($LEFT s left)"
  BUDGET_S=$(( LEFT - 10 )) CHAT_RATES=${CHAT_RATES:-8,16,32} CHAT_N=96 CHAT_EVAL=--length_scale=0.25 PRESETS=chat \
    bash tools/gpu/run_goodput.sh /tmp/pdjax_overlap_goodput disagg > "$OUT/goodput.log" 2>&1
  cp /tmp/pdjax_overlap_goodput/goodput_runs.tar.gz "$OUT/goodput_disagg.tar.gz" 2>/dev/null
  cp /tmp/pdjax_overlap_goodput/summary.txt "$OUT/" 2>/dev/null
  grep -B1 -A6 "rate    attain" "$OUT/summary.txt" 2>/dev/null || tail -30 "$OUT/goodput.log"
fi
echo "done after $((SECONDS-START)) s"
