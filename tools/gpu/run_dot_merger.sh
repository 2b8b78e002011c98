#!/usr/bin/env bash
# XLA's DotMerger in the 8B decode and prefill programs, on one GPU, in one
# device-tool call:
#   1. run_decode_gemm.sh: the engine correctness check (its decode program
#      with the default, DotMerger off), then the serving-loop step
#      (--timed=step, 4 steps per call) with the merger off and on;
#   2. tools/profile_decode.py with the default (off): where the step's
#      time goes now (kernels by category, against the roofline);
#   3. tools/bench_prefill.py at 2K and 8K tokens with the merger on and off.
#
#   bash tools/gpu/run_dot_merger.sh OUT_DIR
set -u
OUT=${1:?usage: run_dot_merger.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
START=$SECONDS
STEPS_PER_CALL=4 BATCHES=${BATCHES:-1,32,128} CONTEXTS=${CONTEXTS:-1024,4096} PART_TIMEOUT=150 \
  VARIANTS="apart=--merge_dots=off --timed=step;merged=--merge_dots=on --timed=step" \
  bash tools/gpu/run_decode_gemm.sh "$OUT"
echo "=== [$((SECONDS-START)) s] decode profile (DotMerger off)"
timeout 200 python3 tools/profile_decode.py --model=llama3-8b --batch_sizes=1,32,128 \
  --context_lengths=1024 --steps_per_call=4 --top=15 --out="$OUT/profile.json" > "$OUT/profile.log" 2>&1
echo "exit $?"; grep -v "^W0000\|^I0000" "$OUT/profile.log" | grep -A12 "^####\|categories" | head -90
for m in on off; do
  echo "=== [$((SECONDS-START)) s] prefill, DotMerger $m"
  timeout 150 python3 tools/bench_prefill.py --model=llama3-8b --tp=1 --prompt_lengths=2048,8192 \
    --merge_dots=$m --out="$OUT/prefill_$m.jsonl" > "$OUT/prefill_$m.log" 2>&1
  echo "exit $?"; grep -v "^W0000\|^I0000" "$OUT/prefill_$m.log" | tail -8
done
# The device tool returns 8 files: the logs travel as one archive.
(cd "$OUT" && tar czf logs.tar.gz ./*.log && rm -f ./*.log)
echo "done after $((SECONDS-START)) s"
