"""A GEMM for decode's few rows: ``x [M, K] @ W`` with M small (1-32),
written in Pallas for GPUs (the Triton backend), that reads the weight once
at the memory's rate.

At a handful of rows a projection is a matrix-vector product: all of its
time is reading ``W`` from HBM. Library GEMMs are tiled for many rows and
launch too few blocks to keep every memory channel busy on a thin
``[M, K] x [K, N]``; this kernel splits the contraction over ``split_k``
blocks as well as the output columns, so even a [4096, 1024] projection
spreads over a few hundred blocks, each streaming its ``[K / split_k,
block_n]`` tile of the weight ``block_k`` rows at a time (``num_stages``
loads in flight). Each block writes its float32 partial sums; the partials
are added afterwards in a fixed order, so the result does not depend on
which block finishes first (no atomics).

The weight is either input-major ``[K, N]`` (how the model stores bf16
projections) or output-major ``[N, K]`` (how it stores FP8 ones, with a
float32 scale per output channel: ``y = (x @ q.T) * scale``), read in its
storage dtype and widened to the activations' in registers.

``interpret=True`` runs the same kernel on any backend (the CPU tests).

Measured against XLA's GEMM on an H100 (``probe_small_gemm.py``, beside
this): 2.95x faster on a thin [4096, 1024] weight at one row, 1.5x at
eight, level or slower on the larger shapes. Thin GEMMs are what joining
q/k/v and gate/up removed from the model (``pdjax.model.fused``), so the
model does not use this kernel; it stays with its probe.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


@dataclasses.dataclass(frozen=True)
class Tiling:
  """How one GEMM is cut: output columns per block, contraction rows per
  load, the contraction split over blocks, and Triton's warps per block and
  software-pipelining depth."""
  block_n: int = 128
  block_k: int = 128
  split_k: int = 4
  num_warps: int = 4
  num_stages: int = 3

  def fits(self, k: int, n: int) -> bool:
    """Whether this tiling cuts a ``[K, N]`` weight exactly (Triton's
    blocks are powers of two: ``K / split_k`` must be one)."""
    if n % self.block_n or k % self.split_k:
      return False
    ks = k // self.split_k
    return ks % self.block_k == 0 and ks & (ks - 1) == 0


def padded_rows(m: int) -> int:
  """The rows a block computes: the tensor cores' smallest tile (16) or
  the next power of two."""
  return max(16, 1 << (m - 1).bit_length())


def _kernel(x_ref, w_ref, o_ref, *, block_k: int, steps: int,
            output_major: bool, dtype):
  mp = x_ref.shape[0]
  bn = w_ref.shape[0] if output_major else w_ref.shape[1]

  def body(i, acc):
    start = pl.multiple_of(i * block_k, block_k)
    xs = x_ref[:, pl.ds(start, block_k)]
    if output_major:
      ws = w_ref[:, pl.ds(start, block_k)].astype(dtype)
      return acc + jax.lax.dot_general(
          xs, ws, (((1,), (1,)), ((), ())),
          preferred_element_type=jnp.float32)
    ws = w_ref[pl.ds(start, block_k), :].astype(dtype)
    return acc + jnp.dot(xs, ws, preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, steps, body,
                          jnp.zeros((mp, bn), jnp.float32))
  o_ref[0, :, :] = acc


@functools.partial(jax.jit, static_argnames=("tiling", "output_major",
                                             "interpret", "exact_rows"))
def small_gemm(x, w, scale=None, *, tiling: Tiling = Tiling(),
               output_major: bool = False, interpret: bool = False,
               exact_rows: bool = True):
  """``x [M, K] @ w`` in ``x``'s dtype, accumulated in float32.

  ``w``: ``[K, N]``, or ``[N, K]`` with ``output_major``; ``scale``
  (``[N]``, float32, optional): multiplies each output column (an FP8
  weight's per-channel scale). ``exact_rows``: the partial sums of the
  real rows only go out (a block's padding rows masked off); else all of
  the block's rows, sliced afterwards."""
  m, k = x.shape
  n = w.shape[0] if output_major else w.shape[1]
  if (w.shape[1] if output_major else w.shape[0]) != k:
    raise ValueError(f"x {x.shape} and w {w.shape} do not contract")
  t = tiling
  if not t.fits(k, n):
    raise ValueError(f"{t} does not cut a [{k}, {n}] weight")
  mp = padded_rows(m)
  ks = k // t.split_k
  xp = jnp.pad(x, ((0, mp - m), (0, 0)))
  if output_major:
    w_spec = pl.BlockSpec((t.block_n, ks), lambda j, s: (j, s))
  else:
    w_spec = pl.BlockSpec((ks, t.block_n), lambda j, s: (s, j))
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as pltriton
    compiler_params = pltriton.CompilerParams(num_warps=t.num_warps,
                                              num_stages=t.num_stages)
  partial = pl.pallas_call(
      functools.partial(_kernel, block_k=t.block_k, steps=ks // t.block_k,
                        output_major=output_major, dtype=x.dtype),
      # Only the real rows go out (the block's others are masked off):
      # the partials' bytes stay a few percent of the weight's.
      out_shape=jax.ShapeDtypeStruct(
          (t.split_k, m if exact_rows else mp, n), jnp.float32),
      grid=(n // t.block_n, t.split_k),
      in_specs=[pl.BlockSpec((mp, ks), lambda j, s: (0, s)), w_spec],
      out_specs=pl.BlockSpec((1, mp, t.block_n), lambda j, s: (s, 0, j)),
      compiler_params=compiler_params,
      interpret=interpret,
      name="small_gemm",
  )(xp, w)
  y = jnp.sum(partial[:, :m], axis=0)
  if scale is not None:
    y = y * scale
  return y.astype(x.dtype)


__all__ = ["Tiling", "padded_rows", "small_gemm"]
