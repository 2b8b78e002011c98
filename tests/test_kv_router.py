"""KV-aware routing: the workers' cache event logs, the router's mirrors of
them, the overlap-vs-load score, and a real deployment where requests that
share a long prefix follow it to the prefill worker that caches it."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from pdjax.engine.block_pool import BlockPool
from pdjax.engine.cache_events import KEY_BYTES, CacheEventLog, routing_key
from pdjax.engine.prefix_cache import block_hashes
from pdjax.service import kv_router
from pdjax.service.kv_router import CacheMirror, KvScorer
from pdjax.service.metrics import Metrics
from pdjax.v1 import common_pb2


def _h(i: int) -> bytes:
  return i.to_bytes(4, "little") * 4   # a 16-byte "block name"


def _k(i: int) -> bytes:
  return routing_key(_h(i))


# ------------------------------------------------------------------ log
def test_log_numbers_events_and_serves_deltas():
  log = CacheEventLog(capacity=16)
  assert log.since(0) == ([], 0, True)
  log.record_stored(_h(1))
  log.record_stored(_h(2))
  log.record_evicted(_h(1))
  events, seq, complete = log.since(0)
  assert complete and seq == 3
  assert [(e.seq, e.kind.value, e.key) for e in events] == [
      (1, "stored", _k(1)), (2, "stored", _k(2)), (3, "evicted", _k(1))]
  assert len(_k(1)) == KEY_BYTES
  assert log.since(2)[0][0].seq == 3
  assert log.since(3) == ([], 3, True)
  assert log.snapshot() == {_k(2)}
  # Net changes: 1 came and went (its last word is evicted), 2 stayed.
  d = log.delta(0)
  assert d.complete and d.stored == [_k(2)] and d.evicted == [_k(1)]


def test_log_truncation_and_foreign_seq_force_a_resync():
  log = CacheEventLog(capacity=4)
  for i in range(10):
    log.record_stored(_h(i))
  log.record_evicted(_h(0))
  assert log.seq == 11
  _, seq, complete = log.since(3)        # events 4.. fell out
  assert not complete and seq == 11
  assert log.since(7)[2]                 # 8..11 are all still there
  assert not log.since(12)[2]            # a number this log never issued
  d = log.delta(3)
  assert not d.complete and set(d.stored) == log.snapshot() and not d.evicted
  assert log.snapshot() == {_k(i) for i in range(1, 10)}


def test_log_counts_pools_holding_a_key():
  """Two replicas of a decode worker share one log: the key is published
  when the first stores it and withdrawn when the last drops it."""
  log = CacheEventLog()
  log.record_stored(_h(5))
  log.record_stored(_h(5))
  log.record_evicted(_h(5))
  assert log.snapshot() == {_k(5)} and log.seq == 1
  log.record_evicted(_h(5))
  log.record_evicted(_h(5))            # unknown now: ignored
  assert log.snapshot() == set() and log.seq == 2


def test_block_pool_reports_names_and_evictions():
  log = CacheEventLog()
  pool = BlockPool(4, on_event=log.on_event)   # 3 usable pages
  pages = pool.allocate(3)
  for p, i in zip(pages, range(3)):
    assert pool.register(p, _h(i)) == p
  assert pool.register(pages[0], _h(0)) == pages[0]   # not new: no event
  assert log.seq == 3 and log.snapshot() == {_k(0), _k(1), _k(2)}
  pool.free(pages)                         # cached now, still named
  assert log.seq == 3
  (p,) = pool.allocate(1)                  # evicts the oldest: block 0
  assert log.snapshot() == {_k(1), _k(2)}
  pool.free([p])
  assert pool.evict_all() == 2
  assert log.snapshot() == set()
  assert [e.kind.value for e in log.since(3)[0]] == ["evicted"] * 3
  pool.check_invariants()


# ------------------------------------------------------------------ mirror
def _answer(log, since, process_id="p1") -> common_pb2.WorkerInfo:
  """A worker's GetWorkerInfo answer, through the wire format."""
  info = common_pb2.WorkerInfo(process_id=process_id)
  kv_router.fill_cache_info(info, log, since)
  return common_pb2.WorkerInfo.FromString(info.SerializeToString())


