#!/usr/bin/env bash
# Prefill GEMM kernels on one GPU: bench_prefill.py (Llama-3-8B shapes, TP=1,
# batch 1) with Triton GEMMs (XLA's default) and with cuBLAS, in one call.
#
#   bash tools/gpu/run_prefill_gemm.sh OUT_DIR
set -u
OUT=${1:?usage: run_prefill_gemm.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
record_env "$OUT"
START=$SECONDS
for g in ${VARIANTS:-on off}; do
  echo "=== [$((SECONDS-START)) s] prefill, triton_gemm=$g"
  timeout ${PART_TIMEOUT:-200} python3 tools/bench_prefill.py --model=llama3-8b --tp=1 \
    --prompt_lengths=${LENGTHS:-128,256,512,1024,2048,8192} --triton_gemm=$g \
    --out="$OUT/prefill_$g.jsonl" > "$OUT/prefill_$g.log" 2>&1
  echo "exit $?"; grep -A8 "^== prefill" "$OUT/prefill_$g.log"
done
echo "done after $((SECONDS-START)) s"
