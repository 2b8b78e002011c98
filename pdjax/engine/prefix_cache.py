"""Block identity for KV reuse across requests, and the prefill pool's store.

A block is ``page_size`` consecutive tokens. Its name chains the names before
it, so equal names mean equal prefixes (not just equal blocks):

  h_i = H(h_{i-1} || layout fingerprint || tenant salt || tokens of block i)

The layout fingerprint (model, dtype, page size) keeps KV of different
models or layouts apart; the salt (vLLM's ``cache_salt``, per request) keeps
tenants apart: requests with different salts never share a block. Only full
blocks are named; a prompt's last partial block is always computed.

``PrefillKVStore`` is the prefill worker's cache: a paged pool on the
prefill mesh plus a ``BlockPool`` naming its pages. Finished prompts leave
their full blocks in it; a later prompt whose leading blocks are there runs
prefill only on the rest (the blocks are gathered into the chunk buffer).
"""

from __future__ import annotations

import functools
import hashlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from pdjax.engine.api import PrefixStore
from pdjax.engine.block_pool import BlockPool
from pdjax.engine import host_tier  # host KV tier
from pdjax.engine.cache_events import CacheEventLog
from pdjax.model.config import ModelConfig
from pdjax.sharding import ShardingRules

POOL_AXES = ("pages", "page_slot", "kv_heads", "head_dim")
HASH_BYTES = 16


def layout_fingerprint(cfg: ModelConfig, page_size: int) -> bytes:
  """What must match for two pools to exchange blocks."""
  return hashlib.blake2b(f"{cfg.fingerprint()}:{page_size}".encode(),
                         digest_size=HASH_BYTES).digest()


def block_hashes(token_ids: Sequence[int], page_size: int, fingerprint: bytes,
                 salt: str = "") -> list[bytes]:
  """Names of the full blocks of ``token_ids``, in order (chained)."""
  ids = np.asarray(token_ids, dtype="<i4")
  n = len(ids) // page_size
  salt_b = salt.encode()
  out: list[bytes] = []
  parent = b""
  for i in range(n):
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    h.update(parent)
    h.update(fingerprint)
    h.update(len(salt_b).to_bytes(4, "little"))
    h.update(salt_b)
    h.update(ids[i * page_size:(i + 1) * page_size].tobytes())
    parent = h.digest()
    out.append(parent)
  return out


# ------------------------------------------------------------------ programs
# Both programs move whole chunk buffers (one entry of ``pages`` per block of
# the buffer; 0 = the null page), so each compiles once. Moving a full
# buffer is a device-local copy of at most one prompt's KV.
def _gather_blocks(k_pool, v_pool, pages, k_buf, v_buf, *, num_layers):
  """Chunk buffers ``[L, 1, S, K, hd]`` from pool pages: block i of the
  buffer is ``pages[i]`` (a cached prefix, then null pages that the chunks
  overwrite; attention masks them meanwhile)."""
  L = num_layers
  N = k_pool.shape[0] // L
  rows = (jnp.arange(L, dtype=jnp.int32)[:, None] * N
          + pages[None, :]).reshape(-1)
  k = k_pool[rows].reshape(k_buf.shape).astype(k_buf.dtype)
  v = v_pool[rows].reshape(v_buf.shape).astype(v_buf.dtype)
  del k_buf, v_buf
  return k, v


def _store_blocks(k_pool, v_pool, k_buf, v_buf, pages, *, num_layers):
  """Writes buffer block i to pool page ``pages[i]`` (0: not stored)."""
  L = num_layers
  N = k_pool.shape[0] // L
  P = k_pool.shape[1]
  n = pages.shape[0]
  rows = (jnp.arange(L, dtype=jnp.int32)[:, None] * N
          + pages[None, :]).reshape(-1)
  k = k_buf.reshape(L * n, P, *k_buf.shape[3:])
  v = v_buf.reshape(L * n, P, *v_buf.shape[3:])
  return (k_pool.at[rows].set(k.astype(k_pool.dtype)),
          v_pool.at[rows].set(v.astype(v_pool.dtype)))


def _store_kv_pages(k_pool, v_pool, kv, pages, *, num_layers):
  """Writes a request KV ``[L, 2, n, P, K, hd]`` (page i = block i) into
  pool pages ``pages[i]`` (0: not stored)."""
  L = num_layers
  N = k_pool.shape[0] // L
  n = kv.shape[2]
  rows = (jnp.arange(L, dtype=jnp.int32)[:, None] * N
          + pages[None, :]).reshape(-1)
  k = kv[:, 0].reshape(L * n, *kv.shape[3:]).astype(k_pool.dtype)
  v = kv[:, 1].reshape(L * n, *kv.shape[3:]).astype(v_pool.dtype)
  return k_pool.at[rows].set(k), v_pool.at[rows].set(v)


