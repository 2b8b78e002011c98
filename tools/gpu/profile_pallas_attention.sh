#!/usr/bin/env bash
# Why the Pallas paged-attention kernel reads an FP8 pool below the HBM rate,
# on ONE GPU: the kernel's pool values widened to the query's dtype (bf16)
# against widened to float16 (one conversion instead of three on Hopper),
# timed by probe_pallas_attention at 32 / 128 rows x 1K / 4K; then Nsight
# Compute's view of one launch at 128 rows x 4K (throughput, memory,
# warp stalls, instructions) for the FP8 pool both ways and a bf16 pool.
#
#   bash tools/gpu/profile_pallas_attention.sh OUT_DIR
set -u
OUT=${1:?usage: profile_pallas_attention.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
start_call "$OUT" > /dev/null
use_compile_cache
echo "=== [$((SECONDS - START)) s] widened to bf16 / float16"
timeout 200 python3 tools/gpu/probe_pallas_attention.py --variants=pallas \
  --rows=32,128 --contexts=1024,4096 --pool_dtypes=float8_e4m3fn,bfloat16 \
  --kernel_configs=default,default+float16 --out="$OUT/widen.jsonl" \
  > "$OUT/widen.log" 2>&1
echo "exit $?"; grep -v "^[IW][0-9]" "$OUT/widen.log" | tail -12
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "no ncu"; exit 0; }
ncu_one() {  # ncu_one NAME POOL_DTYPE CONFIG
  echo "=== [$((SECONDS - START)) s] ncu $1"
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 150 "$NCU" --clock-control none \
    --kernel-name regex:paged_decode_attention --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section WarpStateStats --section Occupancy --section LaunchStats \
    --section SchedulerStats --section InstructionStats \
    python3 tools/gpu/probe_pallas_attention.py --variants=pallas --nocheck \
    --rows=128 --contexts=4096 --pool_dtypes="$2" --kernel_configs="$3" \
    --iters=2 --warmup=2 > "$OUT/ncu_$1.txt" 2>&1
  echo "exit $?"
  grep -E "DRAM Throughput|Memory Throughput|Duration|Compute \(SM\)|Achieved Occupancy|Registers Per|Stall|Issued Ipc|Executed Ipc|L2 Hit|L1/TEX Hit|Mem Busy|Max Bandwidth|Warp Cycles Per Issued" "$OUT/ncu_$1.txt" | head -30
}
ncu_one fp8 float8_e4m3fn default
ncu_one fp8_f16 float8_e4m3fn default+float16
ncu_one bf16 bfloat16 default
echo "done after $((SECONDS - START)) s"
