"""One entry point for weights: a pdjax orbax checkpoint, a Hugging Face
directory or a GGUF file.

Servers and tools take a single ``--checkpoint`` path and should not care
which of the formats it is; the format is recognised from the path (a
``.gguf`` file, or a directory holding one) or the files in the directory.
Shardings depend on the config (head counts, vocab size), which is only
known once the checkpoint has been read, so the caller passes a function
``shardings_fn(cfg)`` instead of a ready-made sharding tree; the weights are
then placed straight into that sharding by whichever loader applies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp

from pdjax.model import checkpoint as ckpt
from pdjax.model.config import ModelConfig
from pdjax.model.gguf_file import find_gguf
from pdjax.model.llama import Params
from pdjax.model.weights import WeightsError, load_hf_params, read_fp8_scales

ShardingsFn = Callable[[ModelConfig], Any]


def _dtype_name(dtype) -> str | None:
  if dtype is None:
    return None
  return jnp.dtype(dtype).name


def detect_format(path: str | Path) -> str:
  """"pdjax", "hf" or "gguf" for a checkpoint path; raises if it is none."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(
        f"{path}: no such model directory (pdjax loads local directories "
        "only; download Hugging Face models first)")
  if path.is_file():
    if find_gguf(path) is not None:
      return "gguf"
    raise WeightsError(f"{path}: expected a model directory or a .gguf "
                       "file, got another file")
  if (path / ckpt.METADATA_FILE).exists():
    return "pdjax"
  if (path / "config.json").exists():
    return "hf"
  if find_gguf(path) is not None:
    return "gguf"
  hint = ""
  if path.name == ckpt.PARAMS_DIR and (
      path.parent / ckpt.METADATA_FILE).exists():
    hint = f" (did you mean the checkpoint directory {path.parent}?)"
  found = sorted(p.name for p in path.iterdir())[:20]
  raise WeightsError(
      f"{path}: neither a pdjax checkpoint (no {ckpt.METADATA_FILE}) nor a "
      f"Hugging Face model directory (no config.json) nor a GGUF "
      f"(no .gguf file){hint}; found {found}")


def load_model(checkpoint: str | Path,
               shardings_fn: ShardingsFn | None = None, *,
               dtype=None) -> tuple[Params, ModelConfig]:
  """Loads weights and config from a pdjax checkpoint, a HF directory or a
  GGUF file.

  Args:
    checkpoint: a directory written by ``save_checkpoint`` (has
      ``pdjax_model.json``), a Hugging Face model directory (has
      ``config.json`` and safetensors), or a ``.gguf`` file (or a directory
      holding one), dequantized on load.
    shardings_fn: ``cfg -> sharding pytree | None``, called once the config
      is known; None places everything on the default device.
    dtype: storage dtype to load as ("bfloat16", "float32", "float16" or a
      numpy/jax dtype); defaults to the checkpoint's own dtype.

  Returns:
    ``(params, cfg)``; ``cfg.dtype`` is the dtype actually loaded.

  Raises:
    FileNotFoundError: the path does not exist.
    WeightsError / ModelConfigError / GGUFError: the path is no known
      format, its files are broken, or a GGUF's architecture or tensor
      types are not supported; the message names the file and the problem.
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
  if fmt == "gguf":
    from pdjax.model.gguf_weights import load_gguf
    return load_gguf(find_gguf(path), shardings_fn, dtype=dtype)
  cfg = ModelConfig.from_hf_dir(path, dtype=dtype)
  shardings = shardings_fn(cfg) if shardings_fn is not None else None
  return load_hf_params(path, cfg, shardings), cfg


def fp8_weight_scales(checkpoint: str | Path, cfg: ModelConfig
                      ) -> dict[str, Any]:
  """A Hugging Face FP8 checkpoint's own weight scales, per output channel
  (``weights.read_fp8_scales``), for a pool that stores FP8 weights to take
  (``quant.quantize_params``); none for other checkpoints and formats."""
  if detect_format(checkpoint) != "hf":
    return {}
  return read_fp8_scales(checkpoint, cfg)


__all__ = ["load_model", "detect_format", "fp8_weight_scales", "ShardingsFn"]