class PrefillKVStore(PrefixStore):
  """The prefill worker's block cache (device pool + names)."""

  keeps_prefills = True

  def __init__(self, cfg: ModelConfig, mesh: Mesh, rules: ShardingRules,
               num_pages: int, page_size: int, host_cache_blocks: int = 0):
    """``host_cache_blocks``: blocks evicted from the device pool are kept
    in host memory, up to this many (``pdjax.engine.host_tier``; 0: off)."""
    self.cfg = cfg
    self.page_size = page_size
    # KV-aware routing: this store's block-set changes, for the router.
    self.cache_events = CacheEventLog()
    self.pool = BlockPool(num_pages, on_event=self.cache_events.on_event)
    self.fingerprint = layout_fingerprint(cfg, page_size)
    shape = (cfg.num_layers * num_pages, page_size, cfg.num_kv_heads,
             cfg.head_dim)
    sharding = rules.sharding(mesh, POOL_AXES, shape, what="prefix cache")
    zeros = jax.jit(lambda: jnp.zeros(shape, cfg.jnp_dtype),
                    out_shardings=sharding)
    self.k = zeros()
    self.v = zeros()
    L = cfg.num_layers
    self._gather = jax.jit(functools.partial(_gather_blocks, num_layers=L),
                           donate_argnums=(3, 4))
    self._store = jax.jit(functools.partial(_store_blocks, num_layers=L),
                          donate_argnums=(0, 1))
    self._store_kv = jax.jit(functools.partial(_store_kv_pages,
                                               num_layers=L),
                             donate_argnums=(0, 1))
    # --- host KV tier: evicted cached blocks go to host memory ---
    self.host_tier = host_tier.make_link(
        host_cache_blocks, self.pool, cfg, page_size,
        lambda: (self.k, self.v), self._set_pools)

  def _set_pools(self, k, v) -> None:   # host KV tier
    self.k, self.v = k, v

  def hashes(self, token_ids: Sequence[int], salt: str = "") -> list[bytes]:
    return block_hashes(token_ids, self.page_size, self.fingerprint, salt)

  def match(self, hashes: Sequence[bytes]) -> list[int]:
    """Pages of the longest cached prefix of ``hashes``, each pinned (one
    reference taken): the caller must ``release`` them."""
    return host_tier.match_with_tier(self.pool, hashes, self.host_tier)

  def release(self, pages: Sequence[int]) -> None:
    self.pool.free(pages)

  def block_stats(self) -> dict[str, int]:
    return {k: self.pool.stats[k] for k in ("hits", "misses", "evictions")}

  def gather_into(self, pages: Sequence[int], k_buf, v_buf):
    """Chunk buffers whose head holds the cached ``pages`` (the rest is
    masked garbage the chunks overwrite). Consumes the buffers given."""
    table = np.zeros((k_buf.shape[2] // self.page_size,), np.int32)
    table[:len(pages)] = pages
    host_tier.flush(self.host_tier)   # promoted pages land first
    return self._gather(self.k, self.v, jnp.asarray(table), k_buf, v_buf)

  def _claim(self, hashes: Sequence[bytes], first: int, table: np.ndarray
             ) -> list[int]:
    """Pages for the not-yet-cached blocks ``first ..`` (recorded in
    ``table``), named and held; stops when no page can be had without
    evicting one in use."""
    new = []
    for i in range(first, min(len(hashes), len(table))):
      if self.pool.contains(hashes[i]):
        continue
      if self.pool.num_free + self.pool.num_cached < 1:
        break
      (page,) = self.pool.allocate(1)
      self.pool.register(page, hashes[i])
      table[i] = page
      new.append(page)
    return new

  def store(self, hashes: Sequence[bytes], first: int, k_buf, v_buf) -> int:
    """Caches blocks ``first ..`` of a finished prompt (named ``hashes[i]``)
    from its chunk buffers; returns how many were new. Blocks already
    cached are skipped; the rest take free or least-recently-used
    unreferenced pages (never a page in use); when none is left, the rest
    are not cached."""
    table = np.zeros((k_buf.shape[2] // self.page_size,), np.int32)
    new = self._claim(hashes, first, table)
    if new:
      host_tier.flush(self.host_tier)   # evicted pages are read first
      self.k, self.v = self._store(self.k, self.v, k_buf, v_buf,
                                   jnp.asarray(table))
      self.pool.free(new)   # unreferenced now: cached, evictable
    return len(new)

  def store_pages(self, hashes: Sequence[bytes], kv) -> int:
    """``store`` for a batched prefill's request KV (page i = block i)."""
    table = np.zeros((kv.shape[2],), np.int32)
    new = self._claim(hashes, 0, table)
    if new:
      host_tier.flush(self.host_tier)   # evicted pages are read first
      self.k, self.v = self._store_kv(self.k, self.v, kv, jnp.asarray(table))
      self.pool.free(new)
    return len(new)

  def warmup(self, engine) -> None:
    """Compiles the store's programs for ``engine``'s shapes, caching
    nothing (every page entry is the null page)."""
    k, v = engine._zeros()  # pylint: disable=protected-access
    table = jnp.zeros((k.shape[2] // self.page_size,), jnp.int32)
    k, v = self._gather(self.k, self.v, table, k, v)
    self.k, self.v = self._store(self.k, self.v, k, v, table)
    for bucket in engine.config.buckets:
      n = bucket // self.page_size
      kv = jnp.zeros((self.cfg.num_layers, 2, n, self.page_size,
                      self.cfg.num_kv_heads, self.cfg.head_dim),
                     self.cfg.jnp_dtype,
                     device=engine.kv_sharding(n))
      self.k, self.v = self._store_kv(self.k, self.v, kv,
                                      jnp.zeros((n,), jnp.int32))
    if self.host_tier is not None:   # host KV tier programs
      self.host_tier.warmup()
    jax.block_until_ready((self.k, self.v))


__all__ = ["block_hashes", "layout_fingerprint", "PrefillKVStore",
           "HASH_BYTES"]
