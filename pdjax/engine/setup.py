"""Building engine inputs: weights placed by a rule set on a mesh.

Every pool (prefill TP, decode DP, colocated) starts the same way: weights
laid out by the pool's rule set on the pool's mesh. These helpers are that
one step, so servers, benchmarks and tests do not each re-derive the
sharding tree. Loading goes through ``pdjax.model.loading.load_model``, so a
pdjax orbax checkpoint and a Hugging Face directory are both accepted and
each array is placed straight into its final sharding (no full host copy on
every device).

A vocabulary that a pool's mesh does not divide (1013 tokens on a TP=2
prefill mesh) is padded to the next multiple, as vLLM pads its
vocabulary-parallel embedding: ``fit_vocab`` gives the config of the padded
model, whose extra logits are -inf (``pdjax.model.llama``), and the
weights are padded with zero rows once read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from pdjax.model import llama
from pdjax.model.config import ModelConfig
from pdjax.sharding import ShardingRules


def param_shardings(cfg: ModelConfig, rules: ShardingRules, mesh: Mesh):
  """The NamedSharding of every weight under ``rules`` on ``mesh``; raises
  ShardingError (naming the weight and axis) when a rule does not divide."""
  return rules.tree(mesh, llama.param_shapes(cfg))


def vocab_shards(rules: ShardingRules, mesh: Mesh) -> int:
  """How many ways ``rules`` split the vocabulary on ``mesh``."""
  n = 1
  for axis in rules.rules.get("vocab", ()):
    n *= mesh.shape.get(axis, 1)
  return n


def fit_vocab(cfg: ModelConfig, rules: ShardingRules, mesh: Mesh
              ) -> ModelConfig:
  """``cfg`` with its vocabulary padded to a multiple of the ways ``rules``
  split it on ``mesh`` (``ModelConfig.vocab_padding``; none where it
  divides): a TP=2 pool serves a 1013-token vocabulary as 1014 rows, as
  vLLM's VocabParallelEmbedding pads, instead of refusing it."""
  return cfg.replace(vocab_padding=-cfg.vocab_size % vocab_shards(rules, mesh))


def _vocab_whole(rules: ShardingRules) -> ShardingRules:
  """``rules`` with the vocabulary not split (weights are read so, then
  padded and split)."""
  return dataclasses.replace(rules, rules={**rules.rules, "vocab": ()})


_VOCAB_AXIS = {"embed": 0, "lm_head": 1}


def pad_vocab(params: llama.Params, cfg: ModelConfig, rules: ShardingRules,
              mesh: Mesh) -> llama.Params:
  """``params`` with the embedding rows and LM head columns of
  ``cfg.padded_vocab`` (the real ones kept, zeros after them), placed by
  ``rules`` on ``mesh``. Weights already of that size are left alone."""
  shardings = param_shardings(cfg, rules, mesh)
  out = dict(params)
  for name, axis in _VOCAB_AXIS.items():
    if name not in params or params[name].shape[axis] == cfg.padded_vocab:
      continue
    out[name] = _fit_rows(params[name], axis, cfg.vocab_size,
                          cfg.vocab_padding, shardings[name])
  return out


def _fit_rows(x, axis: int, keep: int, pad: int, sharding):
  def fit(x):
    x = jax.lax.slice_in_dim(x, 0, keep, axis=axis)
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)
  return jax.jit(fit, out_shardings=sharding)(x)


def shard_params(params: Any, cfg: ModelConfig, rules: ShardingRules,
                 mesh: Mesh) -> llama.Params:
  """Places weights (host numpy arrays or jax arrays anywhere) on ``mesh``.

  Already-placed arrays are moved device to device; this is how one loaded
  copy feeds several pools of a test or a colocated benchmark. The dtype is
  converted to ``cfg.dtype`` so the engines' programs see one dtype. A
  ``cfg`` with a padded vocabulary (``fit_vocab``) gets the weights padded
  to it.
  """
  shardings = param_shardings(cfg, rules, mesh)

  def place(x, sharding, dtype):
    if getattr(x, "dtype", None) != dtype:
      x = x.astype(dtype)
    return jax.device_put(x, sharding)

  dtypes = llama.param_dtypes(cfg)
  padded = {n for n, axis in _VOCAB_AXIS.items()
            if n in params and params[n].shape[axis] != cfg.padded_vocab}
  if not padded:
    return jax.tree.map(place, params, shardings, dtypes)
  whole = param_shardings(cfg, _vocab_whole(rules), mesh)
  out = {k: (jax.tree.map(place, v, shardings[k], dtypes[k])
             if k not in padded else place(v, whole[k], dtypes[k]))
         for k, v in params.items()}
  return pad_vocab(out, cfg, rules, mesh)


