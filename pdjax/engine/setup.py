"""Building engine inputs: weights placed by a rule set on a mesh.

Every pool (prefill TP, decode DP, colocated) starts the same way: weights
laid out by the pool's rule set on the pool's mesh. These helpers are that
one step, so servers, benchmarks and tests do not each re-derive the
sharding tree. Loading goes through ``pdjax.model.loading.load_model``, so a
pdjax orbax checkpoint and a Hugging Face directory are both accepted and
each array is placed straight into its final sharding (no full host copy on
every device).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from pdjax.model import llama
from pdjax.model.config import ModelConfig
from pdjax.sharding import ShardingRules


def param_shardings(cfg: ModelConfig, rules: ShardingRules, mesh: Mesh):
  """The NamedSharding of every weight under ``rules`` on ``mesh``; raises
  ShardingError (naming the weight and axis) when a rule does not divide."""
  return rules.tree(mesh, llama.param_shapes(cfg))


def shard_params(params: Any, cfg: ModelConfig, rules: ShardingRules,
                 mesh: Mesh) -> llama.Params:
  """Places weights (host numpy arrays or jax arrays anywhere) on ``mesh``.

  Already-placed arrays are moved device to device; this is how one loaded
  copy feeds several pools of a test or a colocated benchmark. The dtype is
  converted to ``cfg.dtype`` so the engines' programs see one dtype.
  """
  shardings = param_shardings(cfg, rules, mesh)

  def place(x, sharding, dtype):
    if getattr(x, "dtype", None) != dtype:
      x = x.astype(dtype)
    return jax.device_put(x, sharding)

  return jax.tree.map(place, params, shardings, llama.param_dtypes(cfg))


def load_sharded(checkpoint_dir: str | Path, rules: ShardingRules,
                 mesh: Mesh, dtype=None,
                 check_config: Callable[[ModelConfig], None] | None = None,
                 weight_dtype: str | None = None
                 ) -> tuple[llama.Params, ModelConfig]:
  """Loads a pdjax checkpoint or HF directory straight into ``rules`` on
  ``mesh``. ``dtype`` overrides the checkpoint's storage dtype.
  ``random:<preset>`` (``pdjax.model.presets``) makes seeded random weights
  on the devices instead. ``check_config(cfg)`` runs once the config is
  read, before any weight is (it raises to refuse the model).
  ``weight_dtype``: "float8_e4m3fn" quantizes the layers' projections as
  they are placed (``pdjax.model.quant``)."""
  from pdjax.model import presets

  def shardings(cfg: ModelConfig):
    if check_config is not None:
      check_config(cfg)
    return param_shardings(cfg, rules, mesh)

  if presets.is_random(checkpoint_dir):
    cfg = presets.preset_config(presets.random_preset(checkpoint_dir),
                                dtype=dtype)
    params = llama.init_params(cfg, shardings=shardings(cfg))
  else:
    from pdjax.model.loading import load_model
    params, cfg = load_model(checkpoint_dir, shardings, dtype=dtype)
  if weight_dtype is None:
    return params, cfg
  from pdjax.model import quant
  if weight_dtype != quant.FP8:
    raise ValueError(f"weight_dtype {weight_dtype!r}: pdjax stores weights "
                     f"in {quant.FP8} or in the model's dtype")
  qcfg = cfg.replace(weight_dtype=weight_dtype)
  return quant.quantize_params(params, cfg,
                               param_shardings(qcfg, rules, mesh))


__all__ = ["param_shardings", "shard_params", "load_sharded"]
