#!/usr/bin/env bash
# One device call, measurements by part (Llama-3-8B shapes, random weights):
#   admission  on-demand KV admission against whole-budget admission under
#              200 chat streams (tools/bench_admission.py): rows decoding at
#              once, output tokens/s, TTFT;
#   gemm       one projection's GEMM over 32 layers in bf16, W8A8 (FP8
#              weights stored input-major and output-major) and W8A16:
#              kernels and weight GB/s (tools/gpu/probe_fp8_gemm.py);
#   fp8        the decode step in bf16, FP8 weights (W8A16, with XLA's
#              Triton GEMMs, which widen the weights inside the GEMM: the
#              pool's "auto"), FP8 weights and activations (W8A8) and an FP8
#              KV pool (bf16 weights), the same batch sizes and context, one
#              process each (tools/bench_decode.py; DECODE_VARIANTS picks
#              some of bf16 w8a16 w8a8 kv8);
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
    gemm)
      echo "=== [$((SECONDS-START)) s] FP8 GEMM probe"
      timeout ${PART_TIMEOUT:-110} python3 tools/gpu/probe_fp8_gemm.py \
        --rows="$BATCHES" --out="$OUT/fp8_gemm.json" > "$OUT/fp8_gemm.log" 2>&1
      echo "exit $?"
      grep '^{' "$OUT/fp8_gemm.log" | python3 -c '
import json, sys
for line in sys.stdin:
  r = json.loads(line)
  print(r["rows"], r["form"], "%.4f ms/layer" % r.get("ms_per_layer", -1),
        "%.0f GB/s" % r.get("weight_GBps", 0), r.get("custom_calls"),
        r.get("triton_gemm_fusions"), r.get("weight_sized_ops"), r.get("error", ""))' ;;
    fp8)
      for v in "bf16=" "w8a16=--weight_dtype=fp8" \
               "w8a8=--weight_dtype=fp8 --fp8_activations" \
               "kv8=--kv_dtype=fp8"; do
        name=${v%%=*}; extra=${v#*=}
        case " ${DECODE_VARIANTS:-bf16 w8a16 w8a8 kv8} " in
          *" $name "*) ;;
          *) continue ;;
        esac
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
