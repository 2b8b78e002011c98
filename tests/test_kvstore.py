"""The shared-KV store and the remote tier's rules, without a model: the
store's two tiers (LRU in memory, then on disk, a restart finding its
files), layout isolation, the checks every block passes on arrival, the
fetch plan and cost model, sources that fail, and the BlockStore service
over gRPC with the deployment's service token."""

from __future__ import annotations

import asyncio
import threading
import time
import zlib

import grpc
import numpy as np
import pytest

from pdjax.engine.remote_tier import (BlockLayout, BlockRefused, BlockSource,
                                      FetchCosts, LinearFit, RemoteTier,
                                      check_block)
from pdjax.service import common
from pdjax.service.kvstore import (BlockStoreCore, GrpcBlockSource,
                                   StoreMetrics, StoreServicer, store_info)
from pdjax.service.metrics import Metrics
from pdjax.v1 import blockstore_pb2, blockstore_pb2_grpc, common_pb2

SHAPE = (2, 2, 4, 2, 8)       # [2, layers, page, kv_heads, head_dim]
LAYOUT = BlockLayout(b"f" * 16, SHAPE, "float32")
OTHER = BlockLayout(b"g" * 16, SHAPE, "float32")
BLOCK = LAYOUT.block_bytes    # 1 KiB


def _name(i: int) -> bytes:
  return i.to_bytes(4, "little") * 4


def _data(i: int) -> bytes:
  return np.full(SHAPE, i, np.float32).tobytes()


# ------------------------------------------------------------------ core
def test_memory_lru_spills_to_disk_and_comes_back(tmp_path):
  core = BlockStoreCore(3 * BLOCK, disk_dir=str(tmp_path),
                        disk_capacity_bytes=2 * BLOCK)
  for i in range(4):
    assert core.put(_name(i), LAYOUT, _data(i)) == "stored"
  assert core.put(_name(3), LAYOUT, _data(3)) == "present"
  st = core.stats
  assert st["memory_blocks"] == 3 and st["disk_blocks"] == 1   # 0 on disk
  # A disk hit moves the block back; the memory LRU (1) goes down.
  assert core.fetch([_name(0)], LAYOUT) == [(_name(0), _data(0),
                                             zlib.crc32(_data(0)))]
  st = core.stats
  assert st["disk_hits"] == 1 and st["disk_blocks"] == 1
  assert st["memory_bytes"] <= 3 * BLOCK
  # Two more: the disk tier (2 blocks) drops its LRU for good.
  for i in (4, 5):
    core.put(_name(i), LAYOUT, _data(i))
  st = core.stats
  assert st["disk_blocks"] == 2 and st["disk_bytes"] <= 2 * BLOCK
  assert st["evictions"] == 1
  held = {n for n in map(_name, range(6)) if core.fetch([n], LAYOUT)}
  assert len(held) == 5 and len(core) == 5
  # The routing view: every held name, and the one dropped is gone.
  assert len(core.events) == 5


def test_fetch_gives_the_leading_run_of_its_own_layout_only(tmp_path):
  core = BlockStoreCore(16 * BLOCK)
  for i in (0, 1, 3):
    core.put(_name(i), LAYOUT, _data(i))
  core.put(_name(2), OTHER, _data(2))
  names = [_name(i) for i in range(4)]
  got = core.fetch(names, LAYOUT)
  assert [n for n, _, _ in got] == names[:2]      # 2 is another layout's
  assert core.fetch(names, OTHER) == []           # 0 is not OTHER's
  assert core.fetch(names[2:], OTHER)[0][0] == _name(2)
  assert core.stats["layout_misses"] == 3     # 2, 0, then 3


def test_malformed_puts_are_refused():
  core = BlockStoreCore(16 * BLOCK, max_block_bytes=BLOCK)
  assert core.put(_name(0), LAYOUT, _data(0)[:-4]) == "refused"
  assert core.put(_name(0), LAYOUT, _data(0), crc=1) == "refused"
  assert core.put(b"short", LAYOUT, _data(0)) == "refused"
  big = BlockLayout(b"f" * 16, (2, 2, 8, 2, 8), "float32")
  assert core.put(_name(0), big, bytes(big.block_bytes)) == "refused"
  assert core.put(_name(0), BlockLayout(b"f" * 16, SHAPE, "nonsense"),
                  _data(0)) == "refused"
  assert len(core) == 0 and core.stats["refused"] == 5
  with pytest.raises(ValueError):
    BlockStoreCore(0)


