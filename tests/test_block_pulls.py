"""Shared KV's device pulls between two workers of one host
(pdjax.transfer.block_pulls), on CPU with the fake CUDA driver, without a
model: a peer's ``PullBlocks`` over real gRPC (``PeerServicer`` in front of
a stand-in cache) and the remote tier asking it.

What these pin: the bytes a peer copies into the region lent arrive as the
blocks it holds, in their dtype (FP8 retyped), only after the peer's
copies have run, and in memory the worker owns; every pull gives its
region back, whatever ends it (read, refused, timed out, the peer down,
the call cancelled), at once where nothing can still write it and after
its lease otherwise; and every fast-path problem, on either side, becomes
a transfer pull, never a lost fetch. tests/test_kv_sharing.py runs the
path between two prefill engines.
"""

from __future__ import annotations

import ctypes
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdjax.engine.remote_tier import BlockLayout, RemoteTier
from pdjax.service import common
from pdjax.service.kvstore import GrpcBlockSource, PeerServicer
from pdjax.transfer import cuda_ipc as ci
from pdjax.transfer.block_pulls import AutoBlockPulls, make_block_pulls
from pdjax.transfer.device import BlockPulls
from test_cuda_ipc import Clock, HeldGpu, _bits
from test_kvstore import _serve, loop  # noqa: F401 (a fixture)

SHAPE = (2, 2, 4, 2, 8)       # [2, layers, page, kv_heads, head_dim]
SEC = common.Security(service_token="block-pulls-test")
MiB = 1 << 20


def _layout(dtype: str = "bfloat16") -> BlockLayout:
  return BlockLayout(b"f" * 16, SHAPE, dtype)


def _name(i: int) -> bytes:
  return i.to_bytes(4, "little") * 4


def _blocks(n: int, dtype: str = "bfloat16", seed: int = 0):
  """``n`` blocks whose every element differs, on device 0 (a peer's)."""
  rng = np.random.default_rng(seed)
  host = rng.standard_normal((n, *SHAPE)).astype(np.float32) * 3
  return [jax.device_put(jnp.asarray(b, dtype), jax.devices()[0])
          for b in host]


class Cache:
  """A peer's prefix cache as ``PeerServicer`` reads it: the leading run
  of the names asked that it holds. ``hold``: ``export`` waits for it
  (a busy engine thread); ``rename``: answers its blocks under these
  names instead (a peer that lies)."""

  def __init__(self, layout, blocks):
    self.block_layout = layout
    self.blocks = blocks
    self.hold: threading.Event | None = None
    self.exporting = threading.Event()
    self.rename = None

  def export(self, hashes, timeout_s):
    self.exporting.set()
    if self.hold is not None:
      self.hold.wait(10)
    out = []
    for h in hashes:
      if h not in self.blocks:
        break
      out.append((h, self.blocks[h]))
    if self.rename:
      out = [(n, a) for n, (_, a) in zip(self.rename, out)]
    return out


@pytest.fixture(scope="module")
def transfers():
  """Two transfer servers (a peer's on device 0, the asking worker's on
  device 1), shared by the tests: each test wraps them anew."""
  return BlockPulls(jax.devices()[0]), BlockPulls(jax.devices()[1])


def _pulls(transfer, registry, process_id, *, writer=None, **kw):
  """``make_block_pulls`` with a fake driver on ``registry`` (``writer``:
  that driver instead) for a process of host A."""
  kw.setdefault("landing_bytes", MiB)
  return make_block_pulls(
      transfer, process_id=process_id, hostname=process_id.split(":")[0],
      driver=writer or ci.FakeCudaDriver(registry), **kw)


