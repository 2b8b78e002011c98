"""The host KV tier below the prefix cache (8 CPU devices, tiny model).

A prefix evicted from a tiny device pool must come back from host memory on
a later request, with tokens identical to a cache-free run; the tier's LRU
bound holds; a block pinned by a running request is never demoted; a
promoted block is bit-identical to the one evicted (pinned-host and numpy
storage, sharded pools, a block promoted and evicted again before its upload
ran); with the tier off nothing changes. The swap space that holds
preempted decode rows' KV uses the same copies: pages come back bit for bit.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from pdjax.engine import compile_stats, host_tier
from pdjax.engine.colocated import ColocatedEngine
from pdjax.engine.decode import DecodeConfig
from pdjax.engine.host_tier import HostKVTier, match_with_tier
from pdjax.engine.prefill import PrefillConfig
from pdjax.engine.prefix_cache import PrefillKVStore
from pdjax.engine.sampling import SamplingParams
from pdjax.engine.setup import load_sharded
from pdjax.sharding import ShardingRules, make_mesh

PAGE = 16
# One prefill bucket, batch 1 and one page-table width: few programs, so the
# file compiles quickly from a cold cache.
PCFG = PrefillConfig(buckets=(64,), max_batch=1, page_size=PAGE,
                     max_seq_len=96)


def _dcfg(**kw):
  base = dict(max_seqs=4, page_size=PAGE, num_pages=13, max_seq_len=96,
              steps_per_call=3, table_buckets=(6,), prefix_caching=True)
  base.update(kw)
  return DecodeConfig(**base)


@pytest.fixture(scope="module")
def prefill_params(tiny_model_dir):
  rules = ShardingRules.load("prefill_tp")
  mesh = make_mesh({"tp": 2}, jax.devices()[2:4])
  _, cfg = load_sharded(tiny_model_dir, rules, mesh)
  return cfg, mesh, rules


def _greedy(max_tokens=10):
  return SamplingParams(max_tokens=max_tokens, temperature=0.0,
                        ignore_eos=True)


def _run_one_at_a_time(engine, prompts):
  out = {}
  for i, p in enumerate(prompts):
    engine.submit(str(i), p, _greedy(),
                  lambda ev: out.setdefault(ev.request_id, []).extend(
                      ev.token_ids))
    engine.drain()
  return [out[str(i)] for i in range(len(prompts))]


def test_evicted_prefix_comes_back_from_host(tiny_decode_params):
  """A (4 full blocks) is evicted from the 12-page pool by three fillers,
  then asked for again: its blocks are promoted from the host tier, the
  prefill computes only the last partial block, and every token equals
  the cache-free run."""
  params, cfg, mesh, rules = tiny_decode_params
  rng = np.random.RandomState(11)
  a = rng.randint(3, 500, size=70).tolist()
  fillers = [rng.randint(3, 500, size=60).tolist() for _ in range(3)]
  prompts = [a] + fillers + [a]
  off = ColocatedEngine(params, cfg, mesh, rules, PCFG,
                        _dcfg(prefix_caching=False))
  on = ColocatedEngine(params, cfg, mesh, rules, PCFG,
                       _dcfg(host_cache_blocks=32))
  assert _run_one_at_a_time(on, prompts) == _run_one_at_a_time(off, prompts)
  rep = on.decode.replicas[0]
  stats = rep.host_tier.tier.stats
  assert rep.pool.stats["evictions"] > 0
  assert stats["demotions"] > 0 and stats["hits"] >= 4
  assert rep.host_tier.stats["promotions"] >= 4
  # The repeat of A reused its 4 blocks (through the host), as a device hit.
  assert on.prefill[0].stats["cached_tokens"] == 4 * PAGE
  assert on.decode.stats["prefix_hit_blocks"] == 4
  assert stats["bytes"] == stats["blocks"] * rep.host_tier.tier.block_bytes
  rep.pool.check_invariants()
  assert rep.pool.num_used == 0 and rep.pool.reserved == 0


def test_pinned_blocks_are_never_demoted_under_pressure(tiny_decode_params):
  """All requests at once on a 12-page pool with a host tier of 6 blocks
  (four prompt families compete, so blocks go down and come back up
  constantly): every demoted page was unreferenced and in no live row or
  reservation when it was taken; tokens equal the cache-free run; the tier
  stays within its bound."""
  params, cfg, mesh, rules = tiny_decode_params
  rng = np.random.RandomState(3)
  bases = [rng.randint(3, 500, size=60).tolist() for _ in range(4)]
  prompts = [bases[i % 4][:rng.randint(33, 60)]
             + rng.randint(3, 500, size=5).tolist() for i in range(12)]
  prompts += prompts[:4]        # repeats: some of their blocks are on host
  off = ColocatedEngine(params, cfg, mesh, rules, PCFG,
                        _dcfg(prefix_caching=False))
  on = ColocatedEngine(params, cfg, mesh, rules, PCFG,
                       _dcfg(host_cache_blocks=6))
  rep = on.decode.replicas[0]
  hook = rep.pool.on_evict
  bad = []

  def checked(page, h):
    live = {p for r in rep.rows if r is not None for p in r.pages}
    reservations = on.decode._reservations  # pylint: disable=protected-access
    pinned = {p for res in reservations.values() for p in res.cached_pages}
    if rep.pool.ref_count(page) or page in live or page in pinned:
      bad.append(page)
    hook(page, h)

  rep.pool.on_evict = checked
  outs = {}
  for name, eng in (("off", off), ("on", on)):
    res = {}
    for i, p in enumerate(prompts):
      eng.submit(str(i), p, _greedy(),
                 lambda ev, res=res: res.setdefault(
                     ev.request_id, []).extend(ev.token_ids))
    eng.drain()
    outs[name] = [res[str(i)] for i in range(len(prompts))]
  assert outs["on"] == outs["off"]
  assert not bad
  tier = rep.host_tier.tier
  assert tier.stats["demotions"] > 0 and tier.stats["hits"] > 0
  assert rep.host_tier.stats["promotions"] > 0
  assert len(tier) <= 6 and tier.stats["blocks"] <= 6
  assert tier.stats["evictions"] > 0
  rep.pool.check_invariants()
  assert rep.pool.num_used == 0 and rep.pool.reserved == 0


def test_lru_bound_and_order():
  tier = HostKVTier(3, (2, PAGE, 4, 8), np.float32, use_pinned_host=False)
  blocks = {}
  for h in "abcd":
    blocks[h] = host_tier._Block()   # pylint: disable=protected-access
    tier.put(h, blocks[h])
    if h == "b":
      assert tier.get("a") is blocks["a"]     # a is now the most recent
  assert len(tier) == 3 and tier.stats["evictions"] == 1
  assert not tier.contains("b") and not blocks["b"].in_tier
  assert all(tier.contains(h) for h in "acd")
  assert tier.get("b") is None
  assert tier.stats["hits"] == 1 and tier.stats["misses"] == 1
  assert tier.stats["bytes"] == 3 * 2 * 2 * PAGE * 4 * 8 * 4
  with pytest.raises(ValueError):
    HostKVTier(0, (1, 1, 1, 1), np.float32)


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "numpy"])
def test_promoted_block_round_trips_exactly(prefill_params, pinned):
  """A prefill store of 2 pages (K heads split over 2 devices): random
  blocks stored, evicted by others, promoted back: bit-identical K and V.
  Also a block promoted and evicted again before its upload ran."""
  cfg, mesh, rules = prefill_params
  store = PrefillKVStore(cfg, mesh, rules, num_pages=3, page_size=PAGE)
  assert store.host_tier is None and store.pool.on_evict is None
  set_pools = store._set_pools  # pylint: disable=protected-access
  store.host_tier = host_tier.make_link(
      4, store.pool, cfg, PAGE, lambda: (store.k, store.v), set_pools,
      use_pinned_host=pinned)
  link = store.host_tier
  assert link.memory_kind == ("pinned_host" if pinned else "numpy")
  L, K, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
  N = store.pool.num_pages
  rng = np.random.RandomState(0)

  def kv_of(n):
    return rng.standard_normal((L, 2, n, PAGE, K, hd)).astype(np.float32)

  def page_kv(page):
    rows = np.arange(L) * N + page
    return np.asarray(store.k)[rows], np.asarray(store.v)[rows]

  first = kv_of(2)
  hashes = [b"h0", b"h1"]
  assert store.store_pages(hashes, first) == 2
  (p0,) = store.match(hashes[:1])
  want_k, want_v = page_kv(p0)
  np.testing.assert_array_equal(want_k, first[:, 0, 0])
  store.release([p0])
  # Two other blocks take both pages: h0 and h1 go to the host.
  xs = kv_of(2)
  assert store.store_pages([b"x0", b"x1"], xs) == 2
  assert not store.pool.contains(b"h0") and link.tier.contains(b"h0")
  pages = store.match(hashes)          # both promoted (x0, x1 demoted)
  assert len(pages) == 2 and link.stats["promotions"] == 2
  host_tier.flush(link)
  got_k, got_v = page_kv(pages[0])
  np.testing.assert_array_equal(got_k, want_k)
  np.testing.assert_array_equal(got_v, want_v)
  np.testing.assert_array_equal(page_kv(pages[1])[0], first[:, 0, 1])
  np.testing.assert_array_equal(page_kv(pages[1])[1], first[:, 1, 1])
  store.release(pages)
  # x0 promoted, freed and evicted again before any flush: its content is
  # the pending upload's source, never read from the device.
  (px,) = match_with_tier(store.pool, [b"x0"], link)
  store.release([px])
  taken = store.pool.allocate(2)       # evicts h1 and x0
  assert not store.pool.contains(b"x0") and link.tier.contains(b"x0")
  host_tier.flush(link)
  store.pool.free(taken)
  (px,) = store.match([b"x0"])
  host_tier.flush(link)
  np.testing.assert_array_equal(page_kv(px)[0], xs[:, 0, 0])
  np.testing.assert_array_equal(page_kv(px)[1], xs[:, 1, 0])
  store.release([px])
  store.pool.check_invariants()
  assert len(link.tier) <= 4 and link.tier.stats["blocks"] <= 4


def test_off_path_is_unchanged(tiny_decode_params):
  params, cfg, mesh, rules = tiny_decode_params
  for dcfg in (_dcfg(), _dcfg(host_cache_blocks=0),
               _dcfg(prefix_caching=False, host_cache_blocks=8)):
    eng = ColocatedEngine(params, cfg, mesh, rules, PCFG, dcfg)
    for rep in eng.decode.replicas:
      assert rep.host_tier is None and rep.pool.on_evict is None
  with pytest.raises(ValueError):
    _dcfg(host_cache_blocks=-1)


def test_swap_space_round_trip_and_accounting():
  """Pages swapped out come back bit for bit into other pages; capacity is
  enforced and every page held is released by swap_in or drop."""
  dev = jax.devices()[0]
  L, N, P, K, hd = 2, 9, 4, 2, 8
  rng = np.random.default_rng(0)
  pools = [jax.device_put(rng.standard_normal((L * N, P, K, hd)).astype(
      np.float32), dev) for _ in range(2)]

  def set_pools(k, v):
    pools[:] = [k, v]

  swap = host_tier.SwapSpace(5, lambda: tuple(pools), set_pools,
                             num_layers=L, page_shape=(L, P, K, hd),
                             dtype=np.float32, max_batch=2)
  swap.warmup()
  assert swap.used == 0
  before = [np.asarray(x) for x in pools]
  with compile_stats.CompileCounter() as compiled:   # warmup compiled all
    swap.swap_out("a", [3, 1, 4])
    swap.swap_out("b", [2, 5])
    assert swap.used == 5 and not swap.fits(1) and swap.held("a") == 3
    with pytest.raises(AssertionError, match="do not fit"):
      swap.swap_out("c", [6])
    swap.land()
    swap.swap_in("a", [6, 7, 8])
  assert compiled.count == 0, compiled.names
  k, v = (np.asarray(x) for x in pools)
  for src, dst in zip([3, 1, 4], [6, 7, 8]):
    for layer in range(L):
      np.testing.assert_array_equal(k[layer * N + dst],
                                    before[0][layer * N + src])
      np.testing.assert_array_equal(v[layer * N + dst],
                                    before[1][layer * N + src])
  with pytest.raises(AssertionError, match="given back"):
    swap.swap_in("b", [1])
  swap.drop("b")
  swap.drop("b")
  assert swap.used == 0 and swap.fits(5)
