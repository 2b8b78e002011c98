#!/usr/bin/env bash
# The main job on a fresh machine: set up a virtual environment, then start a
# local cluster (router + prefill worker + decode worker, each its own process
# on this machine's CPU devices, default tiny model) and run a real
# generation through it. Extra arguments go to `python -m pdjax.launch.local`
# (e.g. --serve to keep it running, --kv_transport=device, --num_prefill=0).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
.venv/bin/pip install -q -e .
exec .venv/bin/python -m pdjax.launch.local \
  --prompt="The quick brown fox jumps over the lazy dog" --max_tokens=32 "$@"
