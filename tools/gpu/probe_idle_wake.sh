#!/usr/bin/env bash
# What waking idle CPUs costs the first token, on ONE GPU machine: the
# host's idle setup; one gRPC hop after 2 ms idle as the services make it,
# with both ends' event loops kept polling (bench_grpc_hop --loop_spin),
# with every CPU kept busy by low-priority spinning processes (nothing
# halts), and back to back; then one stream's TTFT (gpu-8b-1gpu, 512-token
# prompts, colocated) plain and with the CPUs kept busy.
#
#   bash tools/gpu/probe_idle_wake.sh OUT_DIR
set -u
OUT=${1:?usage: probe_idle_wake.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
start_call "$OUT" > /dev/null
{
  nproc; cat /proc/cmdline
  cat /sys/devices/system/cpu/cpuidle/current_driver \
      /sys/devices/system/cpu/cpuidle/current_governor 2>&1
  lscpu | grep -iE "model name|hypervisor|virtualization|thread|socket"
} > "$OUT/host.txt" 2>&1
cat "$OUT/host.txt"
trap cpus_busy_off EXIT
hop() { timeout 60 python3 tools/bench_grpc_hop.py --calls=800 "$@" 2>&1 | grep round; }
echo "=== hops after 2 ms idle"; hop --gap_ms=2
echo "=== loops polling"; hop --gap_ms=2 --loop_spin
echo "=== every CPU busy (nice 19 spinners)"; cpus_busy_on; hop --gap_ms=2; cpus_busy_off
echo "=== back to back"; hop --gap_ms=0
for run in plain busy plain busy; do
  echo "=== [$((SECONDS - START)) s] TTFT one stream, 512 colocated, $run"
  [ $run = busy ] && cpus_busy_on
  CONCURRENCIES=1 DEPLOYMENTS=coloc PROMPT_LEN=512 BUDGET_S=150 \
    bash tools/gpu/run_serving_one_gpu.sh "$OUT/serving_$run" 2>&1 |
    grep -E "^(TTFT|TPOT|prepare|queue|prefill|return) "
  cpus_busy_off
  mv "$OUT/serving_$run" "$OUT/serving_${run}_$SECONDS"   # its end, in s
done
echo "done after $((SECONDS - START)) s"
