"""Pipeline-parallel decode pools (a ``pp`` mesh axis) on 8 CPU devices.

A pipelined pool changes where layers run, never what comes out: greedy
tokens equal the unpipelined pool's (dp=1, one device) for pp=2 beside
dp=2 (in 3 microbatches, so calls are padded), pp=4, and pp=2 beside tp=2,
with rows joining, finishing mid-call and cancelled; float results
(logits, log-probabilities, K/V) agree within the rounding bounds of
``tests/tolerances.py``. A prefill payload lands split by stage (each
stage's devices get only its layers' pages) and the insert writes each
stage's layers into that stage's pages.

A 4-layer variant of pdjax-tiny's architecture (float32, its bit-exact
random weights), one row count and one page-table width per pool, so each
pool compiles one insert and one generate program.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from pdjax.engine.colocated import ColocatedEngine
from pdjax.engine.decode import DecodeConfig, DecodeEngine
from pdjax.engine.kv import reshard_kv
from pdjax.engine.prefill import PrefillConfig, PrefillEngine
from pdjax.engine.requests import (DecodeRequest, FinishReason,
                                   PrefillRequest, TokenEvent)
from pdjax.engine.sampling import SamplingParams
from pdjax.engine.setup import shard_params
from pdjax.model import llama
from pdjax.model.pipeline import (bubble_fraction, microbatch_rows,
                                  pipelined_decode_forward)
from pdjax.model.tiny import tiny_config, tiny_params
from pdjax.sharding import ShardingError, ShardingRules, make_mesh
from tolerances import assert_close, logit_scale, logit_weights, \
    logprob_tolerance

CFG = dataclasses.replace(tiny_config(), num_layers=4)
PAGE = 8
MAX_SEQ = 64
PCFG = PrefillConfig(buckets=(32,), max_batch=4, page_size=PAGE,
                     max_seq_len=MAX_SEQ)
DCFG = DecodeConfig(max_seqs=4, page_size=PAGE, num_pages=40,
                    max_seq_len=MAX_SEQ, steps_per_call=4,
                    table_buckets=(MAX_SEQ // PAGE,), row_buckets=(4,))
# Prompts of 17..24 tokens: 3 pages each, one payload size (4 pages).
PROMPT_LENS = (17, 20, 23, 24, 19, 21)
# Different lengths: rows finish mid-call (4 steps per call) and at its end.
MAX_TOKENS = (3, 6, 9, 13, 8, 11)
CANCELLED = "r5"


def greedy(n: int) -> SamplingParams:
  return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def requests():
  rng = np.random.default_rng(7)
  return [(f"r{i}", rng.integers(3, 500, n).tolist(), greedy(t))
          for i, (n, t) in enumerate(zip(PROMPT_LENS, MAX_TOKENS))]


class Collector:
  def __init__(self):
    self.events = collections.defaultdict(list)

  def __call__(self, ev: TokenEvent) -> None:
    self.events[ev.request_id].append(ev)

  def tokens(self, rid):
    return [t for e in self.events[rid] for t in e.token_ids]

  def logprobs(self, rid):
    return [p for e in self.events[rid] for p in e.logprobs]

  def reason(self, rid):
    return self.events[rid][-1].finish_reason


def assert_clean(engine: DecodeEngine) -> None:
  assert not engine.has_work
  u = engine.kv_usage()
  assert u["pages_used"] == u["pages_reserved"] == u["rows_live"] == 0, u
  assert u["pages_available"] == u["pages_total"], u


def submit(engine: DecodeEngine, rid, p, s, r, col) -> None:
  """The disaggregated hand-off: reserve (stepping while the pool is full,
  as a router retries), place the payload in the chosen replica's layout
  (split by stage in a pipelined pool), submit."""
  col(TokenEvent(rid, [r.first_token], [r.first_logprob]))
  while (res := engine.reserve(rid, len(p), s.max_tokens)) is None:
    assert engine.has_work
    engine.step()
  rep = engine.replicas[res.replica]
  kv = reshard_kv(r.kv, rep.payload_sharding(r.kv.kv.shape[2]))
  engine.submit(DecodeRequest(rid, p, r.first_token, r.first_logprob, kv, s,
                              s.seed_u32(0), col, reservation=res))


def run(engine: DecodeEngine, prefilled, *, cancel: str | None = None,
        on_insert=None) -> Collector:
  """Four requests, then two more joining once the first rows have run
  (waiting for a row where the pool is full); ``cancel`` is cancelled
  once it has made tokens."""
  col = Collector()
  pending = list(zip(requests(), prefilled))
  for (rid, p, s), r in pending[:4]:
    submit(engine, rid, p, s, r, col)
  engine.step()
  if on_insert is not None:
    on_insert(engine)
  engine.step()
  for (rid, p, s), r in pending[4:]:
    submit(engine, rid, p, s, r, col)
  if cancel:
    while len(col.tokens(cancel)) < 2:
      engine.step()
    engine.cancel(cancel)
  engine.drain()
  assert_clean(engine)
  return col


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def params():
  return tiny_params(CFG)


@pytest.fixture(scope="module")
def prefill(params):
  mesh = make_mesh({"tp": 1}, jax.devices()[:1])
  rules = ShardingRules.load("prefill_tp")
  return PrefillEngine(shard_params(params, CFG, rules, mesh), CFG, mesh,
                       rules, PCFG)


@pytest.fixture(scope="module")
def prefilled(prefill):
  return prefill.prefill([PrefillRequest(rid, p, s, s.seed_u32(0))
                          for rid, p, s in requests()])


def decode_engine(params, axes, devices, rules, dcfg=DCFG):
  mesh = make_mesh(axes, devices)
  rules = ShardingRules.load(rules)
  return DecodeEngine(shard_params(params, CFG, rules, mesh), CFG, mesh,
                      rules, dcfg)


@pytest.fixture(scope="module")
def baseline(params, prefilled):
  """The unpipelined pool's tokens, without and with the cancellation."""
  engine = decode_engine(params, {"dp": 1}, jax.devices()[:1], "decode_dp")
  return run(engine, prefilled), run(engine, prefilled, cancel=CANCELLED)


