"""Engines on 8 CPU devices with pdjax-tiny: equivalence, batching, limits.

What must hold for disaggregation to be worth anything is that it changes
*where* work runs, never *what* comes out: any TP degree of prefill gives the
same KV, any DP layout of decode the same tokens, a sequence the same tokens
whatever batch it shares, and prefill-on-one-mesh -> decode-on-another the
same tokens as colocated serving. The rest pins the engine contract the
services build on: request limits, stop conditions, KV accounting that
returns to zero, and no XLA compilation while serving after warm-up.

Compilation dominates the run time on CPU (a few seconds per program), so
engines are module fixtures shared by the tests, all use one small config
(buckets 16/32/64, max_seq_len 128), and prefill batches are shaped to reuse
programs that are already compiled. Tests leave every shared engine clean,
which each of them checks.
"""

from __future__ import annotations

import collections
import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdjax.engine import compile_stats
from pdjax.engine.block_pool import BlockPool, PoolExhausted
from pdjax.engine.colocated import ColocatedEngine
from pdjax.engine.decode import DecodeConfig, DecodeEngine
from pdjax.engine.kv import reshard_kv
from pdjax.engine.prefill import PrefillConfig, PrefillEngine
from pdjax.engine.requests import (DecodeRequest, FinishReason, PrefillRequest,
                                   PrefillResult, RequestKV, TokenEvent)
from pdjax.engine.sampling import InvalidRequest, SamplingParams
from pdjax.engine.setup import load_sharded, shard_params
from pdjax.model.config import ModelConfig
from pdjax.model.llama import param_shapes
from pdjax.model.tiny import ensure_tiny_model
from pdjax.model.weights import load_hf_params
from pdjax.sharding import ShardingError, ShardingRules, make_mesh
from tolerances import (BF16, assert_close, assert_kv_close, logit_scale,
                        logprob_tolerance, positive, rounding_flip, signed,
                        tolerance)

PAGE = 16
MAX_SEQ = 128
PCFG = PrefillConfig(buckets=(16, 32, 64), max_batch=2, page_size=PAGE,
                     max_seq_len=MAX_SEQ)
# 31 usable pages per replica, 8 for a sequence of max_seq_len: three such
# sequences fill a replica, so capacity limits are easy to reach. Page-table
# widths 4 and 8: rows still move from one generate program to the other
# as they grow, with half the programs of every power of two.
# One row count (all four rows): the programs by row count, and that they
# give the same tokens, are tests/test_decode_rows.py's.
DCFG = DecodeConfig(max_seqs=4, page_size=PAGE, num_pages=32,
                    max_seq_len=MAX_SEQ, steps_per_call=4, table_buckets=(4,),
                    row_buckets=(4,))

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def seeded(seed: int, max_tokens: int = 12, **kw) -> SamplingParams:
  return SamplingParams(**{"max_tokens": max_tokens, "temperature": 0.8,
                           "top_p": 0.9, "top_k": 50, "seed": seed,
                           "ignore_eos": True, **kw})


def prompt(n: int, seed: int) -> list[int]:
  """Token ids from the tiny model's ordinary range (no special tokens)."""
  return np.random.default_rng(seed).integers(3, 512, n).tolist()


# ------------------------------------------------------------------ helpers
class Collector:
  """A TokenCallback recording every event per request."""

  def __init__(self):
    self.events: dict[str, list[TokenEvent]] = collections.defaultdict(list)

  def __call__(self, ev: TokenEvent) -> None:
    self.events[ev.request_id].append(ev)

  def tokens(self, rid: str) -> list[int]:
    return [t for e in self.events[rid] for t in e.token_ids]

  def reason(self, rid: str) -> FinishReason:
    evs = self.events[rid]
    assert evs, f"{rid}: no events"
    assert all(e.finish_reason is None for e in evs[:-1]), evs
    assert evs[-1].finish_reason is not None, f"{rid} did not finish"
    return evs[-1].finish_reason

  def finished(self, rid: str) -> bool:
    evs = self.events.get(rid)
    return bool(evs) and evs[-1].finish_reason is not None


def assert_clean(engine) -> None:
  """No rows, pages, reservations or queued work left, pools consistent."""
  if isinstance(engine, ColocatedEngine):
    assert engine.num_waiting == 0
    engine = engine.decode
  assert not engine.has_work
  u = engine.kv_usage()
  assert u["pages_used"] == 0, u
  assert u["pages_reserved"] == 0, u
  assert u["pages_cached"] == 0, u
  assert u["reservations"] == 0, u
  assert u["rows_live"] == 0, u
  assert u["rows_swapped"] == 0 and u["pages_swapped"] == 0, u
  assert u["pages_available"] == u["pages_total"], u
  for rep in engine.replicas:
    rep.pool.check_invariants()
    assert not rep.active.any()
    assert not rep._evicted


def prefill_requests(engine: PrefillEngine, reqs) -> list[PrefillResult]:
  """Prefills (rid, prompt, sampling) triples with the request's seed."""
  return engine.prefill([PrefillRequest(rid, p, s, s.seed_u32(0))
                         for rid, p, s in reqs])


def submit_decode(engine: DecodeEngine, rid, p, s, r: PrefillResult,
                  col: Collector) -> int:
  """The disaggregated hand-off: reserve on the decode pool, move the KV to
  the chosen replica's layout, submit. Returns the replica index. While
  the pool is full it runs engine steps, as a router retries a full pool."""
  col(TokenEvent(rid, [r.first_token], [r.first_logprob]))
  while (res := engine.reserve(rid, len(p), s.max_tokens)) is None:
    assert engine.has_work, f"{rid}: an idle decode pool refused it"
    engine.step()
  rep = engine.replicas[res.replica]
  kv = reshard_kv(r.kv, rep.payload_sharding(r.kv.kv.shape[2]))
  assert kv.kv.sharding == rep.payload_sharding(kv.kv.shape[2])
  engine.submit(DecodeRequest(rid, p, r.first_token, r.first_logprob, kv, s,
                              s.seed_u32(0), col, reservation=res))
  return res.replica


def run_disaggregated(prefill: PrefillEngine, decode: DecodeEngine, reqs
                      ) -> Collector:
  col = Collector()
  for (rid, p, s), r in zip(reqs, prefill_requests(prefill, reqs)):
    submit_decode(decode, rid, p, s, r, col)
  decode.drain()
  assert_clean(decode)
  return col


def run_colocated(colo: ColocatedEngine, reqs) -> Collector:
  col = Collector()
  for rid, p, s in reqs:
    colo.submit(rid, p, s, col, seed_u32=s.seed_u32(0))
  colo.drain()
  assert_clean(colo)
  return col


def kv_tokens(r: PrefillResult) -> np.ndarray:
  """The prompt's KV as [layers, 2, tokens, kv_heads, head_dim] on host."""
  kv = np.asarray(jax.device_get(r.kv.kv))
  L, two, n, P, K, hd = kv.shape
  return kv.reshape(L, two, n * P, K, hd)[:, :, :r.prompt_len]


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def tiny():
  """(cfg, params on the default device) of pdjax-tiny, loaded once."""
  path = ensure_tiny_model()
  cfg = ModelConfig.from_hf_dir(path)
  return cfg, load_hf_params(path, cfg), path


@pytest.fixture(scope="module")
def rules():
  return {n: ShardingRules.load(n)
          for n in ("prefill_tp", "decode_dp", "decode_dp_tp")}


def _prefill_engine(tiny, rules, tp, devices, pcfg=PCFG):
  cfg, params, _ = tiny
  mesh = make_mesh({"tp": tp}, devices)
  return PrefillEngine(shard_params(params, cfg, rules["prefill_tp"], mesh),
                       cfg, mesh, rules["prefill_tp"], pcfg)


def _decode_engine(tiny, rules, axes, devices, name="decode_dp",
                   dcfg=DCFG):
  cfg, params, _ = tiny
  mesh = make_mesh(axes, devices)
  return DecodeEngine(shard_params(params, cfg, rules[name], mesh), cfg, mesh,
                      rules[name], dcfg)


@pytest.fixture(scope="module")
def prefill_tp(tiny, rules):
  """TP=1, 2 and 4 prefill engines, on meshes over different devices."""
  d = jax.devices()
  return {1: _prefill_engine(tiny, rules, 1, d[6:7]),
          2: _prefill_engine(tiny, rules, 2, d[4:6]),
          4: _prefill_engine(tiny, rules, 4, d[4:8])}


@pytest.fixture(scope="module")
def decoders(tiny, rules):
  """Decode pools with one DecodeConfig: dp=1, 2 and dp=2 x tp=2. Their
  one-device replicas are on devices 0 and 1, those of the colocated engine
  too, so equal programs compile once (the persistent compilation cache
  keys a CPU program by its devices) however many pools use them."""
  d = jax.devices()
  return {
      "dp1": _decode_engine(tiny, rules, {"dp": 1}, d[:1]),
      "dp2": _decode_engine(tiny, rules, {"dp": 2}, d[:2]),
      "dp2tp2": _decode_engine(tiny, rules, {"dp": 2, "tp": 2}, d[:4],
                               name="decode_dp_tp"),
  }


@pytest.fixture(scope="module")
def colo(tiny, rules):
  """A warmed-up colocated engine, dp=2 on devices 0 and 1."""
  cfg, params, _ = tiny
  mesh = make_mesh({"dp": 2}, jax.devices()[:2])
  engine = ColocatedEngine(
      shard_params(params, cfg, rules["decode_dp"], mesh), cfg, mesh,
      rules["decode_dp"], PCFG, DCFG)
  engine.warmup()
  assert_clean(engine)
  return engine


@pytest.fixture(scope="module")
def local_prefill(colo):
  """A warmed prefill engine on device 0 (the colocated replica's): feeding
  the decode-only tests from it compiles nothing new."""
  return colo.prefill[0]


