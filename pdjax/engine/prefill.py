"""The prefill engine: prompts -> first token + the prompt's KV, on a TP mesh.

One jitted program per (prompt-length bucket, batch size); prompts are
right-padded to the smallest bucket that holds them. A prompt longer than
the largest bucket runs as chunked prefill: bucket-sized chunks, each
attending to the KV of the chunks before it (the same code path a cached
prefix takes). The KV comes out already in page layout and sharded by the
rule set (kv_heads over ``tp``), one array per request, so handing it on is a
matter of moving that array, never of slicing a batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pdjax.engine.kv import (kv_sharding, next_pow2, pages_for, payload_pages,
                             request_kv_shape)
from pdjax.engine.requests import PrefillRequest, PrefillResult, RequestKV
from pdjax.engine.sampling import InvalidRequest, SamplingArrays, sample
from pdjax.model.config import ModelConfig
from pdjax.model.llama import Params, prefill_forward
from pdjax.sharding import ShardingRules


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
  buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
  max_batch: int = 4
  page_size: int = 16
  max_seq_len: int = 1024

  def __post_init__(self):
    if not self.buckets or list(self.buckets) != sorted(set(self.buckets)):
      raise ValueError(f"buckets must be increasing, got {self.buckets}")
    for b in self.buckets:
      if b % self.page_size:
        raise ValueError(f"bucket {b} is not a multiple of page_size "
                         f"{self.page_size}")
    if self.max_seq_len % self.page_size:
      raise ValueError(f"max_seq_len {self.max_seq_len} is not a multiple of "
                       f"page_size {self.page_size}")

  @property
  def chunk(self) -> int:
    return self.buckets[-1]

  def bucket_for(self, n: int) -> int | None:
    for b in self.buckets:
      if n <= b:
        return b
    return None

  def chunked_warmup_lengths(self) -> list[int]:
    """A prompt length for each payload page count beyond the largest
    bucket (empty when max_seq_len fits the largest bucket)."""
    C, P = self.chunk, self.page_size
    seen, out = set(), []
    for n in range(C + 1, self.max_seq_len):
      key = payload_pages(pages_for(n, P))
      if key not in seen:
        seen.add(key)
        out.append(n)
    return out

  def payload_page_counts(self) -> list[int]:
    """Every page count ``RequestKV.kv.shape[2]`` a prefill with this config
    can produce (a decode pool compiles one insert program per count)."""
    counts = {b // self.page_size for b in self.buckets}
    counts.update(payload_pages(pages_for(n, self.page_size))
                  for n in self.chunked_warmup_lengths())
    return sorted(counts)

  def batch_sizes(self) -> list[int]:
    out, b = [], 1
    while b < self.max_batch:
      out.append(b)
      b *= 2
    return out + [self.max_batch]


def _to_pages(k, v, page_size):
  """[L, B, T, K, hd] x2 -> per-row [L, 2, T/P, P, K, hd]."""
  L, B, T, K, hd = k.shape
  kv = jnp.stack([k, v], axis=1).reshape(L, 2, B, T // page_size, page_size,
                                         K, hd)
  return [kv[:, :, b] for b in range(B)]


def _prefill_program(params, tokens, true_len, samp, *, cfg, page_size,
                     kv_spec):
  out = prefill_forward(params, tokens, true_len, cfg=cfg)
  index = jnp.zeros(tokens.shape[:1], jnp.int32)
  tok, lp = sample(out.logits, *samp, index)
  rows = _to_pages(out.k, out.v, page_size)
  rows = [jax.lax.with_sharding_constraint(r, kv_spec) for r in rows]
  return tok, lp, rows


def _chunk_program(params, tokens, true_len, k_buf, v_buf, start, samp, *,
                   cfg):
  """One chunk of a long prompt: attends to the buffer's first ``start``
  positions (the chunks before it) and writes its own K/V after them.

  The buffers ``[L, 1, S, K, hd]`` have one static size (max_seq_len
  rounded up to whole chunks), so every chunk of every prompt runs this one
  program; positions past ``start`` are masked, whatever they hold.
  """
  out = prefill_forward(params, tokens, true_len, cfg=cfg, prefix_k=k_buf,
                        prefix_v=v_buf, prefix_len=start)
  tok, lp = sample(out.logits, *samp, jnp.zeros((1,), jnp.int32))
  at = (0, 0, start[0], 0, 0)
  k_buf = jax.lax.dynamic_update_slice(k_buf, out.k.astype(k_buf.dtype), at)
  v_buf = jax.lax.dynamic_update_slice(v_buf, out.v.astype(v_buf.dtype), at)
  return tok, lp, k_buf, v_buf


def _buffer_to_pages(k_buf, v_buf, *, num_pages, page_size, kv_spec):
  """The first ``num_pages`` pages of the chunk buffers, in request layout."""
  n = num_pages * page_size
  return jax.lax.with_sharding_constraint(
      _to_pages(k_buf[:, :, :n], v_buf[:, :, :n], page_size)[0], kv_spec)


class PrefillEngine:
  """Runs prefill for batches of prompts on one mesh (TP or a replica's)."""

  def __init__(self, params: Params, cfg: ModelConfig, mesh: Mesh,
               rules: ShardingRules, config: PrefillConfig = PrefillConfig()):
    self.params = params
    self.cfg = cfg
    self.mesh = mesh
    self.rules = rules
    self.config = config
    P = config.page_size
    self._kv_sharding = {}
    self._replicated = NamedSharding(mesh, PartitionSpec())
    kv_spec = self.kv_sharding(payload_pages(config.chunk // P))
    self._prefill = jax.jit(
        functools.partial(_prefill_program, cfg=cfg, page_size=P,
                          kv_spec=kv_spec))
    self._chunk = jax.jit(functools.partial(_chunk_program, cfg=cfg),
                          donate_argnums=(3, 4))
    self._pages_fns = {}

  # ---------------------------------------------------------------- layout
  def kv_sharding(self, num_pages: int) -> NamedSharding:
    if num_pages not in self._kv_sharding:
      shape = request_kv_shape(self.cfg, num_pages, self.config.page_size)
      self._kv_sharding[num_pages] = kv_sharding(self.rules, self.mesh, shape)
    return self._kv_sharding[num_pages]

  def _put(self, x):
    return jax.device_put(x, self._replicated)

  # ---------------------------------------------------------------- checks
  def validate(self, prompt_ids: Sequence[int]) -> None:
    n = len(prompt_ids)
    if n == 0:
      raise InvalidRequest("prompt", "is empty")
    if n >= self.config.max_seq_len:
      raise InvalidRequest(
          "prompt", f"has {n} tokens; this deployment accepts at most "
          f"{self.config.max_seq_len - 1} (max_seq_len {self.config.max_seq_len}"
          " counts the generated tokens too)")
    arr = np.asarray(prompt_ids)
    if arr.min() < 0 or arr.max() >= self.cfg.vocab_size:
      bad = int(arr[(arr < 0) | (arr >= self.cfg.vocab_size)][0])
      raise InvalidRequest("prompt_token_ids", f"token id {bad} is outside "
                           f"the vocabulary [0, {self.cfg.vocab_size})")

  # ---------------------------------------------------------------- run
  def prefill(self, requests: Sequence[PrefillRequest]) -> list[PrefillResult]:
    """Prefills every request; results in the order given. Requests that
    share a bucket run together, up to ``max_batch`` at a time."""
    for r in requests:
      self.validate(r.prompt_ids)
    results: dict[int, PrefillResult] = {}
    by_bucket: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
      b = self.config.bucket_for(len(r.prompt_ids))
      if b is None:
        results[i] = self._prefill_chunked(r)
      else:
        by_bucket.setdefault(b, []).append(i)
    for bucket, idxs in by_bucket.items():
      for s in range(0, len(idxs), self.config.max_batch):
        group = idxs[s:s + self.config.max_batch]
        outs = self._prefill_batch([requests[i] for i in group], bucket)
        results.update(zip(group, outs))
    return [results[i] for i in range(len(requests))]

  def _prefill_batch(self, reqs: Sequence[PrefillRequest], bucket: int):
    batch = next(b for b in self.config.batch_sizes() if b >= len(reqs))
    tokens = np.zeros((batch, bucket), np.int32)
    true_len = np.ones((batch,), np.int32)
    for i, r in enumerate(reqs):
      tokens[i, :len(r.prompt_ids)] = r.prompt_ids
      true_len[i] = len(r.prompt_ids)
    samp = SamplingArrays.stack([(r.sampling, r.seed_u32) for r in reqs],
                                batch)
    tok, lp, rows = self._prefill(self.params, self._put(tokens),
                                  self._put(true_len),
                                  tuple(self._put(a) for a in samp.as_tuple()))
    tok, lp = np.asarray(tok), np.asarray(lp)
    return [PrefillResult(r.request_id, int(tok[i]), float(lp[i]),
                          RequestKV(rows[i], len(r.prompt_ids)),
                          len(r.prompt_ids))
            for i, r in enumerate(reqs)]

  @property
  def chunk_buffer_len(self) -> int:
    C = self.config.chunk
    return -(-self.config.max_seq_len // C) * C

  def _prefill_chunked(self, r: PrefillRequest) -> PrefillResult:
    C, P = self.config.chunk, self.config.page_size
    n = len(r.prompt_ids)
    cfg = self.cfg
    samp = tuple(self._put(a) for a in SamplingArrays.stack(
        [(r.sampling, r.seed_u32)], 1).as_tuple())
    shape = (cfg.num_layers, 1, self.chunk_buffer_len, cfg.num_kv_heads,
             cfg.head_dim)
    buf_sharding = self.rules.sharding(
        self.mesh, ("layers", "batch", "seq", "kv_heads", "head_dim"), shape,
        what="chunk buffer")
    k = jnp.zeros(shape, cfg.jnp_dtype, device=buf_sharding)
    v = jnp.zeros(shape, cfg.jnp_dtype, device=buf_sharding)
    tok = lp = None
    for start in range(0, n, C):
      part = np.zeros((1, C), np.int32)
      piece = r.prompt_ids[start:start + C]
      part[0, :len(piece)] = piece
      tok, lp, k, v = self._chunk(
          self.params, self._put(part),
          self._put(np.array([len(piece)], np.int32)), k, v,
          self._put(np.array([start], np.int32)), samp)
    kv = self._pages_fn(payload_pages(pages_for(n, P)))(k, v)
    return PrefillResult(r.request_id, int(np.asarray(tok)[0]),
                         float(np.asarray(lp)[0]), RequestKV(kv, n), n)

  def _pages_fn(self, num_pages: int):
    if num_pages not in self._pages_fns:
      self._pages_fns[num_pages] = jax.jit(functools.partial(
          _buffer_to_pages, num_pages=num_pages,
          page_size=self.config.page_size,
          kv_spec=self.kv_sharding(num_pages)))
    return self._pages_fns[num_pages]

  # ---------------------------------------------------------------- warmup
  def warmup(self) -> None:
    """Compiles every program serving can need, so serving never does."""
    from pdjax.engine.sampling import SamplingParams
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    for bucket in self.config.buckets:
      for batch in self.config.batch_sizes():
        reqs = [PrefillRequest(f"warmup-{i}", [1] * bucket, greedy)
                for i in range(batch)]
        self._prefill_batch(reqs, bucket)
    # Chunked prefill: one chunk program, plus one page extraction per
    # payload size a long prompt can have.
    for n in self._chunked_warmup_lengths():
      self._prefill_chunked(PrefillRequest("warmup", [1] * n, greedy))

  def _chunked_warmup_lengths(self) -> list[int]:
    return self.config.chunked_warmup_lengths()

  def payload_page_counts(self) -> list[int]:
    return self.config.payload_page_counts()


__all__ = ["PrefillConfig", "PrefillEngine", "next_pow2"]
