# Sourced by the GPU scripts, from the repository root: the environment
# every run on the device machine starts with (NVLink multicast off in every
# process: a program that uses it can take a shared host's GPUs out of
# service), the wheels the image may lack (carried in .whl), and a record of
# the machine for the results folder.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

install_carried_wheels() {
  # Its generated code refuses a grpcio older than the one it was made
  # with, so the check imports it (the wheel must match the image's grpcio:
  # 1.84.0 on the GPU machines).
  python3 -c "from grpc_health.v1 import health" 2>/dev/null || python3 -m pip install -q --force-reinstall --no-deps --no-index .whl/grpcio_health_checking-*.whl 2>&1 | tail -1
  python3 -c "import cuda.bindings.driver" 2>/dev/null || python3 -m pip install -q --no-deps --no-index .whl/cuda_*.whl 2>&1 | tail -1
  python3 -c "import gguf" 2>/dev/null || python3 -m pip install -q --no-deps --no-index .whl/gguf-*.whl 2>&1 | tail -1
}

# record_env DIR: date, GPUs, Python, jax and cuda.bindings into DIR/env.txt
# (and on stdout).
record_env() {
  {
    date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c 'import jax, sys; print(sys.version); print("jax", jax.__version__, jax.devices())'
    python3 -c 'import cuda.bindings; print("cuda.bindings", cuda.bindings.__version__)' 2>&1
  } > "$1/env.txt" 2>&1
  cat "$1/env.txt"
}

# start_call DIR: what a one-call script does first (the clock, the carried
# wheels, this tree on PYTHONPATH, the machine recorded into DIR).
start_call() {
  START=$SECONDS
  install_carried_wheels
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  record_env "$1"
}

# use_compile_cache: compiled programs kept on disk across this call's
# processes (each part of a call compiles the same programs).
use_compile_cache() {
  export JAX_COMPILATION_CACHE_DIR=/tmp/pdjax_jax_cache
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
}

# cpus_busy_on / cpus_busy_off: one lowest-priority (nice 19) spinning
# process per CPU, so that no CPU of the machine halts while they run: any
# other thread that wakes preempts one at once, without the halted CPU's
# wake-up (on a KVM guest without a polling idle driver, an exit to the
# hypervisor and back). What a host that never idles would give.
CPUS_BUSY_PIDS=()
cpus_busy_on() {
  local _
  for _ in $(seq "$(nproc)"); do
    nice -n 19 python3 -c "while True: pass" & CPUS_BUSY_PIDS+=($!)
  done
}
cpus_busy_off() {
  (( ${#CPUS_BUSY_PIDS[@]} )) || return 0
  kill "${CPUS_BUSY_PIDS[@]}" 2>/dev/null
  wait "${CPUS_BUSY_PIDS[@]}" 2>/dev/null
  CPUS_BUSY_PIDS=()
}

# ipc_gpu_test DIR LINES: the CUDA IPC GPU test, its log in DIR/ipc_test.log,
# the last LINES lines shown.
ipc_gpu_test() {
  echo "=== [$((SECONDS-START)) s] CUDA IPC GPU test"
  JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 200 python3 -m pytest -q -s tests/gpu/test_cuda_ipc_gpu.py > "$1/ipc_test.log" 2>&1
  echo "exit $?"; grep -v "^W0000\|^I0000" "$1/ipc_test.log" | tail -"$2"
}

# decode_at CONTEXT NAME ROWS [FLAGS]: bench_decode on Llama-3-8B shapes
# (joined projections, 4 steps a call) at CONTEXT with FLAGS, into
# $OUT/decode_NAME.jsonl and .log, its table's rows shown (at most
# DECODE_TIMEOUT seconds, 200 by default); decode_1k: at 1K context.
decode_at() {
  local ctx=$1 name=$2 rows=$3; shift 3
  echo "=== [$((SECONDS - START)) s] decode $name"
  timeout "${DECODE_TIMEOUT:-200}" python3 tools/bench_decode.py \
    --model=llama3-8b --batch_sizes="$rows" --context_lengths="$ctx" \
    --steps_per_call=4 --fuse_projections "$@" \
    --out="$OUT/decode_$name.jsonl" > "$OUT/decode_$name.log" 2>&1
  echo "exit $?"
  grep -E "^ *[0-9]+ +$ctx " "$OUT/decode_$name.log" || tail -3 "$OUT/decode_$name.log"
}
decode_1k() { decode_at 1024 "$@"; }
