"""KV reuse across requests, at the engine level (8 CPU devices, tiny model).

Tokens must be identical with the cache on and off, greedy and seeded, for
prompts sharing 0, 1, many and all blocks with earlier ones; a block in use
is never evicted (tiny cache under pressure); different cache salts never
share; the prefill worker's store and the decode side's block reuse both
work through the disaggregated path, which then moves fewer KV bytes.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
import pytest

from pdjax.engine.colocated import ColocatedEngine
from pdjax.engine.decode import DecodeConfig, DecodeEngine
from pdjax.engine.prefill import PrefillConfig, PrefillEngine
from pdjax.engine.prefix_cache import (PrefillKVStore, block_hashes,
                                       layout_fingerprint)
from pdjax.engine.requests import DecodeRequest, PrefillRequest
from pdjax.engine.sampling import SamplingParams
from pdjax.engine.setup import load_sharded
from pdjax.sharding import ShardingRules, make_mesh
from tolerances import assert_kv_close

PAGE = 16
PCFG = PrefillConfig(buckets=(16, 32, 64), max_batch=2, page_size=PAGE,
                     max_seq_len=256)


def _dcfg(**kw):
  base = dict(max_seqs=4, page_size=PAGE, num_pages=96, max_seq_len=256,
              steps_per_call=3, table_buckets=(4,))
  base.update(kw)
  return DecodeConfig(**base)


def _prompts():
  """A family of prompts sharing 0, 1, many and all blocks."""
  rng = np.random.RandomState(7)
  base = rng.randint(3, 500, size=100).tolist()
  other = rng.randint(3, 500, size=40).tolist()
  return [
      base[:70],                       # first: nothing cached
      base[:70],                       # all of its full blocks again
      base[:16] + other[:30],          # 1 block shared
      base[:64] + other[:20],          # 4 blocks shared (many)
      base[:100],                      # extends the first
      other[:40],                      # nothing shared
      base[:64],                       # exactly 4 full blocks: the last is
  ]                                    # recomputed (logits for token 1)


def _run(engine, prompts, sampling, salts=None):
  out = {}

  def cb(ev):
    out.setdefault(ev.request_id, []).extend(ev.token_ids)

  for i, p in enumerate(prompts):
    engine.submit(str(i), p, sampling(i), cb,
                  cache_salt=(salts[i] if salts else ""))
    engine.drain()          # one at a time: later ones see earlier blocks
  return [out[str(i)] for i in range(len(prompts))]


def _greedy(i):
  return SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _seeded(i):
  return SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9,
                        top_k=40, seed=100 + i, ignore_eos=True)


def test_block_hashes_are_chained_salted_and_layout_bound(tiny_decode_params):
  _, cfg, _, _ = tiny_decode_params
  fp = layout_fingerprint(cfg, PAGE)
  a = list(range(3, 3 + 48))
  b = list(a)
  b[5] = 499
  ha, hb = block_hashes(a, PAGE, fp), block_hashes(b, PAGE, fp)
  assert len(ha) == 3 and len(set(ha)) == 3
  # A change in block 0 changes every later name (chained), not only one.
  assert all(x != y for x, y in zip(ha, hb))
  assert block_hashes(a[:40], PAGE, fp) == ha[:2]      # partial: not named
  assert block_hashes(a, PAGE, fp, "tenant-a") != ha
  assert block_hashes(a, PAGE, fp, "tenant-a") != block_hashes(
      a, PAGE, fp, "tenant-b")
  assert block_hashes(a, PAGE, layout_fingerprint(cfg, 32)) != ha[:1]
  assert block_hashes(a, PAGE, layout_fingerprint(
      cfg.replace(dtype="bfloat16"), PAGE)) != ha


@pytest.mark.parametrize("sampling", [_greedy, _seeded],
                         ids=["greedy", "seeded"])
def test_colocated_cache_on_equals_off(tiny_decode_params, sampling):
  params, cfg, mesh, rules = tiny_decode_params
  prompts = _prompts()
  off = ColocatedEngine(params, cfg, mesh, rules, PCFG, _dcfg())
  on = ColocatedEngine(params, cfg, mesh, rules, PCFG,
                       _dcfg(prefix_caching=True))
  assert _run(on, prompts, sampling) == _run(off, prompts, sampling)
  stats = on.prefill[0].stats
  # 4 + 1 + 4 + 4 + 3 reused blocks (see _prompts).
  assert stats["cached_tokens"] == 16 * PAGE
  usage = on.decode.kv_usage()
  assert usage["pages_used"] == 0 and usage["reservations"] == 0
  assert usage["pages_cached"] > 0
  on.decode.replicas[0].pool.check_invariants()


def test_salts_never_share_blocks(tiny_decode_params):
  params, cfg, mesh, rules = tiny_decode_params
  prompts = [_prompts()[0]] * 3
  eng = ColocatedEngine(params, cfg, mesh, rules, PCFG,
                        _dcfg(prefix_caching=True))
  out = _run(eng, prompts, _greedy, salts=["a", "b", "a"])
  assert out[0] == out[1] == out[2]
  # Only the third request (same salt as the first) reused anything.
  assert eng.prefill[0].stats["cached_tokens"] == 4 * PAGE


def test_tiny_cache_under_pressure_stays_correct(tiny_decode_params):
  """12 pages (the null page included) for 4 rows: cached blocks are
  evicted constantly, pinned ones never; results equal the uncached run."""
  params, cfg, mesh, rules = tiny_decode_params
  rng = np.random.RandomState(3)
  base = rng.randint(3, 500, size=60).tolist()
  prompts = [base[:rng.randint(17, 60)] + rng.randint(3, 500, size=5).tolist()
             for _ in range(12)]
  small = dict(num_pages=13, max_seq_len=96, max_seqs=4)
  pcfg = PrefillConfig(buckets=(16, 32, 64), max_batch=2, page_size=PAGE,
                       max_seq_len=96)
  off = ColocatedEngine(params, cfg, mesh, rules, pcfg, _dcfg(**small))
  on = ColocatedEngine(params, cfg, mesh, rules, pcfg,
                       _dcfg(prefix_caching=True, **small))
  outs = {}
  for name, eng in (("off", off), ("on", on)):
    res = {}

    def cb(ev, res=res):
      res.setdefault(ev.request_id, []).extend(ev.token_ids)

    for i, p in enumerate(prompts):   # all at once: they compete for pages
      eng.submit(str(i), p, _greedy(i), cb)
    eng.drain()
    outs[name] = [res[str(i)] for i in range(len(prompts))]
    pool = eng.decode.replicas[0].pool
    pool.check_invariants()
    assert pool.num_used == 0 and pool.reserved == 0
  assert outs["on"] == outs["off"]
  assert on.decode.replicas[0].pool.stats["evictions"] > 0


def test_disaggregated_reuse_on_both_sides(tiny_model_dir,
                                          tiny_decode_params):
  """Prefill worker store + decode-side block reuse: the second and third
  requests compute fewer prompt tokens and move fewer KV pages, and their
  tokens equal a cache-free colocated run. The decode pool and the
  reference use device 0 like the tests above (their programs are compiled
  already), the prefill devices 2 and 3."""
  prules = ShardingRules.load("prefill_tp")
  pmesh = make_mesh({"tp": 2}, jax.devices()[2:4])
  pparams, cfg = load_sharded(tiny_model_dir, prules, pmesh)
  store = PrefillKVStore(cfg, pmesh, prules, num_pages=64, page_size=PAGE)
  pe = PrefillEngine(pparams, cfg, pmesh, prules, PCFG, prefix_store=store)
  drules = ShardingRules.load("decode_dp")
  dmesh = make_mesh({"dp": 2}, jax.devices()[:2])
  dparams, _ = load_sharded(tiny_model_dir, drules, dmesh)
  de = DecodeEngine(dparams, cfg, dmesh, drules, _dcfg(prefix_caching=True))
  params, _, mesh, rules = tiny_decode_params
  ref = ColocatedEngine(params, cfg, mesh, rules, PCFG, _dcfg())

  prompts = _prompts()[:5]
  want = _run(ref, prompts, _greedy)
  got, sent_pages, cached_tokens = {}, [], []
  for i, p in enumerate(prompts):
    sp = _greedy(i)
    res = de.reserve(str(i), len(p), sp.max_tokens, prompt_ids=p)
    [r] = pe.prefill([PrefillRequest(str(i), p, sp,
                                     skip_pages=res.cached_blocks)])
    sent_pages.append(r.kv.num_pages)
    cached_tokens.append(r.cached_tokens)
    got[str(i)] = [r.first_token]
    de.submit(DecodeRequest(str(i), p, r.first_token, r.first_logprob, r.kv,
                            sp, 0, lambda ev: got[ev.request_id].extend(
                                ev.token_ids), reservation=res))
    de.drain()
  assert [got[str(i)] for i in range(len(prompts))] == want
  # Prompt 1 repeats prompt 0 (70 tokens: 4 full blocks): both sides reuse.
  assert cached_tokens[1] == 4 * PAGE and sent_pages[1] == 1
  assert cached_tokens[0] == 0 and sent_pages[0] == 5
  assert sum(cached_tokens) > 0
  for rep in de.replicas:
    rep.pool.check_invariants()
    assert rep.pool.num_used == 0 and rep.pool.reserved == 0


@pytest.fixture(scope="module")
def prefill_engines(tiny_model_dir):
  """A warm prefill engine with a block store, and one without (tp=2 on
  devices 2 and 3), shared by the tests below: each keeps to cache salts
  of its own."""
  rules = ShardingRules.load("prefill_tp")
  mesh = make_mesh({"tp": 2}, jax.devices()[2:4])
  params, cfg = load_sharded(tiny_model_dir, rules, mesh)
  store = PrefillKVStore(cfg, mesh, rules, num_pages=64, page_size=PAGE)
  cached = PrefillEngine(params, cfg, mesh, rules, PCFG, prefix_store=store)
  cached.warmup()
  plain = PrefillEngine(params, cfg, mesh, rules, PCFG)
  return cfg, store, cached, plain


@contextlib.contextmanager
def _chunk_calls(engine):
  """The tokens' shapes of every chunk program ``engine`` runs meanwhile."""
  calls, real = [], engine._chunk

  def chunk(params, tokens, *a):
    calls.append(tokens.shape)
    return real(params, tokens, *a)

  engine._chunk = chunk
  try:
    yield calls
  finally:
    engine._chunk = real


