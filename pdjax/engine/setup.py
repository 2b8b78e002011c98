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
  dtype = cfg.jnp_dtype

  def place(x, sharding):
    if getattr(x, "dtype", None) != dtype:
      x = x.astype(dtype)
    return jax.device_put(x, sharding)

  return jax.tree.map(place, params, shardings)


def load_sharded(checkpoint_dir: str | Path, rules: ShardingRules,
                 mesh: Mesh, dtype=None,
                 check_config: Callable[[ModelConfig], None] | None = None
                 ) -> tuple[llama.Params, ModelConfig]:
  """Loads a pdjax checkpoint or HF directory straight into ``rules`` on
  ``mesh``. ``dtype`` overrides the checkpoint's storage dtype.
  ``random:<preset>`` (``pdjax.model.presets``) makes seeded random weights
  on the devices instead. ``check_config(cfg)`` runs once the config is
  read, before any weight is (it raises to refuse the model)."""
  from pdjax.model import presets

  def shardings(cfg: ModelConfig):
    if check_config is not None:
      check_config(cfg)
    return param_shardings(cfg, rules, mesh)

  if presets.is_random(checkpoint_dir):
    cfg = presets.preset_config(presets.random_preset(checkpoint_dir),
                                dtype=dtype)
    return llama.init_params(cfg, shardings=shardings(cfg)), cfg
  from pdjax.model.loading import load_model
  return load_model(checkpoint_dir, shardings, dtype=dtype)


__all__ = ["param_shardings", "shard_params", "load_sharded"]
