"""FP8 weights: the layers' projections stored in float8 (e4m3), each output
channel with its own float32 scale.

``w ~= q * s``: for every output channel, ``s = max|w| / 448`` over the
inputs it is contracted with (448: e4m3's largest finite value), and
``q = round_to_e4m3(w / s)``, stored output-major (the contracted axes
minor: ``llama.output_major``). e4m3 keeps 3 mantissa bits: a value in the
normal range (``|w / s| >= 2**-6``) is rounded to within 2**-4 of itself
relative, and one below it to within half the smallest subnormal step,
``2**-10`` absolute (times ``s``). The model multiplies by ``q`` widened to
the activations' dtype and scales the output channels
(``llama._proj``), so a projection reads half the bytes of bf16 from memory
where the compiler fuses the widening into the GEMM.

Weights are quantized when a pool loads them (``quantize_params``): any
checkpoint pdjax reads can be served in FP8. Given a weight's scales (an
FP8 checkpoint's own: ``weights.read_fp8_scales``), ``q = w / s`` takes
them in place of ``max|w| / 448``: a weight that is ``q * s`` read in the
model's dtype gets its e4m3 values back exactly (bf16 rounds ``q * s`` by at
most 2**-9 relative, far inside half of e4m3's smallest relative step,
2**-5), where scales of its own would quantize the checkpoint's values a
second time. Folded KV scales multiply Q's, K's and V's channels by powers
of two, and their given scales with them (``kv_fold.fold_weight_scales``);
a channel that its given scale does not give back within that rounding
(O's, which mix heads scaled differently) is quantized with its own scale
instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.model import llama
from pdjax.model.config import ModelConfig

FP8 = "float8_e4m3fn"
FP8_MAX = llama.FP8_MAX   # e4m3's largest finite value
_INV_MAX = np.float32(1.0 / FP8_MAX)


def _to_output_major(w, contracted: int):
  """``w`` [layers, *in, *out] transposed to [layers, *out, *in]."""
  return w.transpose(llama.output_major(tuple(range(w.ndim)), contracted))


def _to_input_major(q, contracted: int):
  """The inverse of ``_to_output_major``: its permutation undone."""
  perm = llama.output_major(tuple(range(q.ndim)), contracted)
  return q.transpose(tuple(int(a) for a in np.argsort(perm)))


# How far a weight read in bf16 may be from q * s, relative, for ``s`` to be
# its scales: bf16's rounding (2**-9), with room for float32's.
GIVEN_SCALE_RTOL = 2.0**-8


def _own_scale(w32, contracted: int):
  """``max|w| / 448`` of each layer and output channel."""
  amax = jnp.max(jnp.abs(w32), axis=tuple(range(1, 1 + contracted)))
  # Multiplied by 1/448 (what XLA would make of the division anyway), and
  # kept normal: a zero channel's scale must not flush to zero.
  return jnp.maximum(amax * _INV_MAX, jnp.finfo(jnp.float32).tiny)


def _expand(scale, contracted: int):
  """[layers, *out] -> [layers, 1 (x contracted), *out], against w."""
  return scale.reshape(scale.shape[:1] + (1,) * contracted + scale.shape[1:])


def _quantize_with(w32, scale, contracted: int):
  return jnp.clip(w32 / _expand(scale, contracted), -FP8_MAX,
                  FP8_MAX).astype(jnp.float8_e4m3fn)


def quantize_fp8(w, contracted: int, scale=None):
  """(q, scale) of ``w`` [layers, *in (``contracted`` axes), *out]: one
  float32 scale per layer and output channel, and ``q`` stored
  output-major, [layers, *out, *in] (``llama.output_major``). ``scale``
  [layers, *out]: the weight's own FP8 scales, taken where ``q * scale``
  gives ``w`` back (module docstring), else ``max|w| / 448``."""
  w32 = w.astype(jnp.float32)
  own = _own_scale(w32, contracted)
  q = _quantize_with(w32, own, contracted)
  if scale is not None:
    # Each channel takes the given scale where it gives the channel back.
    given = jnp.maximum(jnp.asarray(scale, jnp.float32).reshape(own.shape),
                        jnp.finfo(jnp.float32).tiny)
    q_given = _quantize_with(w32, given, contracted)
    err = jnp.abs(q_given.astype(jnp.float32) * _expand(given, contracted)
                  - w32) - GIVEN_SCALE_RTOL * jnp.abs(w32)
    fits = jnp.all(err <= 0, axis=tuple(range(1, 1 + contracted)))
    q = jnp.where(_expand(fits, contracted), q_given, q)
    own = jnp.where(fits, given, own)
  return _to_output_major(q, contracted), own


def dequantize(q, scale, contracted: int, dtype=jnp.float32):
  """``q * scale`` back in ``dtype`` and in the model's layout
  ([layers, *in, *out]: tests and reference paths). ``q``: stacked, or
  one array per layer as the model stores it."""
  if isinstance(q, (list, tuple)):
    q = jnp.stack(q)
  expand = scale.reshape(scale.shape + (1,) * contracted)
  return _to_input_major((q.astype(jnp.float32) * expand).astype(dtype),
                         contracted)


def _quantize_per_layer(w, scale, contracted: int):
  """``quantize_fp8`` with ``q`` as the model stores it: a list of one
  array per layer (``llama.per_layer``)."""
  q, scale = quantize_fp8(w, contracted, scale)
  return [q[i] for i in range(q.shape[0])], scale


def quantize_params(params: llama.Params, cfg: ModelConfig, shardings=None,
                    scales: dict | None = None
                    ) -> tuple[llama.Params, ModelConfig]:
  """The weights with every projection of ``llama.QUANTIZED`` in FP8, one
  array per layer (and its scales, stacked), and the config that says so.
  ``shardings``: the quantized config's tree (``setup.param_shardings``)
  to place the results in; None keeps each input's. ``scales``: a
  checkpoint's own FP8 scales of some projections (``quantize_fp8``'s
  ``scale``, by the names of ``cfg``'s layout)."""
  if cfg.weight_dtype is not None:
    raise ValueError(f"the weights are already {cfg.weight_dtype}")
  qcfg = cfg.replace(weight_dtype=FP8)
  layers = dict(params["layers"])
  for name, contracted in llama.quantized_projections(cfg).items():
    fn = functools.partial(_quantize_per_layer, contracted=contracted)
    if shardings is not None:
      fn = jax.jit(fn, out_shardings=(
          shardings["layers"][name],
          shardings["layers"][name + llama.SCALE_SUFFIX]))
    else:
      fn = jax.jit(fn)
    q, scale = fn(layers[name], (scales or {}).get(name))
    layers[name] = q
    layers[name + llama.SCALE_SUFFIX] = scale
  return {**params, "layers": layers}, qcfg


def quantize_fp8_numpy(w: np.ndarray, contracted: int,
                       scale: np.ndarray | None = None):
  """The same arithmetic in numpy (``ml_dtypes``' e4m3), the reference the
  tests hold ``quantize_fp8`` to; ``scale`` taken as given."""
  import ml_dtypes
  axes = tuple(range(1, 1 + contracted))
  w32 = np.asarray(w, np.float32)
  if scale is None:
    amax = np.max(np.abs(w32), axis=axes)
    scale = np.maximum(amax * _INV_MAX, np.finfo(np.float32).tiny)
  scale = np.asarray(scale, np.float32)
  expand = scale.reshape(scale.shape[:1] + (1,) * contracted
                         + scale.shape[1:])
  q = np.clip(w32 / expand, -FP8_MAX, FP8_MAX).astype(
      ml_dtypes.float8_e4m3fn)
  return _to_output_major(q, contracted), scale


__all__ = ["FP8", "FP8_MAX", "GIVEN_SCALE_RTOL", "dequantize", "quantize_fp8",
           "quantize_fp8_numpy", "quantize_params"]