def _kv_tokens(r) -> np.ndarray:
  """A result's KV as [layers, 2, tokens, kv_heads, head_dim] on host."""
  kv = np.asarray(jax.device_get(r.kv.kv))
  L, two, n, P, K, hd = kv.shape
  return kv.reshape(L, two, n * P, K, hd)[:, :, :r.prompt_len]


def test_cached_prompts_prefill_together(prefill_engines):
  """Prompts whose leading blocks are cached and whose rest fits one bucket
  run in one chunk program, a row each, not one after another: the same
  first tokens and KV as each alone and as a cache-free engine, and the
  pinned blocks all go back."""
  cfg, store, cached, plain = prefill_engines
  base, other = _prompts()[4], _prompts()[5]
  greedy = SamplingParams(max_tokens=1, temperature=0.0)
  # Two salts: the same cached blocks for the prompts run together and for
  # the same prompts run alone (each run caches its prompts' blocks too).
  for salt in ("together", "alone"):
    cached.prefill([PrefillRequest("seed", base[:70], greedy,
                                   cache_salt=salt)])
  # 4 cached blocks + 20 to compute; 4 + 6; 1 + 30 (buckets 32, 16, 32);
  # nothing cached (the batched path).
  prompts = [base[:64] + other[:20], base[:70], base[:16] + other[:30],
             other[:40]]

  def requests(salt):
    return [PrefillRequest(str(i), p, greedy, cache_salt=salt)
            for i, p in enumerate(prompts)]
  reqs = requests("together")
  with _chunk_calls(cached) as calls:
    together = cached.prefill(reqs)
    assert sorted(calls) == [(1, 16), (2, 32)]
    calls.clear()
    alone = [cached.prefill([r])[0] for r in requests("alone")]
    assert sorted(calls) == [(1, 16), (1, 32), (1, 32)]
  want = plain.prefill(reqs)
  assert [r.cached_tokens for r in together] == [64, 64, 16, 0]
  assert [r.cached_tokens for r in alone] == [64, 64, 16, 0]
  for t, a, w in zip(together, alone, want):
    assert t.first_token == a.first_token == w.first_token, t.request_id
    # The batch's GEMMs may block rows differently from one row's; the
    # cache-free prefill attends over the whole prompt at once.
    assert_kv_close(_kv_tokens(t), _kv_tokens(a), cfg, PCFG.max_seq_len,
                    err_msg=f"together/alone {t.request_id}")
    assert_kv_close(_kv_tokens(t), _kv_tokens(w), cfg, PCFG.max_seq_len,
                    err_msg=f"together/uncached {t.request_id}")
  assert store.pool.num_used == 0
  store.pool.check_invariants()

  # A chunk program that fails gives back every pinned prefix, those of
  # the groups it never reached too.
  def broken(*a):
    raise RuntimeError("device lost")

  real = cached._chunk
  cached._chunk = broken
  try:
    with pytest.raises(RuntimeError, match="device lost"):
      cached.prefill(requests("together")[:3])
  finally:
    cached._chunk = real
  assert store.pool.num_used == 0
  store.pool.check_invariants()


