"""FP8 weights (``pdjax.model.quant``): the quantization's arithmetic against
a numpy reference and its rounding bound, the model computing with FP8
projections as with their dequantized values, and engines serving them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdjax.model import llama, quant


def _weights(seed=0):
  """A [layers, in, out] matrix with columns of very different sizes, one
  all zero, and entries down in e4m3's subnormal range."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(2, 64, 12)).astype(np.float32)
  w *= np.logspace(-3, 2, 12, dtype=np.float32)[None, None, :]
  w[:, :, 3] = 0.0
  w[0, :5, 7] = 1e-6
  return w


@pytest.mark.parametrize("contracted", [1, 2])
def test_quantization_matches_the_numpy_reference(contracted):
  w = _weights()
  if contracted == 2:
    w = w.reshape(2, 8, 8, 12)
  q, scale = jax.jit(quant.quantize_fp8, static_argnums=1)(
      jnp.asarray(w), contracted)
  q_ref, scale_ref = quant.quantize_fp8_numpy(w, contracted)
  # Stored output-major: the contracted axes minor, as FP8 GEMMs read them.
  assert q.shape == (2, 12) + w.shape[1:1 + contracted]
  assert scale.shape == (2, 12)
  np.testing.assert_array_equal(np.asarray(scale), scale_ref)
  np.testing.assert_array_equal(np.asarray(q).view(np.uint8),
                                q_ref.view(np.uint8))


def test_rounding_stays_within_e4m3s_bound():
  """|q s - w| <= 2**-4 |w| (normal range: 3 mantissa bits, round to
  nearest) + 2**-10 s (half the smallest subnormal step), plus the float32
  roundoff of w / s and q * s."""
  w = _weights(1)
  q, scale = quant.quantize_fp8(jnp.asarray(w), 1)
  back = np.asarray(quant.dequantize(q, scale, 1))
  s = np.asarray(scale)[:, None, :]
  eps = np.finfo(np.float32).eps
  bound = 2.0**-4 * np.abs(w) + 2.0**-10 * s + 4 * eps * np.abs(w)
  assert (np.abs(back - w) <= bound).all()
  # The largest entry of every channel is representable exactly (448 * s).
  amax = np.abs(w).max(axis=1)
  assert np.allclose(np.abs(back).max(axis=1), amax, rtol=4 * eps)
  assert (back[:, :, 3] == 0).all()          # a zero channel stays zero
  assert np.isfinite(np.asarray(scale)).all() and (np.asarray(scale) > 0).all()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_given_scales_give_an_fp8_weights_values_back(dtype):
  """A weight that is q * s (an FP8 checkpoint's, per tensor: most channels'
  largest |q| under 448), read in bf16 or float32, quantized with s: q and s
  bit for bit, where its own scales (max|w| / 448) quantize it again."""
  import ml_dtypes
  rng = np.random.default_rng(2)
  s_tensor = np.float32(0.0123)
  q = (rng.normal(size=(2, 64, 12)) * 40).clip(-448, 448).astype(
      ml_dtypes.float8_e4m3fn)
  q[0, 0, 0] = 448.0
  q[1, :, 5] = 0.0                                    # a zero channel
  w = jnp.asarray(q.astype(np.float32) * s_tensor).astype(dtype)
  given = np.full((2, 12), s_tensor, np.float32)
  got_q, got_s = jax.jit(quant.quantize_fp8, static_argnums=1)(w, 1, given)
  want_q = np.swapaxes(q, 1, 2)                       # output-major
  np.testing.assert_array_equal(np.asarray(got_q).view(np.uint8),
                                want_q.view(np.uint8))
  np.testing.assert_array_equal(np.asarray(got_s), given)
  ref_q, ref_s = quant.quantize_fp8_numpy(np.asarray(w, np.float32), 1, given)
  np.testing.assert_array_equal(np.asarray(got_q).view(np.uint8),
                                ref_q.view(np.uint8))
  # Its own scales round the same values onto another grid.
  own_q, _ = quant.quantize_fp8(w, 1)
  assert (np.asarray(own_q).view(np.uint8) != want_q.view(np.uint8)).any()


