#!/usr/bin/env bash
# Engines and the KV hand-off on two GPUs, in one device-tool call:
# environment facts, the two-GPU hand-off correctness check (TP=2 prefill,
# TP=1 decode), the CUDA IPC test and bandwidth table, and the engine
# benchmarks (prefill TP=1/2, decode against its roofline, transfers). Every
# part is bounded; results land in OUT_DIR as at most 8 files
# (engine_and_transfer.tar.gz holds every record and log).
set -u
OUT=${1:?usage: run_engines_and_handoff.sh OUT_DIR}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
W=/tmp/pdjax_engines_handoff; rm -rf "$W"; mkdir -p "$W"
START=$SECONDS
install_carried_wheels
python3 -m pip install -q --no-deps --no-index -e . > /dev/null 2>&1 || export PYTHONPATH=$PWD
{
  date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nvidia-smi topo -m 2>&1 | head -5
  python3 -c 'import jax, sys; print(sys.version); print("jax", jax.__version__, jax.devices())'
  python3 -c 'import cupy, cuda.bindings; print("cupy", cupy.__version__, "cuda.bindings", cuda.bindings.__version__)' 2>&1
} > "$W/env.txt" 2>&1
cat "$W/env.txt"
echo "=== [$((SECONDS-START)) s] two-GPU hand-off check"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 JAX_COMPILATION_CACHE_DIR=/tmp/pdjax_jax_cache timeout 150 python3 tools/gpu/check_two_gpu.py --nobf16_8b --out="$W/check_two_gpu.json" > "$W/check_two_gpu.log" 2>&1
echo "exit $?"; grep '^{' "$W/check_two_gpu.log" | cut -c1-600
echo "=== [$((SECONDS-START)) s] CUDA IPC test + bandwidth"
JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 90 python3 -m pytest -q -s tests/gpu/test_cuda_ipc_gpu.py > "$W/ipc_test.log" 2>&1
echo "exit $?"; grep -v "^W0000\|^I0000" "$W/ipc_test.log" | tail -6
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 120 python3 tools/gpu/ipc_bandwidth.py --out="$W/ipc.json" --budget_s=80 > "$W/ipc_bw.log" 2>&1
echo "exit $?"; grep -v "^W0000\|^I0000" "$W/ipc_bw.log" | tail -14
echo "=== [$((SECONDS-START)) s] engine benchmarks"
DECODE_BATCHES=1,32,128 BUDGET_S=$(( 545 - (SECONDS - START) )) PYTHON=python3 bash tools/gpu/run_engine_benchmarks.sh "$W/bench" > "$W/bench.log" 2>&1
echo "exit $?"; tail -80 "$W/bench.log"
tar -C "$W" -czf "$OUT/engine_and_transfer.tar.gz" .
cp "$W/bench.log" "$OUT/bench.log" 2>/dev/null
echo "done after $((SECONDS-START)) s"
