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


# ---------------------------------------------------------------- min_tokens
def test_min_tokens_holds_back_the_stop_ids_until_reached():
  """Rows whose index is below their min_tokens never take an id of their
  stop set (greedy: the next likeliest; sampled: never drawn), whatever
  its logit; rows at or past it, and rows without a stop set, take what
  they would without. Logprobs stay the raw distribution's."""
  from pdjax.engine.sampling import hold_back_stops, stop_set, token_logprobs
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(4, V)).astype(np.float32)
  top = np.argmax(logits, -1)
  second = np.argsort(-logits, -1)[:, 1]
  eos = jnp.asarray([top[2]], jnp.int32)        # row 2's argmax is EOS
  stop_ids = jnp.asarray([[top[0], -1], [top[1], -1], [-1, -1], [-1, -1]],
                         jnp.int32)
  use_eos = jnp.asarray([False, False, True, False])
  stops = stop_set(stop_ids, use_eos, eos)
  assert stops.shape == (4, 3)
  min_tokens = jnp.asarray([2, 2, 5, 0], jnp.int32)
  index = jnp.asarray([1, 2, 0, 0], jnp.int32)   # row 1 reached its 2
  zeros = jnp.zeros((4,), jnp.float32)
  tok, lp = sample(jnp.asarray(logits), zeros, jnp.ones((4,)),
                   jnp.zeros((4,), jnp.int32), zeros,
                   jnp.zeros((4,), jnp.uint32), index,
                   held_back=(min_tokens, stops), all_greedy=True)
  assert np.asarray(tok).tolist() == [second[0], top[1], second[2], top[3]]
  np.testing.assert_array_equal(
      np.asarray(lp), np.asarray(token_logprobs(jnp.asarray(logits), tok)))
  # Nothing held back: the logits themselves, bit for bit.
  same = hold_back_stops(jnp.asarray(logits), index, jnp.zeros((4,), jnp.int32),
                         stops)
  np.testing.assert_array_equal(np.asarray(same), logits)
  # Sampled: a held id is never drawn, over many seeds.
  n = 4000
  row = jnp.broadcast_to(jnp.asarray(logits[0] * 0.3), (n, V))
  drawn, _ = sample(row, jnp.ones((n,)), jnp.ones((n,)),
                    jnp.zeros((n,), jnp.int32), jnp.zeros((n,)),
                    jnp.arange(n, dtype=jnp.uint32), jnp.zeros((n,), jnp.int32),
                    held_back=(jnp.full((n,), 1, jnp.int32),
                               jnp.broadcast_to(stops[0], (n, 3))),
                    all_greedy=False)
  drawn = np.asarray(drawn)
  assert (drawn != top[0]).all() and len(set(drawn.tolist())) > V // 2


def test_speculation_rejects_a_stop_drafted_before_min_tokens():
  """A greedy row whose draft is its argmax, a stop id: kept once the
  row's min_tokens is reached, rejected (the next likeliest emitted
  instead) while it is not."""
  from pdjax.engine.speculative import accept
  rng = np.random.default_rng(8)
  logits = rng.normal(size=(1, 2, V)).astype(np.float32)
  stop = int(np.argmax(logits[0, 0]))
  second = int(np.argsort(-logits[0, 0])[1])
  stops = jnp.asarray([[stop]], jnp.int32)
  one = lambda v, dt=jnp.float32: jnp.asarray([v], dt)  # noqa: E731

  def run(min_tokens, index):
    tokens, count, _ = accept(
        jnp.asarray(logits), jnp.asarray([[stop]], jnp.int32),
        one(1, jnp.int32), one(0.0), one(1.0), one(0, jnp.int32), one(0.0),
        one(0, jnp.uint32), one(index, jnp.int32),
        held_back=(one(min_tokens, jnp.int32), stops), all_greedy=True)
    return np.asarray(tokens)[0].tolist(), int(np.asarray(count)[0])

  kept_tokens, kept = run(min_tokens=3, index=3)
  assert kept == 2 and kept_tokens[0] == stop
  held_tokens, held = run(min_tokens=3, index=2)
  assert held == 1 and held_tokens[0] == second


@pytest.mark.parametrize("min_tokens, max_tokens", [(-1, 16), (17, 16)])
def test_min_tokens_outside_0_max_tokens_is_refused(min_tokens, max_tokens):
  with pytest.raises(InvalidRequest, match="^min_tokens: must be in"):
    SamplingParams(min_tokens=min_tokens, max_tokens=max_tokens).validate()
  SamplingParams(min_tokens=max_tokens, max_tokens=max_tokens).validate()