# ------------------------------------------------------------------ units
def test_block_pool_allocate_free_reserve():
  pool = BlockPool(8)
  assert (pool.capacity, pool.num_free, pool.available) == (7, 7, 7)
  a = pool.allocate(3)
  assert len(set(a)) == 3 and 0 not in a
  assert all(pool.ref_count(p) == 1 for p in a)
  assert (pool.num_used, pool.available) == (3, 4)
  pool.check_invariants()

  assert pool.reserve(3)
  assert pool.available == 1
  assert not pool.reserve(2)
  with pytest.raises(PoolExhausted):
    pool.allocate(2)                     # would eat into the reservation
  b = pool.allocate(2, reserved=True)
  assert pool.reserved == 1 and pool.available == 1
  pool.unreserve(1)
  with pytest.raises(AssertionError):
    pool.unreserve(1)
  pool.check_invariants()

  pool.free(a + b + [0])                 # the null page is ignored
  assert (pool.num_free, pool.num_used, pool.available) == (7, 0, 7)
  with pytest.raises(AssertionError):
    pool.free([a[0]])                    # double free
  with pytest.raises(PoolExhausted):
    pool.allocate(8)
  with pytest.raises(ValueError):
    BlockPool(1)
  pool.check_invariants()


def test_block_pool_cache_and_evict():
  pool = BlockPool(5)                    # 4 usable pages
  p, q = pool.allocate(2)
  assert pool.register(p, "h-p") == p
  assert pool.register(q, "h-p") == p    # the existing holder wins
  assert pool.lookup("h-p") == p and pool.ref_count(p) == 2
  assert pool.lookup("missing") is None
  pool.free([p, p, q])
  # Unreferenced but named: cached, still available to admission.
  assert (pool.num_cached, pool.num_free, pool.available) == (1, 3, 4)
  assert pool.contains("h-p")
  pool.check_invariants()
  assert pool.lookup("h-p") == p and pool.num_cached == 0   # revived
  pool.free([p])
  assert pool.reserve(4)                 # cached pages may be promised
  got = pool.allocate(4, reserved=True)  # ... and are evicted to keep it
  assert p in got and not pool.contains("h-p")
  assert pool.stats["evictions"] == 1 and pool.reserved == 0
  pool.free(got)
  pool.check_invariants()

  r = pool.allocate(1)[0]
  pool.register(r, "h-r")
  pool.free([r])
  assert pool.evict_all() == 1
  assert (pool.num_cached, pool.num_free) == (0, 4)
  pool.check_invariants()


def test_sharding_rule_that_does_not_divide(tiny, rules):
  cfg = tiny[0]
  mesh = make_mesh({"tp": 8})
  # pdjax-tiny has 4 KV heads: an 8-way split of them is refused, naming the
  # weight, the logical axis, the mesh axis and both sizes.
  with pytest.raises(ShardingError) as e:
    rules["prefill_tp"].tree(mesh, param_shapes(cfg))
  msg = str(e.value)
  for part in ("prefill_tp", "layers/wk", "kv_heads", "size 4", "tp",
               "size 8", "not divisible"):
    assert part in msg, msg
  with pytest.raises(ShardingError, match="kv_heads"):
    shard_params(tiny[1], cfg, rules["prefill_tp"], mesh)
  # A mesh axis the rule set does not know.
  with pytest.raises(ShardingError, match="expects mesh axes"):
    rules["decode_dp"].tree(make_mesh({"tp": 2}), param_shapes(cfg))


def test_sharding_rules_errors():
  with pytest.raises(ShardingError) as e:
    ShardingRules.load("no_such_rules")
  assert "no_such_rules" in str(e.value) and "prefill_tp" in str(e.value)
  with pytest.raises(ShardingError, match="unknown logical axis"):
    ShardingRules.from_dict({"mesh_axes": ["tp"], "rules": {"vocabs": "tp"}})
  with pytest.raises(ShardingError, match="not in mesh_axes"):
    ShardingRules.from_dict({"mesh_axes": ["tp"], "rules": {"vocab": "dp"}})
  tp = ShardingRules.load("prefill_tp")
  assert tuple(tp.partition_spec(("layers", "embed", "heads", "head_dim"))
               ) == (None, None, "tp", None)


def test_compile_counter():
  import jax.numpy as jnp
  f = jax.jit(lambda x: x * 3 + 1)
  before = compile_stats.compile_count()
  with compile_stats.CompileCounter() as c:
    f(jnp.arange(5.0)).block_until_ready()
  assert c.count >= 1 and c.seconds > 0
  assert compile_stats.compile_count() >= before + c.count
  with compile_stats.no_compiles("cached call"):
    f(jnp.arange(5.0)).block_until_ready()
  with pytest.raises(compile_stats.UnexpectedCompilation, match="compiled"):
    with compile_stats.no_compiles("new shape"):
      f(jnp.arange(7.0)).block_until_ready()
  compile_stats.install()                 # idempotent
  n = compile_stats.compile_count()
  with compile_stats.no_compiles():
    f(jnp.arange(7.0)).block_until_ready()
  assert compile_stats.compile_count() == n


def test_load_sharded_both_formats(tiny, rules, tmp_path):
  """A HF directory and a pdjax checkpoint load straight into the rule
  set's shardings, with the same values."""
  from pdjax.model.checkpoint import save_checkpoint
  cfg, params, path = tiny
  mesh = make_mesh({"tp": 2}, jax.devices()[2:4])
  want = rules["prefill_tp"].tree(mesh, param_shapes(cfg))
  orbax_dir = save_checkpoint(tmp_path / "ckpt", params, cfg)
  for source in (path, orbax_dir):
    loaded, cfg2 = load_sharded(source, rules["prefill_tp"], mesh)
    assert cfg2.fingerprint() == cfg.fingerprint()
    for x, s in zip(jax.tree.leaves(loaded), jax.tree.leaves(want)):
      assert x.sharding == s, (source, x.sharding, s)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(
        np.asarray(a), np.asarray(b)), loaded, params)


def test_warmup_covers_every_payload_size(prefill_tp, decoders):
  """Chunked prefill's padded page counts, for a chunk that is not a
  power-of-two number of pages: one warm-up prompt per payload size (the
  chunk program itself is one program for every chunk)."""
  src = prefill_tp[1]
  config = PrefillConfig(buckets=(16, 48), max_batch=1, page_size=PAGE,
                         max_seq_len=256)
  engine = PrefillEngine(src.params, src.cfg, src.mesh, src.rules, config)
  # Buckets' page counts, and (the buffered path: cached prefix, skipped
  # pages) every power of two.
  assert engine.payload_page_counts() == [1, 2, 3, 4, 8, 16]
  assert decoders["dp1"].default_payload_page_counts() == [1, 2, 4, 8]


# ------------------------------------------------------------------ prefill
def test_tp_prefill_equivalence(tiny, rules, prefill_tp):
  """TP=1, 2, 4 prefill: same first tokens and KV for a mixed-length batch
  and a chunked prompt; chunked equals one bucket holding the prompt."""
  cfg, params, _ = tiny
  reqs = [("a", prompt(40, 1), GREEDY), ("b", prompt(64, 2), seeded(7)),
          ("long", prompt(100, 3), GREEDY)]  # 100 > 64: two chunks
  out = {tp: prefill_requests(e, reqs) for tp, e in prefill_tp.items()}
  # TP sums the output and down projections' partial products across
  # shards, in another order than TP=1: equal up to rounding, bounded in
  # tests/tolerances.py.
  lp_tol = logprob_tolerance(cfg, MAX_SEQ, logit_scale(params, cfg))
  for tp in (2, 4):
    for r1, r in zip(out[1], out[tp]):
      assert r.first_token == r1.first_token, (tp, r.request_id)
      assert r.kv.num_tokens == r1.kv.num_tokens == r.prompt_len
      assert r.kv.kv.shape == r1.kv.kv.shape
      assert_kv_close(kv_tokens(r), kv_tokens(r1), cfg, MAX_SEQ,
                      err_msg=f"tp={tp} {r.request_id}")
      assert abs(r.first_logprob - r1.first_logprob) <= lp_tol
  # The chunked payload is padded to a power-of-two page count.
  assert out[1][2].kv.kv.shape[2] == 8
  # KV sharding: kv_heads split over tp.
  assert out[4][0].kv.kv.sharding.spec[4] == "tp"

  # Unchunked: a config whose single bucket holds the whole prompt.
  whole = _prefill_engine(
      tiny, rules, 1, jax.devices()[6:7],
      dataclasses.replace(PCFG, buckets=(128,)))
  (ref,) = prefill_requests(whole, reqs[2:])
  assert ref.first_token == out[1][2].first_token
  # Chunked attention sums over the keys in another order.
  assert_kv_close(kv_tokens(out[1][2]), kv_tokens(ref), cfg, MAX_SEQ,
                  err_msg="chunked")


