"""Hugging Face safetensors checkpoints <-> pdjax weight pytrees.

Loading reads one tensor kind at a time (e.g. every layer's ``q_proj``),
checks names and shapes against ``config.json``, stacks the layers, and
places the result straight into its target sharding with
``jax.make_array_from_callback``: each device receives only its slice, and in
a multi-process pool each process materialises only its addressable shards.
Every problem is reported with the file and tensor it concerns.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # registers bfloat16 with numpy; float8 for FP8 weights
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from pdjax.model import hf_fp8
from pdjax.model.config import ModelConfig
from pdjax.model.llama import QUANTIZED, Params, param_shapes


class WeightsError(ValueError):
  """A checkpoint that does not match its config, named by file and tensor."""


# pdjax name -> (HF name pattern, kind). Kinds say how torch's [out, in]
# linear weights become pdjax's [in, ...out] layout.
_LAYER_MAP = {
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", "vector"),
    "wq": ("model.layers.{i}.self_attn.q_proj.weight", "in_heads"),
    "wk": ("model.layers.{i}.self_attn.k_proj.weight", "in_heads"),
    "wv": ("model.layers.{i}.self_attn.v_proj.weight", "in_heads"),
    "wo": ("model.layers.{i}.self_attn.o_proj.weight", "heads_out"),
    "bq": ("model.layers.{i}.self_attn.q_proj.bias", "bias_heads"),
    "bk": ("model.layers.{i}.self_attn.k_proj.bias", "bias_heads"),
    "bv": ("model.layers.{i}.self_attn.v_proj.bias", "bias_heads"),
    "bo": ("model.layers.{i}.self_attn.o_proj.bias", "vector"),
    "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", "vector"),
    "w_gate": ("model.layers.{i}.mlp.gate_proj.weight", "linear"),
    "w_up": ("model.layers.{i}.mlp.up_proj.weight", "linear"),
    "w_down": ("model.layers.{i}.mlp.down_proj.weight", "linear"),
    "b_gate": ("model.layers.{i}.mlp.gate_proj.bias", "vector"),
    "b_up": ("model.layers.{i}.mlp.up_proj.bias", "vector"),
    "b_down": ("model.layers.{i}.mlp.down_proj.bias", "vector"),
}
_TOP_MAP = {
    "embed": ("model.embed_tokens.weight", "embedding"),
    "final_norm": ("model.norm.weight", "vector"),
    "lm_head": ("lm_head.weight", "linear"),
}


def _hf_to_pdjax(x: np.ndarray, kind: str, shape: tuple[int, ...]):
  """One layer's torch tensor -> pdjax layout of ``shape`` (no layer axis)."""
  if kind in ("vector", "embedding"):
    return x
  if kind == "linear":
    return x.T
  if kind == "in_heads":  # [N*hd, D] -> [D, N, hd]
    return x.T.reshape(shape)
  if kind == "heads_out":  # [D, N*hd] -> [N, hd, D]
    return x.T.reshape(shape)
  if kind == "bias_heads":
    return x.reshape(shape)
  raise AssertionError(kind)


def _pdjax_to_hf(x: np.ndarray, kind: str):
  if kind in ("vector", "embedding"):
    return x
  if kind == "linear":
    return x.T
  if kind == "in_heads":  # [D, N, hd] -> [N*hd, D]
    return x.reshape(x.shape[0], -1).T
  if kind == "heads_out":  # [N, hd, D] -> [D, N*hd]
    return x.reshape(-1, x.shape[-1]).T
  if kind == "bias_heads":
    return x.reshape(-1)
  raise AssertionError(kind)


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  return _pdjax_to_hf(np.empty(shape, np.int8), kind).shape


