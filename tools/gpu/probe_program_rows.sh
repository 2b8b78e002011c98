#!/usr/bin/env bash
# What a few live rows pay for the row count of the program they run in, on
# ONE GPU (Llama-3-8B shapes, random bf16, joined projections, 1K context):
# the decode step of 1 and 4 live rows in the smallest programs that hold
# them (2 / 4 rows) against the same rows in a program of 8 (serving's
# smallest), whose GEMMs need no padding (XLA pads a bf16 GEMM's rows to a
# multiple of 8 in a kernel of its own before each product), runs
# alternating; then where the time goes at one live row in each
# (profile_decode's kernel table).
#
#   bash tools/gpu/probe_program_rows.sh OUT_DIR
set -u
OUT=${1:?usage: probe_program_rows.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
start_call "$OUT" > /dev/null
use_compile_cache
DECODE_TIMEOUT=170
profile() {  # profile NAME [FLAGS]
  local name=$1; shift
  echo "=== [$((SECONDS - START)) s] profile $name"
  timeout 170 python3 tools/profile_decode.py --model=llama3-8b \
    --batch_sizes=1 --context_lengths=1024 --steps_per_call=4 \
    --fuse_projections "$@" --out="$OUT/profile_$name.json" \
    > "$OUT/profile_$name.log" 2>&1
  echo "exit $?"; tail -25 "$OUT/profile_$name.log"
}
decode_1k rows_small 1,4 --program_rows=2
decode_1k rows8 1,4 --program_rows=8
decode_1k rows_small_2 1,4 --program_rows=2
decode_1k rows8_2 1,4 --program_rows=8
[ "${PROFILE:-1}" = 1 ] && {
  profile rows2 --program_rows=2; profile rows8 --program_rows=8; }
echo "done after $((SECONDS - START)) s"
