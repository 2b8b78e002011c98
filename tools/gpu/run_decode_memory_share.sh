#!/usr/bin/env bash
# Disaggregated summarize TPOT against the decode worker's XLA memory share
# (two GPUs): run_goodput.sh's disagg (gpu-8b: 0.85) and disagg_mem75
# (0.75) at one summarize rate, with nvidia-smi's memory every 5 s.
#
#   bash tools/gpu/run_decode_memory_share.sh OUT_DIR      (carry .whl)
set -u
OUT=${1:?usage: run_decode_memory_share.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
( while true; do date -u +%T; nvidia-smi --query-gpu=index,memory.used,memory.total --format=csv,noheader; sleep 5; done ) > "$OUT/nvidia_smi.log" 2>&1 &
SMI=$!
PRESETS=summarize SUM_RATES=${SUM_RATES:-2} SUM_DUR=${SUM_DUR:-10} BUDGET_S=${BUDGET_S:-330} \
  bash tools/gpu/run_goodput.sh "$OUT" "${CONFIGS:-disagg,disagg_mem75}" 2>&1 | grep -v "^W0000\|^I0000" | tail -60
kill $SMI