def test_a_restarted_store_serves_its_disk(tmp_path):
  core = BlockStoreCore(BLOCK, disk_dir=str(tmp_path),
                        disk_capacity_bytes=8 * BLOCK)
  for i in range(4):
    core.put(_name(i), LAYOUT, _data(i))        # 0..2 spill to disk
  again = BlockStoreCore(BLOCK, disk_dir=str(tmp_path),
                         disk_capacity_bytes=8 * BLOCK)
  assert again.stats["disk_blocks"] == 3 and len(again.events) == 3
  got = again.fetch([_name(0), _name(1), _name(2)], LAYOUT)
  assert [d for _, d, _ in got] == [_data(0), _data(1), _data(2)]
  # A corrupted file is found out when read, dropped, and a miss.
  core.put(_name(7), LAYOUT, _data(7))
  core.put(_name(8), LAYOUT, _data(8))          # 7 spills to disk
  path = core._path(_name(7))  # pylint: disable=protected-access
  raw = bytearray(path.read_bytes())
  raw[-1] ^= 0xFF
  path.write_bytes(bytes(raw))
  assert core.fetch([_name(7)], LAYOUT) == []
  assert core.stats["disk_errors"] == 1 and not path.exists()


# ------------------------------------------------------------------ checks
def test_every_arriving_block_is_checked():
  good = _data(1)
  crc = zlib.crc32(good)
  arr = check_block(LAYOUT, _name(1), _name(1), LAYOUT, good, crc)
  assert arr.shape == SHAPE and float(arr[0, 0, 0, 0, 0]) == 1.0
  for why, args in {
      "another name": (_name(2), LAYOUT, good, crc),
      "another model": (_name(1), OTHER, good, crc),
      "another shape": (_name(1), BlockLayout(b"f" * 16, (2, 2, 2, 4, 8),
                                              "float32"), good, crc),
      "another dtype": (_name(1), BlockLayout(b"f" * 16, SHAPE, "float16"),
                        good, crc),
      "short": (_name(1), LAYOUT, good[:-1], zlib.crc32(good[:-1])),
      "corrupt": (_name(1), LAYOUT, good[:-1] + b"\0", crc),
  }.items():
    with pytest.raises(BlockRefused):
      check_block(LAYOUT, _name(1), *args)
      pytest.fail(why)


# ------------------------------------------------------------------ costs
def test_linear_fit_and_fetch_decisions():
  fit = LinearFit(decay=1.0)
  assert fit.coefficients() is None
  for x in (100, 200, 400):
    fit.add(x, 0.01 + 0.001 * x)
  a, b = fit.coefficients()
  assert a == pytest.approx(0.01) and b == pytest.approx(0.001)
  one = LinearFit()
  one.add(50, 0.5)                      # one length: the mean ratio
  assert one.coefficients() == (0.0, pytest.approx(0.01))
  misses = LinearFit()                  # fetches that found nothing: 0 bytes
  misses.add(0, 0.002)
  misses.add(0, 0.004)
  assert misses.coefficients() == (pytest.approx(0.003, rel=0.05), 0.0)

  costs = FetchCosts(block_bytes=1 << 20, page_size=16,
                     prior_latency_s=1e-3, prior_bytes_per_s=1e9)
  assert costs.saved_s(4) is None and costs.worth("peer", 4)  # unmeasured
  # Prefill: 5 ms fixed + 10 us a token; only the slope is saved.
  for n in (64, 128, 256, 512):
    costs.observe_prefill(n, 0.005 + 1e-5 * n)
  assert costs.saved_s(4) == pytest.approx(4 * 16 * 1e-5)
  # The prior: 1 ms + 4 MiB at 1 GB/s = 5.2 ms > 0.64 ms saved.
  assert not costs.worth("peer", 4)
  # A measured fast peer: 0.1 ms + 10 GB/s -> 0.52 ms for 4 blocks.
  for n in (1, 2, 8):
    costs.observe_fetch("fast", n << 20, 1e-4 + (n << 20) / 1e10)
  assert costs.fetch_s("fast", 4) == pytest.approx(1e-4 + (4 << 20) / 1e10)
  assert costs.worth("fast", 4) and not costs.worth("slow", 4)


# ------------------------------------------------------------------ tier
class FakeSource(BlockSource):
  """Serves from a dict; ``cut_after`` blocks then fails; ``tamper``
  changes what it sends."""

  def __init__(self, address, blocks, *, cut_after=None, tamper=None,
               delay_s=0.0):
    self.delay_s = delay_s
    self.address = address
    self.blocks = blocks
    self.cut_after = cut_after
    self.tamper = tamper
    self.asked = []
    self.puts = []

  def fetch(self, layout, hashes, *, timeout_s):
    self.asked.append(list(hashes))
    time.sleep(self.delay_s)
    for i, h in enumerate(hashes):
      if self.cut_after is not None and i >= self.cut_after:
        raise ConnectionError("the store went away mid-fetch")
      if h not in self.blocks:
        return
      data = self.blocks[h]
      item = (h, layout, data, zlib.crc32(data))
      yield self.tamper(item) if self.tamper else item

  def put(self, layout, blocks, *, timeout_s):
    self.puts.extend(blocks)