POOLS = {
    # 4 rows in 3 microbatches: each call padded to 6 rows.
    "dp2pp2": lambda p: decode_engine(
        p, {"dp": 2, "pp": 2}, jax.devices()[:4], "decode_dp_pp",
        dataclasses.replace(DCFG, num_microbatches=3)),
    "pp4": lambda p: decode_engine(p, {"dp": 1, "pp": 4},
                                   jax.devices()[4:8], "decode_dp_pp"),
    "pp2tp2": lambda p: decode_engine(p, {"dp": 1, "pp": 2, "tp": 2},
                                      jax.devices()[4:8], "decode_dp_pp_tp"),
}


def check_tokens(col: Collector, want: Collector, *, cancelled=None):
  for rid, _, s in requests():
    if rid == cancelled:
      assert col.reason(rid) == FinishReason.ABORT
      got = col.tokens(rid)
      assert 1 < len(got) < s.max_tokens
      assert got == want.tokens(rid)[:len(got)], rid
      continue
    assert col.reason(rid) == FinishReason.LENGTH, rid
    assert len(col.tokens(rid)) == s.max_tokens, rid
    assert col.tokens(rid) == want.tokens(rid), rid


def check_logprobs(col: Collector, want: Collector, params):
  """Log-probabilities of the same tokens within the rounding bound."""
  tol = logprob_tolerance(CFG, MAX_SEQ, logit_scale(params, CFG))
  for rid, _, _ in requests():
    got, exp = col.logprobs(rid), want.logprobs(rid)
    n = min(len(got), len(exp))
    diff = float(np.max(np.abs(np.subtract(got[:n], exp[:n]))))
    assert diff <= tol, (rid, diff, tol)


# ------------------------------------------------------------------ tests
def test_pipelined_forward_matches_decode_forward(params):
  """One step, pp=4 in 3 microbatches of 2 rows (5 rows: one padding
  row): logits and every written K/V within the rounding bound."""
  B, N, M = 5, 12, 3
  rng = np.random.default_rng(0)
  shape = (CFG.num_layers * N, PAGE, CFG.num_kv_heads, CFG.head_dim)
  k = rng.normal(size=shape).astype(np.float32)
  v = rng.normal(size=shape).astype(np.float32)
  tokens = rng.integers(3, 500, B).astype(np.int32)
  positions = np.array([0, 9, 20, 3, 14], np.int32)
  # Distinct pages per row (page 0, the null page, as padding).
  table = np.array([[1, 2, 3], [4, 5, 0], [6, 7, 8], [9, 0, 0],
                    [10, 11, 0]], np.int32)
  want = jax.jit(functools.partial(llama.decode_forward, cfg=CFG))(
      params, tokens, positions, k, v, table)
  mesh = make_mesh({"pp": 4}, jax.devices()[4:8])
  rules = ShardingRules.load("decode_dp_pp").without("dp")
  pool = NamedSharding(mesh, PartitionSpec("pp"))
  got = jax.jit(functools.partial(
      pipelined_decode_forward, cfg=CFG, mesh=mesh.abstract_mesh,
      num_microbatches=3))(shard_params(params, CFG, rules, mesh), tokens,
                           positions, jax.device_put(k, pool),
                           jax.device_put(v, pool), table)
  assert got.k_pool.sharding.spec == PartitionSpec("pp")
  assert_close(got.logits, want.logits, logit_weights(CFG, M * PAGE),
               scale=logit_scale(params, CFG), err_msg="logits")
  np.testing.assert_array_equal(np.argmax(got.logits, -1),
                                np.argmax(want.logits, -1))
  # Pages other than the null page (fill and drain ticks write there).
  for name, a, b in (("k", got.k_pool, want.k_pool),
                     ("v", got.v_pool, want.v_pool)):
    a = np.asarray(a).reshape(CFG.num_layers, N, -1)[:, 1:]
    b = np.asarray(b).reshape(CFG.num_layers, N, -1)[:, 1:]
    assert_close(a, b, logit_weights(CFG, M * PAGE), err_msg=name)