def test_a_channel_the_given_scale_does_not_fit_takes_its_own():
  """Channels changed since their scales were read (scaled by 1.5, or by
  1.01) are quantized as if no scale were given; one scaled by a power of
  two (as folded KV scales scale Q, K and V) is still q' * s on e4m3's grid
  and keeps the given scale."""
  import ml_dtypes
  rng = np.random.default_rng(3)
  q = (rng.normal(size=(2, 32, 6)) * 30).clip(-100, 100).astype(
      ml_dtypes.float8_e4m3fn)
  given = np.full((2, 6), 0.5, np.float32)
  w = q.astype(np.float32) * 0.5
  w[:, :, 1] *= 1.5
  w[1, :, 4] *= 1.01
  w[0, :, 2] *= 4.0
  got_q, got_s = quant.quantize_fp8(jnp.asarray(w), 1, given)
  own_q, own_s = quant.quantize_fp8(jnp.asarray(w), 1)
  fits = np.ones((2, 6), bool)
  fits[:, 1] = False
  fits[1, 4] = False
  np.testing.assert_array_equal(np.asarray(got_s),
                                np.where(fits, given, np.asarray(own_s)))
  got_q, own_q = np.asarray(got_q).view(np.uint8), np.asarray(own_q).view(
      np.uint8)
  np.testing.assert_array_equal(got_q[~fits], own_q[~fits])
  want_q = q.astype(np.float32)
  want_q[0, :, 2] *= 4.0
  want_q = want_q.astype(ml_dtypes.float8_e4m3fn)
  np.testing.assert_array_equal(
      got_q[fits], np.swapaxes(want_q, 1, 2).view(np.uint8)[fits])


def _dequantized(params, cfg):
  """The float32 weights FP8 params stand for."""
  layers = dict(params["layers"])
  for name, contracted in llama.QUANTIZED.items():
    layers[name] = quant.dequantize(
        layers.pop(name), layers.pop(name + llama.SCALE_SUFFIX), contracted)
  return {**params, "layers": layers}


def test_the_model_computes_with_the_dequantized_weights(tiny_decode_params):
  """Logits of the FP8 model equal those of a float32 model holding the
  dequantized weights, up to float32 reassociation ((x q) s against
  x (q s)); the FP8 model's own distance from the original is reported
  by tools/measure_fp8_accuracy.py, not assumed."""
  params, cfg, _, _ = tiny_decode_params
  qparams, qcfg = quant.quantize_params(params, cfg)
  assert qcfg.weight_dtype == quant.FP8
  # One array per layer (llama.per_layer), each in FP8.
  wq = qparams["layers"]["wq"]
  assert isinstance(wq, list) and len(wq) == cfg.num_layers
  assert all(w.dtype == jnp.float8_e4m3fn for w in wq)
  # The layout the pools place and load quantized weights in is theirs.
  assert jax.tree.map(lambda a: (a.shape, a.dtype), qparams) == jax.tree.map(
      lambda a: (a.shape, a.dtype), llama.abstract_params(qcfg))
  assert qcfg.fingerprint() != cfg.fingerprint()
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 300, (2, 24)),
                       jnp.int32)
  fwd = jax.jit(llama.reference_forward, static_argnames="cfg")
  got = np.asarray(fwd(qparams, tokens, cfg=qcfg))
  want = np.asarray(fwd(_dequantized(qparams, qcfg), tokens, cfg=cfg))
  scale = np.abs(want).max()
  # Each projection sums D products before its scale multiplies: a few
  # float32 roundings per layer of values as large as the logits.
  tol = 16 * cfg.num_layers * cfg.hidden_size * np.finfo(np.float32).eps
  np.testing.assert_allclose(got, want, atol=tol * scale, rtol=0)
  with pytest.raises(ValueError, match="already"):
    quant.quantize_params(qparams, qcfg)


# The engines' shapes and prompts of the serving tests below.
def _pool_configs():
  from pdjax.engine.decode_config import DecodeConfig
  from pdjax.engine.prefill import PrefillConfig
  return (PrefillConfig(buckets=(16, 32), max_batch=2, page_size=16,
                        max_seq_len=128),
          DecodeConfig(max_seqs=4, page_size=16, num_pages=32,
                       max_seq_len=128, steps_per_call=4, row_buckets=(4,)))


PROMPTS = [np.random.default_rng(i).integers(3, 300, 20 + 9 * i).tolist()
           for i in range(3)]
GREEDY_TOKENS = 10