@pytest.fixture
def peers(request, loop, transfers):
  """A peer (hostA:1) serving 12 bf16 blocks of 512 bytes, and a worker
  (hostA:2) whose remote tier pulls from it; CUDA IPC on both sides, one
  fake driver registry, a landing buffer of 1 MiB (``request.param``:
  other bytes), leases on one settable clock."""
  registry = ci.FakeIpcRegistry()
  layout = _layout()
  names = [_name(i) for i in range(12)]
  cache = Cache(layout, dict(zip(names, _blocks(12))))
  source = _pulls(transfers[0], registry, "hostA:1:aaaa")
  fetcher = _pulls(transfers[1], registry, "hostA:2:bbbb",
                   landing_bytes=getattr(request, "param", MiB))
  clock = Clock(time.time())
  fetcher.pool._clock = clock
  source.ipc._clock = clock
  server, address = loop.run(_serve(
      PeerServicer(cache, timeout_s=5.0, pulls=source), SEC))
  tier = RemoteTier(layout, 4, lambda a: GrpcBlockSource(a, SEC,
                                                         pulls=fetcher),
                    policy="always", timeout_s=5.0, pulls=fetcher)
  yield types.SimpleNamespace(
      registry=registry, layout=layout, names=names, cache=cache,
      source=source, fetcher=fetcher, pool=fetcher.pool, clock=clock,
      address=address, tier=tier)
  if cache.hold is not None:
    cache.hold.set()
  tier.close()
  source.close()
  loop.run(server.stop(None))


def _want(p, n: int) -> np.ndarray:
  return np.stack([_bits(p.cache.blocks[h]) for h in p.names[:n]])


def _got(blocks) -> np.ndarray:
  return np.stack([_bits(a) for _, a in blocks])


def _region_back_at_once(pool) -> bool:
  return (pool.live() == 0 and pool.quarantined() == 0
          and pool.free_bytes() == pool.total_bytes)


def _region_back_after_its_lease(p) -> None:
  assert p.pool.live() == 0 and p.pool.quarantined() == 1
  p.clock.t += p.pool.lease_s + p.pool.grace_s + 1
  p.pool.reap()
  assert _region_back_at_once(p.pool)


# ------------------------------------------------------------- CUDA IPC path
def test_a_peer_on_this_host_copies_its_blocks_into_the_region_lent(peers):
  p = peers
  got = p.tier.fetch(p.names, 1, [(p.address, 5)])
  assert [h for h, _ in got] == p.names[1:5]
  np.testing.assert_array_equal(_got(got), _want(p, 5)[1:])
  assert p.tier.stats["pulled_cuda_ipc_blocks"] == 4
  assert p.tier.stats["pulled_transfer_blocks"] == 0
  assert p.tier.stats["pulled_blocks"] == p.tier.stats["peer_blocks"] == 4
  assert p.source.offers == {"cuda_ipc": 1}
  assert p.registry.copies == 1             # one copy of the stacked run
  assert _region_back_at_once(p.pool)
  assert all(a.devices() == {jax.devices()[1]} for _, a in got)


def test_the_worker_reads_only_after_the_peers_copies_have_run(
    loop, transfers):
  """The peer's copies are still queued when it answers (a slow GPU): the
  bytes land only once the worker waits on the peer's event, so a worker
  that read without the wait would get zeros."""
  registry = ci.FakeIpcRegistry()
  gpu = HeldGpu(registry)         # copies run only when waited for
  source = _pulls(transfers[0], registry, "hostA:1:aaaa", writer=gpu)
  fetcher = _pulls(transfers[1], registry, "hostA:2:bbbb",
                   writer=ci.FakeCudaDriver(registry, deferred=True))
  layout = _layout()
  blocks = _blocks(3, seed=4)
  nbytes = 3 * layout.block_bytes
  shape = (3, *SHAPE)
  with fetcher.lend("peer", nbytes) as lent:
    answer = source.offer(blocks, lent.landing)
    answer.hashes.extend(_name(i) for i in range(3))
    assert answer.transport == "cuda_ipc"
    assert len(answer.ipc_event_handle) == ci.IPC_EVENT_HANDLE_BYTES
    assert registry.copies == 0
    assert ctypes.string_at(lent.slot.ptr, nbytes) == bytes(nbytes)
    arr, path = fetcher.pull(answer, lent, shape, jnp.bfloat16,
                             timeout_s=5)
  assert path == "cuda_ipc" and registry.copies == 1
  np.testing.assert_array_equal(_bits(arr),
                                np.stack([_bits(b) for b in blocks]))
  assert _region_back_at_once(fetcher.pool)
  gpu.go.set()
  source.close()
  fetcher.close()
  assert not registry.events and not sum(registry.opened.values())
  assert not registry.allocations


@pytest.mark.parametrize("dtype", ["bfloat16", "float32",
                                   "float8_e4m3fn", "float8_e5m2"])