@pytest.mark.parametrize("pool", list(POOLS))
def test_greedy_tokens_match_unpipelined(pool, params, prefilled, baseline):
  engine = POOLS[pool](params)
  stages = 4 if pool == "pp4" else 2
  assert engine.programs.stages == stages
  assert engine.programs.num_microbatches == (3 if pool == "dp2pp2"
                                              else stages)
  for rep in engine.replicas:   # the pools are born split by stage
    assert rep.state.k.sharding.spec[0] == "pp"
    assert rep.params["layers"]["wq"].sharding.spec[0] == "pp"
  base, base_cancelled = baseline
  col = run(engine, prefilled)
  check_tokens(col, base)
  check_logprobs(col, base, params)
  col = run(engine, prefilled, cancel=CANCELLED)
  check_tokens(col, base_cancelled, cancelled=CANCELLED)
  check_tokens(col, base, cancelled=CANCELLED)


def test_payload_lands_split_by_stage(params, prefilled):
  """pp=4: the payload's layers 4s..4s+1 (one per stage here) sit only on
  stage s's device, and after the insert that stage's pool shard holds
  them at its local rows ``l * N + page``."""
  engine = POOLS["pp4"](params)
  rep = engine.replicas[0]
  stages = rep.mesh.shape["pp"]
  per = CFG.num_layers // stages
  r0 = prefilled[0]
  kv = reshard_kv(r0.kv, rep.payload_sharding(r0.kv.kv.shape[2])).kv
  host = np.asarray(r0.kv.kv)
  devices = list(rep.mesh.devices.flat)
  for shard in kv.addressable_shards:
    s = devices.index(shard.device)
    assert shard.index[0] == slice(s * per, (s + 1) * per), shard.index
    np.testing.assert_array_equal(np.asarray(shard.data),
                                  host[s * per:(s + 1) * per])

  def check_pool(engine):
    row = engine._where["r0"][1]
    pages = engine.replicas[0].rows[row].pages
    n_prompt = -(-PROMPT_LENS[0] // PAGE)
    N = DCFG.num_pages
    for shard in engine.replicas[0].state.k.addressable_shards:
      s = devices.index(shard.device)
      local = np.asarray(shard.data).reshape(per, N, PAGE, *host.shape[4:])
      want = host[s * per:(s + 1) * per, 0]   # K of the stage's layers
      # The prompt's full pages (the last one also holds decode tokens).
      full = PROMPT_LENS[0] // PAGE
      np.testing.assert_array_equal(local[:, pages[:full]], want[:, :full])
      assert n_prompt == full + 1

  run(engine, prefilled, on_insert=check_pool)


def test_colocated_pipelined_pool(params, baseline):
  """Prefill then insert on a pp=2 replica: the colocated engine's
  tokens equal the disaggregated unpipelined pool's."""
  mesh = make_mesh({"dp": 1, "pp": 2}, jax.devices()[:2])
  rules = ShardingRules.load("decode_dp_pp")
  colo = ColocatedEngine(shard_params(params, CFG, mesh=mesh, rules=rules),
                         CFG, mesh, rules, PCFG, DCFG)
  col = Collector()
  for rid, p, s in requests()[:4]:
    colo.submit(rid, p, s, col, seed_u32=s.seed_u32(0))
  colo.drain()
  check_tokens_subset(col, baseline[0], [r for r, _, _ in requests()[:4]])
  assert_clean(colo.decode)


SPEC_DCFG = dataclasses.replace(DCFG, speculative="ngram", spec_tokens=3,
                                spec_ngram=2, num_microbatches=3)


def test_speculating_pipelined_pool(params, prefilled, baseline):
  """Speculative decoding in a pp=2 pool (3 microbatches: calls padded):
  the verify pass runs through the pipeline and the greedy tokens are
  plain decoding's, rows finishing mid-call and a cancellation included;
  with prompts that repeat themselves, drafts are kept, and the tokens
  are still the unpipelined plain pool's."""
  engine = decode_engine(params, {"dp": 1, "pp": 2}, jax.devices()[2:4],
                         "decode_dp_pp", SPEC_DCFG)
  plain, cancelled = baseline
  check_tokens(run(engine, prefilled), plain)
  check_tokens(run(engine, prefilled, cancel=CANCELLED), cancelled,
               cancelled=CANCELLED)

  # Prompts of a 2-token unit repeated (27 tokens), 30 tokens each: enough
  # of the model's continuations repeat for drafts to be kept (3 and 2 of
  # these two sets' drafts on the machine this was written on).
  reqs = []
  for seed in (0, 4):
    rng = np.random.default_rng(seed)
    for i in range(4):
      unit = rng.integers(3, 500, 2).tolist()
      reqs.append((f"rep{seed}-{i}", (unit * 14)[:27], greedy(30)))

  def colocated(axes, devices, rules, dcfg):
    mesh = make_mesh(axes, devices)
    rules = ShardingRules.load(rules)
    colo = ColocatedEngine(shard_params(params, CFG, rules, mesh), CFG, mesh,
                           rules, PCFG, dcfg)
    col = Collector()
    for rid, p, s in reqs:
      colo.submit(rid, p, s, col, seed_u32=s.seed_u32(0))
    colo.drain()
    assert_clean(colo.decode)
    return {rid: col.tokens(rid) for rid, _, _ in reqs}, colo.decode.stats

  want, _ = colocated({"dp": 1}, jax.devices()[:1], "decode_dp", DCFG)
  got, stats = colocated({"dp": 1, "pp": 2}, jax.devices()[2:4],
                         "decode_dp_pp", SPEC_DCFG)
  assert got == want
  assert 0 < stats["spec_accepted"] <= stats["spec_drafted"], stats


def check_tokens_subset(col, want, rids):
  for rid in rids:
    assert col.tokens(rid) == want.tokens(rid), rid


def test_pipeline_limits(params):
  assert bubble_fraction(1, 4) == 0.0
  assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
  assert microbatch_rows(5, 3) == 2
  # 4 layers do not split into 8 stages: refused, naming the axis.
  mesh = make_mesh({"dp": 1, "pp": 8})
  with pytest.raises(ShardingError, match="layers"):
    shard_params(params, CFG, ShardingRules.load("decode_dp_pp"), mesh)
  with pytest.raises(ValueError, match="num_microbatches"):
    DecodeConfig(num_microbatches=-1)
  # FP8 weights are stored one array per layer, which stages cannot split.
  from pdjax.model.quant import quantize_params
  qparams, qcfg = quantize_params(params, CFG)
  mesh = make_mesh({"dp": 1, "pp": 2}, jax.devices()[:2])
  rules = ShardingRules.load("decode_dp_pp")
  with pytest.raises(ValueError, match="pipeline stages"):
    DecodeEngine(qparams, qcfg, mesh, rules, DCFG)


def test_device_transport_lands_each_stage_its_own_layers(params):
  """Over the device transport a KV bound for a pipelined replica goes as
  one array per stage, each pulled onto its stage's device: no stage
  receives another's layers. The KV arrives whole and equal."""
  from pdjax.engine.requests import RequestKV
  from pdjax.transfer.device import DeviceReceiver, DeviceSender
  from pdjax.v1 import kv_pb2
  devs = jax.devices()
  shape = (CFG.num_layers, 2, 4, PAGE, CFG.num_kv_heads, CFG.head_dim)
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  heads = NamedSharding(jax.sharding.Mesh(np.array(devs[:2]), ("tp",)),
                        PartitionSpec(None, None, None, None, "tp", None))
  kv = RequestKV(jax.device_put(x, heads), 30)      # as a TP=2 prefill holds it
  engine = decode_engine(params, {"dp": 1, "pp": 2}, devs[4:6],
                         "decode_dp_pp")
  target = engine.replicas[0].payload_sharding(4)
  sender, receiver = DeviceSender(devs[0]), DeviceReceiver(devs[4])
  try:
    receiver.expect("t1", "r1")
    handle = sender.send(kv, kv_pb2.KvDestination(
        transport="device", transfer_id="t1", decode_pp=2), timeout_s=10)
    assert handle.layer_shards == 2
    out = receiver.receive(handle, target, timeout_s=10)
    np.testing.assert_array_equal(np.asarray(out.kv), x)
    assert out.kv.sharding.is_equivalent_to(target, len(shape))
    for shard in out.kv.addressable_shards:     # each stage: its layers
      assert shard.data.shape[0] == CFG.num_layers // 2
    # Without stages, one array as before.
    receiver.expect("t2", "r2")
    whole = sender.send(kv, kv_pb2.KvDestination(
        transport="device", transfer_id="t2", decode_tp=1), timeout_s=10)
    assert whole.layer_shards == 0
    np.testing.assert_array_equal(
        np.asarray(receiver.receive(whole, target, timeout_s=10).kv), x)
  finally:
    sender.close()
    receiver.close()
