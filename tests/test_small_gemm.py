"""The few-rows GEMM kernel of the GPU probes (``tools/gpu/small_gemm.py``),
run through Pallas' interpreter on the CPU, against float64 numpy.

Tolerances come from the arithmetic: with float32 operands every product
is exact in float64 and each of the K additions (within a block's
accumulator, then across the ``split_k`` partials) rounds by at most
2^-24 of the running sum, so ``|y - y64| <= gamma_K * sum_k |x_k w_kn|``
with ``gamma_K = K u / (1 - K u)``; an FP8 weight widens to float32
exactly, and its scale adds one more rounding.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "gpu"))
from small_gemm import Tiling, padded_rows, small_gemm  # noqa: E402

U = 2.0 ** -24
K, N = 256, 192
TILING = Tiling(block_n=64, block_k=32, split_k=2)


def _bound(x64, w64, scale=None):
  g = K * U / (1 - K * U)
  b = g * (np.abs(x64) @ np.abs(w64))
  if scale is not None:
    b = b * np.abs(scale) + U * np.abs((x64 @ w64) * scale)
  return b


@pytest.mark.parametrize("m", [1, 5, 16, 17])
def test_input_major_weight(m):
  rng = np.random.default_rng(m)
  x = rng.standard_normal((m, K)).astype(np.float32)
  w = rng.standard_normal((K, N)).astype(np.float32)
  y = np.asarray(small_gemm(jnp.asarray(x), jnp.asarray(w), tiling=TILING,
                            interpret=True), np.float64)
  x64, w64 = x.astype(np.float64), w.astype(np.float64)
  assert y.shape == (m, N)
  assert np.all(np.abs(y - x64 @ w64) <= _bound(x64, w64))


@pytest.mark.parametrize("m", [1, 8])
def test_fp8_output_major_weight_and_its_scale(m):
  rng = np.random.default_rng(10 + m)
  x = rng.standard_normal((m, K)).astype(np.float32)
  q = jnp.asarray(rng.standard_normal((N, K)), jnp.float32).astype(
      jnp.float8_e4m3fn)
  scale = rng.uniform(0.5, 2.0, N).astype(np.float32)
  y = np.asarray(small_gemm(jnp.asarray(x), q, jnp.asarray(scale),
                            tiling=TILING, output_major=True,
                            interpret=True), np.float64)
  x64 = x.astype(np.float64)
  w64 = np.asarray(q.astype(jnp.float32), np.float64).T
  want = (x64 @ w64) * scale
  assert np.all(np.abs(y - want) <= _bound(x64, w64, scale))


def test_padded_rows_give_the_same_bits():
  """Storing every row of a block and slicing afterwards computes the same
  sums as storing the real rows only."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((3, K)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((K, N)), jnp.float32)
  a = small_gemm(x, w, tiling=TILING, interpret=True)
  b = small_gemm(x, w, tiling=TILING, interpret=True, exact_rows=False)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tilings_that_do_not_cut_the_weight_are_refused():
  x = jnp.zeros((1, K), jnp.float32)
  with pytest.raises(ValueError, match="does not cut"):
    small_gemm(x, jnp.zeros((K, 100), jnp.float32), tiling=TILING,
               interpret=True)
  # K / split_k must be a power of two: 256 / 3 is not even whole.
  with pytest.raises(ValueError, match="does not cut"):
    small_gemm(x, jnp.zeros((K, N), jnp.float32),
               tiling=Tiling(64, 32, 3), interpret=True)
  with pytest.raises(ValueError, match="do not contract"):
    small_gemm(x, jnp.zeros((K + 1, N), jnp.float32), tiling=TILING,
               interpret=True)
  assert Tiling(64, 128, 7).fits(14336, 4096)      # 14336 / 7 = 2048
  assert not Tiling(64, 128, 4).fits(14336, 4096)  # 3584 is not


def test_rows_pad_to_a_tensor_core_tile():
  assert [padded_rows(m) for m in (1, 8, 16, 17, 32, 33)] == [
      16, 16, 16, 32, 32, 64]