def test_mirror_follows_deltas_and_resyncs_after_truncation():
  log = CacheEventLog(capacity=4)
  m = CacheMirror()
  m.apply(_answer(log, m.seq), now=0.0)
  assert m.enabled and m.keys == set() and not m.stale(2.0, now=1.0)
  log.record_stored(_h(1))
  log.record_stored(_h(2))
  m.apply(_answer(log, m.seq), now=1.0)
  assert m.keys == {_k(1), _k(2)} and m.seq == 2 and m.resyncs == 0
  log.record_evicted(_h(1))
  log.record_stored(_h(1))                 # back: net "stored"
  log.record_evicted(_h(2))
  m.apply(_answer(log, m.seq), now=2.0)
  assert m.keys == log.snapshot() == {_k(1)}
  for i in range(10, 20):                  # more than the log keeps
    log.record_stored(_h(i))
  ans = _answer(log, m.seq)
  assert not ans.cache_complete
  m.apply(ans, now=3.0)
  assert m.keys == log.snapshot() and m.resyncs == 1 and m.seq == log.seq
  assert m.overlap([_k(1), _k(10), _k(11), _k(99), _k(12)]) == 3


def test_mirror_staleness_restart_and_no_cache():
  log = CacheEventLog()
  log.record_stored(_h(1))
  m = CacheMirror()
  assert m.stale(2.0, now=0.0)             # never synced
  m.apply(_answer(log, m.seq), now=10.0)
  assert not m.stale(2.0, now=11.0)
  assert m.stale(2.0, now=12.5)            # polls lag
  m.mark_failed()
  assert m.stale(2.0, now=10.5)            # a poll failed
  m.apply(_answer(log, m.seq), now=11.0)
  assert not m.stale(2.0, now=11.0) and m.keys == {_k(1)}
  # The worker restarted (new process, new log): the answer to the old
  # seq is dropped and the next poll starts from 0.
  fresh = CacheEventLog()
  fresh.record_stored(_h(7))
  m.apply(_answer(fresh, m.seq, process_id="p2"), now=12.0)
  assert m.keys == set() and m.seq == 0 and m.stale(2.0, now=12.0)
  m.apply(_answer(fresh, m.seq, process_id="p2"), now=12.5)
  assert m.keys == {_k(7)} and not m.stale(2.0, now=12.5)
  # A worker without a cache.
  off = CacheMirror()
  off.apply(_answer(None, 0), now=0.0)
  assert not off.enabled and off.keys == set() and off.overlap([_k(7)]) == 0


def test_request_keys_name_blocks_as_the_workers_do():
  fp = b"f" * 16
  model = common_pb2.ModelInfo(page_size=4, layout_fingerprint=fp)
  ids = list(range(3, 20))                 # 17 tokens: 4 full blocks
  want = [routing_key(h) for h in block_hashes(ids, 4, fp, "s")]
  assert kv_router.request_keys(ids, "s", model) == want
  # The last prompt token is always computed: 16 tokens -> 3 blocks.
  assert kv_router.request_keys(ids[:16], "s", model) == want[:3]
  assert kv_router.request_keys(ids, "t", model) != want
  assert kv_router.request_keys(ids, "", common_pb2.ModelInfo(
      page_size=4)) == []
  assert kv_router.request_keys(ids, "", None) == []


# ------------------------------------------------------------------ score
class _W:
  """The parts of a registry Worker the scorer reads."""

  def __init__(self, address, *, queued=0, free=100, keys=(), now=0.0,
               enabled=True):
    self.address = address
    self.inflight = 0
    self.queued = queued
    self.free = free
    self.cache = CacheMirror()
    self.cache.enabled = enabled
    self.cache.keys = set(keys)
    self.cache.synced_at = now

  def load_score(self):
    return self.inflight + self.queued

  def free_pages(self):
    return self.free


KEYS = [_k(i) for i in range(6)]