def test_tp_pads_an_odd_vocabulary(tiny, rules, tmp_path):
  """A 1013-token vocabulary at TP=2: the embedding and LM head are padded
  to 1014 rows (as vLLM pads), not refused; the padded id is never sampled,
  even where its logit would win, and logits a caller gets stop at 1013.
  Prefill (greedy and seeded) and greedy decoding give TP=1's tokens, and a
  checkpoint of that vocabulary loads straight into the padded layout."""
  from pdjax.engine.setup import fit_vocab
  from pdjax.model.checkpoint import save_checkpoint
  from pdjax.model.generate import greedy_generate
  from pdjax.model.llama import init_params
  cfg = tiny[0].replace(vocab_size=1013)
  host = jax.device_get(init_params(cfg, seed=5))
  tp_rules = rules["prefill_tp"]
  with pytest.raises(ShardingError, match="not divisible"):   # unpadded
    tp_rules.tree(make_mesh({"tp": 2}, jax.devices()[4:6]),
                  param_shapes(cfg))
  reqs = [("a", prompt(40, 21), GREEDY), ("b", prompt(9, 22), seeded(3)),
          ("c", [1012, 1011, 5, 1012], seeded(4, temperature=1.5))]
  out, gen = {}, {}
  for tp, devices in ((1, jax.devices()[6:7]), (2, jax.devices()[4:6])):
    mesh = make_mesh({"tp": tp}, devices)
    pcfg = fit_vocab(cfg, tp_rules, mesh)
    assert pcfg.vocab_padding == tp - 1 and pcfg.padded_vocab % tp == 0
    assert pcfg.fingerprint() == cfg.fingerprint()
    params = shard_params(host, pcfg, tp_rules, mesh)
    assert params["lm_head"].shape == (cfg.hidden_size, pcfg.padded_vocab)
    if tp == 2:
      np.testing.assert_array_equal(
          np.asarray(params["embed"])[:1013], host["embed"])
      assert not np.asarray(params["embed"])[1013:].any()
      # Make the padded id's logit the largest by far, were it not masked.
      head = params["lm_head"].at[:, 1013].set(50.0)
      params = dict(params, lm_head=jax.device_put(
          head, params["lm_head"].sharding))
    engine = PrefillEngine(params, pcfg, mesh, tp_rules, PCFG)
    out[tp] = prefill_requests(engine, reqs)
    gen[tp] = greedy_generate(params, pcfg, [r[1] for r in reqs[:2]], 6,
                              return_logits=True)
  for r1, r2 in zip(out[1], out[2]):
    assert r2.first_token == r1.first_token < 1013, r2.request_id
    assert abs(r2.first_logprob - r1.first_logprob) < 1e-4
  (t1, l1), (t2, l2) = gen[1], gen[2]
  np.testing.assert_array_equal(t2, t1)
  assert l2.shape[-1] == l1.shape[-1] == 1013
  np.testing.assert_allclose(l2, l1, rtol=1e-4, atol=1e-4)
  # A checkpoint of the odd vocabulary, loaded for a TP=2 pool.
  mesh = make_mesh({"tp": 2}, jax.devices()[4:6])
  ckpt = save_checkpoint(tmp_path / "odd", host, cfg)
  loaded, lcfg = load_sharded(ckpt, tp_rules, mesh)
  assert lcfg.vocab_padding == 1 and lcfg.vocab_size == 1013
  assert loaded["embed"].sharding.spec[0] == "tp"
  np.testing.assert_array_equal(np.asarray(loaded["lm_head"])[:, :1013],
                                host["lm_head"])
  assert not np.asarray(loaded["lm_head"])[:, 1013:].any()


def test_layer_group_settings():
  """Groups as even as possible; 0 means auto (groups only where the
  hand-off can write them one by one); a deployment file may set them."""
  from pdjax.config import (AUTO_LAYER_GROUPS, DeploymentConfig,
                            resolve_layer_groups)
  assert PrefillConfig(layer_groups=3).layer_group_sizes(32) == [11, 11, 10]
  assert PrefillConfig(layer_groups=8).layer_group_sizes(2) == [1, 1]
  assert PrefillConfig().layer_group_sizes(32) == [32]
  assert resolve_layer_groups(0, layer_wise_sender=True) == AUTO_LAYER_GROUPS
  assert resolve_layer_groups(0, layer_wise_sender=False) == 1
  assert resolve_layer_groups(2, layer_wise_sender=False) == 2
  with pytest.raises(ValueError, match="layer_groups"):
    resolve_layer_groups(-1, layer_wise_sender=True)
  dep = DeploymentConfig.load("gpu-8b")
  assert dep.prefill_engine_config(layer_groups=4).layer_groups == 4


@pytest.mark.parametrize("weights", ["model", "fp8"])
def test_prefill_in_layer_groups_equals_fused(tiny, rules, weights):
  """Prefill run as layer-group programs (3 layers in groups of 2 and 1, so
  both group programs exist) at TP=2: the fused program's first tokens and
  KV. Each bucketed request's KV comes as its groups, and reaches
  ``kv_ready`` (the same object the result carries); the chunked prompt
  runs fused. The bucketed prompts are two pairs of one bucket: every
  program of the model is compiled once. FP8 weights are stored one array
  per layer, and each group's program picks its own layers' arrays."""
  from pdjax.model.llama import init_params
  from pdjax.model.quant import quantize_params
  cfg = tiny[0].replace(num_layers=3)
  mesh = make_mesh({"tp": 2}, jax.devices()[4:6])
  params = init_params(cfg, seed=3)
  if weights == "fp8":
    params, cfg = quantize_params(params, cfg)
  params = shard_params(params, cfg, rules["prefill_tp"], mesh)
  fused = PrefillEngine(params, cfg, mesh, rules["prefill_tp"], PCFG)
  grouped = PrefillEngine(params, cfg, mesh, rules["prefill_tp"],
                          dataclasses.replace(PCFG, layer_groups=2))
  reqs = [("a", prompt(40, 11), GREEDY), ("b", prompt(57, 12), seeded(7)),
          ("c", prompt(33, 13), GREEDY), ("d", prompt(64, 15), seeded(8)),
          ("long", prompt(100, 14), GREEDY)]   # two chunks: fused
  seen = {}
  out = grouped.prefill([PrefillRequest(rid, p, s, s.seed_u32(0))
                         for rid, p, s in reqs],
                        kv_ready=lambda i, kv: seen.setdefault(i, kv))
  ref = prefill_requests(fused, reqs)
  assert sorted(seen) == [0, 1, 2, 3, 4]
  # One program against several: XLA may fuse and block them differently.
  lp_tol = logprob_tolerance(cfg, MAX_SEQ, logit_scale(params, cfg))
  for i, (r, f) in enumerate(zip(out, ref)):
    assert seen[i] is r.kv
    assert r.first_token == f.first_token, r.request_id
    assert abs(r.first_logprob - f.first_logprob) <= lp_tol
    assert r.kv.shape == f.kv.kv.shape
    assert_kv_close(kv_tokens(r), kv_tokens(f), cfg, MAX_SEQ,
                    err_msg=r.request_id)
  for r in out[:4]:
    assert [g.shape[0] for g in r.kv.layer_groups] == [2, 1]
    assert r.kv.layer_groups[0].sharding.spec[4] == "tp"
  assert out[4].kv.layer_groups == ()
  with pytest.raises(ValueError, match="layer_groups"):
    PrefillConfig(layer_groups=0)


def test_first_tokens_written_to_pinned_host_memory_are_the_same(
    tiny, rules, monkeypatch):
  """Where the devices have pinned host memory (the CPU devices do, as
  GPUs do), the first-token programs write there and the engine reads
  them without a copy: the same first tokens and log-probabilities, bit
  for bit (the same program, only its output's place differs), as an
  engine that copies them from the device. A mesh whose device lacks that
  memory gets the device copy."""
  from pdjax.engine import prefill as prefill_module
  on_host = _prefill_engine(tiny, rules, 2, jax.devices()[:2])
  assert on_host._first_token_on_host
  monkeypatch.setattr(prefill_module, "pinned_host_sharding",
                      lambda mesh: None)
  copied = _prefill_engine(tiny, rules, 2, jax.devices()[:2])
  assert not copied._first_token_on_host
  reqs = [("a", prompt(40, 21), GREEDY), ("b", prompt(20, 22), seeded(5))]
  for got, want in zip(prefill_requests(on_host, reqs),
                       prefill_requests(copied, reqs)):
    assert (got.first_token, got.first_logprob) == (want.first_token,
                                                    want.first_logprob)
  monkeypatch.undo()

  class _NoPinned:
    platform = "cpu"

    def addressable_memories(self):
      return [types.SimpleNamespace(kind="device")]

  mesh = types.SimpleNamespace(devices=np.array([_NoPinned()]))
  monkeypatch.setattr(prefill_module, "spans_processes", lambda m: False)
  assert prefill_module.pinned_host_sharding(mesh) is None


# ------------------------------------------------------------------ decode
def _mixed_requests(tag: str, n: int = 6):
  lengths = (5, 30, 64, 17, 100, 50, 9, 77)
  return [(f"{tag}{i}", prompt(lengths[i % len(lengths)], 100 + i),
           GREEDY if i % 2 == 0 else seeded(1000 + i, 16))
          for i in range(n)]


def test_dp_decode_equivalence(local_prefill, decoders):
  """dp=1, 2 and dp=2 x tp=2 decode pools: identical tokens."""
  reqs = _mixed_requests("dp")
  results = prefill_requests(local_prefill, reqs)
  outs = {}
  for name, engine in decoders.items():
    col = Collector()
    used = set()
    for (rid, p, s), r in zip(reqs, results):
      used.add(submit_decode(engine, rid, p, s, r, col))
    engine.drain()
    assert_clean(engine)
    assert used == set(range(len(engine.replicas))), name
    outs[name] = {rid: (col.tokens(rid), col.reason(rid))
                  for rid, _, _ in reqs}
  for rid, _, s in reqs:
    toks, reason = outs["dp1"][rid]
    assert len(toks) == s.max_tokens and reason == FinishReason.LENGTH
    for name in decoders:
      assert outs[name][rid] == outs["dp1"][rid], (name, rid)


def test_prefill_results_come_out_as_each_is_known(local_prefill):
  """``on_result`` hands each request's result over as soon as its first
  token is on the host: a buffered request's before the next request
  starts, a batch's together once it has run; the same objects the call
  returns, whose tokens are those of a call without it. A request with
  pages to skip and no cached prefix of its own runs bucketed, its KV
  handed on from the first page the receiver lacks."""
  reqs = [PrefillRequest("skip", prompt(40, 1), GREEDY, skip_pages=1),
          PrefillRequest("b1", prompt(10, 2), GREEDY),
          PrefillRequest("b2", prompt(12, 3), GREEDY),
          PrefillRequest("long", prompt(100, 4), GREEDY)]
  events, early = [], {}

  def on_result(i, r):
    events.append(("result", i))
    early[i] = r

  out = local_prefill.prefill(
      reqs, kv_ready=lambda i, kv: events.append(("kv", i)),
      on_result=on_result)
  assert events == [("kv", 3), ("result", 3), ("kv", 0), ("result", 0),
                    ("kv", 1), ("kv", 2), ("result", 1), ("result", 2)]
  assert all(early[i] is r for i, r in enumerate(out))
  assert out[0].kv.first_page == 1
  plain = local_prefill.prefill(reqs)
  assert [(r.first_token, r.prompt_len) for r in out] == [
      (r.first_token, r.prompt_len) for r in plain]


