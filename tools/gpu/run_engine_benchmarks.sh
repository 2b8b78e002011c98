#!/usr/bin/env bash
# pdjax engine benchmarks on the GPU machine, in one call of about 7 minutes.
#
# Usage (from the repository root):  bash tools/gpu/run_engine_benchmarks.sh OUT_DIR
#
# Order: a correctness check (engine prefill + decode of a small random bf16
# Llama against a full forward pass), then prefill, decode and KV-transfer
# benchmarks on Llama-3-8B shapes with random bf16 weights. Every part runs
# under `timeout` within an overall budget (BUDGET_S, default 480 s), writes
# JSON lines (flushed per measurement, so a part cut off by its timeout keeps
# what it measured) and a log under OUT_DIR; the tables are printed last.
#
# Knobs (environment): BUDGET_S, PYTHON (default python3), MODEL (default
# llama3-8b), PREFILL_LENGTHS (512,2048,8192), DECODE_BATCHES (1,32,128,256),
# DECODE_CONTEXTS (1024,4096), DECODE_STEPS (steps per generate call, 16),
# TRANSFER_SIZES (MiB: 128,512,2048,4096), EXTRA_TRITON_OFF=1|0 (default 1:
# if time is left, re-time B=1,32 at the first context with Triton GEMMs off,
# which helps small-batch matmuls: XLA's default GEMMs reach about a
# quarter of HBM bandwidth at decode shapes).

set -u
OUT=${1:?usage: run_engine_benchmarks.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # Absolute: the script moves to the repository root.
cd "$(dirname "$0")/../.." || exit 1
PY=${PYTHON:-python3}
MODEL=${MODEL:-llama3-8b}
BUDGET_S=${BUDGET_S:-480}
DECODE_STEPS=${DECODE_STEPS:-16}
PREFILL_LENGTHS=${PREFILL_LENGTHS:-512,2048,8192}
DECODE_BATCHES=${DECODE_BATCHES:-1,32,128,256}
DECODE_CONTEXTS=${DECODE_CONTEXTS:-1024,4096}
TRANSFER_SIZES=${TRANSFER_SIZES:-128,512,2048,4096}
EXTRA_TRITON_OFF=${EXTRA_TRITON_OFF:-1}

export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export NVSHMEM_DISABLE_NVLS=1
# Shared by the parts: the weight-initialisation programs compile once.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/pdjax_jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
# Single-process parts may use most of the card (the default 75% would make
# the decode fit check skip shapes that fit).
SINGLE_ENV=(env XLA_PYTHON_CLIENT_MEM_FRACTION=0.92)
# Two processes share the card(s) in the transfer part.
MULTI_ENV=(env XLA_PYTHON_CLIENT_PREALLOCATE=false)

START=$SECONDS
remaining() { echo $(( BUDGET_S - (SECONDS - START) )); }
cap() {  # cap WANTED RESERVE -> min(WANTED, remaining - RESERVE), >= 10
  local r; r=$(( $(remaining) - $2 ))
  (( r < $1 )) && echo $(( r > 10 ? r : 10 )) || echo "$1"
}
run_part() {  # run_part NAME TIMEOUT RESERVE CMD...
  # RESERVE: seconds of the budget kept for the parts after this one.
  local name=$1 limit; limit=$(cap "$2" "$3"); shift 3
  echo "=== [$((SECONDS - START)) s] $name (timeout ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "    $name: exit $rc after $((SECONDS - START)) s$( (( rc == 124 )) && echo ' (TIMED OUT: partial records kept)')"
  echo "$name $rc" >> "$OUT/exit_codes.txt"
  return $rc
}

: > "$OUT/exit_codes.txt"
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c 'import jax, sys; print(sys.version); print("jax", jax.__version__, jax.devices())' 2>&1
} > "$OUT/env.txt"
cat "$OUT/env.txt"
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
TPS=1; PREFILL_TIMEOUT=150
(( NGPU >= 2 )) && { TPS=1,2; PREFILL_TIMEOUT=210; }
echo "GPUs: $NGPU; prefill TP degrees: $TPS; budget ${BUDGET_S} s"

run_part check 90 300 "${SINGLE_ENV[@]}" $PY tools/bench_common.py \
  --out="$OUT/check.jsonl"

run_part prefill "$PREFILL_TIMEOUT" 240 "${SINGLE_ENV[@]}" $PY tools/bench_prefill.py \
  --model="$MODEL" --prompt_lengths="$PREFILL_LENGTHS" --tp="$TPS" \
  --warmup=2 --repeat=5 --measure_ceilings --out="$OUT/prefill.jsonl"

# Context-major: the batch sweep at 1024 comes first in case the timeout cuts
# the part short. 32x1024 is also timed with 1 step per call.
run_part decode 240 90 "${SINGLE_ENV[@]}" $PY tools/bench_decode.py \
  --model="$MODEL" --batch_sizes="$DECODE_BATCHES" --context_lengths="$DECODE_CONTEXTS" \
  --steps_per_call="$DECODE_STEPS" --calls_per_sample=4 --warmup=1 --repeat=3 \
  --compare_steps_per_call --compare_at=32x1024 --measure_ceilings \
  --out="$OUT/decode.jsonl"

run_part transfer 120 0 "${MULTI_ENV[@]}" $PY tools/bench_transfer.py \
  --model="$MODEL" --sizes_mib="$TRANSFER_SIZES" --grpc_max_mib=512 \
  --warmup=1 --repeat=3 --out="$OUT/transfer.jsonl"

if [[ "$EXTRA_TRITON_OFF" == 1 ]] && (( $(remaining) > 70 )); then
  run_part decode_triton_off 100 0 "${SINGLE_ENV[@]}" \
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" \
    $PY tools/bench_decode.py --model="$MODEL" --batch_sizes=1,32 \
    --context_lengths="${DECODE_CONTEXTS%%,*}" --steps_per_call="$DECODE_STEPS" \
    --calls_per_sample=4 --warmup=1 --repeat=3 --memory_analysis \
    --out="$OUT/decode_triton_off.jsonl"
elif [[ "$EXTRA_TRITON_OFF" == 1 ]]; then
  echo "skipping decode_triton_off (only $(remaining) s of the budget left)"
fi

echo
echo "################ results ($((SECONDS - START)) s) ################"
for part in check prefill decode transfer decode_triton_off; do
  log="$OUT/$part.log"
  [[ -f "$log" ]] || continue
  echo
  echo "---------------- $part ($(grep "^$part " "$OUT/exit_codes.txt" | cut -d' ' -f2 | sed 's/^/exit /'))"
  # The tables (from the first '== ' heading on); the log's tail if none.
  if grep -q '^== ' "$log"; then
    awk '/^== /{p=1} p' "$log" | grep -v '^[IWE][0-9]\{4\} '
  elif [[ -s "$log" ]]; then
    tail -n 25 "$log"
  else
    echo "(no output)"
  fi
  jsonl="$OUT/$part.jsonl"
  [[ -f "$jsonl" ]] && echo "($(wc -l < "$jsonl") records in $jsonl)"
done
echo
echo "JSON records: $OUT/*.jsonl; logs: $OUT/*.log"
