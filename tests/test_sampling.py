"""The batched sampler against a numpy reference of the distribution it
draws from: the temperature, then min-p over the whole scaled
distribution, then top-k, then top-p over what is left, renormalised
(vLLM's order), each off at its default."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdjax.engine.sampling import sample
from pdjax.engine.sampling_params import InvalidRequest, SamplingParams

V = 12
N = 40000


def _reference(logits, temperature, top_p, top_k, min_p):
  """The distribution over the vocabulary, in float64."""
  z = np.asarray(logits, np.float64) / temperature
  p = np.exp(z - z.max())
  p /= p.sum()
  order = np.argsort(-z, kind="stable")
  keep = order[p[order] >= min_p * p.max()]
  if top_k > 0:
    keep = keep[:top_k]
  q = p[keep] / p[keep].sum()
  cum_before = np.cumsum(q) - q
  keep = keep[cum_before < top_p]
  out = np.zeros(len(z))
  out[keep] = p[keep] / p[keep].sum()
  return out


def _draw(logits, temperature, top_p, top_k, min_p, n=N):
  """``n`` draws from one row's logits, a seed each."""
  full = lambda v, dt: jnp.full((n,), v, dt)  # noqa: E731
  tokens, _ = jax.jit(sample, static_argnames="all_greedy")(
      jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits))),
      full(temperature, jnp.float32), full(top_p, jnp.float32),
      full(top_k, jnp.int32), full(min_p, jnp.float32),
      jnp.arange(n, dtype=jnp.uint32), jnp.zeros((n,), jnp.int32),
      all_greedy=False)
  return np.asarray(tokens)


@pytest.mark.parametrize("temperature, top_p, top_k, min_p", [
    (0.7, 1.0, 0, 0.0),      # nothing filtered
    (1.0, 1.0, 0, 0.15),     # min-p alone
    (0.8, 0.8, 0, 0.0),      # top-p alone
    (1.0, 0.7, 0, 0.15),     # top-p over what min-p left, renormalised
    (0.9, 1.0, 5, 0.05),     # min-p then top-k
])
def test_sampler_draws_the_filtered_distribution(temperature, top_p, top_k,
                                                 min_p):
  """Frequencies over N seeds within 5 binomial standard deviations of the
  reference, and never a token the reference gives no mass."""
  logits = np.random.default_rng(3).normal(size=V).astype(np.float32) * 0.5
  want = _reference(logits, temperature, top_p, top_k, min_p)
  got = _draw(logits, temperature, top_p, top_k, min_p)
  freq = np.bincount(got, minlength=V) / N
  assert (freq[want == 0] == 0).all(), (freq, want)
  sd = np.sqrt(want * (1 - want) / N)
  assert (np.abs(freq - want) <= 5 * sd + 1e-12).all(), (freq, want)


def test_the_cases_filter_what_they_name():
  """The cases above are not vacuous: each filter drops tokens on its own,
  and top-p after min-p keeps a different set than top-p alone (the
  renormalisation matters)."""
  logits = np.random.default_rng(3).normal(size=V).astype(np.float32) * 0.5
  kept = lambda *a: set(np.flatnonzero(_reference(logits, *a)))  # noqa: E731
  everything = kept(1.0, 1.0, 0, 0.0)
  assert len(everything) == V
  assert kept(1.0, 1.0, 0, 0.15) < everything
  assert kept(0.8, 0.8, 0, 0.0) < kept(0.8, 1.0, 0, 0.0)
  both = kept(1.0, 0.7, 0, 0.15)
  assert both != kept(1.0, 0.7, 0, 0.0) and both < kept(1.0, 1.0, 0, 0.15)
  assert kept(0.9, 1.0, 5, 0.05) < kept(0.9, 1.0, 0, 0.05)


def test_min_p_one_leaves_only_the_likeliest_token():
  logits = np.random.default_rng(4).normal(size=V).astype(np.float32)
  got = _draw(logits, 1.5, 1.0, 0, 1.0, n=2000)
  assert (got == np.argmax(logits)).all()


@pytest.mark.parametrize("min_p", [-0.1, 1.01, float("nan")])
def test_min_p_outside_0_1_is_refused(min_p):
  with pytest.raises(InvalidRequest, match="^min_p: must be in \\[0, 1\\]"):
    SamplingParams(min_p=min_p).validate()