@pytest.mark.parametrize("length", [20, 100])
def test_min_tokens_holds_back_a_stop_as_the_first_token(local_prefill,
                                                         length):
  """A stop id that is the greedy first token: sampled without min_tokens,
  held back with min_tokens 1, for a bucketed prompt (its packed inputs)
  and one longer than every bucket (buffered: its chunks' sampling
  columns); the token taken instead is less likely, its logprob the raw
  distribution's."""
  p = prompt(length, 9)

  def first(**kw):
    s = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, **kw)
    return local_prefill.prefill([PrefillRequest("m", p, s)])[0]

  want = first()
  stop = (want.first_token,)
  assert first(stop_token_ids=stop).first_token == want.first_token
  held = first(stop_token_ids=stop, min_tokens=1)
  assert held.first_token != want.first_token
  assert held.first_logprob < want.first_logprob


def test_iteration_timing(local_prefill, decoders):
  """Each step says how long its launch and delivery took and how many
  generate calls it launched: one per replica with live rows; none once
  the last tokens are only being delivered."""
  engine = decoders["dp2"]
  reqs = _mixed_requests("it", n=2)
  col = Collector()
  used = {submit_decode(engine, rid, p, s, r, col)
          for (rid, p, s), r in zip(reqs, prefill_requests(local_prefill,
                                                           reqs))}
  assert used == {0, 1}
  timings = []
  while engine.has_work:
    engine.step()
    timings.append(engine.last_iteration)
  assert_clean(engine)
  assert timings[0].calls == 2 and timings[0].live_rows == 2
  assert timings[-1].calls == 0 and timings[-1].live_rows == 0
  assert all(t.launch_s > 0 and t.deliver_s > 0 for t in timings)
  # Every step but the first delivered a call, so it waited on the device.
  assert [t.calls for t in timings].count(0) == 1


def test_continuous_batching_matches_alone(local_prefill, decoders):
  """Sequences joining and leaving at different steps (and one cancelled)
  produce what each produces alone; seeded ones whatever the replica."""
  engine, alone_engine = decoders["dp2"], decoders["dp1"]
  specs = [("cb0", 20, GREEDY), ("cb1", 50, seeded(11, 30)),
           ("cb2", 7, seeded(12, 9)), ("cb3", 64, dataclasses.replace(
               GREEDY, max_tokens=21)),
           ("cb4", 90, seeded(14, 17)), ("cb5", 33, seeded(15, 25)),
           ("cb6", 12, GREEDY)]
  reqs = [(rid, prompt(n, 200 + i), s)
          for i, (rid, n, s) in enumerate(specs)]
  res = dict(zip([r[0] for r in reqs], prefill_requests(local_prefill, reqs)))
  by_id = {rid: (p, s) for rid, p, s in reqs}

  def submit(col, eng, rid):
    p, s = by_id[rid]
    return submit_decode(eng, rid, p, s, res[rid], col)

  col = Collector()
  replicas = {}
  for rid in ("cb0", "cb1", "cb2"):
    replicas[rid] = submit(col, engine, rid)
  for _ in range(3):
    engine.step()
  replicas["cb3"] = submit(col, engine, "cb3")
  engine.step()
  engine.step()
  engine.cancel("cb1")                   # mid-generation
  engine.step()
  for rid in ("cb4", "cb5", "cb6"):
    replicas[rid] = submit(col, engine, rid)
  engine.drain()
  assert_clean(engine)
  # The alone runs use replica 0 of dp=1: seeded requests served by either
  # replica of the batch must match them.
  assert {replicas[r] for r in ("cb1", "cb2", "cb4", "cb5")} == {0, 1}
  assert col.finished("cb2") and col.finished("cb0")

  for rid in by_id:
    alone = Collector()
    submit(alone, alone_engine, rid)
    alone_engine.drain()
    assert_clean(alone_engine)
    want = alone.tokens(rid)
    got = col.tokens(rid)
    if rid == "cb1":
      assert col.reason(rid) == FinishReason.ABORT
      assert 1 < len(got) < len(want) and got == want[:len(got)]
    else:
      assert col.reason(rid) == alone.reason(rid) == FinishReason.LENGTH
      assert got == want, (rid, replicas[rid])
      assert len(got) == by_id[rid][1].max_tokens


def test_disaggregated_equals_colocated(prefill_tp, decoders, colo):
  """TP=2 prefill on devices 4-5 -> KV moved -> dp=2 decode on devices 0-1
  gives what colocated serving gives, greedy and seeded."""
  # Prompts in bucket 64 (in pairs) or chunked: the programs the TP engine
  # has compiled already.
  reqs = [("dg0", prompt(40, 300), GREEDY),
          ("dg1", prompt(60, 301), seeded(21, 20)),
          ("dg2", prompt(100, 302), seeded(22, 15)),
          ("dg3", prompt(70, 303), GREEDY),
          ("dg4", prompt(50, 304), seeded(24, 10)),
          ("dg5", prompt(64, 305), dataclasses.replace(GREEDY,
                                                        max_tokens=30))]
  dis = run_disaggregated(prefill_tp[2], decoders["dp2"], reqs)
  col = run_colocated(colo, reqs)
  for rid, _, s in reqs:
    assert dis.reason(rid) == col.reason(rid) == FinishReason.LENGTH
    assert dis.tokens(rid) == col.tokens(rid), rid
    assert len(col.tokens(rid)) == s.max_tokens


@pytest.mark.parametrize("layer_groups", [1, 2])
def test_disaggregated_over_cuda_ipc_equals_colocated(prefill_tp, decoders,
                                                      colo, layer_groups):
  """The same-host path end to end, CUDA driver faked (host memory, real
  byte copies): TP=2 prefill KV copied into a landing region, the decode
  worker's zero-copy view of it inserted by the dp=2 engine, the region
  back in the pool only once that insert has run. One small landing buffer
  for six requests, so regions are reused while earlier requests decode;
  tokens must still be the colocated ones. With the prefill in two layer
  groups each group is its own copy, at its own offset in the region."""
  from pdjax.transfer import cuda_ipc as ci
  from pdjax.v1 import kv_pb2
  engine = decoders["dp2"]
  reqs = [("ci0", prompt(40, 310), GREEDY),
          ("ci1", prompt(60, 311), seeded(31, 20)),
          ("ci2", prompt(100, 312), seeded(32, 15)),
          ("ci3", prompt(70, 313), GREEDY),
          ("ci4", prompt(50, 314), seeded(34, 10)),
          ("ci5", prompt(64, 315), GREEDY)]
  src = prefill_tp[2]
  prefill = (src if layer_groups == 1 else PrefillEngine(
      src.params, src.cfg, src.mesh, src.rules,
      dataclasses.replace(PCFG, layer_groups=layer_groups)))
  results = prefill_requests(prefill, reqs)
  registry = ci.FakeIpcRegistry()
  largest = max(r.kv.payload_bytes for r in results)
  pool = ci.LandingPool(ci.FakeCudaDriver(registry), 0, 1, 2 * largest)
  receiver = ci.CudaIpcReceiver(pool, engine.replicas[0].mesh.devices.flat[0])
  sender = ci.CudaIpcSender(ci.FakeCudaDriver(registry))
  col = Collector()
  try:
    for (rid, p, s), r in zip(reqs, results):
      col(TokenEvent(rid, [r.first_token], [r.first_logprob]))
      while (res := engine.reserve(rid, len(p), s.max_tokens)) is None:
        engine.step()
      for _ in range(200):          # regions come back as inserts complete
        if (slot := pool.acquire(rid, r.kv.payload_bytes)) is not None:
          break
        engine.step()
        engine.borrowed.wait_idle()
      assert slot is not None, f"{rid}: no landing region ever came back"
      receiver.expect(rid, rid)
      dest = kv_pb2.KvDestination(
          transfer_id=rid, ipc_handle=slot.handle, ipc_offset=slot.offset,
          ipc_bytes=slot.nbytes, ipc_deadline_ms=slot.deadline_ms)
      handle = sender.send(r.kv, dest, timeout_s=5)
      rep = engine.replicas[res.replica]
      kv = receiver.receive(handle, rep.payload_sharding(r.kv.shape[2]),
                            timeout_s=5)
      assert kv.borrowed and pool.live() >= 1
      engine.submit(DecodeRequest(rid, p, r.first_token, r.first_logprob,
                                  kv, s, s.seed_u32(0), col,
                                  reservation=res))
    engine.drain()
    assert engine.borrowed.wait_idle()
    assert pool.live() == 0 and pool.free_bytes() == pool.total_bytes
    copies = sum(len(r.kv.pieces) for r in results)
    chunked = sum(len(p) > PCFG.chunk for _, p, _ in reqs)   # run fused
    assert chunked == 2
    assert copies == (len(reqs) if layer_groups == 1
                      else 2 * len(reqs) - chunked)
    assert pool.counts["read"] == len(reqs) and registry.copies == copies
    assert_clean(engine)
  finally:
    sender.close()
    pool.close()
  ref = run_colocated(colo, reqs)
  for rid, _, _ in reqs:
    assert col.tokens(rid) == ref.tokens(rid), rid


def test_borrowed_kv_goes_back_only_after_its_reader_finished():
  """A borrowed KV is released when the program that reads it has
  completed, not when it was dispatched; one dropped unread goes back at
  once; owned KV is left alone."""
  import threading
  from pdjax.engine.borrowed_kv import BorrowedKvReturns

  class Receipt:   # a program still running until `done` is set
    def __init__(self):
      self.done = threading.Event()

    def block_until_ready(self):
      assert self.done.wait(10)
      return self

  released = []
  returns = BorrowedKvReturns()
  payload = jax.numpy.zeros((1,))
  kv = RequestKV(payload, 1, release_fn=lambda: released.append("read"))
  receipt = Receipt()
  returns.after(receipt, kv)
  assert returns.pending == 1 and not returns.wait_idle(0.2)
  assert released == []                     # still being read
  receipt.done.set()
  assert returns.wait_idle()
  assert released == ["read"] and returns.pending == 0 and not kv.borrowed
  unread = RequestKV(payload, 1, release_fn=lambda: released.append("unread"))
  returns.after(None, unread)
  assert released == ["read", "unread"]
  returns.after(Receipt(), RequestKV(payload, 1))   # owned: nothing to wait
  assert returns.pending == 0
  returns.close()