def test_blocks_arrive_in_their_dtype(transfers, dtype):
  """An FP8 KV's region is viewed as bytes (DLPack has no 8-bit floats)
  and retyped; the bits are the peer's in every dtype, in an array the
  worker owns (the region, lent again and overwritten, leaves it be)."""
  registry = ci.FakeIpcRegistry()
  source = _pulls(transfers[0], registry, "hostA:1:aaaa")
  fetcher = _pulls(transfers[1], registry, "hostA:2:bbbb")
  blocks = _blocks(2, dtype, seed=7)
  want = np.stack([_bits(b) for b in blocks])
  with fetcher.lend("peer", 2 * _layout(dtype).block_bytes) as lent:
    answer = source.offer(blocks, lent.landing)
    answer.hashes.extend([_name(0), _name(1)])
    arr, path = fetcher.pull(answer, lent, (2, *SHAPE), jnp.dtype(dtype),
                             timeout_s=5)
  assert path == "cuda_ipc" and arr.dtype == jnp.dtype(dtype)
  assert arr.shape == (2, *SHAPE)
  np.testing.assert_array_equal(_bits(arr), want)
  assert _region_back_at_once(fetcher.pool)
  slot = fetcher.pool.acquire("next", fetcher.pool.buffer_bytes)
  ctypes.memset(slot.ptr, 0x5A, slot.nbytes)
  np.testing.assert_array_equal(_bits(arr), want)
  source.close()
  fetcher.close()


# ------------------------------------------------------- the region goes back
def test_a_run_refused_by_the_identity_checks_gives_the_region_back(peers):
  """A peer that answers its blocks under other names than asked: read,
  then refused by ``check_pulled`` (nothing used), the region free."""
  p = peers
  p.cache.rename = [p.names[0], p.names[2], p.names[1]]
  assert p.tier.fetch(p.names, 0, [(p.address, 3)]) == []
  assert p.tier.stats["refused_blocks"] == 1
  assert p.tier.stats["pulled_blocks"] == 0
  assert p.source.offers == {"cuda_ipc": 1}
  assert _region_back_at_once(p.pool)


class LyingPeer(PeerServicer):
  """Copies its blocks, then says they are of another layout."""

  async def PullBlocks(self, request, context):
    out = await super().PullBlocks(request, context)
    out.layout.fingerprint = b"g" * 16
    return out


def test_a_run_of_another_layout_is_refused_unread(peers, loop):
  """The answer says another layout: refused before anything is read; the
  peer wrote the region, so it waits out its lease."""
  p = peers
  server, address = loop.run(_serve(
      LyingPeer(p.cache, timeout_s=5.0, pulls=p.source), SEC))
  try:
    assert p.tier.fetch(p.names, 0, [(address, 3)]) == []
  finally:
    loop.run(server.stop(None))
  assert p.tier.stats["refused_blocks"] == 1
  assert p.source.offers == {"cuda_ipc": 1}
  _region_back_after_its_lease(p)


@pytest.mark.parametrize("end", ["timeout", "cancelled", "down"])
def test_a_pull_without_an_answer_gives_the_region_back_after_its_lease(
    peers, end):
  """The call ends with no answer (its deadline, the tier closing its
  channel, nobody listening): the peer may still copy into the region, so
  it is out of use until its lease ends, then free; the fetch fails
  without blocks."""
  p = peers
  if end == "down":
    address = "127.0.0.1:1"
    p.tier.timeout_s = 2.0
  else:
    address = p.address
    p.cache.hold = threading.Event()   # the peer's engine thread is busy
    p.tier.timeout_s = 0.3 if end == "timeout" else 10.0
  result = []
  fetching = threading.Thread(
      target=lambda: result.append(p.tier.fetch(p.names, 0,
                                                [(address, 4)])))
  fetching.start()
  if end == "cancelled":
    assert p.cache.exporting.wait(5)
    p.tier._sources[address].close()   # pylint: disable=protected-access
  fetching.join(10)
  assert result == [[]]
  assert p.tier.stats["failures"] == 1
  _region_back_after_its_lease(p)
  if end != "down":
    # The peer's call ends with the worker's (or it answers late, past the
    # region's lease): nothing is written into the region lent again.
    p.cache.hold.set()
    time.sleep(0.2)
    assert p.registry.copies == 0 and "cuda_ipc" not in p.source.offers