def test_a_last_chunk_reaching_past_the_buffer_lands_where_it_belongs(
    tiny_decode_params):
  """A cached prefix ending near max_seq_len leaves less room in the prefill
  buffer than the last chunk's bucket (here 48 tokens of room, 40 to
  compute, bucket 64). The chunk must still be written after the prefix,
  not shifted back over it."""
  params, cfg, mesh, rules = tiny_decode_params
  rng = np.random.RandomState(11)
  base = rng.randint(3, 500, size=240).tolist()
  prompts = [base[:224], base[:208] + rng.randint(3, 500, size=40).tolist()]

  def short(i):
    return SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)

  off = ColocatedEngine(params, cfg, mesh, rules, PCFG, _dcfg())
  on = ColocatedEngine(params, cfg, mesh, rules, PCFG,
                       _dcfg(prefix_caching=True))
  assert _run(on, prompts, short) == _run(off, prompts, short)
  assert on.prefill[0].stats["cached_tokens"] == 208


def test_a_warm_prefill_engine_with_a_store_compiles_nothing(prefill_engines):
  """After warm-up, prompts sharing blocks with earlier ones (the store's
  gathers and stores of every length, chunks after a cached prefix, whole
  prompts stored page by page, pages the receiver holds left out of what
  is handed on) run without one compilation: a page table
  handed to a store program as a jax array of a new length used to compile
  a program of its own on the serving path."""
  from pdjax.engine import compile_stats
  _, store, pe, _ = prefill_engines
  hits = store.block_stats()["hits"]
  with compile_stats.CompileCounter() as c:
    for i, p in enumerate(_prompts()):   # some with pages to skip
      pe.prefill([PrefillRequest(str(i), p, _greedy(i), skip_pages=i % 3,
                                 cache_salt="warm")])
  assert c.count == 0, f"serving compiled: {c.names}"
  assert store.block_stats()["hits"] > hits


