"""Projections that read the same input, joined into one matrix each.

q, k and v of a layer all read the normed residual, as gate and up read
the MLP's: ``fuse_projections`` concatenates them (``wqkv`` along the heads,
``w_gate_up`` along the MLP width, their biases alike) so a step computes
each group in one GEMM. At a few rows a GEMM only reads its weight, and a
thin one (Llama-3-8B's k and v: 4096 x 1024) launches too few blocks to
keep the memory busy; joined, the group reads at the rate of a large one.
Each output column is the same dot product as before, so the model's
numbers are those of the separate matrices (within the rounding of the
GEMM chosen for the joined shape).

Done once, where weights are placed for a pool (``pdjax.engine.setup``),
before any quantization (per-output-channel FP8 scales of the joined
matrix are those of its parts). A pool whose mesh splits heads or the MLP
width keeps them separate: a joined axis split over devices would give each
device a mix of q, k and v heads (``can_fuse``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.model import llama
from pdjax.model.config import ModelConfig


def can_fuse(rules, mesh) -> bool:
  """Whether a pool of these sharding rules on ``mesh`` may fuse: it
  splits none of the axes the joined matrices concatenate over more than
  one device."""
  return all(mesh.shape[m] == 1 for axis in ("heads", "kv_heads", "mlp")
             for m in rules.rules.get(axis, ()))


def fuse_projections(params: llama.Params, cfg: ModelConfig,
                     shardings=None) -> tuple[llama.Params, ModelConfig]:
  """``params`` in the fused layout (``llama.FUSED``) and the config that
  says so. ``shardings``: the fused config's tree (``setup.param_shardings``)
  to place the joined weights in; None keeps their parts'.

  The parts are taken out of ``params["layers"]`` as each group is joined
  (the caller's tree is consumed), so where nothing else holds them one
  group's joined copy at a time is what this adds to the weights' memory
  (Llama-3-8B's gate/up: 7.5 GB in bf16)."""
  if cfg.fused_projections:
    return params, cfg
  if cfg.weight_dtype is not None:
    raise ValueError("fuse the projections before quantizing them "
                     f"(these are already {cfg.weight_dtype})")
  fcfg = cfg.replace(fused_projections=True)
  layers = params["layers"]
  for fused, parts in llama.FUSED.items():
    if parts[0] not in layers:
      continue
    axis = layers[parts[0]].ndim - (2 if fused in ("wqkv", "bqkv") else 1)
    join = lambda *xs, axis=axis: jnp.concatenate(xs, axis=axis)
    if shardings is not None:
      fn = jax.jit(join, out_shardings=shardings["layers"][fused])
    else:
      fn = jax.jit(join)
    joined = fn(*(layers[p] for p in parts))
    for p in parts:
      del layers[p]
    layers[fused] = joined
    jax.block_until_ready(joined)   # the parts' memory goes back now
  return {**params, "layers": layers}, fcfg


def join_scales(scales: dict) -> dict:
  """Per-channel scales of separate projections (``quant.quantize_fp8``'s
  ``scale``: [layers, *out]) in the fused layout (``llama.FUSED``): a
  joined weight's scales are its parts', in its order, along the axis its
  output channels were joined on (the heads of q/k/v, the MLP width of
  gate/up; axis 1 of the scales either way), where every part has them; a
  part's alone are dropped."""
  out = {k: v for k, v in scales.items()
         if not any(k in parts for parts in llama.FUSED.values())}
  for fused, parts in llama.FUSED.items():
    if all(p in scales for p in parts):
      out[fused] = np.concatenate([scales[p] for p in parts], axis=1)
  return out


__all__ = ["can_fuse", "fuse_projections", "join_scales"]