def test_a_lease_ending_before_the_peer_copies_takes_the_transfer_path(
    peers):
  """The peer does not start a copy within its margin of the lease's end
  (the worker may give the region back then): it offers the run for a
  transfer pull, and the region, never written, is free at once."""
  p = peers
  p.pool.lease_s = p.source.ipc.deadline_margin_s / 2
  got = p.tier.fetch(p.names, 0, [(p.address, 3)])
  np.testing.assert_array_equal(_got(got), _want(p, 3))
  assert p.tier.stats["pulled_transfer_blocks"] == 3
  assert p.source.fallbacks == {"TransferError": 1}
  assert p.registry.copies == 0
  assert _region_back_at_once(p.pool)


# ---------------------------------------------------------------- fallbacks
def test_a_handle_the_peer_cannot_open_falls_back_to_a_transfer_pull(peers):
  p = peers
  p.source.ipc.driver.fail_open = True
  got = p.tier.fetch(p.names, 0, [(p.address, 4)])
  np.testing.assert_array_equal(_got(got), _want(p, 4))
  assert p.tier.stats["pulled_transfer_blocks"] == 4
  assert p.tier.stats["pulled_cuda_ipc_blocks"] == 0
  assert p.source.offers == {"transfer": 1}
  assert p.source.fallbacks == {"CudaError": 1}
  assert _region_back_at_once(p.pool)   # nothing wrote it: free at once


def test_a_peer_on_another_host_is_pulled_from_and_not_lent_to_again(
    peers):
  p = peers
  p.source.hostname = "hostB"
  p.source.process_id = "hostB:1:aaaa"
  for first in (0, 2):
    got = p.tier.fetch(p.names, first, [(p.address, 4)])
    np.testing.assert_array_equal(_got(got), _want(p, 4)[first:])
  assert p.tier.stats["pulled_transfer_blocks"] == 6
  assert p.source.offers == {"transfer": 2}
  assert p.pool.counts["lent"] == 1      # the second pull lent nothing
  assert _region_back_at_once(p.pool)


@pytest.mark.parametrize("peers", [4096], indirect=True)
def test_a_run_larger_than_the_landing_buffer_takes_the_transfer_path(
    peers):
  p = peers
  assert p.pool.buffer_bytes < 12 * p.layout.block_bytes
  got = p.tier.fetch(p.names, 0, [(p.address, 12)])
  np.testing.assert_array_equal(_got(got), _want(p, 12))
  assert p.tier.stats["pulled_transfer_blocks"] == 12
  assert p.fetcher.fallbacks == {"no_landing": 1}
  # A shorter run fits.
  got = p.tier.fetch(p.names, 0, [(p.address, 4)])
  assert p.tier.stats["pulled_cuda_ipc_blocks"] == 4


def test_a_failed_read_on_this_side_pulls_again_by_transfer(peers):
  """The worker's own driver fails (JAX refuses the view): the fetch
  still brings the blocks, by a second call on the transfer path, and the
  worker lends no more regions."""
  p = peers

  def broken(*a, **k):
    raise ci.CudaError("importing a landing buffer into JAX failed: no view")

  p.pool.driver.view = broken
  got = p.tier.fetch(p.names, 0, [(p.address, 3)])
  np.testing.assert_array_equal(_got(got), _want(p, 3))
  assert p.tier.stats["pulled_transfer_blocks"] == 3
  assert p.tier.stats["failures"] == 0
  assert p.source.offers == {"cuda_ipc": 1, "transfer": 1}
  assert "no view" in p.fetcher.lending_stopped
  assert not p.fetcher.lends
  _region_back_after_its_lease(p)        # a failed read vouches for nothing


def test_a_peer_without_the_fast_path_frees_the_region_at_once(peers):
  p = peers
  p.source.ipc = None                    # --kv_fast_path=off there
  got = p.tier.fetch(p.names, 0, [(p.address, 2)])
  assert len(got) == 2 and p.tier.stats["pulled_transfer_blocks"] == 2
  assert _region_back_at_once(p.pool)


def test_without_a_gpu_the_pulls_are_the_transfer_pulls(transfers):
  assert jax.default_backend() == "cpu" and not ci.fast_path_on("auto")
  pulls = make_block_pulls(transfers[1], process_id="hostA:2:bbbb")
  assert isinstance(pulls, AutoBlockPulls)
  assert pulls.ipc is None and pulls.pool is None and not pulls.lends
  with pulls.lend("peer", 1024) as lent:
    assert lent.landing is None
  with pytest.raises(ValueError, match="auto or off"):
    make_block_pulls(transfers[1], fast_path="on")
  pulls.close()
