"""GGUF files: finding one, reading its metadata, dequantizing its tensors.

GGUF is llama.cpp's single-file checkpoint: a header of typed key/value
metadata (architecture, shapes, the tokenizer's vocabulary and merges, the
chat template) followed by tensors, each stored in one of ggml's block
formats. This module is the only place that talks to the ``gguf`` package's
reader; everything above it sees plain Python values and float32 numpy
arrays. It imports no JAX, so the router and the gateway (which only need the
tokenizer and the template) can use it.

What pdjax serves from a GGUF, and refuses up front with a message naming
the file and the offending value:

* ``general.architecture`` ``llama`` (Llama 1/2/3, SmolLM, TinyLlama, ...),
  with plain, linear or (a ``rope_freqs`` tensor) llama3 rope scaling;
* tensors in F32, F16, BF16, Q8_0, Q4_0, Q4_1 or the K-quants Q4_K, Q5_K,
  Q6_K (what llama.cpp's Q4_K_M, Q5_K_M and Q6_K files hold), dequantized
  block by block to float32 (then cast to the pool's dtype by the weight
  loader). The dequantization is ``gguf.quants.dequantize``; the tests pin
  it against an independent numpy implementation of the block formats.

A GGUF checkpoint is a ``.gguf`` file, or a directory holding exactly one
(and no ``config.json``, which would make it a Hugging Face directory).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np

from pdjax.model.config import (ModelConfig, ModelConfigError, RopeConfig,
                                rope_inv_freq)

GGUF_SUFFIX = ".gguf"
SUPPORTED_ARCHITECTURES = ("llama",)
# ggml type names pdjax dequantizes (gguf.GGMLQuantizationType members).
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1",
                          "Q4_K", "Q5_K", "Q6_K")
# Rope scaling types read from ``<arch>.rope.scaling.type``.
_ROPE_SCALING = {"none": "default", "linear": "linear"}
# Per-frequency rope divisors (Llama 3.1 style scaling).
ROPE_FREQS = "rope_freqs.weight"


class GGUFError(ValueError):
  """A GGUF file pdjax cannot serve; the message names the file and why."""


# ------------------------------------------------------------------ finding
def find_gguf(path: str | Path) -> Path | None:
  """The GGUF file a checkpoint path names, or None if it names none.

  ``path`` is a ``.gguf`` file, or a directory with exactly one ``.gguf`` and
  no ``config.json``. A directory with several is ambiguous and refused.
  """
  path = Path(path)
  if path.is_file():
    return path if path.suffix.lower() == GGUF_SUFFIX else None
  if not path.is_dir() or (path / "config.json").exists():
    return None
  found = sorted(p for p in path.iterdir()
                 if p.is_file() and p.suffix.lower() == GGUF_SUFFIX)
  if len(found) > 1:
    raise GGUFError(f"{path}: holds several GGUF files "
                    f"({', '.join(p.name for p in found)}); pass one of them "
                    "as the checkpoint")
  return found[0] if found else None


# ------------------------------------------------------------------ reading
class GGUFFile:
  """One GGUF file's metadata and tensors (memory-mapped, read lazily).

  Attributes:
    path: the file.
    metadata: every key/value pair, as Python values (arrays as lists).
    architecture: ``general.architecture``.
    tensors: name -> ``gguf.ReaderTensor``.
  """

  def __init__(self, path: str | Path):
    import gguf
    self.path = Path(path)
    try:
      self._reader = gguf.GGUFReader(str(self.path))
    except (ValueError, OSError, IndexError) as e:
      raise GGUFError(f"{self.path}: not a readable GGUF file: {e}") from e
    self.metadata: dict[str, Any] = {}
    for name, field in self._reader.fields.items():
      if name.startswith("GGUF."):
        continue  # The header (version, counts), not model metadata.
      self.metadata[name] = field.contents()
    self.tensors = {t.name: t for t in self._reader.tensors}
    self.architecture = self.metadata.get("general.architecture")

  def get(self, key: str, default: Any = None) -> Any:
    return self.metadata.get(key, default)

  def need(self, key: str) -> Any:
    if key not in self.metadata:
      raise GGUFError(f"{self.path}: metadata key {key!r} is missing")
    return self.metadata[key]

  def arch_key(self, suffix: str) -> str:
    return f"{self.architecture}.{suffix}"

  def check_supported(self) -> None:
    """Refuses an architecture or a tensor type pdjax does not serve."""
    if self.architecture not in SUPPORTED_ARCHITECTURES:
      raise GGUFError(
          f"{self.path}: GGUF architecture {self.architecture!r} is not "
          f"supported (pdjax serves {', '.join(SUPPORTED_ARCHITECTURES)})")
    bad = sorted({(t.tensor_type.name, n) for n, t in self.tensors.items()
                  if t.tensor_type.name not in SUPPORTED_TENSOR_TYPES})
    if bad:
      kinds = sorted({k for k, _ in bad})
      raise GGUFError(
          f"{self.path}: tensor type(s) {', '.join(kinds)} not supported "
          f"(e.g. tensor {bad[0][1]!r} is {bad[0][0]}); pdjax dequantizes "
          f"{', '.join(SUPPORTED_TENSOR_TYPES)}")

  def tensor_shape(self, name: str) -> tuple[int, ...]:
    """The shape in numpy (row-major) order: ``[out, in]`` for a matrix.

    GGUF lists dimensions fastest first (``ne[0]`` is the row length), the
    reverse of numpy's order.
    """
    return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

  def read(self, name: str) -> np.ndarray:
    """Tensor ``name`` dequantized to a float32 array of ``tensor_shape``."""
    import gguf
    t = self.tensors.get(name)
    if t is None:
      raise GGUFError(f"{self.path}: tensor {name!r} is missing")
    if t.tensor_type.name not in SUPPORTED_TENSOR_TYPES:
      raise GGUFError(f"{self.path}: tensor {name!r} is "
                      f"{t.tensor_type.name}, which pdjax does not dequantize")
    try:
      x = gguf.quants.dequantize(t.data, t.tensor_type)
    except (ValueError, NotImplementedError) as e:
      raise GGUFError(f"{self.path}: tensor {name!r} could not be "
                      f"dequantized: {e}") from e
    return np.asarray(x, np.float32).reshape(self.tensor_shape(name))


@functools.lru_cache(maxsize=4)
def _open_cached(path: str, mtime_ns: int) -> GGUFFile:
  del mtime_ns  # Part of the key: a rewritten file is read again.
  return GGUFFile(path)


def open_gguf(path: str | Path) -> GGUFFile:
  """A (cached) ``GGUFFile`` for ``path``; config, tokenizer and template
  loading all read the same header, parsed once per process."""
  path = Path(path).resolve()
  try:
    mtime = path.stat().st_mtime_ns
  except OSError as e:
    raise GGUFError(f"{path}: {e}") from e
  return _open_cached(str(path), mtime)


# ------------------------------------------------------------------ config
def _rope(f: GGUFFile, head_dim: int) -> RopeConfig:
  theta = float(f.get(f.arch_key("rope.freq_base"), 10000.0))
  kind = f.get(f.arch_key("rope.scaling.type"), "none")
  if kind not in _ROPE_SCALING:
    raise GGUFError(f"{f.path}: rope scaling {kind!r} is not supported "
                    f"(supported: {', '.join(_ROPE_SCALING)})")
  if ROPE_FREQS in f.tensors:
    return _llama3_rope(f, theta, head_dim)
  rope_type = _ROPE_SCALING[kind]
  factor = float(f.get(f.arch_key("rope.scaling.factor"), 1.0))
  if rope_type == "default" or factor == 1.0:
    return RopeConfig(theta=theta)
  return RopeConfig(theta=theta, rope_type=rope_type, factor=factor)


def _round(x: float) -> float:
  return float(f"{x:.6g}")


def _llama3_rope(f: GGUFFile, theta: float, head_dim: int) -> RopeConfig:
  """The ``llama3`` rope scaling a ``rope_freqs`` tensor encodes.

  llama.cpp's converter stores Llama 3.1 style scaling as one divisor per
  frequency: 1 for short wavelengths, ``factor`` for long ones, and
  ``1 / ((1 - s) / factor + s)`` between, where ``s = (old_context /
  wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)``
  is linear in 1 / wavelength. ``factor`` is the largest divisor; a line
  through the in-between ones gives the two band parameters for the
  original context (metadata ``rope.scaling.original_context_length``,
  else Llama 3's 8192). The result must reproduce every divisor (to
  float32 rounding, amplified a little by the fit), or the file is
  refused: its factors are not the llama3 shape pdjax implements.
  """
  divisors = f.read(ROPE_FREQS).reshape(-1).astype(np.float64)
  base = rope_inv_freq(RopeConfig(theta=theta), head_dim).astype(np.float64)
  if divisors.shape != base.shape:
    raise GGUFError(f"{f.path}: tensor {ROPE_FREQS!r} has {divisors.size} "
                    f"factors, head dim {head_dim} needs {base.size}")
  if np.all(divisors == 1.0):
    return RopeConfig(theta=theta)
  factor = float(divisors.max())
  old_ctx = int(f.get(f.arch_key("rope.scaling.original_context_length"),
                      8192))
  low, high = 1.0, 4.0
  medium = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
  if medium.sum() >= 2 and factor > 1:
    smooth = (1 / divisors[medium] - 1 / factor) / (1 - 1 / factor)
    x = old_ctx * base[medium] / (2 * math.pi)     # old_ctx / wavelength
    slope, intercept = np.polyfit(x, smooth, 1)
    low = _round(-intercept / slope)
    high = _round(low + 1 / slope)
  rope = RopeConfig(theta=theta, rope_type="llama3", factor=_round(factor),
                    low_freq_factor=low, high_freq_factor=high,
                    original_max_position_embeddings=old_ctx)
  got = rope_inv_freq(rope, head_dim).astype(np.float64)
  if not np.allclose(got, base / divisors, rtol=1e-5, atol=0):
    raise GGUFError(
        f"{f.path}: the per-frequency rope factors of tensor "
        f"{ROPE_FREQS!r} are not llama3 rope scaling (the only kind pdjax "
        "implements)")
  return rope


def token_id(f: GGUFFile, key: str) -> int | None:
  """``tokenizer.ggml.<key>`` as an int, or None when absent."""
  value = f.get(f"tokenizer.ggml.{key}")
  return None if value is None else int(value)


def model_config(f: GGUFFile, *, dtype: str | None = None,
                 name: str | None = None) -> ModelConfig:
  """The ``ModelConfig`` a GGUF's metadata describes.

  Shapes come from ``<arch>.*`` keys and are checked against the tensors
  (a file whose metadata and tensors disagree is refused, naming both);
  the vocabulary is the tokenizer's token list; BOS, EOS (plus the
  end-of-turn ids chat models stop on) and padding from ``tokenizer.ggml``.
  ``dtype`` defaults to float32 for an all-F32 file, else bfloat16.
  """
  f.check_supported()
  heads = int(f.need(f.arch_key("attention.head_count")))
  hidden = int(f.need(f.arch_key("embedding_length")))
  head_dim = int(f.get(f.arch_key("attention.key_length"), hidden // heads))
  rot = f.get(f.arch_key("rope.dimension_count"))
  if rot is not None and int(rot) != head_dim:
    raise GGUFError(f"{f.path}: partial rotary embeddings (rope dimension "
                    f"{rot} of head dim {head_dim}) are not supported")
  tokens = f.get("tokenizer.ggml.tokens")
  if tokens is not None:
    vocab = len(tokens)
  elif "token_embd.weight" in f.tensors:
    vocab = f.tensor_shape("token_embd.weight")[0]
  else:
    vocab = int(f.need(f.arch_key("vocab_size")))
  eos = [token_id(f, k) for k in ("eos_token_id", "eot_token_id",
                                  "eom_token_id")]
  if dtype is None:
    dtype = ("float32" if all(t.tensor_type.name == "F32"
                              for t in f.tensors.values()) else "bfloat16")
  try:
    cfg = ModelConfig(
        architecture="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(f.need(f.arch_key("feed_forward_length"))),
        num_layers=int(f.need(f.arch_key("block_count"))),
        num_heads=heads,
        num_kv_heads=int(f.get(f.arch_key("attention.head_count_kv"), heads)),
        head_dim=head_dim,
        rms_norm_eps=float(f.get(f.arch_key(
            "attention.layer_norm_rms_epsilon"), 1e-5)),
        rope=_rope(f, head_dim),
        max_position_embeddings=int(f.get(f.arch_key("context_length"),
                                          4096)),
        tie_word_embeddings="output.weight" not in f.tensors,
        bos_token_id=token_id(f, "bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(e for e in eos if e is not None)),
        pad_token_id=token_id(f, "padding_token_id"),
        dtype=dtype,
        name=name or f.path.stem,
    )
  except ModelConfigError as e:
    raise GGUFError(f"{f.path}: {e}") from e
  _check_shapes(f, cfg)
  return cfg


def _check_shapes(f: GGUFFile, cfg: ModelConfig) -> None:
  D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  want: dict[str, tuple[int, ...]] = {
      "token_embd.weight": (V, D), "output_norm.weight": (D,)}
  if not cfg.tie_word_embeddings:
    want["output.weight"] = (V, D)
  for i in range(cfg.num_layers):
    want.update({
        f"blk.{i}.attn_norm.weight": (D,),
        f"blk.{i}.attn_q.weight": (cfg.num_heads * cfg.head_dim, D),
        f"blk.{i}.attn_k.weight": (cfg.num_kv_heads * cfg.head_dim, D),
        f"blk.{i}.attn_v.weight": (cfg.num_kv_heads * cfg.head_dim, D),
        f"blk.{i}.attn_output.weight": (D, cfg.num_heads * cfg.head_dim),
        f"blk.{i}.ffn_norm.weight": (D,),
        f"blk.{i}.ffn_gate.weight": (F, D),
        f"blk.{i}.ffn_up.weight": (F, D),
        f"blk.{i}.ffn_down.weight": (D, F),
    })
  problems = []
  for name, shape in want.items():
    if name not in f.tensors:
      problems.append(f"tensor {name!r} is missing")
    elif f.tensor_shape(name) != shape:
      problems.append(f"tensor {name!r} has shape {f.tensor_shape(name)}, "
                      f"the metadata implies {shape}")
  extra = sorted(set(f.tensors) - set(want) - {ROPE_FREQS})
  if extra:
    problems.append(f"tensors {extra[:4]} are not part of the Llama layout "
                    "pdjax serves (biases, ...)")
  if problems:
    raise GGUFError(f"{f.path}: " + "; ".join(problems[:6]))


def read_config(path: str | Path, **kw) -> ModelConfig:
  """``model_config`` of the GGUF at ``path`` (a file or its directory)."""
  found = find_gguf(path)
  if found is None:
    raise GGUFError(f"{path}: not a GGUF file or a directory holding one")
  return model_config(open_gguf(found), **kw)


__all__ = ["GGUFError", "GGUFFile", "GGUF_SUFFIX", "SUPPORTED_ARCHITECTURES",
           "SUPPORTED_TENSOR_TYPES", "find_gguf", "open_gguf", "model_config",
           "read_config", "token_id"]
