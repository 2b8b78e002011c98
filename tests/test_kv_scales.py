"""Per-head scales of an FP8 KV (``pdjax.model.kv_scales``, folded into the
weights by ``pdjax.model.kv_fold``).

Folding powers of two is exact: the folded model's logits are the unfolded
one's bit for bit, in a pool of the model's dtype, and its K/V are the
unfolded ones divided by the scales. Where K/V are small enough for e4m3 to
keep them as subnormals, calibrated scales bring an FP8 pool back close to
the full-precision one (unscaled, it is far off). The scales are powers of
two that put the measured maxima below 448 / headroom; they name the model
(its fingerprint, the handshake); a scales file that does not fit the model
is refused, naming the problem; the checkpoint's own scales are read as
vLLM reads them; the deployment key and its flag parse.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from pdjax.model import kv_scales as kvs
from pdjax.model import llama, quant
from pdjax.model.kv_calibrate import kv_amax
from pdjax.model.kv_fold import fold_kv_scales
from pdjax.model.tiny import tiny_config

from tolerances import assert_close, kv_weights

REPO = Path(__file__).resolve().parents[1]


def _random_scales(cfg, lo=-12, hi=12, seed=0):
  """Powers of two from 2**lo to 2**hi, each (layer, KV head) its own."""
  rng = np.random.default_rng(seed)
  shape = (cfg.num_layers, cfg.num_kv_heads)
  return kvs.KvScales(2.0 ** rng.integers(lo, hi + 1, shape),
                      2.0 ** rng.integers(lo, hi + 1, shape), "random")


def _prompts(n=3, length=40, seed=1, vocab=500):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, vocab, length).tolist() for _ in range(n)]


# ------------------------------------------------------------ exactness
def _qwen2_with_biases():
  """A random-weight Qwen2-shaped model in bf16: Q/K/V biases (folded
  like their projections) and 2 query heads per KV head."""
  cfg = tiny_config().replace(architecture="qwen2", qkv_bias=True,
                              dtype="bfloat16", name="qwen2-random")
  params = llama.init_params(cfg, seed=3, std=0.1)
  # Biases as large as the projections' outputs, so dropping one shows.
  layers = dict(params["layers"])
  for b in ("bq", "bk", "bv"):
    layers[b] = (layers[b].astype(jnp.float32) * 10).astype(layers[b].dtype)
  return {**params, "layers": layers}, cfg


@pytest.mark.parametrize("which", ["tiny-float32", "qwen2-bias-bfloat16"])
def test_folding_is_exact(which, tiny_decode_params):
  """Logits bit for bit, prefill and decode over a pool of the model's
  dtype; K/V exactly the unfolded ones divided by their head's scale."""
  if which == "tiny-float32":
    params, cfg = tiny_decode_params[:2]
  else:
    params, cfg = _qwen2_with_biases()
  scales = _random_scales(cfg)
  fparams, fcfg = fold_kv_scales(params, cfg, scales)
  assert fcfg.kv_scales == scales.digest()
  prompt, cont = _prompts(1, 32)[0], _prompts(1, 8, seed=2)[0]
  for p, c in ((params, cfg), (fparams, fcfg)):
    out = llama.prefill_forward(p, jnp.asarray([prompt]), jnp.asarray([32]),
                                cfg=c, all_logits=True)
    if c is cfg:
      want, k, v = out.logits, out.k, out.v
      want_dec = _pool_logits(p, c, prompt, cont, c.jnp_dtype)
    else:
      np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(want))
      s = (scales.k[:, None, None, :, None], scales.v[:, None, None, :, None])
      np.testing.assert_array_equal(
          np.asarray(out.k, np.float32) * s[0], np.asarray(k, np.float32))
      np.testing.assert_array_equal(
          np.asarray(out.v, np.float32) * s[1], np.asarray(v, np.float32))
      np.testing.assert_array_equal(
          _pool_logits(p, c, prompt, cont, c.jnp_dtype), want_dec)


