#!/usr/bin/env bash
# Prefill over a cached prefix, in one device-tool call on two GPUs: the
# engine correctness check (bucketed and chunked prefill + decode against a
# full forward), then bench_prefix_cache.py's multiturn scenarios on this
# tree and, as the baseline, on the tree at BASE_REF.
#
#   BASE_REF=<commit> bash tools/gpu/run_prefix_attention.sh OUT_DIR   (carry .whl)
#
# (The 2026-11-26 baseline of XLA's masked attention was a copy of the tree
# with the prefix attention call's implementation set to "xla".)
set -u
OUT=${1:?usage: run_prefix_attention.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
start_call "$OUT"
ARGS=(--config=gpu-8b --platform=gpu --preset=multiturn --num_requests=24 --rate=4
      --length_scale=0.5 --max_model_len=8192 --vocab_size=128000 --cache_pages=4096)
echo "=== [$((SECONDS-START)) s] correctness check"
timeout 150 python3 tools/bench_common.py --out="$OUT/check.jsonl" > "$OUT/check.log" 2>&1
echo "exit $?"; grep -A6 "correctness" "$OUT/check.log"
echo "=== [$((SECONDS-START)) s] prefix cache, this tree"
timeout 260 python3 tools/bench_prefix_cache.py "${ARGS[@]}" \
  --scenarios="${SCENARIOS:-off,both}" --out="$OUT/prefix.json" > "$OUT/prefix.log" 2>&1
echo "exit $?"; grep -A4 "^scenario" "$OUT/prefix.log"
# The baseline: the tree at BASE_REF (a commit of this repository; needs the
# .git directory), run the same way. Skipped without BASE_REF.
# Or BASE_DIR: such a tree already unpacked (git archive REF | tar -x -C DIR),
# for machines that get the working tree without its history.
BASE=""
if [[ -n "${BASE_DIR:-}" && -d "${BASE_DIR:-}" ]]; then
  BASE=$(cd "$BASE_DIR" && pwd)
elif [[ -n "${BASE_REF:-}" ]] && git rev-parse -q --verify "$BASE_REF^{commit}" >/dev/null 2>&1; then
  BASE=/tmp/pdjax_prefix_base
  rm -rf "$BASE"; mkdir -p "$BASE"; git archive "$BASE_REF" | tar -x -C "$BASE"
fi
if [[ -n "$BASE" ]]; then
  echo "=== [$((SECONDS-START)) s] prefix cache, baseline tree ${BASE_REF:-$BASE_DIR}"
  (cd "$BASE" && PYTHONPATH=$BASE timeout 200 python3 tools/bench_prefix_cache.py "${ARGS[@]}" \
    --scenarios="${BASE_SCENARIOS:-both}" --out="$OUT/prefix_base.json" > "$OUT/prefix_base.log" 2>&1)
  echo "exit $?"; grep -A3 "^scenario" "$OUT/prefix_base.log"
else
  echo "no baseline: neither BASE_DIR nor a BASE_REF commit here"
fi
echo "done after $((SECONDS-START)) s"
