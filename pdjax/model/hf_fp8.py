"""Hugging Face checkpoints whose linear weights are stored in FP8 (e4m3).

Three layouts are published for Llama-family models, all with the weight in
``F8_E4M3`` ([out, in], as torch stores linear weights) and a float scale
beside it:

* ``compressed-tensors`` (llm-compressor, vLLM's FP8 checkpoints) and
  ``fbgemm_fp8``: ``<name>.weight_scale``, one per output channel
  (``[out, 1]``) or one for the tensor (``[]`` or ``[1]``); the weight is
  ``q * scale``. An ``input_scale`` (static activation quantization) is
  ignored: pdjax quantizes weights only.
* ``fp8`` (transformers' fine-grained FP8, DeepSeek-V3's format):
  ``<name>.weight_scale_inv`` over blocks of ``weight_block_size`` (default
  128 x 128); the weight is ``q * scale_inv`` of its block.

``config.json`` says which in ``quantization_config``; any other
quantization method is refused at load, by name (``check_quantization``).
Weights are dequantized on load to float32 and then go the way of every
checkpoint (the pool's dtype, or FP8 again where the pool asks for
``weight_dtype``). A pool that stores FP8 weights takes a per-tensor or
per-channel checkpoint's own scales (``channel_scales``, read by
``weights.read_fp8_scales``) and so gets its e4m3 values back bit for bit;
block scales do not fit pdjax's per-channel GEMMs, so those weights are
quantized again per channel. Modules a checkpoint leaves unquantized (often
``lm_head``) are read as they are.

numpy has no float8 dtype of its own, so safetensors' numpy reader cannot
return these tensors; ``read_raw`` reads them from the file's header and
bytes with ``ml_dtypes``' e4m3.
"""

from __future__ import annotations

import functools
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from pdjax.model.config import ModelConfigError

FP8_METHODS = ("compressed-tensors", "fbgemm_fp8", "fp8")
DEFAULT_BLOCK = (128, 128)


def check_quantization(hf: dict[str, Any], source: str) -> None:
  """Refuses a ``quantization_config`` pdjax cannot read, naming it."""
  q = hf.get("quantization_config")
  if not q:
    return
  method = q.get("quant_method")
  if method not in FP8_METHODS:
    raise ModelConfigError(
        f"{source}: quantization_config quant_method {method!r} is not "
        f"supported; pdjax reads FP8 (e4m3) checkpoints: "
        f"{', '.join(FP8_METHODS)}")
  if method == "compressed-tensors":
    for name, group in (q.get("config_groups") or {}).items():
      w = (group or {}).get("weights") or {}
      if w.get("type") != "float" or w.get("num_bits") != 8:
        raise ModelConfigError(
            f"{source}: compressed-tensors group {name!r} quantizes weights "
            f"to {w.get('num_bits')}-bit {w.get('type')}; pdjax reads 8-bit "
            "float (FP8) weights only")
  if method == "fp8" and q.get("fmt", "e4m3") != "e4m3":
    raise ModelConfigError(f"{source}: fp8 format {q.get('fmt')!r} is not "
                           "supported (e4m3 only)")


def block_size(hf: dict[str, Any]) -> tuple[int, int]:
  """The block of a ``weight_scale_inv`` (fine-grained FP8)."""
  q = hf.get("quantization_config") or {}
  size = q.get("weight_block_size") or DEFAULT_BLOCK
  return int(size[0]), int(size[1])


def channel_scales(scale: np.ndarray, out: int) -> np.ndarray:
  """A ``weight_scale`` (one for the tensor, or one per output channel) as
  ``out`` float32 scales, one per output channel; a ValueError for any
  other count."""
  s = np.asarray(scale, np.float32)
  if s.size == 1:
    return np.full((out,), s.reshape(()), np.float32)
  if s.size != out:
    raise ValueError(f"weight_scale of {s.size} values for a weight of "
                     f"{out} output channels")
  return s.reshape(out)


def dequantize(q: np.ndarray, *, scale: np.ndarray | None = None,
               scale_inv: np.ndarray | None = None,
               block: tuple[int, int] = DEFAULT_BLOCK) -> np.ndarray:
  """A [out, in] FP8 weight in float32: ``q * scale`` (per tensor or per
  output channel) or ``q * scale_inv`` of each ``block``."""
  w = q.astype(np.float32)
  if scale is not None:
    return w * channel_scales(scale, w.shape[0]).reshape(-1, 1)
  if scale_inv is not None:
    bo, bi = block
    s = np.asarray(scale_inv, np.float32)
    want = (-(-w.shape[0] // bo), -(-w.shape[1] // bi))
    if s.shape != want:
      raise ValueError(f"weight_scale_inv of shape {s.shape} for a weight "
                       f"of {w.shape} in blocks of {block}: expected {want}")
    full = np.repeat(np.repeat(s, bo, axis=0), bi, axis=1)
    return w * full[:w.shape[0], :w.shape[1]]
  raise ValueError("an FP8 weight needs a weight_scale or weight_scale_inv")


def _header(path: Path) -> tuple[int, dict[str, Any]]:
  """(bytes before the data, the tensors' table) of a safetensors file,
  read once per version of the file however many of its tensors are
  read."""
  st = path.stat()
  return _header_of(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _header_of(path: Path, mtime_ns: int, size: int):
  del mtime_ns, size   # the cache key: a rewritten file is read again
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n, json.loads(f.read(n))


def read_raw(path: Path, name: str) -> np.ndarray:
  """Tensor ``name`` of a safetensors file, read from its header and bytes
  (for dtypes numpy lacks: F8_E4M3 as ml_dtypes' float8_e4m3fn)."""
  import ml_dtypes
  dtypes = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F32": np.float32,
            "BF16": ml_dtypes.bfloat16, "F16": np.float16}
  base, header = _header(Path(path))
  meta = header[name]
  start, end = meta["data_offsets"]
  dtype = dtypes.get(meta["dtype"])
  if dtype is None:
    raise ValueError(f"{path}: tensor {name!r} has dtype {meta['dtype']}")
  with open(path, "rb") as f:
    f.seek(base + start)
    data = f.read(end - start)
  return np.frombuffer(data, dtype=dtype).reshape(meta["shape"])


__all__ = ["FP8_METHODS", "block_size", "channel_scales",
           "check_quantization", "dequantize", "read_raw"]
