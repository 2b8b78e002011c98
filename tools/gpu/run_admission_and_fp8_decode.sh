#!/usr/bin/env bash
# One device call, measurements by part (Llama-3-8B shapes, random weights):
#   admission  on-demand KV admission against whole-budget admission under
#              200 chat streams (tools/bench_admission.py): rows decoding at
#              once, output tokens/s, TTFT;
#   fp8        the decode step in bf16, FP8 weights (W8A16; also with
#              XLA's Triton GEMMs, which can widen the weights inside the
#              GEMM where cuBLAS needs them widened first), FP8 weights and
#              activations (W8A8) and an FP8 KV pool (bf16 weights), the
#              same batch sizes and context, one process each
#              (tools/bench_decode.py);
#   fp8prefill the 8B prefill at 2K and 8K tokens in bf16 and W8A8
#              (tools/bench_prefill.py).
#
#   bash tools/gpu/run_admission_and_fp8_decode.sh OUT_DIR
#
# PARTS (default "admission fp8"); BATCHES (1,8,32,128), CONTEXT (1024).
set -u
OUT=${1:?usage: run_admission_and_fp8_decode.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
start_call "$OUT"
use_compile_cache
BATCHES=${BATCHES:-1,8,32,128}
CONTEXT=${CONTEXT:-1024}
for part in ${PARTS:-admission fp8}; do
  case $part in
    admission)
      echo "=== [$((SECONDS-START)) s] admission"
      timeout ${ADMISSION_TIMEOUT:-220} python3 tools/bench_admission.py \
        --model=llama3-8b --rounds=1 --out="$OUT/admission.jsonl" \
        > "$OUT/admission.log" 2>&1
      echo "exit $?"; grep -v "^W0000\|^I0000" "$OUT/admission.log" | tail -14 ;;
    fp8)
      for v in "bf16=" "w8a16=--weight_dtype=fp8" \
               "w8a16_triton=--weight_dtype=fp8 --triton_gemm=on" \
               "w8a8=--weight_dtype=fp8 --fp8_activations" \
               "kv8=--kv_dtype=fp8"; do
        name=${v%%=*}; extra=${v#*=}
        echo "=== [$((SECONDS-START)) s] decode $name"
        timeout ${PART_TIMEOUT:-110} python3 tools/bench_decode.py \
          --model=llama3-8b --batch_sizes="$BATCHES" \
          --context_lengths="$CONTEXT" --steps_per_call=4 $extra \
          --out="$OUT/decode_$name.jsonl" > "$OUT/decode_$name.log" 2>&1
        echo "exit $?"
        grep -A8 "decode step (median)" "$OUT/decode_$name.log" | grep -v "^--" | head -7
      done ;;
    fp8prefill)
      for v in "bf16=" "w8a8=--weight_dtype=fp8 --fp8_activations"; do
        name=${v%%=*}; extra=${v#*=}
        echo "=== [$((SECONDS-START)) s] prefill $name"
        timeout ${PART_TIMEOUT:-110} python3 tools/bench_prefill.py \
          --model=llama3-8b --prompt_lengths=2048,8192 --tp=1 --noe2e $extra \
          --out="$OUT/prefill_$name.jsonl" > "$OUT/prefill_$name.log" 2>&1
        echo "exit $?"; grep -v "^W0000\|^I0000" "$OUT/prefill_$name.log" | tail -6
      done ;;
  esac
done
echo "done after $((SECONDS-START)) s"