def test_overlap_beats_load_only_when_the_weight_says_so():
  holder = _W("a", queued=3, keys=KEYS[:4])
  idle = _W("b", queued=0)
  assert KvScorer(0.0).pick("prefill", [holder, idle], KEYS, now=0) is idle
  assert KvScorer(1.0).pick("prefill", [holder, idle], KEYS, now=0) is holder
  # 4 cached blocks * 0.5 = 2 < 3 queued requests.
  assert KvScorer(0.5).pick("prefill", [holder, idle], KEYS, now=0) is idle
  # Only the leading run counts: a gap at block 0 is worth nothing.
  gap = _W("c", queued=1, keys=KEYS[1:])
  assert KvScorer(10.0).pick("prefill", [gap, idle], KEYS, now=0) is idle
  # Decode: load is pages short of the roomiest candidate.
  roomy = _W("d", free=100)
  cached = _W("e", free=97, keys=KEYS[:5])
  assert KvScorer(0.0).pick("decode", [roomy, cached], KEYS, now=0) is roomy
  assert KvScorer(1.0).pick("decode", [roomy, cached], KEYS, now=0) is cached
  choices = KvScorer(1.0).score("decode", [roomy, cached], KEYS, now=0)
  assert [(c.overlap, c.load, c.score) for c in choices] == [
      (0, 0.0, 0.0), (5, 3.0, 2.0)]


def test_stale_mirrors_fall_back_to_load():
  metrics = Metrics("router")
  scorer = KvScorer(1.0, stale_after_s=2.0, metrics=metrics)
  holder = _W("a", queued=1, keys=KEYS, now=0.0)
  idle = _W("b", queued=0, now=10.0)
  assert scorer.pick("prefill", [holder, idle], KEYS, now=1.0) is holder
  assert scorer.pick("prefill", [holder, idle], KEYS, now=10.0) is idle
  holder.cache.synced_at = 10.0
  holder.cache.mark_failed()
  assert scorer.pick("prefill", [holder, idle], KEYS, now=10.0) is idle
  text = metrics.text()
  assert 'pdjax_router_kv_stale_fallbacks_total{role="prefill"} 2.0' in text
  assert ('pdjax_router_kv_overlap_blocks_total{role="prefill"} 6.0'
          in text)
  assert 'pdjax_router_kv_query_blocks_total{role="prefill"} 18.0' in text


def test_blocks_a_worker_can_fetch_count_at_the_fetch_weight():
  """Shared KV: a worker that serves and fetches blocks may take a prefix
  from a peer or a store, so those blocks count (at fetch_weight of a held
  one); the sources named for the chosen worker are those holding more
  than it, most first; a worker that does not share gets neither."""
  import types
  sharing = types.SimpleNamespace(serves_blocks=True)
  holder = _W("a", queued=2, keys=KEYS[:4])
  idle = _W("b", queued=0, keys=KEYS[:1])
  store = _W("s", keys=KEYS[:5])
  for w in (holder, idle):
    w.info, w.role = sharing, "prefill"
  store.info, store.role = sharing, "kvstore"
  sources = [holder, idle, store]
  scorer = KvScorer(1.0, fetch_weight=0.5)
  choices = scorer.score("prefill", [holder, idle], KEYS, now=0,
                         sources=sources)
  # a: 4 held + 0.5 * (5 - 4) - 2; b: 1 held + 0.5 * (5 - 1) - 0.
  assert [(c.overlap, c.fetchable, c.score) for c in choices] == [
      (4, 1, 2.5), (1, 4, 3.0)]
  assert scorer.pick("prefill", [holder, idle], KEYS, now=0,
                     sources=sources) is idle
  assert scorer.sources(idle, KEYS, sources, now=0) == [("s", 5), ("a", 4)]
  assert scorer.sources(idle, KEYS, sources, limit=1, now=0) == [("s", 5)]
  assert scorer.sources(store, KEYS, sources, now=0) == []
  # Without the fetch weight (or without sharing) only held blocks count.
  assert KvScorer(1.0, fetch_weight=0.0).pick(
      "prefill", [holder, idle], KEYS, now=0, sources=sources) is holder
  idle.info = types.SimpleNamespace(serves_blocks=False)
  assert scorer.score("prefill", [idle], KEYS, now=0,
                      sources=sources)[0].fetchable == 0
  # A stale source is not counted.
  store.cache.mark_failed()
  assert scorer.sources(holder, KEYS, sources, now=0) == []
  with pytest.raises(ValueError):
    KvScorer(1.0, fetch_weight=1.5)


