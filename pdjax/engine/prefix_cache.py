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
Below the pool, optionally: a host-memory tier (``pdjax.engine.host_tier``)
and, below that, the deployment's shared KV (``pdjax.engine.remote_tier``:
blocks fetched from peer workers and the host's store, landing in the host
tier; new blocks written through to the store).

The store serves its blocks to peers too (``export``): a peer's request is
queued, and the store's owner (the thread that runs its programs) reads
the pages for it in ``serve_peers``, between its own programs, as every
device operation of the cache runs on that one thread.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from pdjax.engine.api import PrefixStore
from pdjax.engine.block_names import (HASH_BYTES, block_hashes,
                                       layout_fingerprint)
from pdjax.engine.block_pool import BlockPool
from pdjax.engine import host_tier  # host KV tier
from pdjax.engine.cache_events import CacheEventLog
from pdjax.engine.kv import zero_kv
from pdjax.engine.shared_jit import shared_jit
from pdjax.model.config import ModelConfig
from pdjax.model.llama import kv_to_pool
from pdjax.sharding import ShardingRules

log = logging.getLogger(__name__)

POOL_AXES = ("pages", "page_slot", "kv_heads", "head_dim")


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
  return (k_pool.at[rows].set(kv_to_pool(k, k_pool.dtype)),
          v_pool.at[rows].set(kv_to_pool(v, v_pool.dtype)))


def _store_kv_pages(k_pool, v_pool, kv, pages, *, num_layers):
  """Writes a request KV ``[L, 2, n, P, K, hd]`` (page i = block i) into
  pool pages ``pages[i]`` (0: not stored)."""
  L = num_layers
  N = k_pool.shape[0] // L
  n = kv.shape[2]
  rows = (jnp.arange(L, dtype=jnp.int32)[:, None] * N
          + pages[None, :]).reshape(-1)
  k = kv_to_pool(kv[:, 0].reshape(L * n, *kv.shape[3:]), k_pool.dtype)
  v = kv_to_pool(kv[:, 1].reshape(L * n, *kv.shape[3:]), v_pool.dtype)
  return k_pool.at[rows].set(k), v_pool.at[rows].set(v)


class _Export:
  """A peer's request for blocks, waiting for the store's owner."""

  def __init__(self, hashes: Sequence[bytes]):
    self.hashes = list(hashes)
    self.blocks: list[tuple[bytes, Any]] = []
    self.done = threading.Event()
    self.cancelled = False


