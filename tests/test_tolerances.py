"""The rounding bounds of tests/tolerances.py on sums whose exact value is
known: they hold for float32 sums in the worst usual order, and a sum
carried in bfloat16 breaks them (so the tests using them can fail)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from tolerances import positive, rms, signed, tolerance


@pytest.mark.parametrize("n", [16, 128, 1024])
def test_reordered_float32_matmuls_stay_within_the_bound(n):
  rng = np.random.default_rng(n)
  a = rng.standard_normal((32, n)).astype(np.float32)
  w = (rng.standard_normal((n, 32)) / np.sqrt(n)).astype(np.float32)
  exact = a.astype(np.float64) @ w.astype(np.float64)
  terms = a[:, :, None] * w[None]                    # [32, n, 32], float32
  # Left to right and right to left, one rounding per addition.
  forward = np.cumsum(terms, axis=1, dtype=np.float32)[:, -1]
  backward = np.cumsum(terms[:, ::-1], axis=1, dtype=np.float32)[:, -1]
  tol = tolerance([signed(n)], rms(exact))
  assert np.abs(forward - exact).max() <= tol / 2
  assert np.abs(backward - exact).max() <= tol / 2
  assert np.abs(forward - backward).max() <= tol
  assert np.abs((a @ w) - forward).max() <= tol     # numpy's own blocking
  # The same sums kept in bfloat16 are off by far more.
  bf16 = np.cumsum(terms.astype(ml_dtypes.bfloat16), axis=1,
                   dtype=ml_dtypes.bfloat16)[:, -1].astype(np.float64)
  assert np.abs(bf16 - exact).max() > 10 * tol


def test_positive_sums_stay_within_the_bound():
  """A softmax denominator: positive terms, whose sum carries its own
  scale."""
  rng = np.random.default_rng(1)
  n = 4096
  p = np.exp(rng.standard_normal((16, n)) * 2).astype(np.float32)
  exact = p.astype(np.float64).sum(axis=1)
  forward = np.cumsum(p, axis=1, dtype=np.float32)[:, -1]
  tol = tolerance([positive(n)], rms(exact))
  assert np.abs(forward - exact).max() <= tol / 2
  assert np.abs(forward - exact).max() > 0          # it did round
