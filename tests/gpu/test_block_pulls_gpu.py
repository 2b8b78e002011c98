"""Shared KV's peer pulls over CUDA IPC with the real driver
(pdjax.transfer.block_pulls).

Two processes of one host, as two prefill workers: this one asks, and a
child (this file run as a script) serves seeded blocks behind
``PeerServicer``, over gRPC. Every pull must take the ``cuda_ipc`` path
and bring the peer's bits exactly, in bf16 and in FP8 (viewed as bytes,
retyped); the landing region must be free after each, and a second pull
reuses the peer's opened handle and this side's opened event. The child
uses the last GPU, this process the first (with one GPU, both use it).

Skipped unless JAX's backend is GPU and cuda-bindings imports.
conftest.py defaults JAX_PLATFORMS to cpu, so on the GPU machine:

  JAX_PLATFORMS=cuda python -m pytest tests/gpu/test_block_pulls_gpu.py -s
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from needs import missing

# Two JAX processes share the GPU(s): neither may take most of the memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

SHAPE = (2, 32, 16, 8, 128)   # a Llama-3-8B block: [2, L, P, K, hd]
BLOCKS = 8
TOKEN = "block-pulls-gpu"


def _name(i: int) -> bytes:
  return i.to_bytes(4, "little") * 4


def _layout(dtype: str):
  from pdjax.engine.remote_tier import BlockLayout
  return BlockLayout(b"f" * 16, SHAPE, dtype)


def _blocks(dtype: str) -> list[np.ndarray]:
  """The blocks the peer holds, the same in both processes."""
  import ml_dtypes  # noqa: F401 - names bfloat16 & co. for numpy
  rng = np.random.default_rng(11)
  host = rng.standard_normal((BLOCKS, *SHAPE)).astype(np.float32) * 3
  return list(host.astype(np.dtype(dtype)))


def _serve(dtype: str) -> None:
  """The child: a peer prefill worker's BlockStore over the blocks, on the
  last GPU, until its stdin closes."""
  import asyncio

  import jax

  from pdjax.service import common
  from pdjax.service.kvstore import PeerServicer
  from pdjax.transfer.block_pulls import make_block_pulls
  from pdjax.transfer.device import BlockPulls
  from pdjax.v1 import blockstore_pb2_grpc

  device = jax.devices()[-1]
  held = {_name(i): jax.device_put(b, device)
          for i, b in enumerate(_blocks(dtype))}
  pulls = make_block_pulls(BlockPulls(device), process_id=common.PROCESS_ID)
  assert pulls.ipc is not None, "the peer has no CUDA IPC writer"

  class Cache:
    block_layout = _layout(dtype)

    def export(self, hashes, timeout_s):
      out = []
      for h in hashes:
        if h not in held:
          break
        out.append((h, held[h]))
      return out

  async def main():
    sec = common.Security(service_token=TOKEN)
    server = common.make_server(sec)
    blockstore_pb2_grpc.add_BlockStoreServicer_to_server(
        PeerServicer(Cache(), timeout_s=30.0, pulls=pulls), server)
    port = common.bind(server, "127.0.0.1", 0, sec)
    await server.start()
    print(f"ADDRESS 127.0.0.1:{port}", flush=True)
    await asyncio.to_thread(sys.stdin.read)
    await server.stop(None)
    print(f"OFFERS {dict(pulls.offers)}", flush=True)

  asyncio.run(main())


@pytest.fixture(scope="module", params=["bfloat16", "float8_e4m3fn"])
def peer(request):
  """(address, dtype) of a child serving the blocks in ``dtype``."""
  reason = missing()
  if reason:
    pytest.skip(reason)
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
             PYTHONUNBUFFERED="1")
  proc = subprocess.Popen([sys.executable, __file__, request.param],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True, cwd=str(ROOT), env=env)
  address = None
  for line in proc.stdout:
    if line.startswith("ADDRESS "):
      address = line.split()[1]
      break
  assert address, "the peer process did not start"
  yield address, request.param
  proc.stdin.close()
  rest = proc.stdout.read()
  assert proc.wait(60) == 0
  assert "'cuda_ipc'" in rest and "'transfer'" not in rest, rest


def test_blocks_of_a_peer_on_this_host_come_by_cuda_ipc(peer):
  import jax

  from pdjax.engine.remote_tier import RemoteTier
  from pdjax.service import common
  from pdjax.service.kvstore import GrpcBlockSource
  from pdjax.transfer.block_pulls import make_block_pulls
  from pdjax.transfer.device import BlockPulls

  address, dtype = peer
  layout = _layout(dtype)
  pulls = make_block_pulls(BlockPulls(jax.devices()[0]),
                           process_id=common.PROCESS_ID,
                           landing_bytes=BLOCKS * layout.block_bytes)
  assert pulls.lends, "no landing buffer"
  sec = common.Security(service_token=TOKEN)
  tier = RemoteTier(layout, SHAPE[2],
                    lambda a: GrpcBlockSource(a, sec, pulls=pulls),
                    policy="always", timeout_s=30.0, pulls=pulls)
  names = [_name(i) for i in range(BLOCKS)]
  want = _blocks(dtype)
  try:
    pulled = 0
    for first in (0, BLOCKS // 2):
      got = tier.fetch(names, first, [(address, BLOCKS)])
      assert [h for h, _ in got] == names[first:]
      for (_, arr), block in zip(got, want[first:]):
        assert arr.dtype == block.dtype
        np.testing.assert_array_equal(
            np.asarray(arr).view(np.uint8), block.view(np.uint8))
      pulled += BLOCKS - first
      assert tier.stats["pulled_cuda_ipc_blocks"] == pulled
      assert tier.stats["pulled_transfer_blocks"] == 0
      pool = pulls.pool
      assert pool.live() == pool.quarantined() == 0
      assert pool.free_bytes() == pool.total_bytes
    assert len(pulls.events) == 1         # the peer's event, opened once
  finally:
    tier.close()


if __name__ == "__main__":
  _serve(sys.argv[1])
