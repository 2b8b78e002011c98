"""Speculative decoding: propose a few tokens cheaply, check them all with
one pass of the target model, keep the longest prefix it agrees with.

A row whose next tokens are drafted ``d_1..d_k`` runs the target over
``[t_0, d_1, .., d_k]`` (``t_0`` its current token) at positions
``p..p+k`` (``llama.decode_forward_tokens``): position ``i``'s logits are
the target's distribution for the token after ``d_i``. Acceptance
(``accept``), per row:

* greedy: ``d_{i+1}`` is kept while it equals the argmax at position ``i``;
  the first disagreement (or position ``k``) gives the target's own token.
  The tokens are exactly plain greedy decoding's, one to ``k + 1`` a pass.
* sampled: the draft of a deterministic proposer puts all its mass on
  ``d_{i+1}``, so it is kept with probability ``p_i(d_{i+1})`` (the
  target's filtered distribution: temperature, top-k, top-p), and on the
  first rejection the token is drawn from ``p_i`` with ``d_{i+1}`` removed
  and renormalised; if all are kept, one more is drawn from ``p_k``. Each
  emitted token is then distributed exactly as the target's (Leviathan et
  al.'s rule with a one-hot draft distribution); the random stream is not
  plain decoding's, so seeded tokens differ from it while their
  distribution does not.

Proposer: prompt lookup (``propose_ngram``): the latest earlier occurrence
of the sequence's last n tokens (n from ``max_n`` down to ``min_n``), and
the tokens that followed it, from the prompt and the output so far. No
model; it pays on outputs that repeat their input (summaries, code edits).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.engine.sampling import (apply_penalties, filtered_sorted_logits,
                                   hold_back_stops, token_logprobs)


def propose_ngram(history: Sequence[int], k: int, *, max_n: int = 3,
                  min_n: int = 1) -> list[int]:
  """Up to ``k`` tokens that followed the latest earlier occurrence of the
  history's last n tokens (the longest n that occurs); [] when none."""
  h = np.asarray(history, np.int64)
  L = len(h)
  for n in range(min(max_n, L - 1), min_n - 1, -1):
    tail = h[L - n:]
    # Windows starting at 0 .. L - n - 1 (an earlier occurrence that has at
    # least one token after it).
    windows = np.lib.stride_tricks.sliding_window_view(h[:L - 1], n)
    hits = np.nonzero((windows == tail).all(axis=1))[0]
    if len(hits):
      start = int(hits[-1]) + n
      return h[start:start + k].tolist()
  return []


class PromptLookup:
  """``propose_ngram`` for one growing sequence (a decode row's prompt and
  output), kept up as tokens are appended instead of rebuilt and scanned
  on every call: the tokens sit in a numpy buffer, and for each n every
  n-gram is packed into one int64 (``bits`` per token, exact while
  ``n * bits <= 63``), so a lookup is one vectorized comparison per n over
  the keys. The answers are ``propose_ngram``'s (the latest earlier
  occurrence with a token after it, the longest n first)."""

  def __init__(self, tokens: Sequence[int], capacity: int, *, max_n: int,
               bits: int, min_n: int = 1):
    """``tokens``: the prompt (``update`` appends what follows it)."""
    if not self.packs(max_n, bits):
      raise ValueError(f"{max_n}-grams of {bits}-bit tokens do not pack "
                       "into an int64")
    self.max_n, self.min_n, self.bits = max_n, min_n, bits
    self.prompt_len = len(tokens)
    self._tokens = np.zeros((capacity,), np.int64)
    # _keys[n - 1][e]: the n-gram ending at position e (e >= n - 1).
    self._keys = np.zeros((max_n, capacity), np.int64)
    self.length = 0
    self.extend(tokens)

  @staticmethod
  def packs(max_n: int, bits: int) -> bool:
    """Whether ``max_n``-grams of ``bits``-bit tokens fit an int64 key."""
    return max_n * bits <= 63

  def update(self, generated: Sequence[int]) -> None:
    """Brings the sequence up to the prompt followed by ``generated``
    (a row's output so far, which only grows): appends what is new."""
    seen = self.length - self.prompt_len
    if seen < len(generated):
      self.extend(generated[seen:])

  def extend(self, tokens: Sequence[int]) -> None:
    """Appends ``tokens`` to the sequence."""
    new = np.asarray(tokens, np.int64)
    a, b = self.length, self.length + len(new)
    if b > len(self._tokens):
      grown = max(b, 2 * len(self._tokens))
      self._tokens = np.resize(self._tokens, grown)
      self._keys = np.concatenate(
          [self._keys, np.zeros((self.max_n, grown - self._keys.shape[1]),
                                np.int64)], axis=1)
    self._tokens[a:b] = new
    # key_n[e] = key_{n-1}[e - 1] << bits | token[e]
    self._keys[0, a:b] = new
    for n in range(2, self.max_n + 1):
      lo = max(a, n - 1)
      if lo < b:
        self._keys[n - 1, lo:b] = ((self._keys[n - 2, lo - 1:b - 1]
                                    << self.bits) | self._tokens[lo:b])
    self.length = b

  def propose(self, k: int) -> list[int]:
    """``propose_ngram(sequence, k, max_n=max_n, min_n=min_n)``."""
    L = self.length
    for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
      keys = self._keys[n - 1]
      # Earlier n-grams with a token after them end at n - 1 .. L - 2.
      hits = np.flatnonzero(keys[n - 1:L - 1] == keys[L - 1])
      if len(hits):
        start = int(hits[-1]) + n
        return self._tokens[start:min(start + k, L)].tolist()
    return []


