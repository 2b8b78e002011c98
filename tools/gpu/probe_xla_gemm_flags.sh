#!/usr/bin/env bash
# Whether XLA's GEMM choices leave speed on the table, on ONE GPU
# (Llama-3-8B shapes, random bf16): the prefill at 2K / 8K tokens and the
# bf16 decode step at 1 / 8 / 32 rows with XLA's defaults and with
# cuBLASLt (--xla_gpu_enable_cublaslt, which XLA autotunes among its
# algorithms); the FP8-weight (W8A16) step at 8 / 32 rows with the Triton
# GEMMs' default tilings and with the exhaustive tiling search.
#
#   bash tools/gpu/probe_xla_gemm_flags.sh OUT_DIR
set -u
OUT=${1:?usage: probe_xla_gemm_flags.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
start_call "$OUT" > /dev/null
prefill() {  # prefill NAME [XLA flags]
  local name=$1; shift
  echo "=== [$((SECONDS - START)) s] prefill $name"
  XLA_FLAGS="$*" timeout 150 python3 tools/bench_prefill.py --model=llama3-8b \
    --prompt_lengths=2048,8192 --tp=1 --warmup=2 --repeat=5 --pause_ms=300 \
    --noe2e --fuse_projections --out="$OUT/prefill_$name.jsonl" \
    > "$OUT/prefill_$name.log" 2>&1
  echo "exit $?"; grep -E "T=(2048|8192):" "$OUT/prefill_$name.log" || tail -3 "$OUT/prefill_$name.log"
}
decode() {  # decode NAME ROWS EXTRA_FLAGS [XLA flags]
  local name=$1 rows=$2 extra=$3; shift 3
  echo "=== [$((SECONDS - START)) s] decode $name"
  XLA_FLAGS="$*" timeout 170 python3 tools/bench_decode.py --model=llama3-8b \
    --batch_sizes=$rows --context_lengths=1024 --steps_per_call=4 \
    --fuse_projections $extra --out="$OUT/decode_$name.jsonl" \
    > "$OUT/decode_$name.log" 2>&1
  echo "exit $?"; grep -E "B=[0-9]+ C=" "$OUT/decode_$name.log" || tail -3 "$OUT/decode_$name.log"
}
prefill base
prefill cublaslt --xla_gpu_enable_cublaslt=true
decode base 1,8,32 ""
decode cublaslt 1,8,32 "" --xla_gpu_enable_cublaslt=true
decode fp8 8,32 --weight_dtype=fp8
decode fp8_exhaustive 8,32 --weight_dtype=fp8 --xla_gpu_exhaustive_tiling_search=true
echo "done after $((SECONDS - START)) s"