class _Reading:
  """A receipt whose program runs until ``done`` is set."""

  def __init__(self):
    import threading
    self.done = threading.Event()

  def block_until_ready(self):
    assert self.done.wait(10)
    return self


def test_closing_borrowed_kv_returns_gives_everything_back_then_ends():
  """close waits for the programs still reading borrowed KVs, gives those
  back and ends the waiter thread; one read past the timeout is left to the
  thread rather than given back while possibly being read. A borrowed KV
  after a close starts a new thread."""
  import threading
  from pdjax.engine.borrowed_kv import BorrowedKvReturns
  released = []
  payload = jax.numpy.zeros((1,))

  def borrowed(name):
    return RequestKV(payload, 1, release_fn=lambda: released.append(name))

  returns = BorrowedKvReturns()
  assert returns.close()                    # never started: nothing to do
  first, second = _Reading(), _Reading()
  returns.after(first, borrowed("a"))
  returns.after(second, borrowed("b"))
  thread = returns._thread
  threading.Timer(0.1, first.done.set).start()
  threading.Timer(0.2, second.done.set).start()
  assert returns.close()
  assert released == ["a", "b"] and returns.pending == 0
  assert not thread.is_alive()

  stuck = _Reading()
  returns.after(stuck, borrowed("c"))       # a fresh thread
  thread = returns._thread
  assert thread.is_alive()
  assert not returns.close(0.1)             # still being read: kept
  assert released == ["a", "b"] and returns.pending == 1
  stuck.done.set()
  thread.join(10)
  assert not thread.is_alive()
  assert released == ["a", "b", "c"] and returns.pending == 0


def test_stopping_the_decode_worker_gives_borrowed_kv_back(colo):
  """DecodeWorker.stop closes the engine: a borrowed KV whose insert is
  still running goes back once it has finished, and the waiter thread
  ends (before, it lived on and pending KVs were never given back)."""
  import threading
  from pdjax.service.decode_service import DecodeWorker
  from pdjax.transfer.base import KvReceiver

  class Receiver(KvReceiver):
    def receive(self, handle, sharding, *, timeout_s):
      raise AssertionError("nothing is received here")

  released = []
  worker = DecodeWorker(colo, Receiver())
  worker.start()
  borrowed = colo.decode.borrowed
  inserting = _Reading()
  borrowed.after(inserting, RequestKV(jax.numpy.zeros((1,)), 1,
                                      release_fn=lambda: released.append(1)))
  thread = borrowed._thread
  threading.Timer(0.2, inserting.done.set).start()
  worker.stop()
  assert released == [1] and borrowed.pending == 0
  assert not thread.is_alive() and not worker.loop._thread.is_alive()
  assert_clean(colo)


def test_closing_the_decode_engine_aborts_queued_requests_and_gives_kv_back(
    decoders):
  """A request queued with a borrowed KV when the engine closes is never
  read: aborted, its reservation returned and its KV given back."""
  engine = decoders["dp1"]
  col = Collector()
  released = []
  p = prompt(20, 400)
  res = engine.reserve("q0", len(p), GREEDY.max_tokens)
  kv = RequestKV(jax.numpy.zeros((1,)), len(p),
                 release_fn=lambda: released.append("q0"))
  engine.submit(DecodeRequest("q0", p, 7, -0.5, kv, GREEDY,
                              GREEDY.seed_u32(0), col, reservation=res))
  assert engine.has_work and released == []
  assert engine.close()
  assert released == ["q0"] and col.reason("q0") == FinishReason.ABORT
  assert_clean(engine)


# ------------------------------------------------------------------ serving
def test_no_compiles_while_serving(colo):
  """After warm-up, 200 requests of random shapes compile nothing, rows
  preempted and resumed (swapped out and back) included."""
  rng = np.random.default_rng(2024)
  col = Collector()
  reqs = []
  for i in range(200):
    n = int(rng.integers(1, MAX_SEQ))     # up to 127: some chunked
    mt = int(rng.integers(1, 40))
    stops = tuple(int(t) for t in rng.integers(3, 512, i % 4))
    s = (seeded(int(rng.integers(1 << 31)), mt, ignore_eos=bool(i % 2),
                stop_token_ids=stops) if i % 3 else
         dataclasses.replace(GREEDY, max_tokens=mt, ignore_eos=bool(i % 2)))
    reqs.append((f"z{i}", prompt(n, 5000 + i), s))
  # Then whole contexts, more than there are rows: a row admitted as
  # another ends takes pages the older rows then need, and is swapped out.
  longs = [(f"long{i}", prompt(30 + i, 6000 + i),
            dataclasses.replace(GREEDY, max_tokens=1000)) for i in range(12)]
  before = compile_stats.compile_count()
  swapped = colo.decode.preemption_stats()["preempted_swap"]
  with compile_stats.CompileCounter() as c:
    pending = collections.deque(reqs)
    while pending or colo.has_work:
      # Arrivals in random waves between engine iterations.
      for _ in range(int(rng.integers(0, 12))):
        if pending:
          rid, p, s = pending.popleft()
          colo.submit(rid, p, s, col, seed_u32=s.seed_u32(0))
      colo.step()
    for rid, p, s in longs:
      colo.submit(rid, p, s, col)
    colo.drain()
  reqs += longs
  assert c.count == 0, f"serving compiled: {c.names}"
  assert compile_stats.compile_count() == before
  assert colo.decode.preemption_stats()["preempted_swap"] > swapped
  assert_clean(colo)
  reasons = collections.Counter(col.reason(rid) for rid, _, _ in reqs)
  assert reasons[FinishReason.STOP] >= 5 and reasons[FinishReason.LENGTH] > 100
  for rid, p, s in reqs:
    toks, reason = col.tokens(rid), col.reason(rid)
    assert 1 <= len(toks) <= s.max_tokens
    assert len(p) + len(toks) <= MAX_SEQ
    if reason == FinishReason.LENGTH:
      assert len(toks) == min(s.max_tokens, MAX_SEQ - len(p)), rid
    else:
      assert reason == FinishReason.STOP, rid
      assert toks[-1] in s.stop_token_ids or (
          not s.ignore_eos and toks[-1] in colo.decode.eos_ids), rid
      assert not set(toks[:-1]) & set(s.stop_token_ids), rid


def test_no_compiles_decode_side_of_disaggregation(prefill_tp, decoders):
  """KV from a TP=1 prefill moved onto dp=2 x tp=2 replicas: splitting the
  KV heads finer than the source compiles a slicing program per payload
  size unless warm-up did it (``source_sharding``)."""
  src, engine = prefill_tp[1], decoders["dp2tp2"]
  engine.warmup(src.payload_page_counts(), source_sharding=src.kv_sharding)
  assert_clean(engine)
  # Bucket-64 pairs and chunked prompts: programs the TP=1 engine has
  # compiled already (prefill is not what this test counts).
  reqs = [(f"ds{i}", prompt(n, 1200 + i), seeded(i, 9) if i % 2 else GREEDY)
          for i, n in enumerate((40, 50, 64, 100, 120, 70, 33, 90))]
  results = prefill_requests(src, reqs)
  col = Collector()
  with compile_stats.no_compiles("disaggregated decode"):
    for (rid, p, s), r in zip(reqs, results):
      submit_decode(engine, rid, p, s, r, col)
    engine.drain()
  assert_clean(engine)
  for rid, p, s in reqs:
    assert col.reason(rid) == FinishReason.LENGTH
    assert len(col.tokens(rid)) == min(s.max_tokens, MAX_SEQ - len(p))


def test_invalid_requests(tiny, rules, colo):
  cfg = tiny[0]

  def field(prompt_ids, sampling=GREEDY, engine=colo):
    with pytest.raises(InvalidRequest) as e:
      engine.submit("bad", prompt_ids, sampling, Collector())
    assert str(e.value).startswith(e.value.field + ":")
    return e.value.field

  assert field(prompt(MAX_SEQ, 1)) == "prompt"            # no room to decode
  assert field(prompt(MAX_SEQ + 50, 1)) == "prompt"
  assert field([]) == "prompt"
  assert field([5, cfg.vocab_size, 7]) == "prompt_token_ids"
  assert field([5, -1]) == "prompt_token_ids"
  assert field([5], dataclasses.replace(GREEDY, max_tokens=0)) == "max_tokens"
  assert field([5], dataclasses.replace(GREEDY, top_p=0.0)) == "top_p"
  assert field([5], dataclasses.replace(
      GREEDY, stop_token_ids=(cfg.vocab_size,))) == "stop_token_ids"
  # A replica with fewer pages than one full-length sequence needs: a budget
  # it can never hold is refused up front, naming max_tokens.
  small_dcfg = dataclasses.replace(DCFG, num_pages=6)
  mesh = make_mesh({"dp": 1}, jax.devices()[:1])
  small = ColocatedEngine(shard_params(tiny[1], cfg, rules["decode_dp"], mesh),
                          cfg, mesh, rules["decode_dp"], PCFG, small_dcfg)
  assert field(prompt(10, 1), dataclasses.replace(GREEDY, max_tokens=100),
               engine=small) == "max_tokens"
  small.validate(prompt(10, 1), dataclasses.replace(GREEDY, max_tokens=60))
  with pytest.raises(InvalidRequest, match="^max_tokens"):
    small.decode.reserve("x", 10, 100)
  assert_clean(colo)
  assert_clean(small)


def test_cache_full_requests_queue(colo):
  """More whole contexts than the pool holds: requests take rows as they
  come (their pages are allocated as they grow), wait for a row when none
  is free, are preempted as they fill the pool, and all complete."""
  reqs = [(f"q{i}", prompt(30 + i, 400 + i),
           dataclasses.replace(GREEDY, max_tokens=1000)) for i in range(10)]
  col = Collector()
  for rid, p, s in reqs:
    colo.submit(rid, p, s, col)
  for _ in range(3):                     # admits max_batch per replica a step
    colo.step()
  # 4 rows per replica: eight run, the rest wait (whole budgets of 8 pages
  # in 31 would have run three per replica).
  assert colo.num_waiting == 2
  assert colo.decode.kv_usage()["rows_live"] == 8
  colo.drain()
  assert_clean(colo)
  assert colo.decode.preemption_stats()["preempted_swap"] > 0
  for rid, p, _ in reqs:
    assert col.reason(rid) == FinishReason.LENGTH
    assert len(p) + len(col.tokens(rid)) == MAX_SEQ


