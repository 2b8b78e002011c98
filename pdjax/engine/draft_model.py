"""A draft model for speculative decoding (``DecodeConfig.speculative =
"draft"``): a smaller model of the same tokenizer proposes each row's next
``spec_tokens`` tokens, and the pool's verify program keeps what the
target agrees with (``pdjax.engine.speculative``).

One ``DraftModel`` per decode replica owns the draft's weights (on the
replica's devices), its own paged KV and, per row, how many leading
positions of the row's sequence that KV covers. The draft's pools are
indexed by the replica's page ids: a row's pages hold both models' KV, so
the draft needs no page table, allocation or eviction of its own. The
decode worker computes the draft's KV itself: a row whose draft KV is
behind its sequence (new, resumed after preemption, or after a call that
kept all its drafts) is caught up from the tokens the host knows (a
speculating pool reads every call's tokens before the next), in windows
of ``WINDOWS`` tokens, before the draft proposes.

Drafts are the draft model's greedy choices: a point mass per position,
which is what the verify program's acceptance rule assumes of any draft,
so sampled rows keep the target's distribution.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.engine.decode_config import DecodeConfig
from pdjax.engine.decode_programs import idle_rows_fresh
from pdjax.engine.kv import zero_kv
from pdjax.engine.shared_jit import shared_jit
from pdjax.model.config import ModelConfig
from pdjax.model.llama import Params, decode_forward, decode_forward_tokens

# Catch-up windows (tokens per row per call): the smallest that holds the
# largest gap of the call; longer gaps take several calls.
WINDOWS = (8, 64)


def _catch_up(params, k_pool, v_pool, tokens, start, table, count, *, cfg):
  """Writes the draft KV of ``count[b]`` tokens (``tokens[b, :count]``)
  from position ``start[b]``; rows with count 0 write nothing (the null
  page)."""
  out = decode_forward_tokens(params, tokens, start, k_pool, v_pool, table,
                              cfg=cfg, num_kept=count - 1)
  return out.k_pool, out.v_pool


def _propose(params, k_pool, v_pool, first, pos, table, live, *, cfg,
             num_tokens):
  """``num_tokens`` greedy draft tokens per live row, from its current
  token ``first`` at ``pos`` (written to the draft KV as it goes); rows
  that are not live run a fresh pool's inputs
  (``decode_programs.idle_rows_fresh``)."""
  def step(carry, i):
    tok, kp, vp = carry
    tok, positions, rows_table = idle_rows_fresh(live, tok, pos + i, table)
    out = decode_forward(params, tok, positions, kp, vp, rows_table,
                         cfg=cfg)
    nxt = jnp.argmax(out.logits[:, :cfg.vocab_size], axis=-1)
    nxt = jnp.where(live, nxt.astype(jnp.int32), 0)
    return (nxt, out.k_pool, out.v_pool), nxt

  (_, k_pool, v_pool), drafts = jax.lax.scan(
      step, (first, k_pool, v_pool), jnp.arange(num_tokens, dtype=jnp.int32))
  return drafts.T, k_pool, v_pool


class DraftModel:
  """The draft model of one decode replica (see the module's docstring)."""

  def __init__(self, params: Params, cfg: ModelConfig, target: ModelConfig,
               dcfg: DecodeConfig, sharding):
    if cfg.vocab_size != target.vocab_size:
      raise ValueError(
          f"the draft model's vocabulary ({cfg.vocab_size} tokens) is not "
          f"the target's ({target.vocab_size}): a draft model must share "
          "the target's tokenizer")
    self.params = params
    self.cfg = cfg
    self.dcfg = dcfg
    self.k_tokens = dcfg.spec_tokens
    shape = (cfg.num_layers * dcfg.num_pages, dcfg.page_size,
             cfg.num_kv_heads, cfg.head_dim)
    self.k, self.v = shared_jit(
        functools.partial(zero_kv, shape=shape, dtype=cfg.dtype),
        out_shardings=(sharding, sharding))()
    self._put = functools.partial(jax.device_put, device=sharding)
    # Per row: leading positions of its sequence whose draft KV is written.
    self.filled = np.zeros((dcfg.max_seqs,), np.int64)
    self._catch_up = shared_jit(functools.partial(_catch_up, cfg=cfg),
                                donate_argnums=(1, 2))
    self._propose = shared_jit(functools.partial(
        _propose, cfg=cfg, num_tokens=self.k_tokens), donate_argnums=(1, 2))

  def forget(self, row: int) -> None:
    """The row's draft KV is gone (a new request in it, or its pages
    changed): it is caught up from the start before it next drafts."""
    self.filled[row] = 0

  def propose(self, rows: Sequence[int], width: int, table,
              lengths: Sequence[int],
              tokens: Callable[[int, int, int], Sequence[int]]) -> jax.Array:
    """Drafts [width, spec_tokens] (on device) for a call of ``width``
    rows whose first ``len(rows)`` are ``rows``, with the call's page table
    ``table`` [width, M] (device). ``lengths[i]``: how many tokens row
    ``rows[i]`` has (prompt and output; the last is its current token);
    ``tokens(row, a, b)``: its tokens ``a .. b - 1`` (only what the draft
    has not seen is asked for, not the whole sequence every call)."""
    pos = np.zeros((width,), np.int32)
    pos[:len(rows)] = np.asarray(lengths, np.int32) - 1
    while True:   # catch up: draft KV for positions filled .. pos - 1
      gaps = [int(pos[i] - self.filled[row]) for i, row in enumerate(rows)]
      gap = max(gaps, default=0)
      if gap <= 0:
        break
      w = next((w for w in WINDOWS if w >= gap), WINDOWS[-1])
      window = np.zeros((width, w), np.int32)
      start = np.zeros((width,), np.int32)
      count = np.zeros((width,), np.int32)
      for i, row in enumerate(rows):
        n = min(gaps[i], w)
        if n <= 0:
          continue
        a = int(self.filled[row])
        window[i, :n] = tokens(row, a, a + n)
        start[i], count[i] = a, n
        self.filled[row] = a + n
      self.k, self.v = self._catch_up(self.params, self.k, self.v,
                                      self._put(window), self._put(start),
                                      table, self._put(count))
    first = np.zeros((width,), np.int32)
    live = np.zeros((width,), bool)
    for i, row in enumerate(rows):
      (first[i],) = tokens(row, pos[i], pos[i] + 1)
      live[i] = True
    drafts, self.k, self.v = self._propose(
        self.params, self.k, self.v, self._put(first), self._put(pos), table,
        self._put(live))
    return drafts

  def advance(self, row: int, pos: int, accepted: int) -> None:
    """After a call from position ``pos`` kept ``accepted`` drafts: the
    draft KV it wrote is right up to the last kept draft it was fed (it
    fed the current token and its first ``spec_tokens - 1`` drafts)."""
    self.filled[row] = pos + min(accepted + 1, self.k_tokens)

  def warmup(self, row_counts: Sequence[int], widths: Sequence[int]) -> None:
    """Compiles the catch-up and propose programs for every call shape
    (nothing is written: no row is live, every count is 0)."""
    put = self._put
    for b in row_counts:
      for m in widths:
        table = put(np.zeros((b, m), np.int32))
        for w in WINDOWS:
          self.k, self.v = self._catch_up(
              self.params, self.k, self.v, put(np.zeros((b, w), np.int32)),
              put(np.zeros((b,), np.int32)), table,
              put(np.zeros((b,), np.int32)))
        _, self.k, self.v = self._propose(
            self.params, self.k, self.v, put(np.zeros((b,), np.int32)),
            put(np.zeros((b,), np.int32)), table, put(np.zeros((b,), bool)))
    jax.block_until_ready((self.k, self.v))


__all__ = ["DraftModel", "WINDOWS"]