def test_an_engine_decodes_the_same_with_scales_folded(tiny_decode_params):
  """A colocated engine (its prefill, the paged decode steps) over a pool
  of the model's dtype: the same tokens and log-probs with scales folded
  into the weights as without."""
  from pdjax.engine.colocated import ColocatedEngine
  from pdjax.engine.decode_config import DecodeConfig
  from pdjax.engine.prefill import PrefillConfig
  from pdjax.engine.sampling import SamplingParams
  params, cfg, mesh, rules = tiny_decode_params
  pcfg = PrefillConfig(buckets=(16, 32), max_batch=4, page_size=16,
                       max_seq_len=128)
  dcfg = DecodeConfig(max_seqs=8, page_size=16, num_pages=64,
                      max_seq_len=128, steps_per_call=4, row_buckets=(8,))
  runs = []
  for p, c in ((params, cfg), fold_kv_scales(params, cfg,
                                             _random_scales(cfg, seed=4))):
    engine = ColocatedEngine(p, c, mesh, rules, pcfg, dcfg)
    got: dict[str, list] = {}

    def callback(ev, got=got):
      got.setdefault(ev.request_id, []).append((ev.token_ids, ev.logprobs))
    for i, prompt in enumerate(_prompts(3, 20)):
      s = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
      engine.submit(str(i), prompt, s, callback, seed_u32=0)
    engine.drain()
    runs.append(got)
  assert runs[0] == runs[1] and len(runs[0]) == 3


def test_fp8_weights_quantize_alike_after_folding(tiny_decode_params):
  """Q, K and V's output channels scaled by powers of two quantize to the
  same e4m3 values, their channel scales times the power: for them folding
  before or after the weights' quantization is the same."""
  params, cfg = tiny_decode_params[:2]
  scales = _random_scales(cfg, seed=5)
  fparams, _ = fold_kv_scales(params, cfg, scales)
  G = cfg.q_per_kv
  per_head = {"wq": np.repeat(scales.k, G, axis=1), "wk": 1 / scales.k,
              "wv": 1 / scales.v}
  for name, s in per_head.items():
    q, sc = quant.quantize_fp8(params["layers"][name], 1)
    fq, fsc = quant.quantize_fp8(fparams["layers"][name], 1)
    np.testing.assert_array_equal(np.asarray(fq).view(np.uint8),
                                  np.asarray(q).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(fsc),
                                  np.asarray(sc) * s[:, :, None])


# ------------------------------------------------- what the scales buy
def _pool_logits(params, cfg, prompt, cont, pool_dtype, page=16):
  """Log-probs [len(cont), V] of the tokens ``cont`` following ``prompt``,
  their K/V and the prompt's stored in a paged pool of ``pool_dtype`` (as
  a decode pool stores them: ``kv_to_pool``) and read back by attention:
  the prompt's written by its prefill, ``cont``'s by a verify pass over
  the pool (``decode_forward_tokens``), every token teacher-forced."""
  n = len(prompt)
  assert n % page == 0 and len(cont) <= page
  L, K, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
  pages = n // page
  N = pages + 2                           # the null page, the prompt's, cont's
  out = llama.prefill_forward(params, jnp.asarray([prompt]),
                              jnp.asarray([n]), cfg=cfg)
  rows = (jnp.arange(L)[:, None] * N + 1 + jnp.arange(pages)[None]).reshape(-1)

  def pool(x):                            # x: [L, 1, n, K, hd]
    empty = jnp.zeros((L * N, page, K, hd), pool_dtype)
    x = x[:, 0].reshape(L * pages, page, K, hd)
    return empty.at[rows].set(llama.kv_to_pool(x, pool_dtype))
  table = jnp.arange(1, pages + 2, dtype=jnp.int32)[None]
  res = llama.decode_forward_tokens(
      params, jnp.asarray([cont]), jnp.asarray([n], jnp.int32), pool(out.k),
      pool(out.v), table, cfg=cfg)
  return np.asarray(jax.nn.log_softmax(res.logits[0].astype(jnp.float32)))