class PrefillKVStore(PrefixStore):
  """The prefill worker's block cache (device pool + names)."""

  keeps_prefills = True

  def __init__(self, cfg: ModelConfig, mesh: Mesh, rules: ShardingRules,
               num_pages: int, page_size: int, host_cache_blocks: int = 0,
               remote=None):
    """``host_cache_blocks``: blocks evicted from the device pool are kept
    in host memory, up to this many (``pdjax.engine.host_tier``; 0: off).
    ``remote``: a ``pdjax.engine.remote_tier.RemoteTier`` (its fetched
    blocks land in the host tier, which must be on)."""
    if remote is not None and host_cache_blocks <= 0:
      raise ValueError("shared KV (a remote tier) lands its blocks in the "
                       "host tier: host_cache_blocks must be > 0")
    self.cfg = cfg
    self.page_size = page_size
    # KV-aware routing: this store's block-set changes, for the router.
    self.cache_events = CacheEventLog()
    self.pool = BlockPool(num_pages, on_event=self.cache_events.on_event)
    self.fingerprint = layout_fingerprint(cfg, page_size)
    shape = (cfg.num_layers * num_pages, page_size, cfg.num_kv_heads,
             cfg.head_dim)
    sharding = rules.sharding(mesh, POOL_AXES, shape, what="prefix cache")
    self.k, self.v = shared_jit(
        functools.partial(zero_kv, shape=shape, dtype=cfg.dtype),
        out_shardings=(sharding, sharding))()
    L = cfg.num_layers
    self._gather = shared_jit(functools.partial(_gather_blocks, num_layers=L),
                              donate_argnums=(3, 4))
    self._store = shared_jit(functools.partial(_store_blocks, num_layers=L),
                             donate_argnums=(0, 1))
    self._store_kv = shared_jit(functools.partial(_store_kv_pages,
                                                  num_layers=L),
                                donate_argnums=(0, 1))
    self._read = shared_jit(functools.partial(
        host_tier._read_pages, num_layers=L))  # pylint: disable=protected-access
    # --- host KV tier: evicted cached blocks go to host memory ---
    self.host_tier = host_tier.make_link(
        host_cache_blocks, self.pool, cfg, page_size,
        lambda: (self.k, self.v), self._set_pools)
    # --- shared KV: peers and the host's store (pdjax.engine.remote_tier)
    self.remote = remote
    if remote is not None and remote.publishes and remote.write == "evict":
      # Blocks go to the store as they leave the last local tier.
      self.host_tier.tier.on_drop = (
          lambda name, data: remote.publish([(name, data)]))
    self._exports: list[_Export] = []
    self._exports_lock = threading.Lock()
    self._work = threading.Event()     # an export queued while fetching
    self.stats = {"exported_blocks": 0, "exports": 0}

  def _set_pools(self, k, v) -> None:   # host KV tier
    self.k, self.v = k, v

  @property
  def block_layout(self):
    """What a block of this store is: ``remote_tier.BlockLayout``."""
    from pdjax.engine.remote_tier import layout_of
    return layout_of(self.cfg, self.page_size)

  def hashes(self, token_ids: Sequence[int], salt: str = "") -> list[bytes]:
    return block_hashes(token_ids, self.page_size, self.fingerprint, salt)

  def match(self, hashes: Sequence[bytes],
            sources: Sequence[tuple[str, int]] = ()) -> list[int]:
    """Pages of the longest cached prefix of ``hashes``, each pinned (one
    reference taken): the caller must ``release`` them. Past the local
    tiers, with a remote tier: blocks fetched from ``sources`` (peers the
    router named, best first) and the host's store, promoted like host
    blocks."""
    pages = host_tier.match_with_tier(self.pool, hashes, self.host_tier)
    if self.remote is None or len(pages) >= len(hashes):
      return pages
    fetched = self.remote.fetch(hashes, len(pages), sources,
                                wait=self._wait_serving)
    for h, block in fetched:
      page = self.host_tier.promote_block(h, block)
      if page is None:
        break
      pages.append(page)
    return pages

  def observe_prefill(self, tokens: int, seconds: float) -> None:
    if self.remote is not None:
      self.remote.costs.observe_prefill(tokens, seconds)

  # ------------------------------------------------------------ peers
  def export(self, hashes: Sequence[bytes], timeout_s: float
             ) -> list[tuple[bytes, Any]]:
    """Any thread: the leading run of ``hashes`` held here (device pool or
    host tier), as (name, array) whose reads are dispatched (the caller
    copies them to the host). Queued for the owner, who is woken
    (``wake``); TimeoutError if it does not get to it in ``timeout_s``."""
    job = _Export(hashes)
    with self._exports_lock:
      self._exports.append(job)
    self._work.set()
    if self.wake is not None:
      self.wake()
    if not job.done.wait(timeout_s):
      job.cancelled = True
      raise TimeoutError(f"the prefill engine did not read {len(hashes)} "
                         f"blocks for a peer within {timeout_s:.1f} s")
    return job.blocks

  def serve_peers(self) -> int:
    """Owner thread: reads the blocks queued exports asked for; returns
    how many jobs it answered."""
    with self._exports_lock:
      jobs, self._exports = self._exports, []
    self._work.clear()
    if not jobs:
      return 0
    host_tier.flush(self.host_tier)   # promoted pages land first
    for job in jobs:
      if job.cancelled:
        continue
      try:
        job.blocks = self._read_for_peer(job.hashes)
        self.stats["exports"] += 1
        self.stats["exported_blocks"] += len(job.blocks)
      except Exception:  # noqa: BLE001 - the peer recomputes
        log.exception("reading blocks for a peer failed")
        job.blocks = []
      job.done.set()
    return len(jobs)

  def _read_for_peer(self, hashes: Sequence[bytes]) -> list[tuple[bytes, Any]]:
    """The leading run of ``hashes`` here: device pages (read now, in one
    program per batch of pages) or host-tier blocks."""
    where: list[tuple[bytes, int | None, Any]] = []
    for h in hashes:
      page = self.pool.peek(h)
      if page is not None:
        where.append((h, page, None))
        continue
      data = (self.host_tier.host_block(h) if self.host_tier is not None
              else None)
      if data is None:
        break
      where.append((h, None, data))
    pages = [p for _, p, _ in where if p is not None]
    if pages and self.host_tier is not None:
      read = iter(self.host_tier.read_blocks(pages))
    elif pages:
      read = iter(self._read_pages(pages))
    else:
      read = iter(())
    return [(h, next(read) if p is not None else d) for h, p, d in where]

  def _read_pages(self, pages: Sequence[int]) -> list[jax.Array]:
    """Device pages as blocks without a host tier (one program per page
    count; only the tests' stores lack a tier)."""
    return list(self._read(self.k, self.v, np.asarray(pages, np.int32)))

  def _wait_serving(self, fut: concurrent.futures.Future):
    """Waits for a fetch, serving this store's peers meanwhile (two
    workers fetching from each other would otherwise each wait for the
    other's owner thread until their deadlines)."""
    fut.add_done_callback(lambda _: self._work.set())
    while not fut.done():
      self._work.wait(0.05)
      self.serve_peers()
    return fut.result()

  def _publish(self, names: Sequence[bytes], pages: Sequence[int]) -> None:
    """Write-through: the new blocks ``pages`` (named ``names``) go to the
    host's store, read by a program dispatched now."""
    if (self.remote is None or not self.remote.publishes or not pages
        or self.remote.write != "through"):
      return
    try:
      self.remote.publish(list(zip(names,
                                   self.host_tier.read_blocks(pages))))
    except Exception:  # noqa: BLE001 - the store is optional
      log.exception("queueing blocks for the store failed")

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
    return self._gather(self.k, self.v, table, k_buf, v_buf)

  def _claim(self, hashes: Sequence[bytes], first: int, table: np.ndarray,
             names: list[bytes] | None = None) -> list[int]:
    """Pages for the not-yet-cached blocks ``first ..`` (recorded in
    ``table``; their names appended to ``names``), named and held; stops
    when no page can be had without evicting one in use."""
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
      if names is not None:
        names.append(hashes[i])
    return new

  def store(self, hashes: Sequence[bytes], first: int, k_buf, v_buf) -> int:
    """Caches blocks ``first ..`` of a finished prompt (named ``hashes[i]``)
    from its chunk buffers; returns how many were new. Blocks already
    cached are skipped; the rest take free or least-recently-used
    unreferenced pages (never a page in use); when none is left, the rest
    are not cached."""
    table = np.zeros((k_buf.shape[2] // self.page_size,), np.int32)
    names: list[bytes] = []
    new = self._claim(hashes, first, table, names)
    if new:
      host_tier.flush(self.host_tier)   # evicted pages are read first
      self.k, self.v = self._store(self.k, self.v, k_buf, v_buf, table)
      self._publish(names, new)
      self.pool.free(new)   # unreferenced now: cached, evictable
    return len(new)

  def store_pages(self, hashes: Sequence[bytes], kv) -> int:
    """``store`` for a batched prefill's request KV (page i = block i)."""
    table = np.zeros((kv.shape[2],), np.int32)
    names: list[bytes] = []
    new = self._claim(hashes, 0, table, names)
    if new:
      host_tier.flush(self.host_tier)   # evicted pages are read first
      self.k, self.v = self._store_kv(self.k, self.v, kv, table)
      self._publish(names, new)
      self.pool.free(new)
    return len(new)

  def warmup(self, engine) -> None:
    """Compiles the store's programs for ``engine``'s shapes, caching
    nothing (every page entry is the null page)."""
    for length in engine.chunk_buffer_lens:
      k, v = engine.empty_buffers(length)
      table = jnp.zeros((length // self.page_size,), jnp.int32)
      k, v = self._gather(self.k, self.v, table, k, v)
      self.k, self.v = self._store(self.k, self.v, k, v, table)
      del k, v   # the pair goes before the next, and before the stores below
    for bucket in engine.config.buckets:
      n = bucket // self.page_size
      kv = jnp.zeros((self.cfg.num_layers, 2, n, self.page_size,
                      self.cfg.num_kv_heads, self.cfg.head_dim),
                     self.cfg.jnp_dtype,
                     device=engine.kv_sharding(n))
      self.k, self.v = self._store_kv(self.k, self.v, kv,
                                      jnp.zeros((n,), jnp.int32))
      del kv
    if self.host_tier is not None:   # host KV tier programs
      self.host_tier.warmup()
    jax.block_until_ready((self.k, self.v))


__all__ = ["block_hashes", "layout_fingerprint", "PrefillKVStore",
           "HASH_BYTES"]