def _greedy_tokens(engine) -> dict[str, list[int]]:
  """Each of PROMPTS' greedy tokens from a colocated engine, by request."""
  from pdjax.engine.sampling import SamplingParams
  greedy = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0,
                          ignore_eos=True)
  toks = {}
  for i, p in enumerate(PROMPTS):
    engine.submit(f"r{i}", p, greedy, lambda ev: toks.setdefault(
        ev.request_id, []).extend(ev.token_ids))
  engine.drain()
  return toks


def test_engines_serve_fp8_weights(tiny_model_dir):
  """A colocated engine loaded with weight_dtype=FP8 (the weights
  quantized as they are placed on a TP=2 mesh and on one device)
  produces the greedy tokens of an engine on the dequantized float32
  weights."""
  from pdjax.engine.colocated import ColocatedEngine
  from pdjax.engine.prefill import PrefillEngine
  from pdjax.engine.requests import PrefillRequest
  from pdjax.engine.sampling import SamplingParams
  from pdjax.engine.setup import load_sharded, shard_params
  from pdjax.sharding import ShardingRules, make_mesh
  rules = ShardingRules.load("decode_dp")
  mesh = make_mesh({"dp": 1}, jax.devices()[:1])
  qparams, qcfg = load_sharded(tiny_model_dir, rules, mesh,
                               weight_dtype=quant.FP8)
  pcfg, dcfg = _pool_configs()
  fp8 = ColocatedEngine(qparams, qcfg, mesh, rules, pcfg, dcfg)
  plain_cfg = qcfg.replace(weight_dtype=None)
  deq = shard_params(_dequantized(qparams, qcfg), plain_cfg, rules, mesh)
  ref = ColocatedEngine(deq, plain_cfg, mesh, rules, pcfg, dcfg)
  assert _greedy_tokens(fp8) == _greedy_tokens(ref)
  greedy = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
  # TP=2: the scales split with their channels.
  prules = ShardingRules.load("prefill_tp")
  tp = make_mesh({"tp": 2}, jax.devices()[2:4])
  tparams, tcfg = load_sharded(tiny_model_dir, prules, tp,
                               weight_dtype=quant.FP8)
  r = PrefillEngine(tparams, tcfg, tp, prules, pcfg).prefill(
      [PrefillRequest("t", list(range(3, 23)), greedy)])[0]
  want = ref.prefill[0].prefill(
      [PrefillRequest("t", list(range(3, 23)), greedy)])[0]
  assert r.first_token == want.first_token


# --------------------------------------------- FP8 activations (W8A8)
@pytest.mark.parametrize("subscripts,shape", [
    ("btd,df->btf", (2, 5, 64)), ("btnh,nhd->btd", (2, 5, 4, 16))])