def _small_kv_model(params, cfg):
  """``params`` changed so that K is 2**-11 and V 2**-12 of what it was
  (K and V of the tiny model are O(1): now ~1e-3, where e4m3 keeps only
  subnormals, in steps of 2**-9), Q and O changed back to compensate: the
  same model, exactly (folding's arithmetic with scales 2**11, 2**12)."""
  s = kvs.KvScales(np.full((cfg.num_layers, cfg.num_kv_heads), 2.0 ** 11),
                   np.full((cfg.num_layers, cfg.num_kv_heads), 2.0 ** 12))
  small, _ = fold_kv_scales(params, cfg, s)
  return small


def test_calibrated_scales_save_an_fp8_pool_from_underflow(tiny_decode_params):
  params, cfg = tiny_decode_params[:2]
  small = _small_kv_model(params, cfg)
  prompt, cont = _prompts(1, 32, seed=7)[0], _prompts(1, 16, seed=8)[0]
  base = _pool_logits(small, cfg, prompt, cont, jnp.float32)
  # The same model, exactly (its pool of float32 holds the small K/V).
  np.testing.assert_array_equal(
      base, _pool_logits(params, cfg, prompt, cont, jnp.float32))
  k, v, _ = kv_amax(small, cfg, _prompts(4, 48, seed=9))
  assert k.max() < 2.0 ** -6 and v.max() < 2.0 ** -6   # e4m3's subnormals
  scales = kvs.from_amax(k, v)
  scaled = _pool_logits(*fold_kv_scales(small, cfg, scales), prompt, cont,
                        jnp.float8_e4m3fn)
  unscaled = _pool_logits(small, cfg, prompt, cont, jnp.float8_e4m3fn)
  err_scaled = np.abs(scaled - base).mean()
  err_unscaled = np.abs(unscaled - base).mean()
  # Scaled, K/V keep e4m3's 3 mantissa bits (each within 2**-4 of itself);
  # unscaled, most round to 0 or +-2**-9: several times the error.
  assert err_scaled * 4 < err_unscaled, (err_scaled, err_unscaled)
  # And no worse than the scaled pool of the original model, whose K/V
  # are in e4m3's normal range already: the scales' worth is range alone.
  orig = _pool_logits(*fold_kv_scales(params, cfg, kvs.from_amax(
      *kv_amax(params, cfg, _prompts(4, 48, seed=9))[:2])), prompt, cont,
                      jnp.float8_e4m3fn)
  np.testing.assert_array_equal(scaled, orig)


# ------------------------------------------------------- the scales
@pytest.mark.parametrize("headroom", [1.0, 2.0, 3.5])
def test_scales_from_amax_are_the_smallest_powers_of_two_that_fit(headroom):
  rng = np.random.default_rng(0)
  amax = np.concatenate([10.0 ** rng.uniform(-7, 5, 200),
                         2.0 ** np.arange(-20, 12), [0.0, 448.0, 224.0]])
  amax = amax.reshape(-1, 1)
  s = kvs.from_amax(amax, amax, headroom).k.astype(np.float64)
  assert (np.frexp(s)[0] == 0.5).all()                    # powers of two
  target = 448.0 / headroom
  assert (amax / s <= target).all()
  real = amax > 0
  assert (amax[real] / (s[real] / 2) > target).all()      # the smallest
  assert (s[~real] == 1).all()
  with pytest.raises(ValueError, match="headroom"):
    kvs.from_amax(amax, amax, 0.5)


