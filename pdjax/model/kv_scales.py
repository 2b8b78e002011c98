"""Static scales of an FP8 KV cache: a power of two per (layer, KV head)
for K and one for V.

An FP8 pool (``kv_dtype="fp8"``) stores K/V in e4m3, whose normal range is
2**-6 .. 448: smaller magnitudes lose precision as subnormals (steps of
2**-9) and larger ones saturate at +-448. A head is stored as K / s_k and
V / s_v instead, s chosen so its largest values land in that range
(``from_amax``). The scales are folded into the attention weights
(``pdjax.model.kv_fold``): no kernel, pool or transport knows of them.

Where they come from (``for_deployment``), the first that applies:

* a scales file the deployment names (its ``kv_scales`` key), JSON as
  ``tools/calibrate_kv_scales.py`` writes it (``read_file``);
* the checkpoint's own (Hugging Face FP8 checkpoints: each layer's
  ``self_attn.k_scale`` / ``v_scale``, one for the layer or one per KV
  head, or ModelOpt's ``k_proj.k_scale`` / ``v_proj.v_scale``, or the older
  ``kv_scale`` for both; ``from_checkpoint``), each rounded up to a power
  of two;
* none: the unscaled e4m3 KV (as vLLM's default).

A scale s means what vLLM's ``k_scale`` means: the pool holds K / s, and
K = stored * s. Powers of two because scaling by one is exact in binary
floating point while the values stay normal, so folding them changes no
number the model computes except the K and V themselves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from pdjax.model.config import ModelConfig

log = logging.getLogger("pdjax.kv_scales")

FORMAT = "pdjax-kv-scales"
VERSION = 1
# e4m3's largest finite value (pdjax.model.llama.FP8_MAX, not imported:
# reading a scales file needs no JAX).
FP8_MAX = 448.0
# Scales are 2**e with |e| <= this. A head whose values all lie below
# 448 * 2**-32 carries nothing an FP8 pool could keep anyway, and a larger
# exponent would take folded weights near the edges of float32's range.
MAX_EXPONENT = 32
DEFAULT_HEADROOM = 2.0

# A Hugging Face checkpoint's K and V scales of layer {i}, by the
# conventions vLLM reads: compressed-tensors (llm-compressor), ModelOpt,
# and the older single ``kv_scale`` for both.
CHECKPOINT_NAMES = (
    ("model.layers.{i}.self_attn.k_scale",
     "model.layers.{i}.self_attn.v_scale"),
    ("model.layers.{i}.self_attn.k_proj.k_scale",
     "model.layers.{i}.self_attn.v_proj.v_scale"),
    ("model.layers.{i}.self_attn.kv_scale",
     "model.layers.{i}.self_attn.kv_scale"),
)


class KvScalesError(ValueError):
  """Scales that cannot serve a model, with where they came from and why."""


def power_of_two_at_least(x) -> np.ndarray:
  """The smallest power of two >= each (positive, finite) ``x``."""
  m, e = np.frexp(np.asarray(x, np.float64))   # x = m * 2**e, 0.5 <= m < 1
  return np.ldexp(1.0, np.where(m == 0.5, e - 1, e))


@dataclasses.dataclass(frozen=True, eq=False)
class KvScales:
  """K and V scales, float32 [layers, kv_heads], each a power of two;
  ``source`` says where they came from (a file, a checkpoint)."""
  k: np.ndarray
  v: np.ndarray
  source: str = ""

  def __post_init__(self):
    k = np.asarray(self.k, np.float64)
    v = np.asarray(self.v, np.float64)
    where = self.source or "KV scales"
    if k.ndim != 2 or k.shape != v.shape:
      raise KvScalesError(f"{where}: K and V scales must both be [layers, "
                          f"kv_heads], got {k.shape} and {v.shape}")
    for name, s in (("k_scale", k), ("v_scale", v)):
      bad = ~(np.isfinite(s) & (s > 0))
      if not bad.any():
        m, e = np.frexp(s)
        bad = (m != 0.5) | (np.abs(e - 1) > MAX_EXPONENT)
      if bad.any():
        layer, head = (int(i) for i in np.argwhere(bad)[0])
        raise KvScalesError(
            f"{where}: {name} of layer {layer}, KV head {head} is "
            f"{float(s[layer, head])!r}; a scale is a power of two from "
            f"2**-{MAX_EXPONENT} to 2**{MAX_EXPONENT}")
    # Exact in float32: powers of two within its range.
    object.__setattr__(self, "k", k.astype(np.float32))
    object.__setattr__(self, "v", v.astype(np.float32))

  @property
  def num_layers(self) -> int:
    return self.k.shape[0]

  @property
  def num_kv_heads(self) -> int:
    return self.k.shape[1]

  def is_unit(self) -> bool:
    """Whether every scale is 1 (the unscaled KV)."""
    return bool((self.k == 1).all() and (self.v == 1).all())

  def exponents(self) -> tuple[np.ndarray, np.ndarray]:
    """log2 of the K and V scales, as integers."""
    return (np.frexp(self.k)[1] - 1, np.frexp(self.v)[1] - 1)

  def digest(self) -> str:
    """A short stable id of the scales (``ModelConfig.kv_scales``)."""
    ek, ev = self.exponents()
    blob = json.dumps({"k": ek.tolist(), "v": ev.tolist()}).encode()
    return hashlib.sha256(blob).hexdigest()[:16]

  def check_model(self, cfg: ModelConfig) -> None:
    """Refuses scales made for another shape of model."""
    if (self.num_layers, self.num_kv_heads) != (cfg.num_layers,
                                                cfg.num_kv_heads):
      raise KvScalesError(
          f"{self.source or 'KV scales'}: scales for {self.num_layers} "
          f"layers x {self.num_kv_heads} KV heads, but {cfg.name} has "
          f"{cfg.num_layers} layers x {cfg.num_kv_heads} KV heads")


def from_amax(k_amax, v_amax, headroom: float = DEFAULT_HEADROOM,
              source: str = "") -> KvScales:
  """Scales for K/V whose largest magnitudes per (layer, KV head) are
  ``k_amax`` / ``v_amax``: each the smallest power of two s with
  amax / s <= 448 / ``headroom``, so values up to ``headroom`` times the
  largest seen are still stored unsaturated. A head with amax 0 (nothing
  seen) keeps 1; exponents are clipped to +-``MAX_EXPONENT``."""
  if not headroom >= 1:
    raise ValueError(f"headroom must be >= 1 (below it the largest values "
                     f"seen would saturate), got {headroom}")
  target = FP8_MAX / headroom

  def scales(amax):
    amax = np.asarray(amax, np.float64)
    if not np.isfinite(amax).all() or (amax < 0).any():
      raise ValueError("amax must be finite and >= 0")
    s = power_of_two_at_least(np.where(amax > 0, amax / target, 1.0))
    s = np.where(amax / s > target, 2 * s, s)   # the division's rounding
    return np.clip(s, 2.0 ** -MAX_EXPONENT, 2.0 ** MAX_EXPONENT)

  return KvScales(scales(k_amax), scales(v_amax), source)


# ------------------------------------------------------------- the file
def write_file(path: str | Path, scales: KvScales,
               calibration: dict[str, Any] | None = None) -> None:
  """Writes ``scales`` as a scales file; ``calibration`` (what they were
  measured on) goes beside them, for people: ``read_file`` ignores it."""
  doc = {"format": FORMAT, "version": VERSION,
         "num_layers": scales.num_layers,
         "num_kv_heads": scales.num_kv_heads,
         "k_scale": scales.k.astype(np.float64).tolist(),
         "v_scale": scales.v.astype(np.float64).tolist()}
  if calibration:
    doc["calibration"] = calibration
  Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def read_file(path: str | Path, cfg: ModelConfig) -> KvScales:
  """The scales of the file ``path`` for the model ``cfg``. Values that are
  not powers of two are rounded up to one (never more saturation than the
  file's own scale). Raises KvScalesError naming the file and what is
  wrong: unreadable, not JSON, not a scales file, another version, scales
  for another shape of model, or a scale that is not a positive number."""
  path = Path(path)
  try:
    doc = json.loads(path.read_text())
  except OSError as e:
    raise KvScalesError(f"KV scales file {path}: {e.strerror or e}") from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise KvScalesError(f"KV scales file {path}: not valid JSON: {e}") from e
  if not isinstance(doc, dict) or doc.get("format") != FORMAT:
    raise KvScalesError(f"KV scales file {path}: not a {FORMAT} file (its "
                        f"\"format\" must be {FORMAT!r}; "
                        "tools/calibrate_kv_scales.py writes one)")
  if doc.get("version") != VERSION:
    raise KvScalesError(f"KV scales file {path}: version "
                        f"{doc.get('version')!r}, this pdjax reads "
                        f"version {VERSION}")
  shape = (doc.get("num_layers"), doc.get("num_kv_heads"))
  if shape != (cfg.num_layers, cfg.num_kv_heads):
    raise KvScalesError(
        f"KV scales file {path}: made for {shape[0]} layers x {shape[1]} "
        f"KV heads, but {cfg.name} has {cfg.num_layers} layers x "
        f"{cfg.num_kv_heads} KV heads")
  k, v = (_table(doc.get(name), name, shape, path)
          for name in ("k_scale", "v_scale"))
  return KvScales(power_of_two_at_least(k), power_of_two_at_least(v),
                  str(path))


def _table(value, name: str, shape: tuple[int, int], path: Path
           ) -> np.ndarray:
  """``value`` as a [layers, kv_heads] table of positive finite numbers."""
  layers, heads = shape
  if not isinstance(value, list) or len(value) != layers:
    raise KvScalesError(f"KV scales file {path}: {name!r} must be a list of "
                        f"{layers} layers' lists of {heads} scales")
  for i, row in enumerate(value):
    if not isinstance(row, list) or len(row) != heads:
      raise KvScalesError(f"KV scales file {path}: {name}[{i}] must be a "
                          f"list of {heads} scales (one per KV head)")
    for h, x in enumerate(row):
      if (isinstance(x, bool) or not isinstance(x, (int, float))
          or not math.isfinite(x) or x <= 0):
        raise KvScalesError(f"KV scales file {path}: {name}[{i}][{h}] is "
                            f"{x!r}; a scale is a positive number")
  return np.asarray(value, np.float64)


# ------------------------------------------------------- the checkpoint
def from_checkpoint(path: str | Path, cfg: ModelConfig) -> KvScales | None:
  """The K/V scales a Hugging Face checkpoint directory carries (names:
  ``CHECKPOINT_NAMES``), rounded up to powers of two; None where it has
  none (and for GGUF files and pdjax checkpoints, which carry none)."""
  from pdjax.model.loading import detect_format
  from pdjax.model.weights import SafetensorsIndex
  path = Path(path)
  if detect_format(path) != "hf":
    return None
  index = SafetensorsIndex(path)
  for k_name, v_name in CHECKPOINT_NAMES:
    if not index.has(k_name.format(i=0)):
      continue
    k = [_checkpoint_scale(index, k_name.format(i=i), cfg, path)
         for i in range(cfg.num_layers)]
    v = [_checkpoint_scale(index, v_name.format(i=i), cfg, path)
         for i in range(cfg.num_layers)]
    return KvScales(power_of_two_at_least(k), power_of_two_at_least(v),
                    f"{path} ({k_name.format(i='N')}, rounded up to powers "
                    "of two)")
  return None


def _checkpoint_scale(index, name: str, cfg: ModelConfig, path: Path
                      ) -> np.ndarray:
  """One layer's scale tensor: one value for the layer (every KV head's)
  or one per KV head."""
  if not index.has(name):
    raise KvScalesError(f"{path}: tensor {name!r} is missing (the "
                        "checkpoint has KV scales for other layers)")
  s = np.asarray(index.get_any(name), np.float64).reshape(-1)
  if s.size not in (1, cfg.num_kv_heads):
    raise KvScalesError(f"{path}: tensor {name!r} has {s.size} values; a KV "
                        f"scale is one per layer or one per KV head "
                        f"({cfg.num_kv_heads})")
  if not (np.isfinite(s) & (s > 0)).all():
    raise KvScalesError(f"{path}: tensor {name!r} holds {s.tolist()}; a "
                        "scale is a positive number")
  return np.broadcast_to(s, (cfg.num_kv_heads,))


# ------------------------------------------------------- which applies
def for_deployment(cfg: ModelConfig, kv_dtype: str,
                   scales_file: str | None = None,
                   checkpoint: str | Path | None = None
                   ) -> KvScales | None:
  """The scales a pool of ``kv_dtype`` folds into ``cfg``'s weights:
  ``scales_file``'s where one is named, else ``checkpoint``'s own, else
  None (unscaled). Only an FP8 KV is scaled: a file named for another is
  refused."""
  if kv_dtype != "fp8":
    if scales_file:
      raise KvScalesError(f"kv_scales names {scales_file}, but kv_dtype is "
                          f"{kv_dtype!r}: scales are for an FP8 KV "
                          "(kv_dtype = 'fp8')")
    return None
  own = from_checkpoint(checkpoint, cfg) if checkpoint is not None else None
  if scales_file:
    scales = read_file(scales_file, cfg)
    if own is not None:
      log.warning("the KV scales of %s replace the checkpoint's own (%s)",
                  scales_file, own.source)
  else:
    scales = own
  if scales is not None:
    scales.check_model(cfg)
    ek, ev = scales.exponents()
    log.info("KV scales of %s: K 2**%d .. 2**%d, V 2**%d .. 2**%d",
             scales.source, ek.min(), ek.max(), ev.min(), ev.max())
  return scales


__all__ = ["CHECKPOINT_NAMES", "DEFAULT_HEADROOM", "FORMAT", "KvScales",
           "KvScalesError", "MAX_EXPONENT", "VERSION", "for_deployment",
           "from_amax", "from_checkpoint", "power_of_two_at_least",
           "read_file", "write_file"]
