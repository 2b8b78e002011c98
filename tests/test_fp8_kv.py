"""FP8 KV (``kv_dtype="fp8"``): K/V stored and handed on as float8 e4m3,
unscaled, saturating at +-448.

The cast is pinned against ml_dtypes' own e4m3 rounding (numpy); a prefill
hands on exactly that rounding of its KV, whichever way it made it (one
program, layer groups, the buffered path), and the pool stores what
arrives; an engine with an FP8 pool decodes to the end with every page back
and keeps its first tokens (the prefill does not read the pool); its pages
take a quarter of a float32 pool's bytes. A prefill and a pool that store
KV otherwise are refused together. How far it moves a trained
model is measured, not assumed: tools/measure_fp8_accuracy.py --what=kv
(BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pdjax.engine.colocated import ColocatedEngine
from pdjax.engine.decode_config import DecodeConfig
from pdjax.engine.prefill import PrefillConfig
from pdjax.engine.sampling import SamplingParams
from pdjax.model.llama import kv_to_pool

E4M3 = ml_dtypes.float8_e4m3fn

PCFG = PrefillConfig(buckets=(16, 32), max_batch=4, page_size=16,
                     max_seq_len=128)
DCFG = DecodeConfig(max_seqs=8, page_size=16, num_pages=64, max_seq_len=128,
                    steps_per_call=4, row_buckets=(8,))


def test_cast_is_e4m3_rounding_saturated():
  rng = np.random.default_rng(0)
  # Normal and subnormal magnitudes, exact e4m3 values, ties, and beyond.
  x = np.concatenate([
      rng.standard_normal(2000) * 10.0 ** rng.uniform(-4, 2.5, 2000),
      np.asarray([0.0, -0.0, 448.0, -448.0, 449.0, 465.0, -1e6, 1e6,
                  2.0 ** -9, 2.0 ** -10, 1.0 + 2.0 ** -4, 1.0 + 3 * 2.0 ** -4]),
  ]).astype(np.float32)
  got = np.asarray(kv_to_pool(jnp.asarray(x), jnp.float8_e4m3fn))
  want = np.clip(x, -448.0, 448.0).astype(E4M3)
  assert got.dtype == E4M3
  np.testing.assert_array_equal(got.astype(np.float32),
                                want.astype(np.float32))
  assert not np.isnan(got.astype(np.float32)).any()
  # Other pools: a plain cast, bit for bit.
  for dtype in (jnp.float32, jnp.bfloat16):
    np.testing.assert_array_equal(
        np.asarray(kv_to_pool(jnp.asarray(x), dtype)),
        np.asarray(jnp.asarray(x).astype(dtype)))


def test_kv_dtype_is_checked():
  with pytest.raises(ValueError, match="kv_dtype"):
    DecodeConfig(kv_dtype="int8")


def _run(engine, reqs):
  out, logprobs = {}, {}

  def callback(ev):
    out.setdefault(ev.request_id, []).extend(ev.token_ids)
    logprobs.setdefault(ev.request_id, []).extend(ev.logprobs)
  for rid, p, s in reqs:
    engine.submit(rid, p, s, callback, seed_u32=s.seed_u32(0))
  engine.drain()
  return out, logprobs


def test_fp8_pool_serves_to_the_end(tiny_decode_params):
  params, cfg, mesh, rules = tiny_decode_params
  rng = np.random.default_rng(5)
  reqs = [(f"r{i}", rng.integers(3, 300, n).tolist(),
           SamplingParams(max_tokens=t, temperature=0.0, ignore_eos=True))
          for i, (n, t) in enumerate([(9, 20), (17, 12), (30, 25), (5, 30)])]
  base = ColocatedEngine(params, cfg, mesh, rules, PCFG, DCFG)
  fp8 = ColocatedEngine(params, cfg, mesh, rules, *_fp8(PCFG, DCFG))
  rep = fp8.decode.replicas[0]
  assert rep.state.k.dtype == jnp.float8_e4m3fn
  assert rep.state.k.nbytes * 4 == base.decode.replicas[0].state.k.nbytes
  want, want_lp = _run(base, reqs)
  got, got_lp = _run(fp8, reqs)
  u = fp8.decode.kv_usage()
  assert u["pages_used"] == u["rows_live"] == 0, u
  for rid, _, s in reqs:
    assert len(got[rid]) == s.max_tokens
    # The first token comes from the prefill, which reads no pool.
    assert got[rid][0] == want[rid][0]
    assert got_lp[rid][0] == want_lp[rid][0]
  # Later tokens are not compared here: the tiny model's logits are nearly
  # flat, so one e4m3 rounding can flip a token; how far an FP8 pool moves a
  # trained model is the accuracy tool's figure.


def _fp8(pcfg, dcfg):
  return (dataclasses.replace(pcfg, kv_dtype="fp8"),
          dataclasses.replace(dcfg, kv_dtype="fp8"))


def test_the_prefill_hands_on_fp8_and_the_pool_stores_it(tiny_decode_params):
  """An FP8 deployment's prefill hands on the saturated e4m3 rounding of
  its float32 KV, exactly (a quarter of the bytes here, half of bf16's),
  and the pool stores what arrives as it is."""
  params, cfg, mesh, rules = tiny_decode_params
  engine = ColocatedEngine(params, cfg, mesh, rules, *_fp8(PCFG, DCFG))
  plain = ColocatedEngine(params, cfg, mesh, rules, PCFG, DCFG)
  prompt = list(range(5, 37))    # 2 full pages
  kv = engine.prefill[0].prefill([_prefill_request(prompt)])[0].kv
  full = plain.prefill[0].prefill([_prefill_request(prompt)])[0].kv
  assert kv.dtype == jnp.float8_e4m3fn and kv.kv.nbytes * 4 == full.kv.nbytes
  exact = np.asarray(full.kv, np.float32)       # [L, 2, n, P, K, hd]
  np.testing.assert_array_equal(
      np.asarray(kv.kv.astype(jnp.float32)),
      np.clip(exact, -448, 448).astype(E4M3).astype(np.float32))
  payload = np.asarray(kv.kv.astype(jnp.float32))
  rep = engine.decode.replicas[0]
  res = engine.decode.reserve("x", len(prompt), 4)
  seen = []
  from pdjax.engine.requests import DecodeRequest
  s = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
  engine.decode.submit(DecodeRequest("x", prompt, 7, 0.0, kv, s,
                                     s.seed_u32(0), seen.append,
                                     reservation=res))
  engine.decode.step()      # admits: the insert runs
  row = next(r for r in rep.rows if r is not None)
  L, N = cfg.num_layers, DCFG.num_pages
  k = np.asarray(rep.state.k.astype(jnp.float32))
  for layer in range(L):
    for i, page in enumerate(row.pages[:2]):
      np.testing.assert_array_equal(k[layer * N + page],
                                    payload[layer, 0, i])
  engine.decode.drain()


def test_layer_groups_and_chunks_hand_on_fp8(tiny_decode_params):
  """Every way a prefill makes a payload hands it on in FP8, the same
  rounding: a bucketed prompt run as two layer groups (each group cast on
  its own, so each can still go as soon as it is done) and a prompt longer
  than every bucket (the buffered path's pages)."""
  from pdjax.engine.prefill import PrefillEngine
  params, cfg, mesh, rules = tiny_decode_params
  sub = rules.without("dp")
  fp8 = dataclasses.replace(PCFG, kv_dtype="fp8")
  plain = PrefillEngine(params, cfg, mesh, sub, PCFG)
  grouped = PrefillEngine(params, cfg, mesh, sub,
                          dataclasses.replace(fp8, layer_groups=2))
  for prompt in (list(range(5, 29)), list(range(5, 45))):   # 24, 40 > 32
    want = plain.prefill([_prefill_request(prompt)])[0].kv
    got = grouped.prefill([_prefill_request(prompt)])[0].kv
    if len(prompt) <= PCFG.buckets[-1]:
      assert len(got.layer_groups) == 2
      assert {g.dtype for g in got.layer_groups} == {jnp.dtype(E4M3)}
    assert got.dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(
        np.asarray(got.kv.astype(jnp.float32)),
        np.clip(np.asarray(want.kv, np.float32), -448, 448).astype(
            E4M3).astype(np.float32))


def test_prefill_and_pool_must_store_kv_alike(tiny_decode_params):
  params, cfg, mesh, rules = tiny_decode_params
  with pytest.raises(ValueError, match="same kv_dtype"):
    ColocatedEngine(params, cfg, mesh, rules, PCFG,
                    dataclasses.replace(DCFG, kv_dtype="fp8"))


def _prefill_request(prompt):
  from pdjax.engine.requests import PrefillRequest
  s = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
  return PrefillRequest("x", prompt, s, s.seed_u32(0))
