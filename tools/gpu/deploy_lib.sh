# Sourced by the GPU scripts: the launch.local flags of each named
# configuration (deploy_args; run_goodput.sh describes them); start a
# pdjax.launch.local deployment in the background and wait until its router
# serves (deploy_up); chart the sweeps of several deployments together
# (plot_goodput); gather two concurrent sweeps' results into a few files
# (collect_pair).

# deploy_args CONFIG: its launch.local flags (besides config and platform).
deploy_args() {
  case $1 in
    coloc2) echo "--num_prefill=0 --num_decode=2" ;;
    # Four 1 GiB landing buffers: summarize KVs (up to 1 GiB each) then
    # rarely fall back to jax.experimental.transfer while two are lent.
    disagg) echo "--num_prefill=1 --num_decode=1 --kv_transport=device --worker_flags=--ipc_landing_buffers=4" ;;
    # The same at XLA's default memory share (gpu-8b's decode pool sets 0.85).
    disagg_mem75) echo "--num_prefill=1 --num_decode=1 --kv_transport=device --worker_flags=--ipc_landing_buffers=4,--gpu_memory_fraction=0.75" ;;
    grpc)   echo "--num_prefill=1 --num_decode=1 --kv_transport=grpc" ;;
    xfer)   echo "--num_prefill=1 --num_decode=1 --kv_transport=device --worker_flags=--kv_fast_path=off" ;;
    tp2)    echo "--num_prefill=0 --num_decode=1 --decode_mesh=dp=1,tp=2 --worker_flags=--sharding=decode_dp_tp" ;;
    *) echo "unknown config $1" >&2; return 1 ;;
  esac
}

# deploy_up DIR PORT TIMEOUT_S [launch.local flags...]
#
# Sets LPID (the launcher's pid; `kill -INT $LPID` stops the deployment).
# Returns non-zero, after printing the launcher's and workers' last log
# lines and stopping it, when the router is not ready within TIMEOUT_S.
deploy_up() {
  local dir=$1 port=$2 limit=$3; shift 3
  mkdir -p "$dir"
  timeout "$limit" "${PY:-python3}" -m pdjax.launch.local --serve \
    --run_dir="$dir/cluster" --port="$port" --ready_timeout_s="$limit" "$@" \
    > "$dir/launch.log" 2>&1 &
  LPID=$!
  for _ in $(seq 1 "$limit"); do
    grep -q "router ready" "$dir/launch.log" 2>/dev/null && return 0
    kill -0 $LPID 2>/dev/null || break; sleep 1
  done
  grep -q "router ready" "$dir/launch.log" && return 0
  echo "  deployment in $dir did not start:"; tail -20 "$dir/launch.log"
  for f in "$dir"/cluster/*.log; do
    echo "--- $f"; grep -v "^W0000\|^I0000" "$f" | tail -8
  done
  kill $LPID 2>/dev/null; wait $LPID 2>/dev/null
  return 1
}

# plot_goodput OUT SCRATCH RUNS_DIR...: one sweep chart per preset with every
# configuration under the RUNS_DIRs (CONFIG/PRESET, as run_goodput.sh writes
# them) on it, as OUT/PRESET_goodput.png; the plotter's log in SCRATCH.
plot_goodput() {
  local out=$1 scratch=$2 preset dirs; shift 2
  for preset in chat summarize; do
    dirs=$(for r in "$@"; do ls -d "$r"/*/"$preset" 2>/dev/null; done | paste -sd, -)
    [ -n "$dirs" ] && "${PY:-python3}" tools/batch_eval.py --plot_only="$dirs" \
      --out_dir="$scratch/plots_$preset" > "$scratch/plot_$preset.log" 2>&1 \
      && cp "$scratch/plots_$preset/sweep.png" "$out/${preset}_goodput.png"
  done
}

# collect_pair OUT SCRATCH LOG...: the two sweeps run_goodput.sh wrote under
# SCRATCH/{a,b} (runs in SCRATCH/runs_{a,b}) as OUT's charts,
# goodput_runs.tar.gz (every run), summary.txt (both summaries) and
# logs.tar.gz (the LOGs, relative to SCRATCH, and the plotters' logs); the
# device tool returns 8 files.
collect_pair() {
  local out=$1 s=$2 x; shift 2
  plot_goodput "$out" "$s" "$s/runs_a" "$s/runs_b"
  mkdir -p "$s/all"
  for x in a b; do [ -d "$s/runs_$x" ] && cp -r "$s/runs_$x"/. "$s/all/"; done
  tar -C "$s/all" -czf "$out/goodput_runs.tar.gz" --exclude='*.port' .
  cat "$s"/a/summary.txt "$s"/b/summary.txt > "$out/summary.txt" 2>/dev/null
  tar -C "$s" -czf "$out/logs.tar.gz" "$@" $(cd "$s" && ls plot_*.log 2>/dev/null)
  grep -h "max goodput\|^#####\|rate    attain" -A8 "$out/summary.txt" | grep -v "^--$" | head -80
}
