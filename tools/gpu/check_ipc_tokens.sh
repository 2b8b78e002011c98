#!/usr/bin/env bash
# On two GPUs: a disaggregated deployment whose KV goes over the CUDA IPC
# same-host path (prefill worker on GPU 0, decode worker on GPU 1, the
# decode side inserting straight from its landing buffer) gives the tokens
# of a colocated deployment, request by request.
#
#   bash tools/gpu/check_ipc_tokens.sh OUT_DIR
#
# The tiny model in float32 (pdjax/configs/deployments/local.toml's settings,
# --checkpoint=tiny: the batch-eval prompts below are tiny token ids), the
# batch-eval driver's `chat` prompts, greedy, one request at a time
# (--concurrency=1: the same program shapes in both deployments, so the
# tokens must be identical, not merely close). Writes OUT_DIR/ipc_tokens.json
# and exits non-zero on any mismatch or when a hand-off did not take the
# cuda_ipc path.
#
# DISAGG_ARGS replaces the disaggregated deployment's launch flags, e.g. a
# prefill worker spanning two processes (three GPUs: the prefill pool's two,
# then the decode worker's):
#   DISAGG_ARGS="--num_prefill=1 --num_decode=1 --prefill_mesh=tp=2 \
#     --prefill_processes=2 --decode_mesh=dp=1 --kv_transport=device" \
#     bash tools/gpu/check_ipc_tokens.sh OUT_DIR
set -u
OUT=${1:?usage: check_ipc_tokens.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
PY=${PYTHON:-python3}
PLATFORM=${PLATFORM:-gpu}   # cpu: a dry run of the script (paths are not cuda_ipc there)
N=${N:-16}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# Full-precision float32 matmuls (GPUs default to TF32): identical programs
# then give identical bits, and a token that differs means a KV that did.
export JAX_DEFAULT_MATMUL_PRECISION=highest
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
. tools/gpu/deploy_lib.sh
RUNS=/tmp/pdjax_ipc_tokens; rm -rf "$RUNS"; mkdir -p "$RUNS"

for cfg in disagg coloc; do
  case $cfg in
    disagg) args=${DISAGG_ARGS:-"--num_prefill=1 --num_decode=1 --prefill_mesh=tp=1 --decode_mesh=dp=1 --kv_transport=device"} ;;
    coloc)  args="--num_prefill=0 --num_decode=1 --prefill_mesh=tp=1 --decode_mesh=dp=1" ;;
  esac
  dir=$RUNS/$cfg
  # shellcheck disable=SC2086
  deploy_up "$dir" 50161 200 --config=local --checkpoint=tiny \
    --platform=$PLATFORM $args || exit 1
  timeout 120 $PY tools/batch_eval.py --target=127.0.0.1:50161 --preset=chat \
    --num_requests=$N --concurrency=1 --length_scale=0.25 --max_model_len=1024 \
    --vocab_size=512 --max_tokens=32 --ignore_eos --label=$cfg \
    --out_dir="$dir/eval" --noprogress > "$dir/eval.log" 2>&1
  echo "$cfg: batch_eval exit $?"
  grep -h "landing\|CUDA IPC\|fast path" "$dir"/cluster/*.log 2>/dev/null | cut -c1-300 | head -5
  kill -INT $LPID 2>/dev/null; wait $LPID 2>/dev/null
done

$PY - "$RUNS" "$OUT/ipc_tokens.json" <<'EOF'
import collections, json, sys
from pathlib import Path
runs, out = Path(sys.argv[1]), Path(sys.argv[2])

def load(cfg):
  recs = {}
  for line in (runs / cfg / "eval" / "results.jsonl").read_text().splitlines():
    r = json.loads(line)
    recs[r["request_id"]] = r
  return recs

dis, col = load("disagg"), load("coloc")
paths = collections.Counter(str((r.get("usage") or {}).get("kv_path", r.get("kv_path")))
                            for r in dis.values())
same = [k for k in col if k in dis and dis[k]["token_ids"] == col[k]["token_ids"]
        and dis[k]["token_ids"]]
result = {"requests": len(col), "identical": len(same), "kv_paths": dict(paths),
          "tokens_compared": sum(len(col[k]["token_ids"]) for k in same),
          "mismatched": sorted(str(k) for k in col if k not in same)}
out.write_text(json.dumps(result, indent=1))
print(json.dumps(result))
ok = len(same) == len(col) == len(dis) > 0 and set(paths) == {"cuda_ipc"}
sys.exit(0 if ok else 1)
EOF
