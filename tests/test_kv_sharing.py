"""Shared KV between prefill engines (8 CPU devices, tiny model), in one
process over real gRPC: two prefill workers' engines, each on its own
thread as in a worker, serving their caches to each other
(``PeerServicer``) and writing through to a store (``StoreServicer``).

A conversation whose turns alternate between the two: every turn after the
first fetches the earlier turns' blocks from the other worker instead of
computing them (counted), and its first token and KV are exactly what one
worker with a local cache gives (first tokens equal a cache-free run).
Peers with transfer servers (a ``device`` deployment) pull the blocks
device to device instead, by CUDA IPC where both are "on one host" (the
fake CUDA driver) and by jax.experimental.transfer otherwise; one without
falls back to the stream. The store outlives a worker: a fresh one
fetches from it. Salts and model layouts isolate; a source that dies
mid-fetch leaves a correct prefill.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading

import jax
import numpy as np
import pytest

from pdjax.engine.cache_events import routing_key
from pdjax.engine.prefill import PrefillConfig, PrefillEngine
from pdjax.engine.prefix_cache import PrefillKVStore
from pdjax.engine.remote_tier import RemoteTier
from pdjax.engine.requests import PrefillRequest
from pdjax.engine.sampling import SamplingParams
from pdjax.engine.setup import load_sharded
from pdjax.service import common
from pdjax.service.kvstore import (BlockStoreCore, GrpcBlockSource,
                                   PeerServicer, StoreServicer, store_info)
from pdjax.sharding import ShardingRules, make_mesh
from pdjax.transfer import cuda_ipc
from pdjax.transfer.block_pulls import make_block_pulls
from pdjax.transfer.device import BlockPulls
from test_kvstore import _serve, loop  # noqa: F401 (a fixture)

PAGE = 16
# Any cached prefix is used: these tests count the blocks fetched.
PCFG = PrefillConfig(buckets=(64,), max_batch=1, page_size=PAGE,
                     max_seq_len=192, cached_prefix="always")
SEC = common.Security(service_token="shared-kv-test")
GREEDY = SamplingParams(max_tokens=1, temperature=0.0)
# The CUDA driver the "processes" of host A share (fake: host memory).
HOST_A = cuda_ipc.FakeIpcRegistry()


class Worker:
  """A prefill engine on its own thread (as a prefill worker's batcher),
  serving its peers' fetches between prefills, behind a BlockStore
  server."""

  def __init__(self, loop, model_dir, devices, *, store=None,
               policy="always", cache=True, pulls=False, write="through",
               num_pages=64, host_blocks=24):
    """``pulls``: offers and pulls blocks device to device (a ``device``
    transport deployment's workers): True by jax.experimental.transfer, a
    process id of host A by CUDA IPC with the others of host A too."""
    rules = ShardingRules.load("prefill_tp")
    mesh = make_mesh({"tp": 2}, devices)
    params, cfg = load_sharded(model_dir, rules, mesh)
    self.cfg = cfg
    self.remote = None
    self.pstore = None
    self.address = ""
    self.pulls = None
    if pulls:
      ipc = ({} if pulls is True else dict(
          process_id=pulls, hostname="hostA", landing_bytes=1 << 20,
          driver=cuda_ipc.FakeCudaDriver(HOST_A)))
      self.pulls = make_block_pulls(BlockPulls(devices[0]), fast_path="off",
                                    **ipc)
    if cache:
      self.remote = RemoteTier(
          _layout(cfg), PAGE,
          lambda a: GrpcBlockSource(a, SEC, pulls=self.pulls), store=store,
          policy=policy, timeout_s=5.0, write=write, pulls=self.pulls)
      self.pstore = PrefillKVStore(cfg, mesh, rules, num_pages=num_pages,
                                   page_size=PAGE,
                                   host_cache_blocks=host_blocks,
                                   remote=self.remote)
      self.server, self.address = loop.run(_serve(
          PeerServicer(self.pstore, timeout_s=5.0, pulls=self.pulls), SEC))
      self.remote.self_address = self.address
      self.pstore.wake = lambda: self._q.put(None)
    self.engine = PrefillEngine(params, cfg, mesh, rules, PCFG,
                                prefix_store=self.pstore)
    self._q: queue.Queue = queue.Queue()
    self._thread = threading.Thread(target=self._loop, daemon=True)
    self._thread.start()

  def _loop(self):
    while True:
      item = self._q.get()
      if self.pstore is not None:
        self.pstore.serve_peers()
      if item is None:
        continue
      fn, fut = item
      try:
        fut.set_result(fn())
      except BaseException as e:  # noqa: BLE001
        fut.set_exception(e)

  def prefill(self, ids, salt="", sources=()):
    fut = concurrent.futures.Future()
    req = PrefillRequest("r", ids, GREEDY, cache_salt=salt,
                         kv_sources=list(sources))
    self._q.put((lambda: self.engine.prefill([req])[0], fut))
    r = fut.result(timeout=600)
    return r.first_token, np.asarray(r.kv.kv)[:, :, :r.kv.num_pages], r

  def held(self, ids, salt=""):
    """What the router's mirror of this worker says: leading blocks whose
    routing keys it published."""
    keys = self.pstore.cache_events.snapshot()
    n = 0
    for h in self.pstore.hashes(ids, salt):
      if routing_key(h) not in keys:
        break
      n += 1
    return n

  def hint(self, ids, salt=""):
    return [(self.address, self.held(ids, salt))]


def _layout(cfg):
  from pdjax.engine.remote_tier import layout_of
  return layout_of(cfg, PAGE)


@pytest.fixture(scope="module")
def store(loop):
  core = BlockStoreCore(1 << 24)
  server, address = loop.run(_serve(StoreServicer(core, store_info("s")),
                                    SEC))
  yield core, address
  loop.run(server.stop(None))


@pytest.fixture(scope="module")
def workers(loop, store, tiny_model_dir):
  devs = jax.devices()
  # a offers device pulls (by CUDA IPC to the others of host A), b does
  # not: b streams from a, and a's pulls from b fall back to streams.
  a = Worker(loop, tiny_model_dir, devs[0:2], store=store[1],
             pulls="hostA:1:a")
  b = Worker(loop, tiny_model_dir, devs[2:4], store=store[1])
  plain = Worker(loop, tiny_model_dir, devs[4:6], cache=False)
  return a, b, plain


def _conversation(seed=5, turns=4):
  """Each turn resends the history (previous turns and a stand-in reply)
  plus a new message."""
  rng = np.random.RandomState(seed)
  history, out = [], []
  for _ in range(turns):
    prompt = history + rng.randint(3, 300, size=25).tolist()
    out.append(prompt)
    history = prompt + rng.randint(3, 300, size=12).tolist()
  return out


def test_turns_alternating_between_workers_fetch_instead_of_compute(
    workers):
  a, b, plain = workers
  turns = _conversation()
  # One worker with a local cache: the KV every turn must equal.
  local_kv = []
  for ids in turns:
    local_kv.append(a.prefill(ids, salt="local")[1])
  fetched0 = b.remote.stats["peer_blocks"] + a.remote.stats["peer_blocks"]
  for i, ids in enumerate(turns):
    me, other = (a, b) if i % 2 == 0 else (b, a)
    limit = (len(ids) - 1) // PAGE
    held_here = me.held(ids, "conv")
    sources = other.hint(ids, "conv")
    tok, kv, r = me.prefill(ids, salt="conv", sources=sources)
    want_tok = plain.prefill(ids)[0]
    assert tok == want_tok, i
    np.testing.assert_array_equal(kv, local_kv[i])
    # Every block the other worker held (and this one did not) came over.
    fetchable = max(min(sources[0][1], limit) - held_here, 0)
    assert r.cached_tokens == (held_here + fetchable) * PAGE, i
    if i:
      assert fetchable > 0, i
  fetched = (b.remote.stats["peer_blocks"] + a.remote.stats["peer_blocks"]
             - fetched0)
  assert fetched > 0
  assert a.pstore.stats["exported_blocks"] + b.pstore.stats[
      "exported_blocks"] >= fetched
  assert a.remote.stats["refused_blocks"] == b.remote.stats[
      "refused_blocks"] == 0
  for w in (a, b):
    w.pstore.pool.check_invariants()
    assert w.pstore.pool.num_used == 0
  # a asked b for device pulls once, was told b offers none, and streamed;
  # the landing region it lent for that ask is free again.
  assert b.address in a.remote._no_pull  # pylint: disable=protected-access
  assert a.remote.stats["pulled_blocks"] == 0
  assert a.pulls.pool.counts["lent"] == 1
  assert a.pulls.pool.free_bytes() == a.pulls.pool.total_bytes


def test_peers_of_a_device_deployment_pull_blocks_device_to_device(
    workers, tiny_model_dir, loop):
  """Both sides with transfer servers, c without CUDA IPC: the blocks move
  by jax.experimental.transfer, and land exactly as streamed ones
  would."""
  a, _, plain = workers
  c = Worker(loop, tiny_model_dir, jax.devices()[6:8], pulls=True)
  ids = _conversation(seed=17, turns=1)[0] + list(range(200, 260))
  a.prefill(ids, salt="pull")
  tok, kv_c, r = c.prefill(ids, salt="pull", sources=a.hint(ids, "pull"))
  blocks = (len(ids) - 1) // PAGE
  assert r.cached_tokens == blocks * PAGE
  assert c.remote.stats["pulled_blocks"] == blocks
  assert c.remote.stats["pulled_transfer_blocks"] == blocks
  assert c.remote.stats["peer_blocks"] == blocks
  assert tok == plain.prefill(ids)[0]
  # The same KV as the worker that computed it (the cached blocks are its
  # bits; the rest is computed after them, as a local hit would be).
  _, kv_again, r2 = a.prefill(ids, salt="pull")
  assert r2.cached_tokens == blocks * PAGE
  np.testing.assert_array_equal(kv_c, kv_again)
  assert a.pulls.transfer.held_bytes() > 0   # held until their TTL
  c.pstore.pool.check_invariants()


def test_peers_of_one_host_pull_blocks_by_cuda_ipc(workers, tiny_model_dir,
                                                   loop):
  """Both on host A with the fast path: the blocks are copied into the
  landing region the worker asking lent, and give the tokens and KV of
  the worker that computed them; the region is back once they are in."""
  a, _, plain = workers
  d = Worker(loop, tiny_model_dir, jax.devices()[6:8], pulls="hostA:2:d")
  ids = _conversation(seed=19, turns=1)[0] + list(range(140, 200))
  a.prefill(ids, salt="ipc")
  tok, kv_d, r = d.prefill(ids, salt="ipc", sources=a.hint(ids, "ipc"))
  blocks = (len(ids) - 1) // PAGE
  assert r.cached_tokens == blocks * PAGE
  assert d.remote.stats["pulled_cuda_ipc_blocks"] == blocks
  assert d.remote.stats["pulled_transfer_blocks"] == 0
  assert a.pulls.offers["cuda_ipc"] == 1
  assert tok == plain.prefill(ids)[0]
  _, kv_a, _ = a.prefill(ids, salt="ipc")
  np.testing.assert_array_equal(kv_d, kv_a)
  pool = d.pulls.pool
  assert pool.live() == pool.quarantined() == 0
  assert pool.free_bytes() == pool.total_bytes
  d.pstore.pool.check_invariants()


def test_salts_and_layouts_isolate(workers, store):
  a, b, plain = workers
  ids = _conversation(seed=9, turns=1)[0] + list(range(3, 40))
  a.prefill(ids, salt="tenant-a")
  assert a.held(ids, "tenant-a") == 3
  before = b.remote.snapshot()
  # A hint that names the blocks of another tenant's salt: nothing comes,
  # the prompt is computed whole.
  tok, _, r = b.prefill(ids, salt="tenant-b", sources=a.hint(ids, "tenant-a"))
  assert r.cached_tokens == 0 and tok == plain.prefill(ids)[0]
  after = b.remote.snapshot()
  assert after["fetched_blocks"] == before["fetched_blocks"]
  # The same salt does share.
  _, _, r = b.prefill(ids, salt="tenant-a", sources=a.hint(ids, "tenant-a"))
  assert r.cached_tokens == 3 * PAGE
  # A worker of another layout (fingerprint) asking the same names, at the
  # peer and at the store: nothing is served to it.
  assert a.remote.flush_publish()
  names = a.pstore.hashes(ids, "tenant-a")[:3]
  layout = _layout(a.cfg)
  other = type(layout)(b"x" * 16, layout.shape, layout.dtype)
  for address in (a.address, store[1]):
    src = GrpcBlockSource(address, SEC)
    assert len(list(src.fetch(layout, names, timeout_s=10))) == 3
    assert list(src.fetch(other, names, timeout_s=10)) == []
    src.close()


def test_the_store_outlives_a_worker(workers, store, tiny_model_dir, loop):
  a, _, plain = workers
  ids = _conversation(seed=21, turns=1)[0] + list(range(50, 90))
  a.prefill(ids, salt="restart")
  assert a.remote.flush_publish()
  assert a.remote.stats["published_blocks"] > 0
  # A fresh worker (a restart: nothing cached, no peer named) fetches it
  # from the store.
  fresh = Worker(loop, tiny_model_dir, jax.devices()[6:8], store=store[1])
  tok, _, r = fresh.prefill(ids, salt="restart")
  assert r.cached_tokens == ((len(ids) - 1) // PAGE) * PAGE
  assert fresh.remote.stats["store_blocks"] == (len(ids) - 1) // PAGE
  assert tok == plain.prefill(ids)[0]


def test_a_source_dying_mid_fetch_leaves_a_correct_prefill(
    workers, store, loop):
  """The store's server stops while a fetch streams (here: between the
  blocks the fake stream hands out); the worker keeps the checked blocks,
  computes the rest, and gives the same first token."""
  a, b, plain = workers
  ids = _conversation(seed=33, turns=1)[0] + list(range(100, 160))
  a.prefill(ids, salt="dying")
  assert a.remote.flush_publish()
  real_connect = b.remote._connect  # pylint: disable=protected-access

  class Dying:
    """The store's source, whose stream breaks after two blocks."""

    def __init__(self, address):
      self.inner = real_connect(address)
      self.address = address

    def fetch(self, layout, hashes, *, timeout_s):
      for i, item in enumerate(self.inner.fetch(layout, hashes,
                                                timeout_s=timeout_s)):
        if i == 2:
          raise ConnectionError("store died mid-fetch")
        yield item

    def close(self):
      self.inner.close()

  sources = b.remote._sources  # pylint: disable=protected-access
  sources[store[1]] = Dying(store[1])
  before = b.remote.snapshot()
  try:
    tok, _, r = b.prefill(ids, salt="dying")
  finally:                       # the store comes back for later tests
    sources.pop(store[1])
    b.remote._down.ok(store[1])  # pylint: disable=protected-access
  after = b.remote.snapshot()
  assert after["failures"] == before["failures"] + 1
  assert after["store_blocks"] - before["store_blocks"] == 2
  assert r.cached_tokens == 2 * PAGE
  assert tok == plain.prefill(ids)[0]


def test_evict_mode_sends_the_blocks_a_worker_drops(workers, store,
                                                    tiny_model_dir, loop):
  """write="evict": nothing is written through; the blocks the host
  tier's LRU drops go to the store, where another worker finds them."""
  _, b, plain = workers
  core, address = store
  w = Worker(loop, tiny_model_dir, jax.devices()[4:6], store=address,
             write="evict", num_pages=8, host_blocks=6)
  rng = np.random.RandomState(41)
  x = rng.randint(3, 300, size=65).tolist()          # 4 full blocks
  w.prefill(x, salt="evict")
  assert w.remote.flush_publish()
  assert w.remote.stats["published_blocks"] == 0      # not written through
  for _ in range(4):   # fillers push x down to the host tier, then out
    w.prefill(rng.randint(3, 300, size=65).tolist(), salt="evict")
  assert w.remote.flush_publish()
  dropped = w.pstore.host_tier.tier.stats["evictions"]
  assert dropped >= 4
  assert w.remote.stats["published_blocks"] == dropped
  names = w.pstore.hashes(x, "evict")
  assert len(core.fetch(names, _layout(w.cfg))) == 4
  tok, _, r = b.prefill(x, salt="evict")
  assert r.cached_tokens == 4 * PAGE and tok == plain.prefill(x)[0]
