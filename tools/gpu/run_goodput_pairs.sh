#!/usr/bin/env bash
# Two goodput sweeps at once on a four-GPU host (device kind
# nvidia-h100-x4): run_goodput.sh's CONFIGS_A on GPUs 0,1 and CONFIGS_B on
# GPUs 2,3, each deployment on its own pair, so two configurations are
# measured in the time of one and under the same conditions.
#
#   bash tools/gpu/run_goodput_pairs.sh OUT_DIR CONFIGS_A CONFIGS_B
#
# Every run_goodput.sh knob (PRESETS, CHAT_RATES, CHAT_DUR, ...) applies to
# both. OUT_DIR gets one plot per preset with every configuration on it,
# one archive of every run (goodput_runs.tar.gz), summary.txt, env.txt and
# the two sweeps' logs (logs.tar.gz): the device tool returns 8 files.
set -u
OUT=${1:?usage: run_goodput_pairs.sh OUT_DIR CONFIGS_A CONFIGS_B}
A=${2:?CONFIGS_A}; B=${3:?CONFIGS_B}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
start_call "$OUT"           # wheels installed once, before both start
S=/tmp/pdjax_pairs; rm -rf "$S"; mkdir -p "$S"
CUDA_VISIBLE_DEVICES=0,1 PORT=50151 RUNS=$S/runs_a \
  bash tools/gpu/run_goodput.sh "$S/a" "$A" > "$S/a.log" 2>&1 &
PA=$!
CUDA_VISIBLE_DEVICES=2,3 PORT=50251 RUNS=$S/runs_b \
  bash tools/gpu/run_goodput.sh "$S/b" "$B" > "$S/b.log" 2>&1 &
PB=$!
wait $PA; echo "pair A ($A) exit $?"
wait $PB; echo "pair B ($B) exit $?"
PY=${PYTHON:-python3}
. tools/gpu/deploy_lib.sh
collect_pair "$OUT" "$S" a.log b.log
echo "done after $((SECONDS-START)) s"
