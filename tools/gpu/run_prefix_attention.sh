#!/usr/bin/env bash
# Prefill over a cached prefix with cuDNN attention (mask as bias) against
# the XLA masked attention it replaced, in one device-tool call on two GPUs:
# the engine correctness check (bucketed and chunked prefill + decode against
# a full forward), then bench_prefix_cache.py's multiturn scenarios on this
# tree and, as the baseline, on a copy whose prefix attention is XLA's.
#
#   bash tools/gpu/run_prefix_attention.sh OUT_DIR        (carry .whl)
set -u
OUT=${1:?usage: run_prefix_attention.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
install_carried_wheels
record_env "$OUT"
START=$SECONDS
ARGS=(--config=gpu-8b --platform=gpu --preset=multiturn --num_requests=24 --rate=4
      --length_scale=0.5 --max_model_len=8192 --vocab_size=128000 --cache_pages=4096)
echo "=== [$((SECONDS-START)) s] correctness check"
PYTHONPATH=$PWD timeout 150 python3 tools/bench_common.py --out="$OUT/check.jsonl" > "$OUT/check.log" 2>&1
echo "exit $?"; grep -A6 "correctness" "$OUT/check.log"
echo "=== [$((SECONDS-START)) s] prefix cache, cuDNN prefix attention"
PYTHONPATH=$PWD timeout 260 python3 tools/bench_prefix_cache.py "${ARGS[@]}" \
  --scenarios="${SCENARIOS:-off,both}" --out="$OUT/prefix_cudnn.json" > "$OUT/prefix_cudnn.log" 2>&1
echo "exit $?"; grep -A4 "^scenario" "$OUT/prefix_cudnn.log"
BASE=/tmp/pdjax_prefix_base
rm -rf "$BASE"; mkdir -p "$BASE"; cp -r pdjax protos shardings configs tools pyproject.toml "$BASE"/
python3 - "$BASE/pdjax/model/llama.py" <<'PY'
import sys
p = sys.argv[1]; s = open(p).read()
old = "attn = jax.nn.dot_product_attention(q, kk, vv, mask=mask,\n                                        implementation=impl)"
assert old in s, "prefix attention call not found"
open(p, "w").write(s.replace(old, old.replace("implementation=impl", 'implementation="xla"')))
PY
echo "=== [$((SECONDS-START)) s] prefix cache, XLA prefix attention (baseline)"
(cd "$BASE" && PYTHONPATH=$BASE timeout 200 python3 tools/bench_prefix_cache.py "${ARGS[@]}" \
  --scenarios=both --out="$OUT/prefix_xla.json" > "$OUT/prefix_xla.log" 2>&1)
echo "exit $?"; grep -A3 "^scenario" "$OUT/prefix_xla.log"
echo "done after $((SECONDS-START)) s"