def test_a_prefix_that_does_not_shrink_the_bucket_is_not_used(
    prefill_engines):
  """A chunk after a cached prefix costs more than the bucketed program
  of the same length, so a prompt that fits a bucket takes its cached
  prefix only where the rest fits a smaller one: 60 tokens with one block
  cached (44 left: bucket 64 either way) run bucketed, their KV handed on
  from the page the receiver does not hold, as a chunked run's would be;
  with two blocks cached (28 left: bucket 32) they run after the prefix.
  A prompt of the smallest bucket is not looked up at all. The first
  tokens and KV are the cache-free engine's, and no page stays pinned."""
  cfg, store, cached, plain = prefill_engines
  base, other = _prompts()[4], _prompts()[5]

  def request(rid, prompt, skip=0):
    return PrefillRequest(rid, prompt, SamplingParams(
        max_tokens=1, temperature=0.0), skip_pages=skip, cache_salt="shrink")
  cached.prefill([request("seed", base[:40])])  # 2 blocks
  one, two = base[:16] + other[:44], base[:32] + other[:28]
  with _chunk_calls(cached) as chunks:
    lookups = dict(store.block_stats())
    [short] = cached.prefill([request("short", base[:16])])
    assert store.block_stats() == lookups and short.cached_tokens == 0
    [r1] = cached.prefill([request("one", one, skip=1)])
    assert chunks == [] and r1.cached_tokens == 0
    assert r1.kv.first_page == 1 and r1.kv.num_pages == 3
    [r2] = cached.prefill([request("two", two, skip=1)])
    assert chunks == [(1, 32)] and r2.cached_tokens == 2 * PAGE
    assert r2.kv.first_page == 1
  want = plain.prefill([request("one", one), request("two", two)])
  assert [r1.first_token, r2.first_token] == [w.first_token for w in want]
  # Tokens 16.. of the prompt, from the pages handed on.
  got = np.asarray(jax.device_get(r1.kv.kv))
  L, two, n, P, K, hd = got.shape
  got = got.reshape(L, two, n * P, K, hd)[:, :, :len(one) - PAGE]
  assert_kv_close(got, _kv_tokens(want[0])[:, :, PAGE:], cfg,
                  PCFG.max_seq_len, err_msg="one block cached, bucketed")
  assert store.pool.num_used == 0
  store.pool.check_invariants()


