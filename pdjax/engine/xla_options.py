"""XLA compiler options the engines' programs choose for themselves.

Each program is jitted with its own ``compiler_options`` rather than
process-wide ``XLA_FLAGS``: prefill and decode want different GEMM choices
at their shapes, and a worker may run both."""

from __future__ import annotations

ON_OFF = ("auto", "on", "off")


def check_on_off(name: str, value: str) -> None:
  """A setting that is ``auto``, ``on`` or ``off``, or a ValueError that
  names it."""
  if value not in ON_OFF:
    raise ValueError(f"{name} must be auto, on or off, got {value!r}")


def gemm_options(*, triton: bool, merge_dots: bool) -> dict[str, bool | int]:
  """Options of a GPU program's GEMMs: XLA's Triton GEMMs or cuBLAS, and
  whether XLA's DotMerger may join dots that share an input into one dot
  against the concatenation of their weights (its size threshold 0 turns it
  off; left out, XLA's default applies)."""
  out: dict[str, bool | int] = {"xla_gpu_enable_triton_gemm": triton}
  if not merge_dots:
    out["xla_gpu_dot_merger_threshold_mb"] = 0
  return out


__all__ = ["ON_OFF", "check_on_off", "gemm_options"]
