"""What the real-driver tests need, and why one is skipped here."""

from __future__ import annotations


def missing(min_gpus: int = 1) -> str | None:
  """None when JAX runs on GPUs (at least ``min_gpus``) and cuda-bindings
  imports; else the reason to skip."""
  import jax
  if jax.default_backend() != "gpu":
    return (f"needs a GPU backend (is {jax.default_backend()}; run with "
            "JAX_PLATFORMS=cuda)")
  if len(jax.devices()) < min_gpus:
    return f"needs {min_gpus} GPUs"
  try:
    from cuda.bindings import driver  # noqa: F401
  except ImportError:
    try:
      from cuda import cuda  # noqa: F401
    except ImportError:
      return "needs cuda-bindings (pip install 'pdjax[cuda-ipc]')"
  return None
