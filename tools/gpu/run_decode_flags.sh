#!/usr/bin/env bash
# Decode step time under XLA flag sets, one process each (bench_decode.py,
# Llama-3-8B shapes): which flags close the gap to the HBM roofline.
#
#   bash tools/gpu/run_decode_flags.sh OUT_DIR
#
# VARIANTS: name=flags pairs separated by ';' (default below); BATCHES,
# CONTEXTS, STEPS as bench_decode's flags.
set -u
OUT=${1:?usage: run_decode_flags.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
BATCHES=${BATCHES:-1,32,128}
CONTEXTS=${CONTEXTS:-1024}
STEPS=${STEPS:-16}
VARIANTS=${VARIANTS:-"base=;dsf=--xla_gpu_enable_dynamic_slice_fusion=true;unroll=--xla_gpu_enable_while_loop_unrolling=WHILE_LOOP_UNROLLING_FULL_UNROLL;notriton_dsf=--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_dynamic_slice_fusion=true"}
START=$SECONDS
IFS=';' read -ra VS <<< "$VARIANTS"
for v in "${VS[@]}"; do
  name=${v%%=*}; flags=${v#*=}
  echo "=== [$((SECONDS-START)) s] $name: XLA_FLAGS='$flags'"
  XLA_FLAGS="$flags" timeout ${PART_TIMEOUT:-150} python3 tools/bench_decode.py --model=llama3-8b \
    --batch_sizes="$BATCHES" --context_lengths="$CONTEXTS" --steps_per_call="$STEPS" \
    --calls_per_sample=4 --warmup=1 --repeat=3 --out="$OUT/decode_$name.jsonl" > "$OUT/decode_$name.log" 2>&1
  echo "exit $?"; grep -A8 "decode step (median)" "$OUT/decode_$name.log" | grep -v "^--" | head -7
done
echo "done after $((SECONDS-START)) s"