# ------------------------------------------------------------------ reading
class SafetensorsIndex:
  """Which file holds which tensor, for single-file and sharded checkpoints."""

  def __init__(self, path: Path):
    self.path = path
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    self._handles: dict[Path, Any] = {}
    if index.exists():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise WeightsError(f"{index}: not a valid safetensors index "
                           f"(needs a 'weight_map'): {e}") from e
      self.where = {name: path / f for name, f in weight_map.items()}
      for f in sorted(set(self.where.values())):
        if not f.exists():
          raise WeightsError(f"{f}: listed in {index.name} but missing")
    elif single.exists():
      self.where = {name: single for name in self._open(single).keys()}
    else:
      found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
      hint = (" (pytorch_model.bin checkpoints are not supported: convert "
              "them to safetensors)" if "pytorch_model.bin" in found else "")
      raise WeightsError(
          f"{path}: no model.safetensors or model.safetensors.index.json"
          f"{hint}; found {found}")

  def _open(self, f: Path):
    if f not in self._handles:
      try:
        self._handles[f] = safe_open(str(f), framework="np")
      except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{f}: corrupt or unreadable safetensors file: "
                           f"{e}") from e
    return self._handles[f]

  def has(self, name: str) -> bool:
    return name in self.where

  def dtype(self, name: str) -> str:
    """A tensor's safetensors dtype ("F8_E4M3", "BF16", ...), unread."""
    return self._open(self.where[name]).get_slice(name).get_dtype()

  def get_any(self, name: str) -> np.ndarray:
    """A tensor of any shape (an FP8 weight's scale)."""
    f = self.where[name]
    shape = tuple(self._open(f).get_slice(name).get_shape())
    return self.get(name, shape)

  def get(self, name: str, expected_shape: tuple[int, ...]) -> np.ndarray:
    f = self.where.get(name)
    if f is None:
      raise WeightsError(f"{self.path}: tensor {name!r} is missing from the "
                         "checkpoint")
    handle = self._open(f)
    try:
      shape = tuple(handle.get_slice(name).get_shape())
    except (SafetensorError, KeyError) as e:
      raise WeightsError(f"{f}: tensor {name!r} is missing or unreadable: "
                         f"{e}") from e
    if shape != tuple(expected_shape):
      raise WeightsError(f"{f}: tensor {name!r} has shape {shape}, expected "
                         f"{tuple(expected_shape)} from config.json")
    try:
      if handle.get_slice(name).get_dtype() == "F8_E4M3":
        return hf_fp8.read_raw(f, name)   # numpy has no float8 of its own
      return handle.get_tensor(name)
    except (SafetensorError, ValueError, OSError) as e:
      raise WeightsError(f"{f}: tensor {name!r} could not be read (corrupt "
                         f"file?): {e}") from e


def _place(host: np.ndarray, dtype, sharding) -> jax.Array:
  host = host.astype(dtype, copy=False)
  if sharding is None:
    # A copy to the default device; jnp.asarray would compile (and cache)
    # a program of each weight's shape to do the same.
    return jax.device_put(host)
  return jax.make_array_from_callback(host.shape, sharding,
                                      lambda idx: host[idx])


def load_hf_params(path: str | Path, cfg: ModelConfig, shardings=None,
                   *, dtype=None) -> Params:
  """Reads a HF checkpoint directory into a pdjax pytree.

  ``shardings``: a pytree like the params of ``jax.sharding.Sharding``
  (from ``pdjax.sharding``), or None for the default device.
  """
  path = Path(path)
  dtype = jnp.dtype(dtype or cfg.jnp_dtype)
  index = SafetensorsIndex(path)
  spec = param_shapes(cfg)
  shard_tree = shardings or jax.tree.map(
      lambda _: None, spec, is_leaf=lambda x: isinstance(x, tuple)
      and len(x) == 2 and isinstance(x[1], tuple))

  params: dict[str, Any] = {"layers": {}}
  for key, (shape, _) in spec["layers"].items():
    pattern, kind = _LAYER_MAP[key]
    per_layer = shape[1:]
    hf_shape = _hf_shape(kind, per_layer)
    stacked = np.empty(shape, dtype)
    for i in range(cfg.num_layers):
      x = _read_weight(index, pattern.format(i=i), hf_shape, path)
      stacked[i] = _hf_to_pdjax(x, kind, per_layer).astype(dtype)
    params["layers"][key] = _place(stacked, dtype, shard_tree["layers"][key])
    del stacked
  for key in ("embed", "final_norm", "lm_head"):
    if key not in spec:
      continue
    shape = spec[key][0]
    name, kind = _TOP_MAP[key]
    x = _read_weight(index, name, _hf_shape(kind, shape), path)
    params[key] = _place(_hf_to_pdjax(x, kind, shape), dtype, shard_tree[key])
  return params


