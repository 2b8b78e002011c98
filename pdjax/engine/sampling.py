"""The batched sampler (the parameters, named as vLLM names them, are in
``sampling_params``).

Reproducibility is per sequence: the randomness for the n-th generated token
of a request comes from ``fold_in(key(seed), n)`` and is drawn for that row
alone (vmapped), so a seeded request samples the same tokens whatever batch,
replica or pool (prefill or decode) produces each of them.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.engine.sampling_params import (MAX_STOP_TOKEN_IDS,  # noqa: F401
                                          InvalidRequest, SamplingParams)


@dataclasses.dataclass
class SamplingArrays:
  """Per-row sampling inputs of one batch, as host arrays."""
  temperature: np.ndarray  # [B] f32
  top_p: np.ndarray        # [B] f32
  top_k: np.ndarray        # [B] i32 (0 = off)
  min_p: np.ndarray        # [B] f32 (0 = off)
  seed: np.ndarray         # [B] u32
  # What ends a row, and what min_tokens holds back until then (not
  # ``sample``'s positional arguments: see its ``held_back``).
  min_tokens: np.ndarray   # [B] i32 (0 = off)
  stop_ids: np.ndarray     # [B, MAX_STOP_TOKEN_IDS] i32 (-1 padded)
  use_eos: np.ndarray      # [B] bool (False: ignore_eos)
  # vLLM's penalties (``apply_penalties``; 0, 0, 1: off).
  presence: np.ndarray     # [B] f32
  frequency: np.ndarray    # [B] f32
  repetition: np.ndarray   # [B] f32

  @classmethod
  def empty(cls, batch: int) -> "SamplingArrays":
    return cls(np.zeros((batch,), np.float32), np.ones((batch,), np.float32),
               np.zeros((batch,), np.int32), np.zeros((batch,), np.float32),
               np.zeros((batch,), np.uint32), np.zeros((batch,), np.int32),
               np.full((batch, MAX_STOP_TOKEN_IDS), -1, np.int32),
               np.ones((batch,), bool), np.zeros((batch,), np.float32),
               np.zeros((batch,), np.float32), np.ones((batch,), np.float32))

  def set_row(self, row: int, params: SamplingParams, seed_u32: int) -> None:
    self.temperature[row] = params.temperature
    self.top_p[row] = params.top_p
    self.top_k[row] = max(params.top_k, 0)
    self.min_p[row] = params.min_p
    self.seed[row] = seed_u32
    self.min_tokens[row] = params.min_tokens
    stops = list(params.stop_token_ids)[:MAX_STOP_TOKEN_IDS]
    self.stop_ids[row] = -1
    self.stop_ids[row, :len(stops)] = stops
    self.use_eos[row] = not params.ignore_eos
    self.presence[row] = params.presence_penalty
    self.frequency[row] = params.frequency_penalty
    self.repetition[row] = params.repetition_penalty

  def clear_row(self, row: int) -> None:
    """Back to ``empty``'s values (greedy, no top-p/top-k/min-p, no
    min_tokens, stop ids or penalties, EOS counted, seed 0)."""
    for f, a in dataclasses.asdict(_EMPTY_ROW).items():
      getattr(self, f)[row] = a[0]

  @classmethod
  def stack(cls, rows: Sequence[tuple[SamplingParams, int]], batch: int):
    out = cls.empty(batch)
    for i, (p, s) in enumerate(rows):
      out.set_row(i, p, s)
    return out

  def as_tuple(self):
    """``sample``'s per-row arguments, in its order."""
    return (self.temperature, self.top_p, self.top_k, self.min_p, self.seed)


# One row of ``SamplingArrays.empty``: what ``clear_row`` sets.
_EMPTY_ROW = SamplingArrays.empty(1)

def filtered_sorted_logits(logits, temperature, top_p, top_k, min_p):
  """One row's sampling distribution: logits [V] scaled by the temperature
  and sorted (descending), with what min-p, top-k and top-p drop at -inf
  (each a no-op when off), in vLLM's order: min-p over the whole scaled
  distribution, then top-k, then top-p over what is left, renormalised.
  Returns (order, masked), ``masked[i]`` being the logit of token
  ``order[i]``.

  min-p keeps p_i >= min_p * p_max, that is l_i - l_max >= log(min_p) in
  the scaled logits (the softmax's normaliser cancels): the likeliest
  token always stays."""
  vocab = logits.shape[-1]
  scaled = logits / jnp.maximum(temperature, 1e-6)
  order = jnp.argsort(-scaled)
  sorted_logits = scaled[order]
  rank = jnp.arange(vocab)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  keep = (rank < k) & (sorted_logits - sorted_logits[0] >= jnp.log(min_p))
  probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf))
  cum_before = jnp.cumsum(probs) - probs
  keep = keep & (cum_before < top_p)
  return order, jnp.where(keep, sorted_logits, -jnp.inf)


def _sample_row(logits, temperature, top_p, top_k, min_p, seed, index):
  """One row: logits [V] f32 -> token. Greedy when temperature == 0."""
  greedy_tok = jnp.argmax(logits).astype(jnp.int32)
  key = jax.random.fold_in(jax.random.key(seed), index)
  order, masked = filtered_sorted_logits(logits, temperature, top_p, top_k,
                                         min_p)
  choice = jax.random.categorical(key, masked)
  sampled_tok = order[choice].astype(jnp.int32)
  return jnp.where(temperature == 0.0, greedy_tok, sampled_tok)