def test_reserve_returns_none_when_full(decoders):
  engine = decoders["dp1"]
  # Pages run out: a 120-token prompt takes its whole context, 8 pages
  # (prompt and first calls), and the pool has 31.
  got = [engine.reserve(f"r{i}", 120, 1000) for i in range(4)]
  assert [g is not None for g in got] == [True, True, True, False]
  assert engine.kv_usage()["pages_reserved"] == 24
  assert engine.reserve("r0", 30, 1000) is got[0]       # idempotent
  for i in range(3):
    engine.unreserve(f"r{i}")
  # Rows run out: 4 rows even though pages remain. A 30-token prompt
  # without a small max_tokens is promised 3 pages (its prompt and first
  # two calls' tokens), not its budget of 8.
  got = [engine.reserve(f"s{i}", 30, 1000) for i in range(5)]
  assert [g is not None for g in got] == [True] * 4 + [False]
  assert engine.kv_usage()["pages_reserved"] == 12
  for i in range(4):
    engine.unreserve(f"s{i}")
  assert_clean(engine)


def test_row_stays_counted_while_its_request_is_admitted(local_prefill,
                                                         decoders):
  """A reserve() from a service thread that lands while the engine thread
  is inserting a reserved request must still count that request's row: a
  full replica refuses rather than promising the row twice (which made the
  second insert fail with an internal error under load)."""
  engine = decoders["dp1"]                   # one replica of 4 rows
  reqs = [(f"a{i}", prompt(12, 950 + i), GREEDY) for i in range(4)]
  col = Collector()
  for (rid, p, s), r in zip(reqs, prefill_requests(local_prefill, reqs)):
    submit_decode(engine, rid, p, s, r, col)
  rep = engine.replicas[0]
  seen = []
  real_insert = rep.insert

  def insert_and_race(req, reservation):
    seen.append(engine.reserve(f"late-{req.request_id}", 5, 5))
    # A stray unreserve (another thread) cannot free it mid-admission.
    assert engine.unreserve(req.request_id) is None
    row = real_insert(req, reservation)
    seen.append(engine.reserve(f"late2-{req.request_id}", 5, 5))
    return row

  rep.insert = insert_and_race
  try:
    engine.step()                            # admits all four
  finally:
    del rep.insert
  assert len(seen) == 8 and seen[-1] is None
  # Before its row is taken, a request's reservation still holds its row.
  assert [s is None for s in seen[::2]] == [True] * 4
  assert rep.live_rows == 4
  engine.drain()
  for rid, _, _ in reqs:
    assert col.reason(rid) == FinishReason.LENGTH
  assert_clean(engine)


# ------------------------------------------------------------------ stops
def _reference(colo, p, max_tokens=60):
  """Greedy continuation ignoring EOS (the unconstrained output)."""
  s = dataclasses.replace(GREEDY, max_tokens=max_tokens)
  return run_colocated(colo, [("ref", p, s)]).tokens("ref")


def test_max_tokens_and_capacity(colo):
  p = prompt(23, 500)
  ref = _reference(colo, p, 11)
  reqs = [(f"mt{m}", p, dataclasses.replace(GREEDY, max_tokens=m))
          for m in (1, 2, 4, 5, 11)]
  col = run_colocated(colo, reqs)
  for rid, _, s in reqs:
    assert col.reason(rid) == FinishReason.LENGTH
    assert col.tokens(rid) == ref[:s.max_tokens]        # first token counts
  # Capacity: prompt + generated stops at max_seq_len, however large
  # max_tokens is; a prompt of max_seq_len - 1 gets exactly one token.
  reqs = [(f"cap{n}", prompt(n, 600 + n),
           dataclasses.replace(GREEDY, max_tokens=500)) for n in (127, 126,
                                                                  100, 61)]
  col = run_colocated(colo, reqs)
  for rid, p, _ in reqs:
    assert col.reason(rid) == FinishReason.LENGTH, rid
    assert len(p) + len(col.tokens(rid)) == MAX_SEQ, rid


def test_stop_token_ids(colo):
  p = prompt(37, 700)
  ref = _reference(colo, p, 30)
  k = next(i for i in range(3, len(ref)) if ref[i] not in ref[:i])
  reqs = [("stop-mid", p, dataclasses.replace(
              GREEDY, max_tokens=30, stop_token_ids=(ref[k], 511))),
          ("stop-first", p, dataclasses.replace(
              GREEDY, max_tokens=30, stop_token_ids=(ref[0],)))]
  col = run_colocated(colo, reqs)
  assert col.reason("stop-mid") == FinishReason.STOP
  assert col.tokens("stop-mid") == ref[:k + 1]          # stop id included
  assert col.reason("stop-first") == FinishReason.STOP
  assert col.tokens("stop-first") == ref[:1]


def test_eos_from_config(colo, tiny):
  """EOS (cfg.eos_token_ids) ends a sequence with STOP unless ignore_eos."""
  eos = tiny[0].eos_token_ids
  assert eos == colo.decode.eos_ids and eos
  # Find prompts whose unconstrained greedy output contains EOS: the model
  # is random, so search a batch of them (cheap: no compiles).
  cands = [(f"e{i}", prompt(int(n), 800 + i), dataclasses.replace(
      GREEDY, max_tokens=40)) for i, n in enumerate(
          np.random.default_rng(8).integers(4, 60, 48))]
  ref = run_colocated(colo, cands)
  hits = [(rid, p, ref.tokens(rid)) for rid, p, _ in cands
          if set(ref.tokens(rid)) & set(eos)]
  assert hits, "no greedy output of 48 prompts contains EOS"
  reqs = []
  for rid, p, toks in hits[:4]:
    reqs.append((rid, p, dataclasses.replace(GREEDY, max_tokens=40,
                                             ignore_eos=False)))
  col = run_colocated(colo, reqs)
  for rid, p, toks in hits[:4]:
    k = next(i for i, t in enumerate(toks) if t in eos)
    assert col.reason(rid) == FinishReason.STOP, rid
    assert col.tokens(rid) == toks[:k + 1], rid


# ------------------------------------------------------------------ cancel
def test_cancellation_frees_everything(colo, local_prefill, decoders):
  # Colocated: cancelled while waiting, and while running.
  col = Collector()
  long = dataclasses.replace(GREEDY, max_tokens=60)
  colo.submit("c-wait", prompt(20, 900), long, col)
  colo.cancel("c-wait")
  colo.submit("c-run", prompt(20, 901), long, col)
  colo.submit("c-keep", prompt(25, 902), dataclasses.replace(
      GREEDY, max_tokens=9), col)
  for _ in range(3):
    colo.step()
  assert col.tokens("c-run") and not col.finished("c-run")
  colo.cancel("c-run")
  colo.drain()
  assert col.reason("c-wait") == FinishReason.ABORT
  assert col.tokens("c-wait") == []
  assert col.reason("c-run") == FinishReason.ABORT
  assert 1 < len(col.tokens("c-run")) < 60
  assert col.reason("c-keep") == FinishReason.LENGTH
  assert len(col.tokens("c-keep")) == 9
  assert_clean(colo)

  # Decode pool: cancelled after reserve (KV still "in transfer"), and
  # cancelled while queued in the inbox.
  engine = decoders["dp2"]
  reqs = [("d-inflight", prompt(20, 903), long),
          ("d-inbox", prompt(30, 904), long)]
  r0, r1 = prefill_requests(local_prefill, reqs)
  col = Collector()
  res = engine.reserve("d-inflight", 20, 60)
  engine.cancel("d-inflight")
  engine.step()
  engine.submit(DecodeRequest("d-inflight", reqs[0][1], r0.first_token,
                              r0.first_logprob, r0.kv, long, 0, col,
                              reservation=res))
  submit_decode(engine, *reqs[1], r1, col)
  engine.cancel("d-inbox")
  engine.drain()
  assert col.reason("d-inflight") == FinishReason.ABORT
  assert col.reason("d-inbox") == FinishReason.ABORT
  assert_clean(engine)


def test_sampling_path_chosen_on_the_host_matches_the_device_choice():
  """``sample`` with the path fixed by the caller (what the decode loop
  does, so its calls dispatch ahead) gives the tokens the on-device
  ``lax.cond`` gives: argmax for greedy rows, and for a mixed batch the same
  draws for the sampled rows."""
  from pdjax.engine.sampling import sample
  rng = np.random.default_rng(5)
  logits = jnp.asarray(rng.standard_normal((4, 64)) * 3, jnp.float32)
  args = (jnp.asarray([1.0, 1.0, 1.0, 1.0]), jnp.asarray([0.9] * 4),
          jnp.asarray([8, 0, 8, 0], jnp.int32), jnp.asarray([0.0, 0.05] * 2),
          jnp.asarray([1, 2, 3, 4], jnp.uint32), jnp.zeros((4,), jnp.int32))
  greedy_t = jnp.zeros((4,))
  mixed_t = jnp.asarray([0.0, 0.7, 0.0, 1.3])
  argmax = np.asarray(jnp.argmax(logits, -1))
  for fixed in (None, True, False):
    tok, lp = sample(logits, greedy_t, *args[1:], all_greedy=fixed)
    np.testing.assert_array_equal(np.asarray(tok), argmax)
  want, want_lp = sample(logits, mixed_t, *args[1:])
  got, got_lp = sample(logits, mixed_t, *args[1:], all_greedy=False)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # The same log_softmax of the same logits at the same tokens, whichever
  # path chose them: bit for bit.
  np.testing.assert_array_equal(np.asarray(got_lp), np.asarray(want_lp))
  assert (np.asarray(got)[[0, 2]] == argmax[[0, 2]]).all()
  # A sampled batch does draw: on flat logits, tokens off the argmax.
  flat = logits / 10
  drawn, _ = sample(flat, *args, all_greedy=False)
  assert (np.asarray(drawn) != np.asarray(jnp.argmax(flat, -1))).any()


