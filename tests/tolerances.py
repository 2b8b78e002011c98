"""Tolerances for float results that may differ only by rounding.

Several tests compare two evaluations of one real-valued computation that
differ only in how the floating-point arithmetic is arranged: tensor-parallel
shards summing partial products in another order, a prompt prefilled in
chunks or in one piece, a matmul blocked differently for another batch size,
XLA's kernels against transformers'. Their results differ by rounding alone,
and how much is a matter of arithmetic, not of the machine: this module turns
the bound into the tolerance those tests assert, so that it holds on any CPU
(any vector width, any blocking) and still fails on a real difference.

Derivation, to first order in the unit roundoff u (2**-24 for float32, 2**-8
for bfloat16):

1. One reduction. A sum y = t_1 + ... + t_n evaluated in floating point in
   any order or blocking satisfies |fl(y) - y| <= n u sum|t_i| (Higham,
   *Accuracy and Stability of Numerical Algorithms*, 2nd ed., eq. 3.5), a
   worst case that needs every rounding to err the same way. The bound used
   here is the probabilistic one (Higham and Mary, "A new approach to
   probabilistic rounding error analysis", SIAM J. Sci. Comput. 41(5),
   2019, Thm. 3.1): with rounding errors independent, of mean zero and at
   most u, |fl(y) - y| <= lam sqrt(n) u sum|t_i| with probability at least
   1 - 2n exp(-lam**2 / 2). ``LAMBDA`` = 8 puts that failure probability
   below 1e-10 per compared value for n <= 10**4, so below 1e-4 for the
   ~10**6 values the suite compares in all: the tolerance essentially never
   fails by chance.

2. The size of sum|t_i|, against ``scale``, the RMS of the compared values:

   * Products with signed weights (projections, q.k scores): Cauchy-Schwarz
     gives sum|t_i| <= sqrt(n) ||t||_2, and for terms of unrelated signs
     (random weights) ||t||_2 is the typical size of y, i.e. ``scale``. One
     such reduction: lam n u scale.
   * Positive sums and convex combinations (RMSNorm's mean of squares,
     softmax denominators, probabilities times values): sum|t_i| is |y|
     itself or at most max|v|, i.e. O(scale). One such reduction:
     lam sqrt(n) u scale.

3. All reductions on the path. In the model every rounding error is
   independent, so the errors of all reductions feeding a compared value add
   in quadrature (one lam for the whole sum, by Hoeffding's inequality), and
   between reductions they are carried with a gain of order one: every block
   starts with an RMSNorm, which rescales the residual stream to unit RMS,
   and the weights (std ~ 1/sqrt(fan_in)) keep it there. Hence

     |fl(y) - y| <= lam scale sqrt(sum_k w_k),   w_k = (u_k n_k)**2 for a
                                                 signed reduction,
                                                 u_k**2 n_k for a positive
                                                 one, u_k**2 for a rounding.

   A rounding is one store to a narrower type (bfloat16 activations): its
   relative error is at most u with no factor n, since matmuls accumulate in
   float32 (``preferred_element_type``).

4. Two evaluations, each within that bound of the exact value, differ by at
   most twice it: ``tolerance`` = 2 lam scale sqrt(sum_k w_k).

Elementwise functions (exp, rsqrt, silu, RoPE's rotation) add a few u per
value with no factor n; beside the reductions they are negligible and not
counted. The gain-of-order-one assumption is what the tests' models are
built for (``tests/conftest.py`` scales random weights by 1/sqrt(fan_in),
pdjax-tiny uses fixed stds); a softmax over sharp scores amplifies somewhat
more, which the factor 8 in lam covers: the differences the tests measure
(TP degrees, chunked prefill, paged decode, transformers) sit 30 to 400
times below these bounds.

For pdjax-tiny (context 128) this allows 1.2e-4 x RMS on layer 0's K/V and
3.5e-4 x RMS on layer 1's, 4.7e-4 x RMS on the logits. A bug (a wrong
shard, a missed all-reduce, a sum kept in bfloat16, at u = 2**-8) moves
values by far more.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

F32 = 2.0 ** -24    # unit roundoff of float32
BF16 = 2.0 ** -8    # unit roundoff of bfloat16
LAMBDA = 8.0


def unit_roundoff(dtype) -> float:
  """u of a float dtype: 2**-24 for float32, 2**-8 for bfloat16."""
  if np.dtype(dtype) == np.float32:
    return F32
  if str(np.dtype(dtype)) == "bfloat16":
    return BF16
  return float(np.finfo(dtype).eps) / 2


def signed(n: int, u: float = F32) -> float:
  """The weight of a reduction of n signed products (a matmul row)."""
  return (u * n) ** 2


def positive(n: int, u: float = F32) -> float:
  """The weight of a positive sum or a convex combination of n terms."""
  return u * u * n


def rounding(u: float = BF16) -> float:
  """The weight of one rounding of a value to a type with roundoff u."""
  return u * u


def rounding_flip(delta: float, u: float = BF16) -> float:
  """The weight of a rounding to a type with roundoff u of values that two
  evaluations hold only to within ``delta`` x scale of each other (delta:
  ``tolerance(weights, 1.0)`` of what came before). Rounding boundaries are
  at least u|x| apart, so the two round to different neighbours with
  probability at most delta scale / (u |x|), and then differ by at most
  2u|x|: a mean square difference of at most 4 delta u scale**2, i.e.
  delta u per evaluation (``tolerance`` doubles it back). Never more than
  a plain rounding."""
  return min(delta * u, rounding(u))


def tolerance(weights: Iterable[float], scale: float) -> float:
  """Largest |a - b| between two evaluations of a computation whose
  reductions have these ``weights`` and whose results are of RMS ``scale``
  (module docstring, step 4)."""
  return 2.0 * LAMBDA * float(scale) * math.sqrt(sum(weights))


def layer_weights(cfg, context: int, u: float = F32) -> list[float]:
  """The reductions of one Llama decoder layer, input to output, for
  queries attending to at most ``context`` keys."""
  d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  return [positive(d, u),                    # RMSNorm before attention
          signed(d, u),                      # q, k, v projections
          signed(hd, u),                     # scores q.k
          positive(context, u),              # softmax denominator
          positive(context, u),              # probabilities x values
          signed(cfg.num_heads * hd, u),     # output projection (TP sum)
          positive(d, u),                    # RMSNorm before the MLP
          signed(d, u),                      # gate, up
          signed(f, u)]                      # down projection (TP sum)


def kv_weights(cfg, layer: int, context: int, u: float = F32) -> list[float]:
  """The reductions behind layer ``layer``'s K/V: the layers before it,
  then its RMSNorm and K/V projection."""
  out = []
  for _ in range(layer):
    out += layer_weights(cfg, context, u)
  return out + [positive(cfg.hidden_size, u), signed(cfg.hidden_size, u)]


def logit_weights(cfg, context: int, u: float = F32) -> list[float]:
  """The reductions behind the logits: every layer, the final RMSNorm and
  the LM head."""
  out = []
  for _ in range(cfg.num_layers):
    out += layer_weights(cfg, context, u)
  return out + [positive(cfg.hidden_size, u), signed(cfg.hidden_size, u)]


def rms(x) -> float:
  x = np.asarray(x, np.float64)
  return float(np.sqrt(np.mean(x * x))) if x.size else 0.0


def assert_close(got, want, weights: Sequence[float], *, scale=None,
                 err_msg: str = "") -> None:
  """|got - want| <= ``tolerance(weights, scale)`` everywhere; ``scale``
  defaults to the RMS of ``want``."""
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape, err_msg)
  scale = rms(want) if scale is None else scale
  tol = tolerance(weights, scale)
  diff = float(np.abs(got - want).max()) if got.size else 0.0
  assert diff <= tol, (f"{err_msg}: max |diff| {diff:.3g} > tolerance "
                       f"{tol:.3g} (scale {scale:.3g})")


def assert_kv_close(got, want, cfg, context: int, err_msg: str = "") -> None:
  """K/V of [layers, 2, ...] (2: K and V), each layer's K and V against
  its own bound and its own scale."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (got.shape, want.shape, err_msg)
  for layer in range(want.shape[0]):
    weights = kv_weights(cfg, layer, context)
    for i, name in enumerate("KV"):
      assert_close(got[layer, i], want[layer, i], weights,
                   err_msg=f"{err_msg} layer {layer} {name}")


def logprob_tolerance(cfg, context: int, logit_scale: float) -> float:
  """Largest difference between two evaluations' log-probabilities of one
  token: log_softmax moves by at most twice the largest change of a logit
  (d log p_i = dz_i - sum_j p_j dz_j), and adds its own sum over the
  vocabulary (a positive sum)."""
  logits = tolerance(logit_weights(cfg, context), logit_scale)
  return 2.0 * logits + tolerance([positive(cfg.vocab_size)], 1.0)


def logit_scale(params, cfg) -> float:
  """The typical size of a logit, from the weights: RMSNorm leaves the
  final hidden state at unit RMS times the norm's weights, so a logit
  (a sum of hidden_size signed products) has RMS about
  sqrt(hidden_size) x RMS(final_norm) x RMS(LM head)."""
  head = (params["embed"] if cfg.tie_word_embeddings
          else params["lm_head"])
  return (math.sqrt(cfg.hidden_size) * rms(params["final_norm"])
          * rms(head))