def stop_set(stop_ids, use_eos, eos):
  """The ids a row's ``min_tokens`` holds back: its stop ids ``[..., S]``
  (-1 padded) and, where ``use_eos`` [...], the model's EOS ids ``eos``
  [E]; -1 pads. Returns ``[..., S + E]``."""
  eos = jnp.broadcast_to(eos, (*use_eos.shape, eos.shape[-1]))
  return jnp.concatenate(
      [stop_ids, jnp.where(use_eos[..., None], eos, -1)], axis=-1)


def hold_back_stops(logits, index, min_tokens, stops):
  """``logits`` [..., V] with the ids of ``stops`` [..., N] (-1: none) at
  -inf where the row has generated fewer than ``min_tokens`` tokens
  (``index`` [...]): vLLM's min_tokens. An elementwise mask (N compares
  per logit, fused with the sampler's reading of the logits): nothing is
  gathered or scattered, and a row it holds nothing back for keeps its
  logits bit for bit."""
  vocab = jnp.arange(logits.shape[-1], dtype=jnp.int32)
  hit = jnp.zeros(logits.shape, bool)
  for j in range(stops.shape[-1]):
    hit = hit | (vocab == stops[..., j:j + 1])
  return jnp.where(hit & (index < min_tokens)[..., None], -jnp.inf, logits)


def seen_rows(prompts: Sequence[Sequence[int]], batch: int,
              width: int) -> np.ndarray:
  """On the host: ``[batch, width]`` bool, row ``b`` the tokens of
  ``prompts[b]`` (what the repetition penalty reads; rows past the
  prompts: none)."""
  out = np.zeros((batch, width), bool)
  for b, ids in enumerate(prompts):
    out[b, np.asarray(ids, np.int64)] = True
  return out


def apply_penalties(logits, counts, seen, presence, frequency, repetition):
  """vLLM's penalties on ``logits`` [..., V] f32: ``counts`` [..., V] (the
  output's occurrences of each token; None: none yet, as for a first
  token), ``seen`` [..., V] bool (the prompt's tokens), and per row
  ``presence``, ``frequency``, ``repetition`` [...]. A token of the prompt
  or the output has its logit divided by ``repetition`` where positive,
  multiplied where not; then one the output holds loses ``frequency`` per
  occurrence and ``presence`` once. Elementwise: with the penalties off
  (0, 0, 1) every logit stays bit for bit (x / 1, x * 1 and x - 0 are x)."""
  rep = repetition[..., None]
  if counts is not None:
    c = counts.astype(jnp.float32)
    seen = seen | (counts > 0)
  logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep),
                     logits)
  if counts is not None:
    logits = (logits - frequency[..., None] * c
              - presence[..., None] * (counts > 0).astype(jnp.float32))
  return logits


def sample(logits, temperature, top_p, top_k, min_p, seed, index, *,
           held_back=None, penalties=None, all_greedy: bool | None = None):
  """Batched sampler: logits [B, V] f32 -> (tokens [B], logprobs [B]).

  ``index`` [B] is the number of tokens the row has generated before this
  one (0 for the first token, sampled at prefill). The logprob is that of
  the raw model distribution (before temperature/min-p/top-k/top-p), as vLLM
  reports by default.

  ``held_back``: None, or (min_tokens [B], stops [B, N]): a row's stop
  ids are not sampled before its ``min_tokens``-th token
  (``hold_back_stops``); the logprob stays the raw distribution's.

  ``penalties``: None, or ``apply_penalties``' (counts, seen, presence,
  frequency, repetition), applied first; the logprob stays the raw
  distribution's (vLLM's default).

  ``all_greedy``: whether every row is greedy, when the caller knows it
  (then the program has only that path); None decides on device with a
  ``lax.cond``. XLA's GPU runtime reads a cond's predicate on the host, so
  a program with one returns from its call only after it has run: callers
  that dispatch ahead (the decode loop) choose the path on the host.
  """
  logits = logits.astype(jnp.float32)
  choose = logits if penalties is None else apply_penalties(logits,
                                                            *penalties)
  if held_back is not None:
    choose = hold_back_stops(choose, index, *held_back)
  greedy = jnp.argmax(choose, axis=-1).astype(jnp.int32)

  def sampled():
    return jax.vmap(_sample_row)(choose, temperature, top_p, top_k, min_p,
                                 seed, index)

  if all_greedy is None:
    tokens = jax.lax.cond(jnp.all(temperature == 0.0), lambda: greedy,
                          sampled)
  else:
    tokens = greedy if all_greedy else sampled()
  return tokens, token_logprobs(logits, tokens)


def token_logprobs(logits, tokens):
  """logits [..., V] f32, tokens [...] -> each token's log-probability
  under the raw distribution of its logits."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


__all__ = ["SamplingParams", "SamplingArrays", "InvalidRequest", "sample",
           "apply_penalties", "seen_rows",
           "filtered_sorted_logits", "hold_back_stops", "stop_set",
           "token_logprobs",
           "MAX_STOP_TOKEN_IDS"]
