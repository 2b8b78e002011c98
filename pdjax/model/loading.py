"""One entry point for weights: a pdjax orbax checkpoint or a HF directory.

Servers and tools take a single ``--checkpoint`` path and should not care
which of the two formats it is; the format is recognised from the files in the
directory. Shardings depend on the config (head counts, vocab size), which is
only known once the directory has been read, so the caller passes a function
``shardings_fn(cfg)`` instead of a ready-made sharding tree; the weights are
then placed straight into that sharding by whichever loader applies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp

from pdjax.model import checkpoint as ckpt
from pdjax.model.config import ModelConfig
from pdjax.model.llama import Params
from pdjax.model.weights import WeightsError, load_hf_params

ShardingsFn = Callable[[ModelConfig], Any]


def _dtype_name(dtype) -> str | None:
  if dtype is None:
    return None
  return jnp.dtype(dtype).name


def detect_format(path: str | Path) -> str:
  """"pdjax" or "hf" for a model directory; raises if it is neither."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(
        f"{path}: no such model directory (pdjax loads local directories "
        "only; download Hugging Face models first)")
  if not path.is_dir():
    raise WeightsError(f"{path}: expected a model directory, got a file")
  if (path / ckpt.METADATA_FILE).exists():
    return "pdjax"
  if (path / "config.json").exists():
    return "hf"
  hint = ""
  if path.name == ckpt.PARAMS_DIR and (
      path.parent / ckpt.METADATA_FILE).exists():
    hint = f" (did you mean the checkpoint directory {path.parent}?)"
  found = sorted(p.name for p in path.iterdir())[:20]
  raise WeightsError(
      f"{path}: neither a pdjax checkpoint (no {ckpt.METADATA_FILE}) nor a "
      f"Hugging Face model directory (no config.json){hint}; found {found}")


def load_model(checkpoint: str | Path,
               shardings_fn: ShardingsFn | None = None, *,
               dtype=None) -> tuple[Params, ModelConfig]:
  """Loads weights and config from a pdjax checkpoint or a HF directory.

  Args:
    checkpoint: a directory written by ``save_checkpoint`` (has
      ``pdjax_model.json``) or a Hugging Face model directory (has
      ``config.json`` and safetensors).
    shardings_fn: ``cfg -> sharding pytree | None``, called once the config
      is known; None places everything on the default device.
    dtype: storage dtype to load as ("bfloat16", "float32", "float16" or a
      numpy/jax dtype); defaults to the checkpoint's own dtype.

  Returns:
    ``(params, cfg)``; ``cfg.dtype`` is the dtype actually loaded.

  Raises:
    FileNotFoundError: the path does not exist.
    WeightsError / ModelConfigError: the directory is neither format, or its
      files are broken; the message names the file and the problem.
  """
  path = Path(checkpoint)
  fmt = detect_format(path)
  dtype = _dtype_name(dtype)
  if fmt == "pdjax":
    cfg = ckpt.read_checkpoint_config(path)
    if dtype is not None:
      cfg = cfg.replace(dtype=dtype)
    shardings = shardings_fn(cfg) if shardings_fn is not None else None
    return ckpt.restore_checkpoint(path, shardings, cfg=cfg)
  cfg = ModelConfig.from_hf_dir(path, dtype=dtype)
  shardings = shardings_fn(cfg) if shardings_fn is not None else None
  return load_hf_params(path, cfg, shardings), cfg


__all__ = ["load_model", "detect_format", "ShardingsFn"]
