#!/usr/bin/env bash
# Nsight Compute's view of the paged decode attention kernel
# (pdjax/model/pallas_attention.py) at a few shapes, one launch each: how
# fast it reads HBM, what its warps wait on, how many programs an SM holds
# (registers, shared memory) and what bounds that. One probe process per
# case (probe_pallas_attention.py, the kernel only, no check), ncu on the
# first launch after the warm-up calls; then each report as text.
# CASES (default "float8_e4m3fn:32:1024 float8_e4m3fn:128:4096
# bfloat16:128:4096"): pool dtype, rows and context per case.
# KERNEL_CONFIGS (default "default"): kernel variants in
# probe_pallas_attention's --kernel_configs form, each profiled in a
# process of its own at every case.
#
#   bash tools/gpu/profile_pallas_attention.sh OUT_DIR
set -u
OUT=${1:?usage: profile_pallas_attention.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
start_call "$OUT" > /dev/null
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "no ncu on this machine"; exit 1; }
SECTIONS="--section SpeedOfLight --section MemoryWorkloadAnalysis
  --section Occupancy --section LaunchStats --section WarpStateStats
  --section SchedulerStats --section ComputeWorkloadAnalysis"
for case in ${CASES:-float8_e4m3fn:32:1024 float8_e4m3fn:128:4096 bfloat16:128:4096}; do
  IFS=: read -r dtype rows ctx <<< "$case"
  for config in ${KERNEL_CONFIGS:-default}; do
    name=${dtype}_${rows}x${ctx}_${config//:/-}
    echo "===== $name"
    # --launch-skip: past the probe's warm-up calls (3) to a timed one.
    # shellcheck disable=SC2086
    "$NCU" --clock-control none --target-processes all \
      --kernel-name regex:paged_decode_attention --launch-skip 3 \
      --launch-count 1 $SECTIONS -o "$OUT/$name" -f \
      python3 tools/gpu/probe_pallas_attention.py --variants=pallas \
        --nocheck --pool_dtypes="$dtype" --rows="$rows" --contexts="$ctx" \
        --kernel_configs="$config" --iters=3 --warmup=3 \
        > "$OUT/$name.log" 2>&1
    tail -3 "$OUT/$name.log"
    "$NCU" --import "$OUT/$name.ncu-rep" --page details > "$OUT/$name.txt" 2>&1
    grep -E "DRAM Throughput|Memory Throughput|Duration|Registers Per|Shared Memory Configuration Size|Dynamic Shared|Static Shared|Achieved Occupancy|Theoretical Occupancy|Block Limit|Warp Cycles Per Issued|Issue Slots Busy|Compute \(SM\) Throughput|stalled" \
      "$OUT/$name.txt"
  done
done
echo "done in $((SECONDS - START)) s"