def test_equal_scores_take_turns():
  scorer = KvScorer(0.0)
  ws = [_W("a"), _W("b"), _W("c")]
  got = [scorer.pick("prefill", ws, KEYS, now=0).address for _ in range(6)]
  assert got == ["a", "b", "c", "a", "b", "c"]
  assert scorer.pick("prefill", [], KEYS) is None


def test_registry_polls_cache_events():
  """The registry asks for the events since its mirror's seq and keeps the
  polled WorkerInfo free of them."""
  from pdjax.service.registry import WorkerRegistry, WorkerState
  log = CacheEventLog(capacity=3)
  asked = []

  class Stub:
    async def GetWorkerInfo(self, request, timeout=None):
      asked.append(request.cache_events_since)
      info = common_pb2.WorkerInfo(role="prefill", process_id="p")
      kv_router.fill_cache_info(info, log, request.cache_events_since)
      return info

  async def run():
    reg = WorkerRegistry(kv_overlap_weight=1.0)
    w = reg.add("127.0.0.1:1", "prefill")
    w.stub = Stub()
    await reg.poll_once()
    assert w.state is WorkerState.READY and w.cache.keys == set()
    for i in range(2):
      log.record_stored(_h(i))
    await reg.poll_once()
    assert w.cache.keys == {_k(0), _k(1)} and not w.info.cache_stored
    for i in range(2, 8):
      log.record_stored(_h(i))
    await reg.poll_once()                  # fell behind: a snapshot
    assert w.cache.keys == log.snapshot() and w.cache.resyncs == 1
    assert reg.pick_prefill(keys=[_k(0), _k(1)]) is w
    await reg.close()

  asyncio.run(run())
  assert asked == [0, 0, 2]


def test_block_keys_are_named_only_where_something_caches():
  """The router hashes a prompt into block keys only where they can weigh
  in a choice: a ready worker that caches, or a ready store."""
  from pdjax.service.registry import WorkerRegistry, WorkerState

  async def run():
    reg = WorkerRegistry()
    d = reg.add("127.0.0.1:1", "decode")
    d.state = WorkerState.READY
    assert not reg.caches_prefixes()          # no cache anywhere
    d.cache.apply(common_pb2.WorkerInfo(process_id="p", prefix_caching=True))
    assert reg.caches_prefixes()
    d.state = WorkerState.DOWN                # a cache gone with its worker
    assert not reg.caches_prefixes()
    store = reg.add("127.0.0.1:2", "kvstore")
    assert not reg.caches_prefixes()          # not ready yet
    store.state = WorkerState.READY
    assert reg.caches_prefixes()
    await reg.close()

  asyncio.run(run())


# ------------------------------------------------------------------ e2e
PREFIX_LEN = 160          # 10 blocks of 16
SUFFIX_LEN = 20
NUM_REQUESTS = 4
# The routers' poll interval here (the default is 0.5 s).
POLL_S = 0.1
MAX_NEW = 6


@pytest.fixture(scope="module")
def kv_cluster(tmp_path_factory):
  from cluster_helpers import Cluster
  c = Cluster(tmp_path_factory.mktemp("kv_router"), kv_transport="grpc",
              num_prefill=2, num_decode=1, warmup=False,
              worker_flags=["--prefix_cache_pages=64", "--prefix_caching"],
              router_flags=["--kv_overlap_weight=1",
                            f"--poll_interval_s={POLL_S}"])
  yield c
  c.stop()


def _second_router(c, weight: float) -> tuple[str, str]:
  """Another router over the same workers, with another overlap weight:
  its address and name."""
  name = f"router_w{weight:g}"
  return c.add_router(name, [f"--kv_overlap_weight={weight:g}",
                             f"--poll_interval_s={POLL_S}"]), name