def test_decode_dispatch_picks_the_program_for_its_rows(local_prefill,
                                                        decoders):
  """All active rows greedy: the greedy program; one sampled row: the
  sampled one (finished rows' settings do not count)."""
  engine = decoders["dp1"]
  rep = engine.replicas[0]
  used = []
  programs = rep.programs
  real = programs.generate
  try:
    programs.generate = lambda g, rows: used.append(g) or real(g, rows)
    col = Collector()
    reqs = [("pg0", prompt(20, 71), GREEDY),
            ("pg1", prompt(20, 72), seeded(3, 4))]
    results = prefill_requests(local_prefill, reqs)
    submit_decode(engine, *reqs[0], results[0], col)
    engine.step()
    assert rep.all_greedy() and used[-1] is True
    submit_decode(engine, *reqs[1], results[1], col)
    engine.step()
    assert not rep.all_greedy() and used[-1] is False
    engine.drain()            # the sampled row ends first (4 tokens)
    assert False in used and used[-1] is True
  finally:
    del programs.generate
  assert_clean(engine)


def test_generate_gemm_choice():
  """The generate program's GEMM kernels: cuBLAS from CUBLAS_MIN_ROWS rows
  on GPUs unless told otherwise (or the projections are FP8 read by bf16
  activations), decided per program's row count; no option at all off
  GPUs (a CPU compiler rejects GPU options)."""
  from pdjax.engine.decode_programs import (CUBLAS_MIN_ROWS,
                                            generate_compiler_options)
  many = DecodeConfig(max_seqs=CUBLAS_MIN_ROWS)
  one = DecodeConfig(max_seqs=1)
  # A pool's programs of fewer rows than CUBLAS_MIN_ROWS take Triton.
  assert generate_compiler_options(
      DecodeConfig(max_seqs=64), "gpu", rows=CUBLAS_MIN_ROWS - 1) == \
      generate_compiler_options(one, "gpu")
  apart = {"xla_gpu_dot_merger_threshold_mb": 0}
  assert generate_compiler_options(many, "gpu") == {
      "xla_gpu_enable_triton_gemm": False, **apart}
  assert generate_compiler_options(one, "gpu") == {
      "xla_gpu_enable_triton_gemm": True, **apart}
  assert generate_compiler_options(
      dataclasses.replace(many, triton_gemm="on"), "cuda") == {
          "xla_gpu_enable_triton_gemm": True, **apart}
  assert generate_compiler_options(
      dataclasses.replace(one, triton_gemm="off"), "gpu") == {
          "xla_gpu_enable_triton_gemm": False, **apart}
  # DotMerger left to XLA's default only when asked for.
  assert generate_compiler_options(
      dataclasses.replace(many, merge_dots="on"), "gpu") == {
          "xla_gpu_enable_triton_gemm": False}
  assert generate_compiler_options(many, "cpu") is None
  # FP8 projections read by bf16 activations: Triton at every row count,
  # unless told otherwise.
  assert generate_compiler_options(
      DecodeConfig(max_seqs=128), "gpu", rows=128, fp8_weights_only=True) \
      == {"xla_gpu_enable_triton_gemm": True, **apart}
  assert generate_compiler_options(
      dataclasses.replace(many, triton_gemm="off"), "gpu",
      fp8_weights_only=True) == {
          "xla_gpu_enable_triton_gemm": False, **apart}
  with pytest.raises(ValueError, match="triton_gemm"):
    DecodeConfig(triton_gemm="cublas")
  with pytest.raises(ValueError, match="merge_dots"):
    DecodeConfig(merge_dots="yes")


def test_prefill_batch_token_cap(tiny, rules, prefill_tp, monkeypatch):
  """max_batch_tokens caps the prompts of one batched program by its
  bucket (never below one prompt); a capped engine's results equal the
  uncapped engine's, and the deployment file's setting reaches it."""
  from pdjax.config import DeploymentConfig
  cap = PrefillConfig(buckets=(16, 32, 64), max_batch=4, page_size=PAGE,
                      max_seq_len=MAX_SEQ, max_batch_tokens=64)
  assert [cap.batch_limit(b) for b in (16, 32, 64)] == [4, 2, 1]
  assert [cap.batch_sizes(b) for b in (16, 32, 64)] == [[1, 2, 4], [1, 2],
                                                          [1]]
  assert PCFG.batch_sizes(64) == [1, 2]            # no cap: max_batch
  # Prompts over a cached prefix: each row holds a whole chunk buffer
  # (max_seq_len rounded up to the largest bucket, plus one), and those
  # positions count against the cap.
  eight_k = PrefillConfig(buckets=(512, 8192), max_batch=4,
                          max_seq_len=8192, max_batch_tokens=8192)
  assert eight_k.chunk_buffer_len == 16384
  assert eight_k.cached_batch_sizes(512) == [1]
  assert dataclasses.replace(
      eight_k, max_batch_tokens=49152).cached_batch_sizes(512) == [1, 2, 3]
  assert dataclasses.replace(
      eight_k, max_batch_tokens=0).cached_batch_sizes(512) == [1, 2, 4]
  assert dataclasses.replace(cap, max_batch_tokens=8).batch_limit(16) == 1
  with pytest.raises(ValueError, match="max_batch_tokens"):
    dataclasses.replace(cap, max_batch_tokens=-1)
  capped = _prefill_engine(tiny, rules, 1, jax.devices()[6:7],
                           dataclasses.replace(PCFG, max_batch_tokens=32))
  sizes = []
  run = capped._prefill_batch
  monkeypatch.setattr(capped, "_prefill_batch", lambda reqs, bucket, **kw: (
      sizes.append((bucket, len(reqs))), run(reqs, bucket, **kw))[1])
  reqs = [PrefillRequest(f"r{i}", prompt(n, 40 + i), GREEDY, 0)
          for i, n in enumerate((40, 50, 12, 9))]
  got = capped.prefill(reqs)
  want = prefill_tp[1].prefill(reqs)
  assert sorted(sizes) == [(16, 2), (64, 1), (64, 1)]
  for g, w in zip(got, want):
    assert g.first_token == w.first_token
    # Another batch size: the matmuls may be blocked differently.
    assert_kv_close(np.asarray(g.kv.kv), np.asarray(w.kv.kv), tiny[0],
                    MAX_SEQ, err_msg=g.request_id)
  dep = DeploymentConfig.load("gpu-8b")
  assert dep.prefill_engine_config().max_batch_tokens == 8192


def test_prefill_gemm_choice():
  """Prefill programs take cuBLAS on GPUs unless told Triton; nothing off
  GPUs; a deployment file's [prefill] triton_gemm reaches the engine."""
  from pdjax.config import DeploymentConfig
  from pdjax.engine.prefill import prefill_compiler_options
  apart = {"xla_gpu_dot_merger_threshold_mb": 0}
  assert prefill_compiler_options(PrefillConfig(), "gpu") == {
      "xla_gpu_enable_triton_gemm": False, **apart}
  assert prefill_compiler_options(PrefillConfig(triton_gemm="on"),
                                  "cuda") == {
                                      "xla_gpu_enable_triton_gemm": True,
                                      **apart}
  assert prefill_compiler_options(PrefillConfig(triton_gemm="on"),
                                  "cpu") is None
  with pytest.raises(ValueError, match="triton_gemm"):
    PrefillConfig(triton_gemm="cublas")
  assert prefill_compiler_options(PrefillConfig(merge_dots="on"),
                                  "gpu") == {
      "xla_gpu_enable_triton_gemm": False}
  with pytest.raises(ValueError, match="merge_dots"):
    PrefillConfig(merge_dots="never")
  from pdjax.config import resolve
  dep = DeploymentConfig.load("gpu-8b")
  assert dep.prefill_engine_config().triton_gemm == "auto"
  dep = resolve("gpu-8b", {"prefill": {"triton_gemm": "on"}})
  assert dep.prefill_engine_config().triton_gemm == "on"
  # The deployment file's DotMerger settings reach both engines.
  assert dep.prefill_engine_config().merge_dots == "auto"
  assert dep.decode_engine_config().merge_dots == "auto"
  dep = resolve("gpu-8b", {"decode": {"merge_dots": "on"}})
  assert dep.decode_engine_config().merge_dots == "on"


