"""Speculative decoding's parts: the prompt-lookup proposer, the target's
pass over several tokens per row (equal to as many single-token steps), and
acceptance: greedy keeps exactly plain decoding's tokens; sampled keeps the
target's distribution (checked by counting over many seeds)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from pdjax.engine.speculative import (PromptLookup, accept, propose_ngram,
                                      token_bits)
from pdjax.model import llama


def test_propose_ngram():
  h = [5, 6, 7, 8, 9, 1, 2, 6, 7]
  assert propose_ngram(h, 3) == [8, 9, 1]          # "6 7" seen at 1..2
  assert propose_ngram(h, 10) == [8, 9, 1, 2, 6, 7]
  # The latest occurrence wins; the longest n first.
  assert propose_ngram([1, 2, 3, 9, 2, 3, 4, 0, 2, 3], 2) == [4, 0]
  assert propose_ngram([1, 2, 3, 4], 3) == []       # nothing repeats
  assert propose_ngram([3], 3) == []
  assert propose_ngram([4, 4], 2) == [4]            # n=1, one token after


@hypothesis.settings(max_examples=300)
@hypothesis.given(
    tokens=st.lists(st.integers(0, 4), max_size=40),
    chunks=st.lists(st.integers(1, 7), max_size=40),
    max_n=st.integers(1, 4), k=st.integers(1, 6),
    capacity=st.integers(1, 8))
def test_prompt_lookup_answers_as_propose_ngram(tokens, chunks, max_n, k,
                                                capacity):
  """The index kept as a row's tokens arrive (its output growing by chunks
  of any size, past its first capacity) proposes what a scan of the whole
  sequence does, at every length."""
  first = chunks[0] if chunks else len(tokens)
  lookup = PromptLookup(tokens[:first], capacity, max_n=max_n,
                        bits=token_bits(5))
  at = min(first, len(tokens))
  for size in chunks[1:] + [len(tokens)]:
    assert lookup.length == at
    assert lookup.propose(k) == propose_ngram(tokens[:at], k, max_n=max_n)
    lookup.update(tokens[first:at + size])   # the row's output so far
    at = min(at + size, len(tokens))
  assert lookup.propose(k) == propose_ngram(tokens, k, max_n=max_n)


def test_prompt_lookup_packs_only_what_fits_an_int64():
  assert token_bits(128256) == 17 and token_bits(2) == 1
  PromptLookup([1, 2], 4, max_n=3, bits=21)
  with pytest.raises(ValueError, match="int64"):
    PromptLookup([1, 2], 4, max_n=4, bits=17)


def test_many_tokens_equal_single_steps(tiny_decode_params):
  """``decode_forward_tokens`` over T tokens gives the logits and the pool
  of T ``decode_forward`` steps (random pool contents as the rows' cached
  tokens; rows of different lengths)."""
  params, cfg, _, _ = tiny_decode_params
  L, K, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
  P, N, M, T = 4, 24, 6, 4
  rng = np.random.default_rng(0)
  pool = rng.normal(size=(L * N, P, K, hd)).astype(np.float32)
  table = np.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]], np.int32)
  start = np.array([5, 13], np.int32)
  tokens = rng.integers(3, cfg.vocab_size, (2, T)).astype(np.int32)
  many = jax.jit(llama.decode_forward_tokens, static_argnames="cfg")(
      params, jnp.asarray(tokens), jnp.asarray(start), jnp.asarray(pool),
      jnp.asarray(pool), jnp.asarray(table), cfg=cfg)
  one = jax.jit(llama.decode_forward, static_argnames=("cfg",
                                                      "paged_attention"))
  kp = vp = jnp.asarray(pool)
  step_logits = []
  for t in range(T):
    out = one(params, jnp.asarray(tokens[:, t]), jnp.asarray(start + t), kp,
              vp, jnp.asarray(table), cfg=cfg)
    kp, vp = out.k_pool, out.v_pool
    step_logits.append(np.asarray(out.logits))
  want = np.stack(step_logits, axis=1)
  got = np.asarray(many.logits)
  # The same float32 arithmetic in another order (batched vs one token):
  # a few units of roundoff of values of size |logits|.
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, atol=64 * np.finfo(np.float32).eps *
                             scale * cfg.num_layers, rtol=0)
  np.testing.assert_allclose(np.asarray(many.k_pool), np.asarray(kp),
                             atol=64 * np.finfo(np.float32).eps *
                             np.abs(np.asarray(kp)).max(), rtol=0)
  assert (got.argmax(-1) == want.argmax(-1)).all()


def _greedy_case():
  V, k = 8, 3
  logits = np.full((2, k + 1, V), -5.0, np.float32)
  argmax = np.array([[1, 2, 3, 4], [5, 6, 7, 0]])
  for b in range(2):
    for i in range(k + 1):
      logits[b, i, argmax[b, i]] = 5.0
  return logits, argmax


@pytest.mark.parametrize("drafts, num, want_tokens, want_count", [
    # row 0 agrees with 1, 2 (then 9 != 3): two kept, then the target's 3.
    ([[1, 2, 9], [5, 6, 7]], [3, 3], [[1, 2, 3, 0], [5, 6, 7, 0]], [3, 4]),
    # no drafts: one token, the target's.
    ([[0, 0, 0], [0, 0, 0]], [0, 0], [[1, 0, 0, 0], [5, 0, 0, 0]], [1, 1]),
    # only one real draft, agreeing: two tokens.
    ([[1, 2, 3], [9, 9, 9]], [1, 3], [[1, 2, 0, 0], [5, 0, 0, 0]], [2, 1]),
])
def test_greedy_acceptance_is_plain_greedy(drafts, num, want_tokens,
                                           want_count):
  logits, _ = _greedy_case()
  zeros = jnp.zeros((2,), jnp.float32)
  tokens, count, logprobs = accept(
      jnp.asarray(logits), jnp.asarray(drafts, jnp.int32),
      jnp.asarray(num, jnp.int32), zeros, jnp.ones((2,)),
      jnp.zeros((2,), jnp.int32), zeros, jnp.zeros((2,), jnp.uint32),
      jnp.zeros((2,), jnp.int32))
  count = np.asarray(count)
  assert count.tolist() == want_count
  for b in range(2):
    assert np.asarray(tokens)[b, :count[b]].tolist() == \
        want_tokens[b][:count[b]]
  lp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), -1))
  got = np.asarray(logprobs)
  for b in range(2):
    for i in range(count[b]):
      assert got[b, i] == pytest.approx(lp[b, i, want_tokens[b][i]])


@pytest.mark.parametrize("top_k, min_p", [(5, 0.0), (0, 0.4), (6, 0.1)])
def test_sampled_acceptance_keeps_the_target_distribution(top_k, min_p):
  """Over many seeds, with the draft a fixed token: the first emitted token
  is distributed as the target's (temperature 0.8, then min-p over the
  scaled distribution, then top-k) at position 0, and the second, when the
  draft was kept, as the target's at position 1. Tolerance: 5 standard
  deviations of a binomial frequency."""
  V, n = 8, 40000
  rng = np.random.default_rng(1)
  base = rng.normal(size=(2, V)).astype(np.float32) * 1.5
  logits = jnp.broadcast_to(jnp.asarray(base), (n, 2, V))
  temperature = 0.8
  draft = int(np.argsort(-base[0])[1])   # kept about a third of the time
  tokens, count, _ = jax.jit(accept)(
      logits, jnp.full((n, 1), draft, jnp.int32), jnp.ones((n,), jnp.int32),
      jnp.full((n,), temperature, jnp.float32), jnp.ones((n,)),
      jnp.full((n,), top_k, jnp.int32), jnp.full((n,), min_p, jnp.float32),
      jnp.arange(n, dtype=jnp.uint32), jnp.zeros((n,), jnp.int32))
  tokens, count = np.asarray(tokens), np.asarray(count)

  def target(row):
    z = base[row].astype(np.float64) / temperature
    p_full = np.exp(z - z.max())
    p_full /= p_full.sum()
    order = np.argsort(-z)
    keep = order[p_full[order] >= min_p * p_full.max()]
    if top_k:
      keep = keep[:top_k]
    p = np.zeros(V)
    p[keep] = np.exp(z[keep] - z[keep].max())
    return p / p.sum()

  def check(samples, p):
    freq = np.bincount(samples, minlength=V) / len(samples)
    sd = np.sqrt(p * (1 - p) / len(samples))
    assert (np.abs(freq - p) <= 5 * sd + 1e-12).all(), (freq, p)

  p0 = target(0)
  assert p0[draft] > 0.1 and (p0 == 0).sum() >= 2  # the filters bite
  check(tokens[:, 0], p0)
  kept = tokens[:, 0] == draft
  assert (count[kept] == 2).all() and (count[~kept] == 1).all()
  check(tokens[kept, 1], target(1))