def test_the_calibration_tool_writes_scales_that_fit(tmp_path, tiny_model_dir):
  """tools/calibrate_kv_scales.py on the tiny model: a file the pools
  read back, powers of two putting every head's measured max below
  448 / headroom, and the amax it records is what the scaled model
  stores (the folded model's own K/V maxima, measured again)."""
  out = tmp_path / "scales.json"
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  proc = subprocess.run(
      [sys.executable, str(REPO / "tools" / "calibrate_kv_scales.py"),
       "--checkpoint=tiny", f"--out={out}", "--num_prompts=4",
       "--max_prompt_tokens=64", "--headroom=3"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-4000:]
  cfg = tiny_config()
  scales = kvs.read_file(out, cfg)
  rec = json.loads(out.read_text())["calibration"]
  assert rec["tokens"] > 0 and rec["headroom"] == 3
  for name, s in (("k_amax", scales.k), ("v_amax", scales.v)):
    amax = np.asarray(rec[name], np.float64)
    assert (amax > 0).all()
    assert (amax / s <= 448 / 3).all() and (amax / s > 448 / 6).all()


def test_kv_amax_counts_real_tokens_only(tiny_decode_params):
  """Padding (the rest of a prompt's bucket) is not measured: a prompt
  measured alone gives the same maxima whatever its bucket."""
  params, cfg = tiny_decode_params[:2]
  prompts = _prompts(2, 21)
  a = kv_amax(params, cfg, prompts, bucket=32)
  b = kv_amax(params, cfg, prompts, bucket=64)
  # The two buckets' programs may round differently (another blocking of
  # the same sums): each layer's maxima within the bound of its K/V, taken
  # at the maxima's own size (above the K/V values' RMS, so looser).
  for layer in range(cfg.num_layers):
    weights = kv_weights(cfg, layer, context=64)
    for i in (0, 1):
      assert_close(a[i][layer], b[i][layer], weights,
                   err_msg=f"layer {layer} {'KV'[i]}")
  assert a[2] == b[2] == 42
  folded = fold_kv_scales(params, cfg, _random_scales(cfg))
  with pytest.raises(ValueError, match="folded in already"):
    kv_amax(*folded, prompts)


# ------------------------------------------------------ the model's name
def test_scales_name_the_model(tiny_decode_params):
  """Scales enter the fingerprint (and so the names of KV blocks and the
  handshake); scales of 1 change nothing; the handshake names the cause."""
  from pdjax.engine.block_names import layout_fingerprint
  from pdjax.launch.worker import _model_info
  from pdjax.service.registry import WorkerRegistry
  from pdjax.v1 import common_pb2
  params, cfg = tiny_decode_params[:2]
  a = fold_kv_scales(params, cfg, _random_scales(cfg, seed=1))[1]
  b = fold_kv_scales(params, cfg, _random_scales(cfg, seed=2))[1]
  assert len({cfg.fingerprint(), a.fingerprint(), b.fingerprint()}) == 3
  assert layout_fingerprint(a, 16) != layout_fingerprint(cfg, 16)
  ones = np.ones((cfg.num_layers, cfg.num_kv_heads))
  same = fold_kv_scales(params, cfg, kvs.KvScales(ones, ones))
  assert same[0] is params and same[1] is cfg
  # The unscaled fingerprint is what it was before scales existed: every
  # field but name, vocab_padding (and the storage-only fused_projections,
  # added since), hashed as before.
  fields = dataclasses.asdict(cfg)
  for name in ("name", "vocab_padding", "kv_scales", "fused_projections"):
    fields.pop(name)
  assert cfg.fingerprint() == hashlib.sha256(json.dumps(
      fields, sort_keys=True).encode()).hexdigest()[:16]

  def info(c):          # what a worker announces
    return common_pb2.WorkerInfo(model=_model_info(c, 16, 128, "fp8"))
  assert info(a).model.kv_scales == a.kv_scales
  reg = WorkerRegistry(expected_model=info(a).model)
  assert reg.check_compatible(info(a)) is None
  assert reg.check_compatible(info(cfg)) == (
      f"kv_scales '' differs from the deployment's {a.kv_scales!r}")


def test_folding_refuses_what_it_cannot_fold(tiny_decode_params):
  params, cfg = tiny_decode_params[:2]
  scales = _random_scales(cfg)
  folded = fold_kv_scales(params, cfg, scales)
  cases = [
      ((params, cfg.replace(architecture="gemma2"), scales),
       "cannot be folded into a 'gemma2' model"),
      (folded + (scales,), "already has KV scales folded in"),
      ((params, cfg, _random_scales(cfg.replace(num_layers=3))),
       f"scales for 3 layers x 4 KV heads, but {cfg.name} has 2 layers"),
  ]
  qparams, qcfg = quant.quantize_params(params, cfg)
  cases.append(((qparams, qcfg, scales), "before the weights are quantized"))
  # float16's range: V's projection divided by 2**20 leaves it (its
  # smallest normal is 2**-14).
  big = kvs.KvScales(np.ones((2, 4)), np.full((2, 4), 2.0 ** 20), "big")
  half = jax.tree.map(lambda x: x.astype(jnp.float16), params)
  cases.append(((half, cfg.replace(dtype="float16"), big),
                "take wv out of the dtype's normal range"))
  for args, match in cases:
    with pytest.raises(kvs.KvScalesError, match=match):
      fold_kv_scales(*args)


# ------------------------------------------------------------- files
def _doc(cfg, **changes):
  s = np.full((cfg.num_layers, cfg.num_kv_heads), 0.25).tolist()
  doc = {"format": kvs.FORMAT, "version": kvs.VERSION,
         "num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads,
         "k_scale": s, "v_scale": s}
  doc.update(changes)
  return json.dumps(doc)


def test_a_scales_file_round_trips_and_rounds_up(tmp_path):
  cfg = tiny_config()
  scales = _random_scales(cfg)
  path = tmp_path / "s.json"
  kvs.write_file(path, scales, {"prompts": "none"})
  back = kvs.read_file(path, cfg)
  np.testing.assert_array_equal(back.k, scales.k)
  np.testing.assert_array_equal(back.v, scales.v)
  assert back.digest() == scales.digest() and back.source == str(path)
  # A scale that is no power of two is rounded up (no more saturation than
  # the file's own value would give).
  doc = json.loads(_doc(cfg))
  doc["k_scale"][1][2] = 0.3
  doc["v_scale"][0][0] = 5
  path.write_text(json.dumps(doc))
  back = kvs.read_file(path, cfg)
  assert back.k[1, 2] == 0.5 and back.v[0, 0] == 8 and back.k[0, 0] == 0.25


@pytest.mark.parametrize("text, match", [
    ("{", "not valid JSON"),
    ("[1, 2]", "not a pdjax-kv-scales file"),
    ('{"format": "other"}', "not a pdjax-kv-scales file"),
    ("VERSION", "version 2, this pdjax reads version 1"),
    ("LAYERS", "made for 3 layers x 4 KV heads, but pdjax-tiny has 2 layers "
     "x 4 KV heads"),
    ("HEADS", "made for 2 layers x 8 KV heads"),
    ("SHORT", r"k_scale\[1\] must be a list of 4 scales"),
    ("NOT_LIST", "'v_scale' must be a list of 2 layers"),
    ("NEGATIVE", r"v_scale\[0\]\[3\] is -1; a scale is a positive number"),
    ("STRING", r"k_scale\[0\]\[0\] is '1'; a scale is a positive number"),
    ("HUGE", "is a power of two from 2\\*\\*-32 to 2\\*\\*32"),
])
def test_bad_scales_files_are_refused(tmp_path, text, match):
  cfg = tiny_config()
  row = [0.25] * 4
  docs = {
      "VERSION": _doc(cfg, version=2),
      "LAYERS": _doc(cfg, num_layers=3),
      "HEADS": _doc(cfg, num_kv_heads=8),
      "SHORT": _doc(cfg, k_scale=[row, row[:3]]),
      "NOT_LIST": _doc(cfg, v_scale=0.25),
      "NEGATIVE": _doc(cfg, v_scale=[row[:3] + [-1], row]),
      "STRING": _doc(cfg, k_scale=[["1"] + row[1:], row]),
      "HUGE": _doc(cfg, k_scale=[[1e12] + row[1:], row]),
  }
  path = tmp_path / "s.json"
  path.write_text(docs.get(text, text))
  with pytest.raises(kvs.KvScalesError, match=match) as e:
    kvs.read_file(path, cfg)
  assert str(path) in str(e.value)


def test_a_missing_file_is_named(tmp_path):
  with pytest.raises(kvs.KvScalesError, match="nope.json"):
    kvs.read_file(tmp_path / "nope.json", tiny_config())


# -------------------------------------------------------- checkpoints
def _with_scales(tiny_model_dir, tmp_path, k_shape=(), v_shape=(4,),
                 name="model.layers.{i}.self_attn.{x}_scale"):
  """The tiny checkpoint with K/V scales added as a HF FP8 checkpoint
  carries them: 0.3 for K, 3.0 for V (no powers of two)."""
  from safetensors.numpy import load_file, save_file
  out = tmp_path / "ckpt"
  out.mkdir()
  for f in ("config.json", "generation_config.json"):
    shutil.copy(tiny_model_dir / f, out / f)
  tensors = load_file(str(tiny_model_dir / "model.safetensors"))
  for i in range(2):
    tensors[name.format(i=i, x="k")] = np.full(k_shape, 0.3, np.float32)
    tensors[name.format(i=i, x="v")] = np.full(v_shape, 3.0, np.float32)
  save_file(tensors, str(out / "model.safetensors"))
  return out


def test_the_checkpoints_scales_are_read_and_folded(tiny_model_dir, tmp_path):
  from pdjax.engine.setup import load_sharded
  from pdjax.sharding import ShardingRules, make_mesh
  path = _with_scales(tiny_model_dir, tmp_path)
  cfg = tiny_config()
  scales = kvs.from_checkpoint(path, cfg)
  np.testing.assert_array_equal(scales.k, np.full((2, 4), 0.5))
  np.testing.assert_array_equal(scales.v, np.full((2, 4), 4.0))
  assert kvs.from_checkpoint(tiny_model_dir, cfg) is None
  rules = ShardingRules.load("decode_dp")
  mesh = make_mesh({"dp": 1}, jax.devices()[:1])
  _, fcfg = load_sharded(path, rules, mesh, kv_dtype="fp8")
  assert fcfg.kv_scales == scales.digest()
  _, plain = load_sharded(path, rules, mesh)           # kv_dtype "auto"
  assert plain.kv_scales is None
  # A scales file the deployment names wins over the checkpoint's.
  own = _random_scales(cfg)
  kvs.write_file(tmp_path / "s.json", own)
  _, fcfg = load_sharded(path, rules, mesh, kv_dtype="fp8",
                         kv_scales=str(tmp_path / "s.json"))
  assert fcfg.kv_scales == own.digest()
  with pytest.raises(kvs.KvScalesError, match="kv_dtype is 'auto'"):
    load_sharded(path, rules, mesh, kv_scales=str(tmp_path / "s.json"))


def test_modelopt_names_and_bad_checkpoint_scales(tiny_model_dir, tmp_path):
  cfg = tiny_config()
  path = _with_scales(tiny_model_dir, tmp_path, k_shape=(4, 1, 1),
                      v_shape=(1,),
                      name="model.layers.{i}.self_attn.{x}_proj.{x}_scale")
  scales = kvs.from_checkpoint(path, cfg)
  assert (scales.k == 0.5).all() and (scales.v == 4).all()
  shutil.rmtree(path)
  path = _with_scales(tiny_model_dir, tmp_path, v_shape=(3,))
  with pytest.raises(kvs.KvScalesError, match="has 3 values; a KV scale is "
                     "one per layer or one per KV head"):
    kvs.from_checkpoint(path, cfg)


# ------------------------------------------------------- configuration
def test_the_deployment_key_and_its_flag(tmp_path):
  from pdjax import config as C
  from pdjax.launch import local
  dep = C.resolve(None, {"kv_dtype": "fp8", "kv_scales": "s.json"})
  assert dep.kv_scales == "s.json" and C.DeploymentConfig().kv_scales is None
  path = tmp_path / "d.toml"
  path.write_text(dep.to_toml())
  assert C.resolve(path) == dep
  with pytest.raises(ValueError, match="kv_scales .* needs kv_dtype = 'fp8'"):
    C.resolve(None, {"kv_scales": "s.json"})
  fv = flags.FlagValues()
  cfg_flags = local.define_flags(fv)
  fv(["prog", "--kv_dtype=fp8", "--kv_scales=x.json"])
  assert cfg_flags.resolve(log_it=False).kv_scales == "x.json"
  assert "kv_scales" in fv and "calibrate_kv_scales" in fv["kv_scales"].help
  fv = flags.FlagValues()
  cfg_flags = local.define_flags(fv)
  fv(["prog", "--kv_scales="])                       # empty: unset
  assert cfg_flags.resolve(log_it=False).kv_scales is None