def _cached_tokens(c) -> float:
  from cluster_helpers import metric
  return sum(metric(c.metrics(n), "pdjax_prefill_tokens_total",
                    'source="cache"') for n in c.worker_names("prefill"))


def _shared_prefix_run(address, salt):
  """Sequential requests behind one long prefix. Between them, time for
  four of the router's polls (``POLL_S``) to see the new blocks."""
  from pdjax.client import Client
  rng = np.random.RandomState(7)
  prefix = rng.randint(3, 512, size=PREFIX_LEN).tolist()
  out = []
  with Client(address, timeout_s=120) as client:
    for i in range(NUM_REQUESTS):
      if i:
        time.sleep(4 * POLL_S)
      ids = prefix + rng.randint(3, 512, size=SUFFIX_LEN).tolist()
      r = client.generate(prompt_token_ids=ids, max_tokens=MAX_NEW,
                          temperature=0.0, ignore_eos=True, cache_salt=salt)
      out.append((r.usage.prefill_worker, r.token_ids))
  return out


@pytest.mark.timeout(600)
def test_shared_prefix_follows_the_cache(kv_cluster):
  """With weight 1 every request after the first goes to the prefill worker
  that cached the prefix; with weight 0 they take turns (equal load), so
  half of them recompute it. Salts keep the two runs' blocks apart."""
  from cluster_helpers import metric
  c = kv_cluster
  before = _cached_tokens(c)
  aware = _shared_prefix_run(c.address, "kv-aware")
  aware_cached = _cached_tokens(c) - before
  plain_address, plain_router = _second_router(c, 0.0)
  before = _cached_tokens(c)
  plain = _shared_prefix_run(plain_address, "load-only")
  plain_cached = _cached_tokens(c) - before

  assert [t for _, t in aware] == [t for _, t in plain]
  assert all(len(t) == MAX_NEW for _, t in aware)
  workers = [w for w, _ in aware]
  assert all(workers) and len(set(workers)) == 1, workers
  workers = [w for w, _ in plain]
  assert workers[0] != workers[1], workers
  assert workers == [workers[0], workers[1]] * (NUM_REQUESTS // 2), workers
  blocks = PREFIX_LEN // 16
  assert aware_cached == (NUM_REQUESTS - 1) * blocks * 16
  assert plain_cached == (NUM_REQUESTS - 2) * blocks * 16
  assert aware_cached > plain_cached
  predicted = metric(c.metrics("router"),
                     "pdjax_router_kv_overlap_blocks_total", 'role="prefill"')
  assert predicted == (NUM_REQUESTS - 1) * blocks
  assert metric(c.metrics(plain_router),
                "pdjax_router_kv_overlap_blocks_total",
                'role="prefill"') == (NUM_REQUESTS - 2) * blocks


def test_late_polls_mark_a_worker_down_only_in_a_row():
  """A poll that times out once (a busy worker) leaves it READY; as many in
  a row as late_polls_down make it DOWN; an answer resets the count and
  brings it back; a refused connection is DOWN at once."""
  import grpc
  from pdjax.service.registry import WorkerRegistry, WorkerState
  answers = []

  class Late(grpc.RpcError):
    def __init__(self, code):
      self._code = code

    def code(self):
      return self._code

  class Stub:
    async def GetWorkerInfo(self, request, timeout=None):
      a = answers.pop(0)
      if a is not None:
        raise Late(a)
      return common_pb2.WorkerInfo(role="decode", process_id="p")

  late, refused = (grpc.StatusCode.DEADLINE_EXCEEDED,
                   grpc.StatusCode.UNAVAILABLE)

  async def run():
    reg = WorkerRegistry(late_polls_down=3)
    w = reg.add("127.0.0.1:1", "decode")
    w.stub = Stub()
    states = []
    answers.extend([None, late, late, None, late, late, late, None, refused])
    for _ in range(len(answers)):
      await reg.poll_once()
      states.append(w.state)
    await reg.close()
    return states

  R, D = WorkerState.READY, WorkerState.DOWN
  assert asyncio.run(run()) == [R, R, R, R, R, R, D, R, D]
