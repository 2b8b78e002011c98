#!/usr/bin/env bash
# The generate program's GEMM choice (DecodeConfig.triton_gemm) on one GPU:
# the engine correctness check (prefill + decode vs a full forward, with
# enough decode rows for cuBLAS GEMMs), then the decode step with the
# default (auto: cuBLAS from 4 rows) against Triton GEMMs everywhere.
#
#   bash tools/gpu/run_decode_gemm.sh OUT_DIR
set -u
OUT=${1:?usage: run_decode_gemm.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
BATCHES=${BATCHES:-1,4,32,128}
START=$SECONDS
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import jax, sys; print(sys.version); print("jax", jax.__version__, jax.devices())'; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
echo "=== [$((SECONDS-START)) s] correctness check"
timeout 150 python3 tools/bench_common.py --out="$OUT/check.jsonl" > "$OUT/check.log" 2>&1
echo "exit $?"; grep -v "^W0000\|^I0000" "$OUT/check.log" | tail -6
for g in auto on; do
  echo "=== [$((SECONDS-START)) s] decode, triton_gemm=$g"
  timeout 200 python3 tools/bench_decode.py --model=llama3-8b --batch_sizes="$BATCHES" \
    --context_lengths=1024 --steps_per_call=16 --calls_per_sample=4 --warmup=1 --repeat=3 \
    --triton_gemm=$g --measure_ceilings --out="$OUT/decode_$g.jsonl" > "$OUT/decode_$g.log" 2>&1
  echo "exit $?"; grep -A7 "decode step (median)" "$OUT/decode_$g.log" | grep -v "^--"
done
echo "done after $((SECONDS-START)) s"
