#!/usr/bin/env bash
# Does the 8B decode step slow down after a churn of chat requests, in one
# engine and one process (tools/bench_decode_churn.py)? One GPU, one
# device-tool call; each variant is its own process, so each starts fresh:
#   default         gpu-8b.toml's decode pool, XLA's defaults;
#   no_graphs       XLA's command buffers (CUDA graphs) off;
#   shared_kv       churn KVs allocated once per size (the engine's own
#                   state changes, the allocator's does not);
#   merged          DotMerger on (the setting before 2026-11-26); not in the
#                   default VARIANTS: three parts of up to PART_TIMEOUT s each
#                   fit the device tool's 600 s call, four may not.
# A ratio after/before near 2.6 (110 vs 42 ms per call in the deployment;
# docs/notes/2026-11-26-decode-slowdown-after-chat.md) reproduces it; the
# variant whose ratio falls to 1 names the cause. (Reproduced at 3.05x with
# every call running all rows, gone with row programs:
# docs/notes/2026-12-05-h100-serving-latency.md.)
#
#   bash tools/gpu/run_decode_churn.sh OUT_DIR      (VARIANTS="merged" for the fourth)
set -u
OUT=${1:?usage: run_decode_churn.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
start_call "$OUT"
args() {
  case $1 in
    default) echo "" ;;
    no_graphs) echo "--nocommand_buffers" ;;
    shared_kv) echo "--churn_kv=shared" ;;
    merged) echo "--merge_dots=on" ;;
    *) echo "unknown variant $1" >&2; return 1 ;;
  esac
}
for v in ${VARIANTS:-default no_graphs shared_kv}; do
  a=$(args "$v") || continue
  echo "=== [$((SECONDS-START)) s] $v"
  # shellcheck disable=SC2086
  timeout "${PART_TIMEOUT:-170}" python3 tools/bench_decode_churn.py --model=llama3-8b \
    $a --out="$OUT/churn.jsonl" > "$OUT/$v.log" 2>&1
  echo "exit $?"; grep -v "^W0000\|^I0000" "$OUT/$v.log" | tail -9
done
(cd "$OUT" && tar czf logs.tar.gz ./*.log && rm -f ./*.log)
echo "done after $((SECONDS-START)) s"