def _tier(sources, **kw):
  kw.setdefault("policy", "always")
  return RemoteTier(LAYOUT, 4, lambda a: sources[a], **kw)


def test_plan_fetch_order_partial_and_refused_sources():
  names = [_name(i) for i in range(6)]
  a = FakeSource("a", {n: _data(i) for i, n in enumerate(names[:3])})
  b = FakeSource("b", {n: _data(i) for i, n in enumerate(names[:5])})
  store = FakeSource("s", {n: _data(i) for i, n in enumerate(names)})
  tier = _tier({"a": a, "b": b, "s": store}, store="s", self_address="me")
  assert tier.plan(6, 1, [("a", 3), ("me", 6), ("b", 5), ("x", 1)]) == [
      ("peer", "b", 5, True), ("peer", "a", 3, True),
      ("store", "s", 6, False)]
  # 1 held here; b gives 1..4, a has nothing past 4, the store gives 5.
  got = tier.fetch(names, 1, [("a", 3), ("b", 5)])
  assert [h for h, _ in got] == names[1:]
  assert b.asked == [names[1:5]] and a.asked == [] and store.asked == [
      names[5:]]
  assert tier.stats["peer_blocks"] == 4 and tier.stats["store_blocks"] == 1
  # A source that lies about a block: the blocks before it are kept.
  liar = FakeSource("l", {n: _data(i) for i, n in enumerate(names)},
                    tamper=lambda it: (it[0], OTHER, it[2], it[3])
                    if it[0] == names[2] else it)
  tier = _tier({"l": liar})
  got = tier.fetch(names, 0, [("l", 6)])
  assert [h for h, _ in got] == names[:2]
  assert tier.stats["refused_blocks"] == 1 and tier.stats["failures"] == 1


def test_a_store_dying_mid_fetch_keeps_what_arrived_and_backs_off():
  names = [_name(i) for i in range(6)]
  now = [0.0]
  dying = FakeSource("s", {n: _data(i) for i, n in enumerate(names)},
                     cut_after=2)
  tier = _tier({"s": dying}, store="s", clock=lambda: now[0])
  got = tier.fetch(names, 0)
  assert [h for h, _ in got] == names[:2]
  assert tier.stats["failures"] == 1
  # Down: not asked again until its backoff ends.
  assert tier.fetch(names, 2) == [] and len(dying.asked) == 1
  now[0] = 10.0
  dying.cut_after = None
  assert len(tier.fetch(names, 2)) == 4 and len(dying.asked) == 2


def test_auto_declines_fetches_slower_than_the_prefill():
  names = [_name(i) for i in range(4)]
  src = FakeSource("p", {n: _data(i) for i, n in enumerate(names)})
  tier = _tier({"p": src}, policy="auto")
  for n in (64, 128):                   # a very fast prefill: 1 ns a token
    tier.costs.observe_prefill(n, 1e-9 * n)
  assert tier.fetch(names, 0, [("p", 4)]) == [] and src.asked == []
  assert tier.stats["declined_blocks"] == 4
  for n in (64, 128):                   # a slow one: 1 ms a token
    tier.costs.observe_prefill(n, 1e-3 * n)
  assert len(tier.fetch(names, 0, [("p", 4)])) == 4


def test_an_unhinted_store_is_asked_by_what_it_lately_held():
  """auto: the store, asked without a hint, is weighed by the share of
  asked blocks it brought lately; one that keeps missing is asked once a
  second only, and a hint is taken at its word."""
  names = [_name(i) for i in range(4)]
  now = [0.0]
  store = FakeSource("s", {}, delay_s=1e-3)   # a round trip: 1 ms
  tier = _tier({"s": store}, store="s", policy="auto", clock=lambda: now[0])
  for n in (64, 128):                   # prefill: 1 ms a token
    tier.costs.observe_prefill(n, 1e-3 * n)
  # Unknown yield: worth it (4 blocks of 4 tokens save 16 ms).
  assert tier.fetch(names, 0) == [] and len(store.asked) == 1
  for t in range(1, 20):                # keeps missing: then 1 ask a second
    now[0] = t * 0.25
    tier.fetch(names, 0)
  assert len(store.asked) <= 10, len(store.asked)
  assert tier.stats["declined_blocks"] > 0
  # Hinted by the router (its mirror saw them): asked.
  store.blocks = {n: _data(i) for i, n in enumerate(names)}
  asked = len(store.asked)
  assert len(tier.fetch(names, 0, [("s", 4)])) == 4
  assert len(store.asked) == asked + 1