def load_sharded(checkpoint_dir: str | Path, rules: ShardingRules,
                 mesh: Mesh, dtype=None,
                 check_config: Callable[[ModelConfig], None] | None = None,
                 weight_dtype: str | None = None,
                 activation_dtype: str | None = None,
                 kv_dtype: str = "auto", kv_scales: str | None = None,
                 fuse_projections: str = "off"
                 ) -> tuple[llama.Params, ModelConfig]:
  """Loads a pdjax checkpoint or HF directory straight into ``rules`` on
  ``mesh``. ``dtype`` overrides the checkpoint's storage dtype.
  ``random:<preset>`` (``pdjax.model.presets``) makes seeded random weights
  on the devices instead. ``check_config(cfg)`` runs once the config is
  read, before any weight is (it raises to refuse the model).
  ``weight_dtype``: "float8_e4m3fn" quantizes the layers' projections as
  they are placed (``pdjax.model.quant``); ``activation_dtype`` the same
  has them read FP8 activations (``ModelConfig.activation_dtype``).
  ``kv_dtype`` "fp8": the per-head KV scales of the file ``kv_scales``
  names, else the checkpoint's own, are read (a file that does not fit the
  model refused) before any weight is, and folded into the weights before
  they are quantized (``pdjax.model.kv_scales``, ``kv_fold``); the config
  returned names them (``ModelConfig.kv_scales``). ``fuse_projections``
  "on" / "auto": q/k/v and gate/up joined (``pdjax.model.fused``) before
  quantizing; where the mesh splits heads or the MLP width, "on" is a
  ValueError and "auto" keeps them separate.

  A vocabulary the mesh does not divide is padded (``fit_vocab``): its
  weights are read with the vocabulary whole, then padded and split; the
  config returned says so (``vocab_padding``)."""
  from pdjax.model import kv_scales as kvs
  from pdjax.model import presets
  random = presets.is_random(checkpoint_dir)
  fitted: dict[str, Any] = {}

  def shardings(cfg: ModelConfig):
    if check_config is not None:
      check_config(cfg)
    # Read (and checked against the model) before any weight is.
    fitted["scales"] = kvs.for_deployment(
        cfg, kv_dtype, kv_scales, None if random else checkpoint_dir)
    fitted["cfg"] = fit_vocab(cfg, rules, mesh)
    if fitted["cfg"].vocab_padding == cfg.vocab_padding:
      return param_shardings(cfg, rules, mesh)
    return param_shardings(cfg, _vocab_whole(rules), mesh)

  fp8_scales = None     # an FP8 checkpoint's own, for FP8 weights
  if random:
    cfg = presets.preset_config(presets.random_preset(checkpoint_dir),
                                dtype=dtype)
    params = llama.init_params(cfg, shardings=shardings(cfg))
  else:
    from pdjax.model.loading import fp8_weight_scales, load_model
    params, cfg = load_model(checkpoint_dir, shardings, dtype=dtype)
    if weight_dtype is not None:
      fp8_scales = fp8_weight_scales(checkpoint_dir, cfg)
  target = cfg.replace(vocab_padding=fitted["cfg"].vocab_padding)
  if target.vocab_padding != cfg.vocab_padding:
    params = pad_vocab(params, target, rules, mesh)
  if fitted["scales"] is not None:
    from pdjax.model.kv_fold import fold_kv_scales, fold_weight_scales
    params, target = fold_kv_scales(params, target, fitted["scales"])
    if fp8_scales:
      fp8_scales = fold_weight_scales(fp8_scales, target, fitted["scales"])
  from pdjax.model.fused import can_fuse
  if fuse_projections == "on" or (fuse_projections == "auto"
                                  and can_fuse(rules, mesh)):
    params, target = fuse_sharded(params, target, rules, mesh)
    if fp8_scales:
      from pdjax.model.fused import join_scales
      fp8_scales = join_scales(fp8_scales)
  if weight_dtype is None:   # (ModelConfig refuses activations alone)
    return params, target.replace(activation_dtype=activation_dtype)
  return quantize_sharded(params, target, rules, mesh, weight_dtype,
                          activation_dtype, scales=fp8_scales)


def fuse_sharded(params: llama.Params, cfg: ModelConfig,
                 rules: ShardingRules, mesh: Mesh):
  """(params, cfg) with q/k/v and gate/up joined (``pdjax.model.fused``,
  which takes the parts out of ``params``), placed in ``rules``' layout on
  ``mesh``; a ValueError where that layout splits what they join."""
  from pdjax.model import fused
  if not fused.can_fuse(rules, mesh):
    raise ValueError(
        f"fuse_projections: sharding {rules.name!r} on mesh "
        f"{dict(mesh.shape)} splits attention heads or the MLP width; "
        "joined projections need them whole on each device")
  return fused.fuse_projections(
      params, cfg, param_shardings(cfg.replace(fused_projections=True),
                                   rules, mesh))


def quantize_sharded(params: llama.Params, cfg: ModelConfig,
                     rules: ShardingRules, mesh: Mesh, weight_dtype: str,
                     activation_dtype: str | None = None,
                     scales: dict | None = None):
  """(params, cfg) with the layers' projections stored in ``weight_dtype``
  (FP8), born in ``rules``' layout on ``mesh``; the config's
  ``activation_dtype`` as given. ``scales``: an FP8 checkpoint's own
  (``quant.quantize_params``)."""
  from pdjax.model import quant
  if weight_dtype != quant.FP8:
    raise ValueError(f"weight_dtype {weight_dtype!r}: pdjax stores weights "
                     f"in {quant.FP8} or in the model's dtype")
  qcfg = cfg.replace(weight_dtype=weight_dtype)
  params, qcfg = quant.quantize_params(
      params, cfg, param_shardings(qcfg, rules, mesh), scales)
  return params, qcfg.replace(activation_dtype=activation_dtype)


__all__ = ["fit_vocab", "fuse_sharded", "load_sharded", "pad_vocab",
           "param_shardings", "quantize_sharded", "shard_params",
           "vocab_shards"]