def test_a_short_prompt_after_a_prefix_takes_a_short_buffer(prefill_engines):
  """A chunk program moves its whole buffer through every layer, so a
  prompt takes the shortest buffer length that holds it: 42 tokens after a
  cached 32 run in 80 positions, 94 after 64 in the longest (320), with the
  first tokens and KV of the cache-free engine."""
  cfg, store, cached, plain = prefill_engines
  assert PCFG.chunk_buffer_lens == [80, 320]
  # Warm-up compiles the lengths an engine's prompts can take: after a
  # cached page, any; without a store, only prompts past every bucket
  # (65 tokens and a 16-token chunk need more than 80).
  assert cached.chunk_buffer_lens == [80, 320]
  assert plain.chunk_buffer_lens == [320]
  with pytest.raises(ValueError, match="from 65"):
    plain.start_chunked(PrefillRequest("short", [5] * 64, SamplingParams(
        max_tokens=1, temperature=0.0)))
  base, other = _prompts()[4], _prompts()[5]
  greedy = SamplingParams(max_tokens=1, temperature=0.0)
  cached.prefill([PrefillRequest("seed", base[:64], greedy,
                                 cache_salt="short")])
  lengths, real = [], cached._chunk

  def chunk(params, tokens, true_len, k_bufs, *a):
    lengths.append(k_bufs[0].shape[2])
    return real(params, tokens, true_len, k_bufs, *a)

  reqs = [PrefillRequest("a", base[:32] + other[:10], greedy,
                         cache_salt="short"),
          PrefillRequest("b", base[:64] + other[:30], greedy,
                         cache_salt="short")]
  cached._chunk = chunk
  try:
    got = [cached.prefill([r])[0] for r in reqs]
  finally:
    cached._chunk = real
  assert lengths == [80, 320]   # a: 10 tokens (bucket 16), b: 30 (32)
  assert [r.cached_tokens for r in got] == [32, 64]
  for g, w in zip(got, plain.prefill(reqs)):
    assert g.first_token == w.first_token, g.request_id
    assert_kv_close(_kv_tokens(g), _kv_tokens(w), cfg, PCFG.max_seq_len,
                    err_msg=g.request_id)
  assert store.pool.num_used == 0


