"""How the KV is stored: one setting both pools share (no JAX at import:
the configuration and the router read it).

``"auto"`` stores K/V in the model's dtype; ``"fp8"`` in float8 e4m3,
saturating at +-448, half a bf16 KV's bytes. The decode pool's pages are
stored so, and so is the KV a prefill hands on: an FP8 deployment moves
half the bytes per hand-off, and the decode worker's insert stores what
arrives as it is. The compatibility handshake refuses a worker whose
setting differs from the deployment's (``ModelInfo.kv_dtype``).

The cast itself is unscaled (as vLLM's fp8 KV cache is by default); the
K/V it casts are scaled per (layer, KV head) where the deployment has
scales (``kv_scales``, or the checkpoint's own): they are folded into the
weights, so the model computes K / s_k and V / s_v itself
(``pdjax.model.kv_scales``, ``pdjax.model.kv_fold``).
"""

from __future__ import annotations

KV_DTYPES = ("auto", "fp8")
DEFAULT_KV_DTYPE = "auto"


def check_kv_dtype(value: str) -> None:
  if value not in KV_DTYPES:
    raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got "
                     f"{value!r}")


def kv_storage_dtype(kv_dtype: str, model_dtype):
  """The dtype K/V are stored in, for a model of ``model_dtype``."""
  if kv_dtype == "fp8":
    import jax.numpy as jnp
    return jnp.dtype(jnp.float8_e4m3fn)
  return model_dtype


def kv_dtype_name(kv_dtype: str, model_dtype: str) -> str:
  """The stored dtype's name (the handshake's ``ModelInfo.kv_dtype``)."""
  import numpy as np
  import ml_dtypes  # noqa: F401 - names bfloat16 & co. for numpy
  return np.dtype(kv_storage_dtype(kv_dtype, model_dtype)).name
