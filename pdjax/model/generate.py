"""Greedy generation through the paged KV cache: a simple reference path.

This is not the serving engine. It exists so that tests (and a curious user)
can check, in a few lines, that ``prefill_forward`` + ``decode_forward`` with a
page pool produce the same tokens as Hugging Face ``generate``: it builds a
private page pool, gives each sequence a contiguous run of pages, copies the
prefill K/V into them through the page table exactly as the engine's KV
transfer does, then decodes one token per step. Keeping it small and obvious
is the point; batching, scheduling and sampling live in the engine.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.model import llama
from pdjax.model.config import ModelConfig


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnums=(3, 4))
def _decode_step(params, tokens, positions, k_pages, v_pages, page_table, *,
                 cfg: ModelConfig):
  out = llama.decode_forward(params, tokens, positions, k_pages, v_pages,
                             page_table, cfg=cfg)
  next_tokens = jnp.argmax(out.logits, axis=-1).astype(jnp.int32)
  return next_tokens, out.logits, out.k_pool, out.v_pool


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _write_prefill_kv(k_pages, v_pages, k, v, page_table):
  """Scatters dense prefill K/V [L, B, T, K, hd] into the sequences' pages
  of the ``[L * N, P, K, hd]`` pools.

  T is a multiple of the page size and ``page_table[:, :T // P]`` names the
  pages that hold positions [0, T). Padding positions are written too; they
  are overwritten by decode before any query can see them (decode masks keys
  at positions >= the current length).
  """
  L, B, T, K, hd = k.shape
  P = k_pages.shape[1]
  N = k_pages.shape[0] // L
  pages = page_table[:, :T // P]                       # [B, T/P]
  rows = (jnp.arange(L)[:, None, None] * N + pages[None]).reshape(-1)
  k_pages = k_pages.at[rows].set(
      k.reshape(L * B * (T // P), P, K, hd).astype(k_pages.dtype))
  v_pages = v_pages.at[rows].set(
      v.reshape(L * B * (T // P), P, K, hd).astype(v_pages.dtype))
  return k_pages, v_pages


def _as_prompts(prompt_ids) -> tuple[list[np.ndarray], bool]:
  """Normalises one prompt or a batch of (ragged) prompts to a list."""
  if isinstance(prompt_ids, (np.ndarray, jax.Array)):
    arr = np.asarray(prompt_ids)
    if arr.ndim == 1:
      return [arr.astype(np.int32)], True
    if arr.ndim == 2:
      return [row.astype(np.int32) for row in arr], False
    raise ValueError(f"prompt_ids must be 1-D or 2-D, got shape {arr.shape}")
  prompts = list(prompt_ids)
  if prompts and np.ndim(prompts[0]) == 0:
    return [np.asarray(prompts, np.int32)], True
  return [np.asarray(p, np.int32).reshape(-1) for p in prompts], False


def greedy_generate(params: llama.Params, cfg: ModelConfig,
                    prompt_ids: Sequence[int] | Sequence[Sequence[int]] |
                    np.ndarray, max_new_tokens: int, page_size: int = 16, *,
                    return_logits: bool = False):
  """Greedy (argmax) decoding of ``max_new_tokens`` tokens; never stops early.

  Args:
    params: weights pytree (``llama.init_params``, ``load_hf_params``, ...).
    cfg: the model config; ``cfg.dtype`` is the KV cache dtype.
    prompt_ids: one prompt (a 1-D sequence of ids) or a batch of prompts of
      possibly different lengths (a list of sequences, or a 2-D array).
    max_new_tokens: how many tokens to produce per prompt (EOS is ignored).
    page_size: tokens per KV page.
    return_logits: also return the float32 logits each token was chosen from.

  Returns:
    int32 tokens ``[B, max_new_tokens]`` (``[max_new_tokens]`` for a single
    1-D prompt), and with ``return_logits`` a tuple ``(tokens, logits)`` with
    logits ``[B, max_new_tokens, vocab]``: ``logits[:, 0]`` come from the
    prefill, the rest from decode steps.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  prompts, single = _as_prompts(prompt_ids)
  lengths = np.array([len(p) for p in prompts], np.int32)
  if (lengths < 1).any():
    raise ValueError("every prompt needs at least one token")
  B, P = len(prompts), page_size
  # Pad the prompt to whole pages: the prefill K/V then maps onto pages by a
  # reshape, and prompts of similar length share one compiled prefill.
  T = llama.num_pages_for(int(lengths.max()), P) * P
  total = int(lengths.max()) + max_new_tokens
  if total > cfg.max_position_embeddings:
    raise ValueError(f"prompt + new tokens ({total}) exceed "
                     f"max_position_embeddings ({cfg.max_position_embeddings})")
  M = llama.num_pages_for(max(T, total), P)

  tokens = np.zeros((B, T), np.int32)
  for b, p in enumerate(prompts):
    tokens[b, :len(p)] = p
  # Page 0 is the null page; sequence b owns pages 1 + b*M ... (b+1)*M.
  page_table = jnp.asarray(1 + np.arange(B * M, dtype=np.int32).reshape(B, M))
  # Every layer's pages on one axis (layer l's page p is row l * N + p).
  pool_shape = (cfg.num_layers * (1 + B * M), P, cfg.num_kv_heads,
                cfg.head_dim)
  k_pages = jnp.zeros(pool_shape, cfg.jnp_dtype)
  v_pages = jnp.zeros(pool_shape, cfg.jnp_dtype)

  pre = llama.prefill_forward(params, jnp.asarray(tokens),
                              jnp.asarray(lengths), cfg=cfg)
  k_pages, v_pages = _write_prefill_kv(k_pages, v_pages, pre.k, pre.v,
                                       page_table)
  next_tokens = jnp.argmax(pre.logits, axis=-1).astype(jnp.int32)
  out_tokens = [next_tokens]
  out_logits = [pre.logits]
  positions = jnp.asarray(lengths)
  for _ in range(max_new_tokens - 1):
    next_tokens, logits, k_pages, v_pages = _decode_step(
        params, next_tokens, positions, k_pages, v_pages, page_table, cfg=cfg)
    positions = positions + 1
    out_tokens.append(next_tokens)
    out_logits.append(logits)

  result = np.asarray(jnp.stack(out_tokens, axis=1))
  logits = (np.asarray(jnp.stack(out_logits, axis=1)[..., :cfg.vocab_size])
            if return_logits else None)
  if single:
    result = result[0]
    logits = None if logits is None else logits[0]
  return (result, logits) if return_logits else result


__all__ = ["greedy_generate"]
