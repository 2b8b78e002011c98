"""GGUF tensors -> the pdjax weight pytree.

GGUF names Llama's tensors its own way (``token_embd``, ``blk.N.attn_q``,
``ffn_gate``, ``output_norm``, ``output``; no ``output`` when the embedding
is tied) and stores each matrix as torch does, ``[out, in]``. Each tensor
kind is read for every layer, dequantized to float32
(``gguf_file.GGUFFile.read``), brought to Hugging Face's layout, turned into
pdjax's layout by the same code as safetensors checkpoints
(``weights._hf_to_pdjax``), stacked over layers, cast to the pool's dtype
and placed straight into its sharding.

One difference from a Hugging Face checkpoint: llama.cpp's converter
permutes the rows of ``attn_q`` and ``attn_k`` within each head, because
ggml's rope rotates adjacent pairs ``(x[2i], x[2i+1])`` where Hugging Face's
(and pdjax's, see ``llama.apply_rope``) rotates the halves
``(x[i], x[i + hd/2])``. The converter moved HF row ``i`` of a head to row
``2i`` and row ``hd/2 + i`` to ``2i + 1``; ``unpermute_rope_rows`` moves them
back, so the same rope code serves both formats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from pdjax.model.config import ModelConfig
from pdjax.model.gguf_file import GGUFFile
from pdjax.model.llama import Params, param_shapes
from pdjax.model.weights import _hf_to_pdjax, _place

# pdjax name -> (GGUF name pattern, kind of weights._hf_to_pdjax, rope rows:
# the head count whose rows llama.cpp permuted, or None).
_LAYER_MAP = {
    "attn_norm": ("blk.{i}.attn_norm.weight", "vector", None),
    "wq": ("blk.{i}.attn_q.weight", "in_heads", "num_heads"),
    "wk": ("blk.{i}.attn_k.weight", "in_heads", "num_kv_heads"),
    "wv": ("blk.{i}.attn_v.weight", "in_heads", None),
    "wo": ("blk.{i}.attn_output.weight", "heads_out", None),
    "mlp_norm": ("blk.{i}.ffn_norm.weight", "vector", None),
    "w_gate": ("blk.{i}.ffn_gate.weight", "linear", None),
    "w_up": ("blk.{i}.ffn_up.weight", "linear", None),
    "w_down": ("blk.{i}.ffn_down.weight", "linear", None),
}
_TOP_MAP = {
    "embed": ("token_embd.weight", "embedding"),
    "final_norm": ("output_norm.weight", "vector"),
    "lm_head": ("output.weight", "linear"),
}


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation: ``[heads * hd, in]`` rows from
  ggml's interleaved-pair order back to Hugging Face's rotate-half order."""
  out_dim = w.shape[0]
  hd = out_dim // num_heads
  return (w.reshape(num_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


def permute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """llama.cpp's permutation (Hugging Face order -> ggml order); the inverse
  of ``unpermute_rope_rows``, for writing GGUF files."""
  hd = w.shape[0] // num_heads
  return (w.reshape(num_heads, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


def _hf_tensor(f: GGUFFile, cfg: ModelConfig, name: str,
               rope_heads: str | None) -> np.ndarray:
  x = f.read(name)
  if rope_heads is not None:
    x = unpermute_rope_rows(x, getattr(cfg, rope_heads))
  return x


def load_gguf_params(f: GGUFFile, cfg: ModelConfig, shardings=None) -> Params:
  """Reads a GGUF's tensors into a pdjax pytree of dtype ``cfg.dtype``.

  ``cfg`` is ``gguf_file.model_config(f)`` (possibly with another dtype),
  which has already checked every tensor's presence and shape.
  ``shardings``: a pytree like the params of ``jax.sharding.Sharding``, or
  None for the default device.
  """
  dtype = np.dtype(cfg.jnp_dtype)
  spec = param_shapes(cfg)
  shard_tree = shardings or jax.tree.map(
      lambda _: None, spec, is_leaf=lambda x: isinstance(x, tuple)
      and len(x) == 2 and isinstance(x[1], tuple))
  params: dict[str, Any] = {"layers": {}}
  for key, (shape, _) in spec["layers"].items():
    pattern, kind, rope_heads = _LAYER_MAP[key]
    stacked = np.empty(shape, dtype)
    for i in range(cfg.num_layers):
      x = _hf_tensor(f, cfg, pattern.format(i=i), rope_heads)
      stacked[i] = _hf_to_pdjax(x, kind, shape[1:]).astype(dtype)
    params["layers"][key] = _place(stacked, dtype, shard_tree["layers"][key])
    del stacked
  for key in ("embed", "final_norm", "lm_head"):
    if key not in spec:
      continue
    name, kind = _TOP_MAP[key]
    x = _hf_to_pdjax(f.read(name), kind, spec[key][0])
    params[key] = _place(x, dtype, shard_tree[key])
  return params


def load_gguf(path: str | Path, shardings_fn=None, *, dtype: str | None = None
              ) -> tuple[Params, ModelConfig]:
  """``(params, cfg)`` of the GGUF file at ``path``; ``shardings_fn(cfg)``
  gives the target sharding tree once the config is known."""
  from pdjax.model.gguf_file import model_config, open_gguf
  f = open_gguf(path)
  cfg = model_config(f, dtype=dtype)
  shardings = shardings_fn(cfg) if shardings_fn is not None else None
  return load_gguf_params(f, cfg, shardings), cfg


__all__ = ["load_gguf", "load_gguf_params", "unpermute_rope_rows",
           "permute_rope_rows"]
