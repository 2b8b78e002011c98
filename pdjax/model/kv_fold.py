"""Per-head KV scales folded into the attention weights.

With scales s_k, s_v [layers, kv_heads] (``pdjax.model.kv_scales``), the
weights are changed so that the K and V the model computes, and so stores,
are K / s_k and V / s_v of their KV head, and nothing else it computes
changes:

* the K and V projections' output channels of KV head h, and their biases,
  are divided by s_k[h] and s_v[h];
* the Q projection's output channels of the query heads that attend to h
  (h * G .. h * G + G - 1, G = num_heads // num_kv_heads, as GQA groups
  them), and their biases, are multiplied by s_k[h]: q.k is unchanged;
* the O projection's input rows of those query heads are multiplied by
  s_v[h]: a head's attention output, a convex combination of V / s_v, is
  scaled back where the heads are mixed.

RoPE rotates each head's channel pairs by the same angles whatever their
size, so it commutes with scaling a head, and attention's 1/sqrt(head_dim)
multiplies q.k as before. The architectures pdjax serves (Llama, Mistral,
Qwen2) have no QK norm and no logit soft-capping, which would not commute
(``FOLDABLE``). Every scale is a power of two, so every product, sum and
rounding of the folded model is the unfolded one's times a power of two,
exactly, while the values stay normal in the model's dtype: its logits are
the same bits (``tests/test_kv_scales.py`` holds it to that). bfloat16 and
float32 have float32's exponent range, which scales up to
2**``MAX_EXPONENT`` leave far from its ends; float16 is narrow, and the
folded weights are checked to have stayed in it (its activations are not).

Fold before quantizing the weights (``pdjax.model.quant``, one scale per
output channel): Q, K and V's output channels scaled by a power of two
quantize to the same e4m3 values, their channel scales times s, so for them
the order does not matter; O's output channels each mix every head, scaled
differently, so O is quantized on the folded weights' own grid (the same
error bound, not the same bits as the unfolded model's).
An FP8 checkpoint's own weight scales, which a pool that stores FP8
weights takes (``quant.quantize_fp8``), follow Q's, K's and V's channels
(``fold_weight_scales``), so those keep the checkpoint's e4m3 values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.model.config import ModelConfig
from pdjax.model.kv_scales import KvScales, KvScalesError
from pdjax.model.llama import Params

FOLDABLE = ("llama", "mistral", "qwen2")


def fold_kv_scales(params: Params, cfg: ModelConfig, scales: KvScales
                   ) -> tuple[Params, ModelConfig]:
  """(params, cfg) with ``scales`` folded in (the module docstring says
  how); the config's ``kv_scales`` names them, so the fingerprint of a
  model whose KV is scaled differs from the unscaled one's. Scales of 1
  change nothing (the same params and config come back). Each weight
  keeps its sharding."""
  if cfg.architecture not in FOLDABLE:
    raise KvScalesError(f"KV scales cannot be folded into a "
                        f"{cfg.architecture!r} model (pdjax folds them into "
                        f"{', '.join(FOLDABLE)})")
  if cfg.weight_dtype is not None:
    raise KvScalesError("KV scales are folded before the weights are "
                        f"quantized ({cfg.weight_dtype}), not after")
  if cfg.kv_scales is not None:
    raise KvScalesError(f"{cfg.name} already has KV scales folded in "
                        f"({cfg.kv_scales})")
  scales.check_model(cfg)
  if scales.is_unit():
    return params, cfg
  f = _head_factors(cfg, scales)                 # [L, heads]
  by = {"wq": f["wq"][:, None, :, None],         # [L, D, H, hd]
        "wk": f["wk"][:, None, :, None],         # [L, D, K, hd]
        "wv": f["wv"][:, None, :, None],
        "wo": f["wo"][:, :, None, None]}         # [L, H, hd, D]
  if cfg.qkv_bias:
    by.update(bq=f["wq"][:, :, None], bk=f["wk"][:, :, None],
              bv=f["wv"][:, :, None])
  layers = dict(params["layers"])
  for name, factor in by.items():
    layers[name], ok = _scaled(layers[name], factor)
    if not ok:
      ek, ev = scales.exponents()
      lo, hi = min(ek.min(), ev.min()), max(ek.max(), ev.max())
      raise KvScalesError(
          f"{scales.source or 'KV scales'}: folded into {cfg.name}'s "
          f"{cfg.dtype} weights, scales from 2**{lo} to 2**{hi} take "
          f"{name} out of the dtype's normal range")
  return {**params, "layers": layers}, cfg.replace(kv_scales=scales.digest())


def fold_weight_scales(weight_scales: dict, cfg: ModelConfig,
                       scales: KvScales) -> dict:
  """An FP8 checkpoint's per-channel weight scales (``quant.quantize_fp8``'s
  ``scale``: [layers, *out], by projection) for the weights that
  ``fold_kv_scales`` makes of its weights: Q's, K's and V's output channels
  are multiplied by powers of two, and so are their scales, which keeps the
  checkpoint's e4m3 values; O's output channels each mix heads scaled
  differently, so its scales are left out (quantized with its own)."""
  if scales.is_unit():
    return weight_scales
  f = _head_factors(cfg, scales)
  out = {name: s for name, s in weight_scales.items() if name != "wo"}
  for name in ("wq", "wk", "wv"):
    if name in out:                              # [L, heads, hd]
      out[name] = (out[name] * f[name][:, :, None]).astype(np.float32)
  return out


def _head_factors(cfg: ModelConfig, scales: KvScales) -> dict:
  """What folding multiplies each projection's heads by, [layers, heads]:
  Q's and O's query heads by their KV head's s_k and s_v, K's and V's KV
  heads by 1 / s_k and 1 / s_v (Q, K, V: output channels; O: input
  rows)."""
  G = cfg.q_per_kv
  k, v = scales.k, scales.v                      # [L, K]
  return {"wq": np.repeat(k, G, axis=1), "wk": 1 / k, "wv": 1 / v,
          "wo": np.repeat(v, G, axis=1)}


def _scaled(w, factor: np.ndarray):
  """(w * factor in w's dtype and sharding, whether every value normal in
  that dtype came out exactly w * factor: no overflow, no loss of bits
  below the normal range; values subnormal already are not held to it)."""
  out, ok = _scale_program(getattr(w, "sharding", None))(
      w, np.asarray(factor, np.float32))
  return out, bool(ok)


def _scale(w, factor):
  w32 = w.astype(jnp.float32)
  out = (w32 * factor).astype(w.dtype)
  normal = jnp.abs(w32) >= jnp.finfo(w.dtype).tiny
  exact = out.astype(jnp.float32) / factor == w32
  return out, ~(normal & ~exact).any()


@functools.lru_cache(maxsize=None)
def _scale_program(sharding):
  """``_scale`` jitted with its output in ``sharding`` (None: where XLA
  puts it). The factor is an argument, not a constant: a model's weights
  of one shape share a program, and models of one shape theirs."""
  if sharding is None:
    return jax.jit(_scale)
  return jax.jit(_scale, out_shardings=(sharding, None))


__all__ = ["FOLDABLE", "fold_kv_scales"]
