#!/usr/bin/env bash
# Where one stream's time to first token goes, hop by hop, on ONE GPU
# (gpu-8b-1gpu shapes, random bf16): the idle compute first
# (bench_prefill at a 300 ms pause: the program alone and
# PrefillEngine.prefill in-process; probe_prefill_host_copies.py: the
# prompt's upload and the first token's read, each way JAX offers them,
# around the same programs), then run_serving_one_gpu.sh at one
# stream with ttft_hops.patch applied to this tree for the runs (reverted
# on exit), and tools/gpu/ttft_hops.py's table per run.
# RUNS (default "2048:coloc 512:coloc 2048:disagg"): prompt length and
# deployment per run, with ":calls" after them for a router that makes a
# call per request to the workers (--noworker_sessions) rather than using
# its sessions with them, ":sessions" for a client that sends its requests
# on one session with the router (batch_eval --sessions), or ":busy" for a
# run with every CPU kept from halting (gpu_env.sh's cpus_busy_on: what a
# host that never idles gives),
# or ":base" for a run served from the earlier tree that
# tools/gpu/stage_baseline.sh put in .baseline (the call's carry names it):
# the same machine measures both.
# IDLE=0 leaves out the idle compute (for runs compared only with each
# other, as :base against this tree).
# SWITCH_INTERVAL_MS (optional): the workers' and, via sys.setswitchinterval
# in a sitecustomize, the router's and the client's GIL switch interval.
#
#   bash tools/gpu/run_ttft_hops.sh OUT_DIR
set -u
OUT=${1:?usage: run_ttft_hops.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
start_call "$OUT" > /dev/null
use_compile_cache
if [ "${IDLE:-1}" = 1 ]; then
  python3 tools/bench_prefill.py --model=llama3-8b --prompt_lengths=512,2048 \
    --tp=1 --warmup=2 --repeat=9 --pause_ms=300 --fuse_projections --e2e \
    --out="$OUT/prefill_idle.jsonl" > "$OUT/prefill_idle.log" 2>&1
  grep -A4 "e2e_ms" "$OUT/prefill_idle.log"
  python3 tools/gpu/probe_prefill_host_copies.py \
    --out="$OUT/host_copies.json" \
    2>&1 | grep -E "^T=|^  [a-z_]+(: left out| +(upload|done))"
fi
git apply tools/gpu/ttft_hops.patch || exit 1
trap 'cpus_busy_off; git apply -R tools/gpu/ttft_hops.patch' EXIT
export PYTHONPATH=$PWD
if [ -n "${SWITCH_INTERVAL_MS:-}" ]; then
  mkdir -p "$OUT/site"
  echo "import sys; sys.setswitchinterval(${SWITCH_INTERVAL_MS} / 1000)" \
    > "$OUT/site/sitecustomize.py"
  export PYTHONPATH=$PWD:$OUT/site
  export WORKER_FLAGS=--gil_switch_interval_ms=$SWITCH_INTERVAL_MS
fi
mkdir -p "$OUT/trace"
for run in ${RUNS:-2048:coloc 512:coloc 2048:disagg}; do
  IFS=: read -r len dep variant <<< "$run"
  name=${len}_$dep${variant:+_$variant}
  # A run repeated in RUNS gets its own traces and results (_2, _3, ...).
  n=1; base_name=$name
  while [ -e "$OUT/trace/$name" ] || [ -e "$OUT/serving_$name" ]; do
    n=$((n + 1)); name=${base_name}_$n
  done
  router_flags= eval_flags=
  [ "$variant" = calls ] && router_flags=--noworker_sessions
  [ "$variant" = sessions ] && eval_flags=--sessions
  tree=.
  if [ "$variant" = base ]; then
    [ -f .baseline/COMMIT ] || { echo "no .baseline: stage_baseline.sh"; continue; }
    tree=.baseline
    variant="base, $(cat .baseline/COMMIT)"
    # Its own marks, applied once (git kept from the enclosing repository).
    grep -q _trace .baseline/pdjax/service/router.py ||
      (cd .baseline && GIT_CEILING_DIRECTORIES=$(dirname "$PWD") \
        git apply tools/gpu/ttft_hops.patch) || exit 1
  fi
  echo "===== $len tokens, $dep${variant:+, $variant}"
  [ "$variant" = busy ] && cpus_busy_on
  (cd "$tree" && PDJAX_TRACE=$OUT/trace/$name CONCURRENCIES=1 \
    DEPLOYMENTS=$dep PROMPT_LEN=$len BUDGET_S=200 \
    ROUTER_FLAGS=$router_flags EVAL_FLAGS=$eval_flags \
    bash tools/gpu/run_serving_one_gpu.sh "$OUT/serving_$name" 2>&1 |
    grep -E "^(TTFT|TPOT|prepare|queue|prefill|return) ")
  cpus_busy_off
  python3 tools/gpu/ttft_hops.py "$OUT/trace/$name" |
    tee "$OUT/hops_$name.txt"
done