def _read_weight(index: SafetensorsIndex, name: str, shape, path: Path):
  """A checkpoint tensor, an FP8 one dequantized with its scale
  (``pdjax.model.hf_fp8``)."""
  x = index.get(name, shape)
  if x.dtype != ml_dtypes.float8_e4m3fn:
    return x
  base = name[:-len("weight")] if name.endswith("weight") else name + "_"
  try:
    if index.has(base + "weight_scale"):
      return hf_fp8.dequantize(x, scale=index.get_any(base + "weight_scale"))
    if index.has(base + "weight_scale_inv"):
      hf = json.loads((path / "config.json").read_text())
      return hf_fp8.dequantize(
          x, scale_inv=index.get_any(base + "weight_scale_inv"),
          block=hf_fp8.block_size(hf))
  except ValueError as e:
    raise WeightsError(f"{path}: tensor {name!r}: {e}") from e
  raise WeightsError(f"{path}: tensor {name!r} is FP8 but the checkpoint "
                     f"has no {base}weight_scale or {base}weight_scale_inv")


def read_fp8_scales(path: str | Path, cfg: ModelConfig
                    ) -> dict[str, np.ndarray]:
  """The checkpoint's own FP8 scales, one per output channel, of each layer
  projection (``llama.QUANTIZED``) that every layer stores in F8_E4M3 with a
  ``weight_scale`` (one per tensor, repeated for every channel, or one per
  output channel): ``{key: [layers, *out]}`` float32 in pdjax's layout,
  ``quant.quantize_fp8``'s ``scale``. Projections stored otherwise (not
  FP8, or in blocks: ``weight_scale_inv``) are left out. Reads the scales
  only, not the weights."""
  path = Path(path)
  index = SafetensorsIndex(path)
  spec = param_shapes(cfg)["layers"]
  scales: dict[str, np.ndarray] = {}
  for key, contracted in QUANTIZED.items():
    if key not in spec:
      continue
    out_shape = spec[key][0][1 + contracted:]
    pattern, _ = _LAYER_MAP[key]
    names = [pattern.format(i=i) for i in range(cfg.num_layers)]
    scale_names = [n[:-len("weight")] + "weight_scale" for n in names]
    if not all(index.has(n) and index.dtype(n) == "F8_E4M3"
               and index.has(sn) for n, sn in zip(names, scale_names)):
      continue
    try:
      scales[key] = np.stack([
          hf_fp8.channel_scales(index.get_any(sn), int(np.prod(out_shape)))
          .reshape(out_shape) for sn in scale_names])
    except ValueError as e:
      raise WeightsError(f"{path}: {key}: {e}") from e
  return scales


# ------------------------------------------------------------------ writing
def save_hf_checkpoint(params: Params, cfg: ModelConfig, path: str | Path, *,
                       max_shard_bytes: int | None = None,
                       extra_files: dict[str, Any] | None = None) -> Path:
  """Writes ``config.json`` + safetensors a transformers model can load.

  With ``max_shard_bytes`` the tensors are split over several files with a
  ``model.safetensors.index.json``, as large HF checkpoints are.
  """
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  tensors: dict[str, np.ndarray] = {}
  for key, arr in params["layers"].items():
    pattern, kind = _LAYER_MAP[key]
    host = np.asarray(jax.device_get(arr))
    for i in range(host.shape[0]):
      tensors[pattern.format(i=i)] = np.ascontiguousarray(
          _pdjax_to_hf(host[i], kind))
  for key in ("embed", "final_norm", "lm_head"):
    if key in params:
      name, kind = _TOP_MAP[key]
      tensors[name] = np.ascontiguousarray(
          _pdjax_to_hf(np.asarray(jax.device_get(params[key])), kind))

  (path / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
  if max_shard_bytes is None:
    save_file(tensors, str(path / "model.safetensors"),
              metadata={"format": "pt"})
  else:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, t in tensors.items():
      if size and size + t.nbytes > max_shard_bytes:
        shards.append({})
        size = 0
      shards[-1][name] = t
      size += t.nbytes
    weight_map = {}
    for n, shard in enumerate(shards):
      fname = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, str(path / fname), metadata={"format": "pt"})
      weight_map.update({name: fname for name in shard})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
         "weight_map": weight_map}, indent=2))
  for fname, content in (extra_files or {}).items():
    target = path / fname
    if isinstance(content, (dict, list)):
      target.write_text(json.dumps(content, indent=2))
    else:
      target.write_text(str(content))
  return path


__all__ = ["WeightsError", "load_hf_params", "read_fp8_scales",
           "save_hf_checkpoint", "SafetensorsIndex"]
