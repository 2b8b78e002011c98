"""q/k/v and gate/up joined into one matrix each (``pdjax.model.fused``):
the layout, the model's numbers, the engines' tokens, and where it cannot
apply."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdjax.model import llama, quant
from pdjax.model.config import ModelConfig
from pdjax.model.fused import fuse_projections

CFG = ModelConfig(architecture="qwen2", vocab_size=96, hidden_size=32,
                  intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, qkv_bias=True, mlp_bias=True,
                  dtype="float32")


def _shapes(cfg):
  return jax.tree.map(lambda s: s[0], llama.param_shapes(cfg)["layers"],
                      is_leaf=llama._is_leaf)  # pylint: disable=protected-access


def test_the_fused_layout_joins_along_heads_and_mlp_width():
  plain = _shapes(CFG)
  fused = _shapes(CFG.replace(fused_projections=True))
  L, D, F, hd = 2, 32, 48, 8
  assert fused["wqkv"] == (L, D, 4 + 2 + 2, hd)
  assert fused["bqkv"] == (L, 4 + 2 + 2, hd)
  assert fused["w_gate_up"] == (L, D, 2 * F)
  assert fused["b_gate_up"] == (L, 2 * F)
  for part in ("wq", "wk", "wv", "bq", "bk", "bv", "w_gate", "w_up",
               "b_gate", "b_up"):
    assert part in plain and part not in fused
  assert fused["wo"] == plain["wo"] and fused["w_down"] == plain["w_down"]
  # FP8: the joined matrices are what is quantized, one scale per column.
  q = _shapes(CFG.replace(fused_projections=True, weight_dtype=quant.FP8))
  assert q["wqkv"] == [(8, hd, D)] * L and q["wqkv_scale"] == (L, 8, hd)
  assert q["w_gate_up"] == [(2 * F, D)] * L
  assert q["w_gate_up_scale"] == (L, 2 * F)
  # The model's numbers, not its storage: the fingerprint is the same.
  assert CFG.replace(fused_projections=True).fingerprint() == (
      CFG.fingerprint())


def test_the_fused_model_computes_the_separate_projections():
  """Each joined column is the same dot product as its part's: float32
  logits within a few units of rounding of the whole forward pass (the
  GEMMs of the joined shapes may add in another order)."""
  params = llama.init_params(CFG, seed=3, std=0.3)
  # (fusing consumes its tree's parts: a copy of the tree, same arrays)
  fparams, fcfg = fuse_projections(
      {**params, "layers": dict(params["layers"])}, CFG)
  assert fcfg.fused_projections and "wqkv" in fparams["layers"]
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 11)),
                       jnp.int32)
  want = np.asarray(llama.reference_forward(params, tokens, cfg=CFG))
  got = np.asarray(llama.reference_forward(fparams, tokens, cfg=fcfg))
  # A reordered sum of K <= 48 float32 terms moves by at most 2 gamma_K of
  # its terms' magnitude (gamma_K ~ K 2^-24); four such GEMM groups (q/k/v
  # and gate/up in each of two layers), with 8x for what the norms and
  # the attention carry on: far above the 12 ulps seen, far below a
  # wrong column (order 1).
  scale = np.abs(want).max()
  gamma = 48 * 2.0 ** -24
  assert np.abs(got - want).max() <= 8 * 4 * 2 * gamma * scale
  # Fusing twice is a no-op; quantized weights are refused.
  assert fuse_projections(fparams, fcfg)[0] is fparams
  qparams, qcfg = quant.quantize_params(params, CFG)
  with pytest.raises(ValueError, match="before quantizing"):
    fuse_projections(qparams, qcfg)


def test_engines_serve_fused_projections(tiny_model_dir):
  """A colocated engine on a decode_dp mesh loaded with joined projections,
  in float32 and with FP8 weights, gives the greedy tokens of one loaded
  without them."""
  from pdjax.engine.colocated import ColocatedEngine
  from pdjax.engine.setup import load_sharded
  from pdjax.sharding import ShardingRules, make_mesh
  from tests.test_quant import _greedy_tokens, _pool_configs
  rules = ShardingRules.load("decode_dp")
  mesh = make_mesh({"dp": 1}, jax.devices()[:1])
  pcfg, dcfg = _pool_configs()
  for weight_dtype in (None, quant.FP8):
    tokens = []
    for fuse in ("off", "auto"):
      params, cfg = load_sharded(tiny_model_dir, rules, mesh,
                                 weight_dtype=weight_dtype,
                                 fuse_projections=fuse)
      assert cfg.fused_projections == (fuse == "auto")
      assert ("wqkv" in params["layers"]) == cfg.fused_projections
      tokens.append(_greedy_tokens(
          ColocatedEngine(params, cfg, mesh, rules, pcfg, dcfg)))
    assert tokens[0] == tokens[1], weight_dtype


def test_a_mesh_that_splits_heads_keeps_them_separate(tiny_model_dir):
  from pdjax.engine.setup import load_sharded
  from pdjax.model.fused import can_fuse
  from pdjax.sharding import ShardingRules, make_mesh
  tp_rules = ShardingRules.load("prefill_tp")
  assert can_fuse(tp_rules, make_mesh({"tp": 1}, jax.devices()[:1]))
  tp2 = make_mesh({"tp": 2}, jax.devices()[:2])
  assert not can_fuse(tp_rules, tp2)
  with pytest.raises(ValueError, match="splits attention heads"):
    load_sharded(tiny_model_dir, tp_rules, tp2, fuse_projections="on")
  _, cfg = load_sharded(tiny_model_dir, tp_rules, tp2,
                        fuse_projections="auto")
  assert not cfg.fused_projections


def test_each_pool_says_whether_it_joins(tmp_path):
  """[decode] joins where it can by default, [prefill] not unless asked;
  a value that is not auto, on or off is refused by name."""
  from pdjax import config as C
  dep = C.DeploymentConfig.load("test")
  assert dep.decode.fuse_projections == "auto"
  assert dep.prefill.fuse_projections == "auto"
  asked = C.resolve("test", {"prefill": {"fuse_projections": "off"}})
  assert asked.prefill.fuse_projections == "off"
  bad = tmp_path / "bad.toml"
  bad.write_text('[decode]\nfuse_projections = "yes"\n')
  with pytest.raises(ValueError, match="fuse_projections: 'yes' is not one "
                     "of auto, on, off"):
    C.resolve(str(bad))
