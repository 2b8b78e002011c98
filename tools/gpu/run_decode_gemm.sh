#!/usr/bin/env bash
# Decode program choices on one GPU: the engine correctness check (prefill +
# decode vs a full forward, 4 decode rows: cuBLAS GEMMs and, where it
# applies, cuDNN paged attention), then the decode step under each
# bench_decode.py argument set in VARIANTS (;-separated name=args), at
# STEPS_PER_CALL steps per call (default 16; serving configs use 4).
#
#   bash tools/gpu/run_decode_gemm.sh OUT_DIR
set -u
OUT=${1:?usage: run_decode_gemm.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
BATCHES=${BATCHES:-1,4,32,128}
CONTEXTS=${CONTEXTS:-1024}
VARIANTS=${VARIANTS:-"auto=--triton_gemm=auto;on=--triton_gemm=on"}
START=$SECONDS
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import jax, sys; print(sys.version); print("jax", jax.__version__, jax.devices())'; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
echo "=== [$((SECONDS-START)) s] correctness check"
timeout 150 python3 tools/bench_common.py --out="$OUT/check.jsonl" > "$OUT/check.log" 2>&1
echo "exit $?"; grep -v "^W0000\|^I0000" "$OUT/check.log" | grep -i "decode attention\|check\|ok\|fail\|error" | tail -6
IFS=';' read -ra VS <<< "$VARIANTS"
for v in "${VS[@]}"; do
  name=${v%%=*}; args=${v#*=}
  echo "=== [$((SECONDS-START)) s] decode, $name: $args"
  # shellcheck disable=SC2086
  timeout ${PART_TIMEOUT:-200} python3 tools/bench_decode.py --model=llama3-8b --batch_sizes="$BATCHES" \
    --context_lengths="$CONTEXTS" --steps_per_call=${STEPS_PER_CALL:-16} --calls_per_sample=4 --warmup=1 --repeat=3 \
    $args --out="$OUT/decode_$name.jsonl" > "$OUT/decode_$name.log" 2>&1
  echo "exit $?"; grep -A7 "decode step (median)" "$OUT/decode_$name.log" | grep -v "^--"
  grep -h "decode attention" "$OUT/decode_$name.log" | head -1 | cut -c1-200
  grep -h "Error\|error:" "$OUT/decode_$name.log" | head -3 | cut -c1-300
done
echo "done after $((SECONDS-START)) s"
