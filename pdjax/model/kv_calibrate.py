"""A model's K/V ranges, measured for FP8 KV scales
(``pdjax.model.kv_scales.from_amax``): the largest |K| (after RoPE, as the
pool stores it) and |V| of each (layer, KV head) over the prefill of some
prompts. ``tools/calibrate_kv_scales.py`` runs it and writes the scales.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.model import llama
from pdjax.model.config import ModelConfig


@functools.partial(jax.jit, static_argnames="cfg")
def _prompt_amax(params, tokens, true_len, *, cfg: ModelConfig):
  """[L, K] max |K| and |V| over the real tokens of [B, T] prompts."""
  out = llama.prefill_forward(params, tokens, true_len, cfg=cfg)
  T = tokens.shape[1]
  real = (jnp.arange(T)[None, :] < true_len[:, None])[None, :, :, None, None]

  def amax(x):                                  # x: [L, B, T, K, hd]
    x = jnp.where(real, jnp.abs(x.astype(jnp.float32)), 0.0)
    return jnp.max(x, axis=(1, 2, 4))
  return amax(out.k), amax(out.v)


def kv_amax(params: llama.Params, cfg: ModelConfig,
            prompts: Iterable[Sequence[int]], *, bucket: int = 64
            ) -> tuple[np.ndarray, np.ndarray, int]:
  """(K amax, V amax, tokens seen): float32 [layers, kv_heads] maxima of
  |K| and |V| over every token of ``prompts`` (token id lists, each
  prefilled on its own, right-padded to a multiple of ``bucket`` so few
  programs compile; padding is not counted). The weights must be the
  checkpoint's own, no scales folded in: the scales are measured for
  them."""
  if cfg.kv_scales is not None:
    raise ValueError(f"{cfg.name} has KV scales folded in already "
                     f"({cfg.kv_scales}); measure the unscaled model")
  k = np.zeros((cfg.num_layers, cfg.num_kv_heads), np.float32)
  v = np.zeros_like(k)
  seen = 0
  for ids in prompts:
    n = len(ids)
    if not n:
      continue
    if min(ids) < 0 or max(ids) >= cfg.vocab_size:
      raise ValueError(f"a calibration prompt holds token id "
                       f"{min(ids) if min(ids) < 0 else max(ids)}, outside "
                       f"{cfg.name}'s vocabulary of {cfg.vocab_size}")
    if n > cfg.max_position_embeddings:
      raise ValueError(f"a calibration prompt of {n} tokens is longer than "
                       f"{cfg.name}'s {cfg.max_position_embeddings} positions")
    T = -(-n // bucket) * bucket
    tokens = np.zeros((1, T), np.int32)
    tokens[0, :n] = ids
    pk, pv = _prompt_amax(params, jnp.asarray(tokens),
                          jnp.asarray([n], jnp.int32), cfg=cfg)
    k = np.maximum(k, np.asarray(pk))
    v = np.maximum(v, np.asarray(pv))
    seen += n
  return k, v, seen


__all__ = ["kv_amax"]