def test_write_through_is_bounded_and_survives_a_dead_store():
  store = FakeSource("s", {})
  tier = _tier({"s": store}, store="s", publish_bytes=3 * BLOCK)
  arrays = [(_name(i), np.full(SHAPE, i, np.float32)) for i in range(2)]
  tier.publish(arrays)
  assert tier.flush_publish()
  assert [h for h, _ in store.puts] == [_name(0), _name(1)]
  assert store.puts[1][1] == _data(1)
  tier.publish(arrays * 2)              # 4 blocks > 3: dropped, counted
  assert tier.stats["publish_dropped"] == 4

  def dead(*a, **k):
    raise ConnectionError("store down")
  store.put = dead
  tier.publish(arrays[:1])
  assert tier.flush_publish()
  assert tier.stats["publish_failures"] == 1
  tier.close()


# ------------------------------------------------------------------ gRPC
class _Loop:
  """An asyncio loop on its own thread, for in-process servers."""

  def __init__(self):
    self.loop = asyncio.new_event_loop()
    self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
    self.thread.start()

  def run(self, coro, timeout=60):
    return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

  def close(self):
    self.loop.call_soon_threadsafe(self.loop.stop)
    self.thread.join(5)


@pytest.fixture(scope="module")
def loop():
  """A module's ``_Loop`` for its in-process servers."""
  lp = _Loop()
  yield lp
  lp.close()


async def _serve(servicer, security):
  server = common.make_server(security)
  blockstore_pb2_grpc.add_BlockStoreServicer_to_server(servicer, server)
  port = common.bind(server, "127.0.0.1", 0, security)
  await server.start()
  return server, f"127.0.0.1:{port}"


def test_store_service_over_grpc_with_the_service_token():
  sec = common.Security(service_token="service-secret")
  loop = _Loop()
  core = BlockStoreCore(64 * BLOCK)
  metrics = Metrics("kvstore")
  server, address = loop.run(_serve(
      StoreServicer(core, store_info("s"), StoreMetrics(metrics)), sec))
  try:
    src = GrpcBlockSource(address, sec)
    src.put(LAYOUT, [(_name(i), _data(i)) for i in range(3)], timeout_s=10)
    got = list(src.fetch(LAYOUT, [_name(i) for i in range(5)], timeout_s=10))
    assert [(h, d) for h, _, d, _ in got] == [(_name(i), _data(i))
                                              for i in range(3)]
    assert all(l == LAYOUT for _, l, _, _ in got)
    assert list(src.fetch(OTHER, [_name(0)], timeout_s=10)) == []
    # The remote tier over it: checked blocks, counted.
    tier = RemoteTier(LAYOUT, 4, lambda a: GrpcBlockSource(a, sec),
                      store=address, policy="always")
    assert len(tier.fetch([_name(i) for i in range(4)], 0)) == 3
    tier.close()
    # Bounds and bad input: a clear INVALID_ARGUMENT.
    with pytest.raises(grpc.RpcError) as e:
      list(src.fetch(LAYOUT, [b"x"] * 3, timeout_s=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
      list(src.fetch(LAYOUT, [_name(0)] * 5000, timeout_s=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ValueError, match="refused 1"):
      src.put(LAYOUT, [(_name(9), b"short")], timeout_s=10)
    # Without the token: nothing.
    for bad in (common.Security(), common.Security(service_token="wrong")):
      with pytest.raises(grpc.RpcError) as e:
        list(GrpcBlockSource(address, bad).fetch(LAYOUT, [_name(0)],
                                                 timeout_s=10))
      assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Polled like a worker: role kvstore, its held blocks as cache events.
    stub = blockstore_pb2_grpc.BlockStoreStub(common.make_channel(address,
                                                                  sec))
    info = stub.GetWorkerInfo(common_pb2.WorkerInfoRequest(), timeout=10)
    assert info.role == "kvstore" and info.prefix_caching
    assert len(info.cache_stored) == 3 and info.serves_blocks
    StoreMetrics(Metrics("x")).observe(core)
    text = metrics.text()
    assert 'pdjax_kvstore_blocks_total{event="stored"} 3.0' in text
    assert 'pdjax_kvstore_bytes_total{direction="out"}' in text
    src.close()
  finally:
    loop.run(server.stop(None))
    loop.close()
  # The store gone: a fetch fails, the tier says so and moves on.
  tier = RemoteTier(LAYOUT, 4, lambda a: GrpcBlockSource(a, sec),
                    store=address, policy="always", timeout_s=1.0)
  assert tier.fetch([_name(0)], 0) == []
  assert tier.stats["failures"] == 1
  tier.close()


def test_proto_block_fields_round_trip():
  from pdjax.service.kvstore import layout_from_proto, layout_to_proto
  assert layout_from_proto(layout_to_proto(LAYOUT)) == LAYOUT
  msg = blockstore_pb2.KvBlock(hash=_name(0), layout=layout_to_proto(LAYOUT))
  assert layout_from_proto(msg.layout).shape == SHAPE