def token_bits(vocab_size: int) -> int:
  """Bits that hold any token id below ``vocab_size``."""
  return max(int(vocab_size - 1).bit_length(), 1)


def _filtered_logits(logits, temperature, top_p, top_k, min_p):
  """[V] logits -> the target's sampling distribution as logits in vocab
  order (the kept tokens; -inf elsewhere), as ``sampling._sample_row``
  samples."""
  order, masked = filtered_sorted_logits(logits, temperature, top_p, top_k,
                                         min_p)
  return jnp.full(logits.shape, -jnp.inf, masked.dtype).at[order].set(masked)


def _accept_greedy_row(logits, drafts, num_drafts):
  """``_accept_row`` for a greedy row, without the sampled path's work."""
  T = logits.shape[0]
  greedy_tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)     # [T]
  ok = (drafts == greedy_tok[:T - 1]) & (jnp.arange(T - 1) < num_drafts)
  n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
  tokens = jnp.where(jnp.arange(T) <= n, greedy_tok, 0)
  return tokens, n + 1


def _accept_row(logits, drafts, num_drafts, temperature, top_p, top_k, min_p,
                seed, index):
  """One row: logits [T, V] (T = k + 1), drafts [k] (the first
  ``num_drafts`` real) -> (tokens [T], emitted count in 1..num_drafts+1)."""
  T = logits.shape[0]
  k = T - 1
  greedy_tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)     # [T]
  ok_greedy = drafts == greedy_tok[:k]
  # Sampled: u_i < p_i(d_{i+1}) keeps the draft.
  filt = jax.vmap(_filtered_logits, in_axes=(0, None, None, None, None))(
      logits, temperature, top_p, top_k, min_p)                    # [T, V]
  probs = jax.nn.softmax(filt, axis=-1)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed),
                                               index + i))(jnp.arange(T))
  split = jax.vmap(jax.random.split)(keys)                         # [T, 2]
  u = jax.vmap(jax.random.uniform)(split[:, 0])
  p_draft = jnp.take_along_axis(probs[:k], drafts[:, None], axis=1)[:, 0]
  ok_sampled = u[:k] < p_draft
  greedy = temperature == 0.0
  ok = jnp.where(greedy, ok_greedy, ok_sampled)
  ok = ok & (jnp.arange(k) < num_drafts)
  n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))                 # accepted
  # The token at position n: the target's own (greedy), or a draw from the
  # residual (the draft removed) after a rejection, from p_n otherwise.
  rejected = n < num_drafts
  residual = jnp.where(
      rejected & (jnp.arange(filt.shape[1]) == drafts[jnp.minimum(n, k - 1)]),
      -jnp.inf, filt[n])
  drawn = jax.random.categorical(split[n, 1], residual).astype(jnp.int32)
  last = jnp.where(greedy, greedy_tok[n], drawn)
  padded = jnp.concatenate([drafts, jnp.zeros((1,), jnp.int32)])
  tokens = jnp.where(jnp.arange(T) < n, padded, 0)
  tokens = tokens.at[n].set(last)
  return tokens, n + 1


def accept(logits, drafts, num_drafts, temperature, top_p, top_k, min_p,
           seed, index, *, held_back=None, penalties=None,
           all_greedy: bool | None = None):
  """Acceptance for a batch (see the module docstring). logits [B, k+1, V]
  f32; drafts [B, k] int32, ``num_drafts`` [B] of them real (rows with
  fewer proposals, or none, decode one token as usual); sampling arrays
  [B]; index [B]: tokens each row generated before this pass. Returns
  (tokens [B, k+1], count [B]): each row emits its first ``count``
  tokens, and logprobs [B, k+1] of the raw distribution. ``held_back``:
  None or (min_tokens [B], stops [B, N]), as ``sampling.sample`` takes
  them, position i of a row being its (index + i)-th token: a stop id
  drafted too early is rejected. ``penalties``: None or
  ``sampling.apply_penalties``' (counts [B, V], seen [B, V], presence,
  frequency, repetition [B]), the same at every position: a row with a
  penalty on drafts nothing (``SamplingParams.drafted``), so only its
  first position emits. ``all_greedy``: every row is greedy (the caller
  knows; only that path is computed)."""
  logits = logits.astype(jnp.float32)
  choose = logits
  if penalties is not None:
    counts, seen, presence, frequency, repetition = penalties
    choose = apply_penalties(choose, counts[:, None], seen[:, None],
                             presence[:, None], frequency[:, None],
                             repetition[:, None])
  if held_back is not None:
    min_tokens, stops = held_back
    positions = index[:, None] + jnp.arange(logits.shape[1])
    choose = hold_back_stops(choose, positions, min_tokens[:, None],
                             stops[:, None, :])
  if all_greedy:
    tokens, count = jax.vmap(_accept_greedy_row)(choose, drafts, num_drafts)
  else:
    tokens, count = jax.vmap(_accept_row)(
        choose, drafts, num_drafts, temperature, top_p, top_k, min_p, seed,
        index)
  return tokens, count, token_logprobs(logits, tokens)


__all__ = ["PromptLookup", "accept", "propose_ngram", "token_bits"]