def test_paged_attention_glue_matches_the_gather(tiny, monkeypatch):
  """decode_forward's cuDNN paged-attention path (GPU only) exercised on CPU
  with cuDNN's own argument checks (``check_layout``: block count, page
  table shape, dtypes) and a reference kernel standing in for cuDNN: the
  logits equal the gather path's, so the table padding, layer offsets,
  lengths and scale handed to cuDNN are right. Also: the selection never
  picks it off GPUs, and asking for it there is an error that says why."""
  import jax.numpy as jnp
  from jax._src.cudnn import fused_attention_stablehlo as fa
  from pdjax.engine.decode_programs import use_paged_attention
  from pdjax.model import llama
  cfg0, params0, _ = tiny
  cfg = cfg0.replace(dtype="bfloat16")
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params0)
  calls = []

  def fake_paged(q, k, v, q_seqlen, kv_seqlen, pt_k, pt_v, *, scale,
                 mask_type, qkv_layout):
    fa.check_layout(q, k, v, None, q_seqlen, kv_seqlen, None, None, pt_k,
                    pt_v, fa.AttentionLayout.BTNH)
    assert mask_type == fa.MaskType.PADDING and qkv_layout == "BTNH"
    calls.append(pt_k.shape)
    pages = pt_k[:, 0, :, 0]                           # [B, W]
    B, W = pages.shape
    kk = k[pages].reshape(B, W * k.shape[1], *k.shape[2:])
    vv = v[pages].reshape(B, W * v.shape[1], *v.shape[2:])
    return jax.nn.dot_product_attention(
        q, kk, vv, scale=scale, query_seq_lengths=q_seqlen,
        key_value_seq_lengths=kv_seqlen, implementation="xla")

  monkeypatch.setattr(fa, "paged_attention", fake_paged)
  B, N, P, M = 2, 6, 16, 2          # 2 layers x 6 pages = 12 blocks = 2 x 6
  L, K, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
  rng = np.random.default_rng(0)
  pool = jnp.asarray(rng.normal(size=(L * N, P, K, hd)), jnp.bfloat16)
  table = jnp.asarray([[1, 2], [4, 5]], jnp.int32)
  positions = jnp.asarray([20, 7], jnp.int32)
  tokens = jnp.asarray([5, 9], jnp.int32)
  out = {}
  for paged in (None, "cudnn"):
    out[bool(paged)] = llama.decode_forward(
        params, tokens, positions, pool, pool, table, cfg=cfg,
        paged_attention=paged)
  assert calls == [(B, 1, L * N // B, 1)]   # the layer loop traces once
  # Both run XLA's attention, the stand-in over all L * N // B pages a row
  # may hold (masked) rather than M: its float32 sums run in another order,
  # so a bfloat16 rounding of the scores, the probabilities or the output
  # of a layer's attention may land the other way (tests/tolerances.py).
  keys = L * N // B * P                # the keys the stand-in reads
  before = tolerance([signed(hd), positive(keys), positive(keys)], 1.0)
  assert_close(out[True].logits, out[False].logits,
               [rounding_flip(before, BF16)] * 3 * L, err_msg="logits")
  np.testing.assert_array_equal(np.asarray(out[True].k_pool),
                                np.asarray(out[False].k_pool))
  # Off GPUs the gather always; "paged" asked for there is refused.
  dcfg = DecodeConfig(max_seqs=2, num_pages=N, page_size=P, max_seq_len=M * P)
  assert not use_paged_attention(cfg, dcfg, "cpu", 1)
  with pytest.raises(ValueError, match="one device per decode replica"):
    use_paged_attention(cfg, dataclasses.replace(dcfg, attention="paged"),
                        "cpu", 1)
  with pytest.raises(ValueError, match="attention"):
    DecodeConfig(attention="flash")


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
def test_pallas_paged_attention_in_the_step_matches_the_gather(tiny,
                                                               kv_dtype):
  """decode_forward with the Pallas kernel reading the pages in place
  (interpreted on CPU) against the gather, float32 model over a float32 or
  an FP8 pool (widened exactly): the same logits but for the order of
  float32 sums, the same pools. (The kernel's bf16 arithmetic is held to
  the float32 reference in tests/test_pallas_attention.py.)"""
  import jax.numpy as jnp
  from pdjax.model import llama
  from tolerances import kv_weights, logit_weights
  cfg, params, _ = tiny
  N, P, M = 6, 16, 3
  L, K, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
  rng = np.random.default_rng(0)
  pool_dtype = jnp.float8_e4m3fn if kv_dtype == "fp8" else jnp.float32
  k = jnp.asarray(rng.normal(size=(L * N, P, K, hd)), pool_dtype)
  v = jnp.asarray(rng.normal(size=(L * N, P, K, hd)), pool_dtype)
  # Rows of 36, 8 and 1 keys; stale pages past them hold other values.
  table = jnp.asarray([[1, 2, 3], [4, 0, 0], [5, 3, 2]], jnp.int32)
  positions = jnp.asarray([35, 7, 0], jnp.int32)
  tokens = jnp.asarray([5, 9, 2], jnp.int32)
  out = {paged: llama.decode_forward(params, tokens, positions, k, v, table,
                                     cfg=cfg, paged_attention=paged)
         for paged in (None, "pallas")}
  weights = logit_weights(cfg, M * P)
  if kv_dtype == "fp8":
    # Layer 1's new K/V, within float32 rounding of each other, are stored
    # in e4m3 (u = 2**-4): a store may round the other way.
    before = tolerance(kv_weights(cfg, 1, M * P), 1.0)
    weights += [rounding_flip(before, 2.0 ** -4)] * 2
  assert_close(out["pallas"].logits, out[None].logits, weights,
               scale=logit_scale(params, cfg), err_msg="logits")
  # Layer 0's writes come before any attention: the same bits.
  for name in ("k_pool", "v_pool"):
    np.testing.assert_array_equal(
        np.asarray(getattr(out["pallas"], name)[:N]).view(np.uint8),
        np.asarray(getattr(out[None], name)[:N]).view(np.uint8))


def test_auto_attention_reads_pages_in_place_with_pallas_where_cudnn_cannot(
    tiny):
  """On one GPU an FP8 pool's pages are read in place by the Pallas kernel
  (cuDNN's reads no FP8), and so are a bf16 pool's where cuDNN's kernel
  does not take its block count. Off GPUs, or a replica spanning devices,
  the gather; "pallas" asked for where it cannot run is an error that
  says why, and batch-invariant pools refuse it."""
  from pdjax.engine.decode_programs import use_paged_attention
  cfg = tiny[0].replace(dtype="bfloat16")
  fp8 = DecodeConfig(max_seqs=8, num_pages=33, page_size=16, max_seq_len=64,
                     kv_dtype="fp8")
  assert use_paged_attention(cfg, fp8, "gpu", 1) == "pallas"
  assert use_paged_attention(cfg, fp8, "gpu", 2) is None
  assert use_paged_attention(cfg, fp8, "cpu", 1) is None
  bf16 = dataclasses.replace(fp8, kv_dtype="auto")
  assert use_paged_attention(cfg, bf16, "gpu", 1) == "pallas"  # 66 % 8
  assert use_paged_attention(
      cfg, dataclasses.replace(bf16, attention="pallas"), "gpu", 1) == "pallas"
  assert use_paged_attention(
      cfg, dataclasses.replace(fp8, attention="gather"), "gpu", 1) is None
  with pytest.raises(ValueError, match="attention='pallas' needs a GPU"):
    use_paged_attention(cfg, dataclasses.replace(fp8, attention="pallas"),
                        "cpu", 1)
  with pytest.raises(ValueError, match="page_size powers of two"):
    use_paged_attention(
        cfg, dataclasses.replace(fp8, attention="pallas", page_size=12,
                                 max_seq_len=48), "gpu", 1)
  with pytest.raises(ValueError, match="batch_invariant"):
    dataclasses.replace(fp8, attention="pallas", batch_invariant=True)


def test_prefill_inputs_travel_packed_exactly():
  """A bucketed prefill's inputs go to the device as one int32 array: the
  prompt, its length and every sampling setting come out of it bit for bit
  (a seed past 2**31, float settings as their bits), and the first tokens
  and logprobs come back out of one array likewise."""
  from pdjax.engine.prefill import (COLUMNS_PAST_PROMPT, _held_back,
                                    _pack_outputs, _penalties,
                                    _unpack_inputs, _unpack_sampling,
                                    pack_inputs, prompt_seen,
                                    unpack_outputs)
  from pdjax.engine.sampling import SamplingArrays
  tokens = np.arange(12, dtype=np.int32).reshape(2, 6)
  true_len = np.array([6, 3], np.int32)
  params = [SamplingParams(temperature=0.7, top_p=0.93, top_k=40, min_p=0.07,
                           min_tokens=3, stop_token_ids=(9, 11),
                           presence_penalty=-0.3, frequency_penalty=1.7,
                           repetition_penalty=1.15),
            SamplingParams(temperature=0.0, ignore_eos=True)]
  samp = SamplingArrays.stack([(params[0], 0xFFFFFFF0), (params[1], 5)], 2)
  packed = pack_inputs(tokens, true_len, samp)
  assert packed.shape == (2, 6 + COLUMNS_PAST_PROMPT)
  assert packed.dtype == np.int32
  got_tokens, got_len, cols = jax.jit(_unpack_inputs)(packed)
  got_samp = jax.jit(_unpack_sampling)(cols)
  np.testing.assert_array_equal(got_tokens, tokens)
  np.testing.assert_array_equal(got_len, true_len)
  for got, want in zip(got_samp, samp.as_tuple()):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), want)
  # What min_tokens holds back: row 0 its stops and the EOS ids, row 1
  # (ignore_eos, no stops) nothing.
  min_tokens, stops = jax.jit(_held_back, static_argnums=1)(cols,
                                                               (2, 7))
  assert np.asarray(min_tokens).tolist() == [3, 0]
  assert sorted(t for t in np.asarray(stops)[0].tolist() if t >= 0) == [
      2, 7, 9, 11]
  assert (np.asarray(stops)[1] == -1).all()
  # The penalties, and the prompts' tokens (row 1: its first three).
  seen = jax.jit(prompt_seen, static_argnums=2)(got_tokens, got_len, 16)
  counts, got_seen, *pen = jax.jit(_penalties)(cols, seen)
  assert counts is None
  np.testing.assert_array_equal(np.asarray(got_seen), np.asarray(seen))
  assert np.flatnonzero(np.asarray(seen)[1]).tolist() == [6, 7, 8]
  assert np.flatnonzero(np.asarray(seen)[0]).tolist() == list(range(6))
  for got, want in zip(pen, (samp.presence, samp.frequency,
                             samp.repetition)):
    np.testing.assert_array_equal(np.asarray(got), want)
  assert samp.repetition.tolist() == [np.float32(1.15), 1.0]
  tok = jnp.array([3, 49151], jnp.int32)
  lp = jnp.array([-0.125, -17.3], jnp.float32)
  got_tok, got_lp = unpack_outputs(jax.device_get(jax.jit(_pack_outputs)(
      tok, lp)))
  np.testing.assert_array_equal(got_tok, np.asarray(tok))
  np.testing.assert_array_equal(got_lp, np.asarray(lp))


def test_first_tokens_go_out_before_the_prefix_cache_takes_the_pages(
    prefill_tp):
  """``on_result`` answers a bucketed prompt before the engine's prefix
  cache stores its pages (that copy is off the first token's path)."""
  engine = prefill_tp[1]
  order = []

  class Store:
    keeps_prefills = True

    def hashes(self, ids, salt):
      return [bytes([i]) for i in range(len(ids) // PCFG.page_size)]

    def match(self, hashes, sources=None):
      return []

    def store_pages(self, hashes, kv):
      order.append("stored")

    def observe_prefill(self, tokens, seconds):
      pass

  engine.prefix_store = Store()
  try:
    engine.prefill([PrefillRequest("a", prompt(40, 3), GREEDY)],
                   on_result=lambda i, r: order.append("answered"))
  finally:
    engine.prefix_store = None
  assert order == ["answered", "stored"]