def test_each_token_is_quantized_by_its_own_scale(subscripts, shape):
  """x ~= x_q * s for every token, within e4m3's rounding (as the weights'
  bound), each token's largest entry exactly representable, a zero token
  kept zero; the scale is laid out to broadcast against the output."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=shape).astype(np.float32)
  x *= np.logspace(-4, 3, shape[1], dtype=np.float32)[None, :, None] if (
      len(shape) == 3) else np.logspace(-4, 3, shape[1], dtype=np.float32)[
          None, :, None, None]
  x[1, 2] = 0.0
  xq, s = llama.quantize_tokens(jnp.asarray(x), subscripts,
                                jnp.float8_e4m3fn)
  out_rank = len(subscripts.split("->")[1])
  assert xq.dtype == jnp.float8_e4m3fn
  assert s.shape == shape[:2] + (1,) * (out_rank - 2)
  s_x = np.asarray(s).reshape(shape[:2] + (1,) * (len(shape) - 2))
  back = np.asarray(xq.astype(jnp.float32)) * s_x
  eps = np.finfo(np.float32).eps
  bound = 2.0**-4 * np.abs(x) + 2.0**-10 * s_x + 4 * eps * np.abs(x)
  assert (np.abs(back - x) <= bound).all()
  axes = tuple(range(2, len(shape)))
  np.testing.assert_allclose(np.abs(back).max(axis=axes),
                             np.abs(x).max(axis=axes), rtol=4 * eps)
  assert (back[1, 2] == 0).all()


def test_w8a8_projection_sums_the_fp8_products_in_float32():
  """A W8A8 projection is sum_d x_q[d] w_q[d] in float32 (each product of
  two e4m3 values is exact in float32), times the token's and the
  channel's scales: against float64 the error is a float32 sum's
  roundoff, D * eps of the summed magnitudes."""
  rng = np.random.default_rng(6)
  x = rng.normal(size=(2, 3, 64)).astype(np.float32) * 3.0
  w = _weights(7)[0]                                   # [64, 12]
  q, scale = quant.quantize_fp8(jnp.asarray(w)[None], 1)
  lp = {"w": q[0], "w_scale": scale[0]}
  got = np.asarray(llama._proj(jnp.asarray(x), lp, "w", "btd,df->btf",
                               jnp.float8_e4m3fn))
  xq, s = llama.quantize_tokens(jnp.asarray(x), "btd,df->btf",
                                jnp.float8_e4m3fn)
  xq64 = np.asarray(xq.astype(jnp.float32)).astype(np.float64)
  wq64 = np.asarray(q[0].astype(jnp.float32)).astype(np.float64).T
  scales = np.asarray(s, np.float64) * np.asarray(scale[0], np.float64)
  want = np.einsum("btd,df->btf", xq64, wq64) * scales
  size = np.einsum("btd,df->btf", np.abs(xq64), np.abs(wq64)) * scales
  eps = np.finfo(np.float32).eps
  assert (np.abs(got - want) <= (64 + 2) * eps * size + 1e-30).all()


def test_fp8_activations_need_fp8_weights_and_name_the_fingerprint(
    tiny_model_dir):
  from pdjax.engine.setup import load_sharded
  from pdjax.model.config import ModelConfigError
  from pdjax.sharding import ShardingRules, make_mesh
  rules = ShardingRules.load("decode_dp")
  mesh = make_mesh({"dp": 1}, jax.devices()[:1])
  with pytest.raises(ValueError, match="needs weight_dtype"):
    load_sharded(tiny_model_dir, rules, mesh, activation_dtype=quant.FP8)
  _, w8 = load_sharded(tiny_model_dir, rules, mesh, weight_dtype=quant.FP8)
  _, w8a8 = load_sharded(tiny_model_dir, rules, mesh, weight_dtype=quant.FP8,
                         activation_dtype=quant.FP8)
  assert w8a8.activation_dtype == quant.FP8
  assert w8a8.fingerprint() != w8.fingerprint()
  with pytest.raises(ModelConfigError, match="needs weight_dtype"):
    w8.replace(weight_dtype=None, activation_dtype=quant.FP8)


def test_engines_serve_fp8_activations_as_the_reference_model(
    tiny_model_dir):
  """W8A8 quantizes each token by itself, so a prompt's tokens get the same
  activations whether a prefill computes them together or decode steps one
  by one: a colocated engine (prefill, then paged decode steps) produces
  the greedy tokens of the reference model with the same weights and
  config."""
  from pdjax.engine.colocated import ColocatedEngine
  from pdjax.engine.setup import load_sharded
  from pdjax.model.generate import greedy_generate
  from pdjax.sharding import ShardingRules, make_mesh
  rules = ShardingRules.load("decode_dp")
  mesh = make_mesh({"dp": 1}, jax.devices()[:1])
  params, cfg = load_sharded(tiny_model_dir, rules, mesh,
                             weight_dtype=quant.FP8,
                             activation_dtype=quant.FP8)
  toks = _greedy_tokens(ColocatedEngine(params, cfg, mesh, rules,
                                        *_pool_configs()))
  for i, p in enumerate(PROMPTS):
    want = greedy_generate(params, cfg, np.asarray(p), GREEDY_TOKENS)
    assert toks[f"r{i}"] == np.asarray(want).reshape(-1).tolist(), i
  # TP=2: a token's scale is its max over the whole contracted axis, which
  # the mesh splits (heads, MLP columns): the same first token.
  from pdjax.engine.prefill import PrefillEngine
  from pdjax.engine.requests import PrefillRequest
  from pdjax.engine.sampling import SamplingParams
  prules = ShardingRules.load("prefill_tp")
  tp = make_mesh({"tp": 2}, jax.devices()[2:4])
  tparams, tcfg = load_sharded(tiny_model_dir, prules, tp,
                               weight_dtype=quant.FP8,
                               activation_dtype=quant.FP8)
  one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
  r = PrefillEngine(tparams, tcfg, tp, prules, _pool_configs()[0]).prefill(
      [PrefillRequest("t", PROMPTS[0], one)])[0]
  assert r.first_token == toks["r0"][0]
