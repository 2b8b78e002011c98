"""CUDA IPC KV hand-off on two real GPUs (pdjax.transfer.cuda_ipc).

Two processes, as in a deployment: a prefill side on GPU 0 (CudaIpcSender)
and a decode side on GPU 1 (LandingPool + CudaIpcReceiver), started by
tools/gpu/ipc_bandwidth.py, move a 256 MiB bf16 KV ([32, 2, 128, 16, 8, 128],
Llama-3-8B's layout) through the real driver; the bits are checked on both
sides (position-weighted checksum and first elements) and GB/s printed.

Skipped unless JAX's backend is GPU with 2+ devices and cuda-bindings
imports. conftest.py defaults JAX_PLATFORMS to cpu, so on the GPU machine:

  JAX_PLATFORMS=cuda python -m pytest tests/gpu/test_cuda_ipc_gpu.py -s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# This process may initialise CUDA for the check below; the two processes it
# starts need the memory, so it must not take most of it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "gpu" / "ipc_bandwidth.py"


def _why_not() -> str | None:
  import jax
  if jax.default_backend() != "gpu":
    return f"needs a GPU backend (is {jax.default_backend()}; run with " \
           "JAX_PLATFORMS=cuda)"
  if len(jax.devices()) < 2:
    return "needs 2 GPUs"
  try:
    from cuda.bindings import driver  # noqa: F401
  except ImportError:
    try:
      from cuda import cuda  # noqa: F401
    except ImportError:
      return "needs cuda-bindings (pip install 'pdjax[cuda-ipc]')"
  return None


def test_kv_moves_gpu0_to_gpu1_over_cuda_ipc(tmp_path):
  reason = _why_not()
  if reason:
    pytest.skip(reason)
  out = tmp_path / "ipc.json"
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
             NCCL_NVLS_ENABLE="0", NVSHMEM_DISABLE_NVLS="1",
             TORCH_SYMM_MEM_DISABLE_MULTICAST="1", PYTHONUNBUFFERED="1")
  proc = subprocess.run(
      [sys.executable, str(TOOL), "--sizes_mib", "256", "--reps", "3",
       "--budget_s", "240", "--out", str(out)],
      cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=420)
  sys.stdout.write(proc.stdout)
  sys.stderr.write(proc.stderr[-4000:])
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(out.read_text())
  (row,) = result["rows"]
  assert row["bytes"] == 256 << 20
  assert row["correct"], row
  print(f"\n256 MiB bf16 KV GPU0 -> GPU1: e2e {row['e2e_GBps']:.1f} GB/s "
        f"(send {row['send_GBps']:.1f}, recv {row['recv_ms']:.2f} ms, "
        f"zero-copy {row['zero_copy']}); raw "
        f"IPC copy {row['raw_ipc_GBps']:.1f}, device_put "
        f"{row['device_put_GBps']:.1f}")
  # The copy is the link's: a pdjax send far below the raw copy means the
  # path regressed (e.g. a host round trip crept in).
  assert row["send_GBps"] > 0.5 * row["raw_ipc_GBps"], row
  # The decode side imports the landing region as a view, not a copy.
  assert row["zero_copy"], row
