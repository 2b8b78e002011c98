#!/usr/bin/env bash
# The decode step with the layer loop unrolled (the scan unrolled over the
# stacked weights: `--scan_unroll`; every layer's weights an array of its
# own, one call per layer: `--unroll_layers`) against the lax.scan over
# stacked weights that bf16 pools run, on ONE GPU (Llama-3-8B
# shapes, random bf16, joined projections, 1K context; runs alternating);
# then an FP8 KV pool's step with its pages widened to float16 in the Pallas
# attention against bf16 (`--pallas_widen_to`), runs alternating; then where
# the one-row step's time goes unrolled (profile_decode's kernel table).
#
#   bash tools/gpu/probe_unrolled_layers.sh OUT_DIR
# PARTS: which of "layers widen profile" to run (default: all three);
# LAYERS: which of "scan scan_unroll unrolled" the layers part runs.
set -u
OUT=${1:?usage: probe_unrolled_layers.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
start_call "$OUT" > /dev/null
use_compile_cache
PARTS=${PARTS:-layers widen profile}
LAYERS=${LAYERS:-scan scan_unroll unrolled}
# Each pair twice, the pairs interleaved: a call cut short keeps a pair of
# each.
for i in 1 2; do
  case " $PARTS " in *" layers "*)
    for v in $LAYERS; do
      case $v in
        scan) decode_1k scan_$i 1,8,32,128 ;;
        scan_unroll) decode_1k scan_unroll_$i 1,8,32,128 --scan_unroll ;;
        unrolled) decode_1k unrolled_$i 1,8,32,128 --unroll_layers ;;
      esac
    done ;;
  esac
  case " $PARTS " in *" widen "*)
    decode_1k fp8kv_bf16_$i 32,128 --kv_dtype=fp8 --pallas_widen_to=bfloat16
    decode_1k fp8kv_f16_$i 32,128 --kv_dtype=fp8 --pallas_widen_to=float16 ;;
  esac
done
case " $PARTS " in *" profile "*)
  echo "=== [$((SECONDS - START)) s] profile unrolled"
  timeout 200 python3 tools/profile_decode.py --model=llama3-8b \
    --batch_sizes=1 --context_lengths=1024 --steps_per_call=4 \
    --fuse_projections --unroll_layers --out="$OUT/profile_unrolled.json" \
    > "$OUT/profile_unrolled.log" 2>&1
  echo "exit $?"; tail -25 "$OUT/profile_unrolled.log" ;;
esac
echo "done after $((SECONDS - START)) s"