@pytest.mark.parametrize("pcfg", [
    PCFG, PrefillConfig(buckets=(128, 512, 1024, 2048, 4096, 8192),
                        max_batch=4, page_size=16, max_seq_len=8192)])
def test_every_chunk_ends_inside_the_buffer_its_prompt_takes(pcfg):
  """``buffer_len_for`` bounds where any chunk of a prompt can end: for
  every cached prefix and token budget (the colocated engine cuts chunks
  by its per-iteration budget), chunks chosen as ``PrefillEngine._chunk_len``
  chooses them end inside the buffer, and a longer buffer is taken only
  where a shorter one could not hold the prompt and its last bucket."""
  import types
  lens = pcfg.chunk_buffer_lens
  assert lens[-1] == pcfg.chunk_buffer_len
  assert all(n % pcfg.page_size == 0 and n >= pcfg.buckets[0] for n in lens)
  engine = types.SimpleNamespace(config=pcfg)
  chunk_len = lambda rem, cap: PrefillEngine._chunk_len(engine, rem, cap)
  P = pcfg.page_size
  step = max(1, pcfg.max_seq_len // 64)
  for n in list(range(1, pcfg.max_seq_len, step)) + [pcfg.max_seq_len - 1]:
    for cached_tokens in sorted({0, (n - 1) // P * P, n // 2 // P * P}):
      length = pcfg.buffer_len_for(n, cached_tokens)
      for budget in (None, pcfg.buckets[0], pcfg.buckets[0] + 1,
                     2 * pcfg.buckets[-1]):
        pos, end = cached_tokens, 0
        while pos < n:   # one advance(budget) after another
          spent = 0
          while pos < n:
            c = chunk_len(n - pos, None if budget is None
                          else max(budget - spent, 1))
            if spent and budget is not None and spent + c > budget:
              break
            end, pos, spent = max(end, pos + c), pos + c, spent + c
        assert end <= length, (n, cached_tokens, budget, end, length)
      shorter = [m for m in lens if m < length]
      if shorter:
        rest = n - cached_tokens
        last = min(pcfg.bucket_for(rest) or pcfg.chunk, pcfg.chunk)
        assert shorter[-1] < n + last


def test_warmup_holds_no_buffers_of_its_own_while_the_store_warms(
    tiny_model_dir):
  """Warm-up's peak memory is one program's: while the store compiles its
  programs (writing a request's KV into its pool: the largest bucket's is a
  GiB in 8B), nothing warm-up made before is still held, neither a
  bucketed batch's KV nor a buffer pair (on one H100 they together ran a
  prefill worker out of its share of the card)."""
  rules = ShardingRules.load("prefill_tp")
  mesh = make_mesh({"tp": 2}, jax.devices()[2:4])
  params, cfg = load_sharded(tiny_model_dir, rules, mesh)
  store = PrefillKVStore(cfg, mesh, rules, num_pages=64, page_size=PAGE)
  engine = PrefillEngine(params, cfg, mesh, rules, PCFG, prefix_store=store)
  before = {id(a) for a in jax.live_arrays()}
  held = []

  def made_since(*args):
    """Bytes of the arrays made since ``before``, but ``args``."""
    skip = {id(x) for x in args}
    return sum(a.nbytes for a in jax.live_arrays()
               if id(a) not in before and id(a) not in skip)

  real_warmup, real_store_kv = store.warmup, store._store_kv

  def warmup(e):
    held.append(made_since(store.k, store.v))
    store._store_kv = lambda *a: (held.append(made_since(*a)),
                                  real_store_kv(*a))[1]
    real_warmup(e)

  store.warmup = warmup
  engine.warmup()
  # A few scalars and a page table are what may be left (the engine's
  # constants), far below a buffer pair of the shortest length.
  shortest = engine.empty_buffers(engine.chunk_buffer_lens[0])[0].nbytes
  assert len(held) == 1 + len(PCFG.buckets)
  assert max(held) < shortest // 8, (held, shortest)
