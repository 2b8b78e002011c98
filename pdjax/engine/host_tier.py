"""A second KV tier in host memory, below a device pool's prefix cache.

A device pool keeps finished blocks, named by content, until it needs their
pages (``BlockPool``'s LRU eviction). Without a second tier an evicted block
is gone, and the next request sharing that prefix recomputes it. Host memory
is an order of magnitude larger than the KV pool and a host->device copy of
a block is far cheaper than recomputing it, so:

* demotion: when the pool evicts a cached block, its K and V (every layer)
  are copied to ``HostKVTier``, an LRU store keyed by the block hash;
* promotion: when a lookup misses on the device but the host tier has the
  block, a device page is allocated, named, and the block uploaded into it;
  the request then uses it exactly like a block found on the device.

Ordering is the subtle part. Eviction happens inside ``BlockPool.allocate``,
and the page is handed to a new owner that will write it. The copy must read
the page before that write, and must not race the owner thread's programs,
which donate (consume) the pools: a decode replica's ``reserve`` runs on gRPC
threads while its loop thread replaces ``state`` every step. So every device
operation of the tier is *queued* (``HostTierLink``: the pool's ``on_evict``
hook queues a read, a promotion queues an upload) and runs in ``flush``,
which the pool's owner calls on its own thread right before any program that
reads or writes the pools. A page can only be written by a program its owner
dispatches after allocating it (and so after the flush that reads it), or by
a queued upload that runs after the reads of the same flush; JAX runs the
flush's programs in dispatch order with the owner's later ones.

Where the backend has the ``pinned_host`` memory kind (GPU, TPU, recent CPU
backends), tier blocks are JAX arrays in page-locked host memory, so both
directions are asynchronous DMA; otherwise they are numpy arrays.

The tier is inclusive: a promoted block stays on the host too (touched as
recently used), so evicting it from the device again costs no copy.

``SwapSpace`` uses the same copies for another purpose: the KV of decode
rows preempted when the pool runs out of pages (``DecodeReplica``), held by
row rather than by content, and written back into fresh pages when the row
resumes.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import threading
from typing import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from pdjax.engine.block_pool import BlockPool, PoolExhausted
from pdjax.engine.shared_jit import shared_jit

log = logging.getLogger(__name__)

PINNED_HOST = "pinned_host"
# The counters and gauges ``HostKVTier.stats`` reports (metric ``stat``s).
STATS = ("hits", "misses", "evictions", "demotions", "blocks", "bytes")


class _Block:
  """One tier entry: ``data`` is ``[2, L, P, K, hd]`` (K then V), a host
  array, or a device array still on its way to the host, or None while its
  read is queued. Entries are shared by reference with queued uploads, so a
  block dropped from the tier can still be uploaded."""

  __slots__ = ("data", "in_tier")

  def __init__(self):
    self.data = None
    self.in_tier = False


class _HostCopies:
  """Blocks' device -> host copies, as the host's memory allows: into
  pinned host memory by an asynchronous DMA (a ``host_sharding``), or, in
  numpy mode (None), a device copy whose transfer starts at once and
  which ``land`` later turns into numpy, freeing the device memory."""

  def __init__(self, host_sharding):
    self.host_sharding = host_sharding
    self._unlanded: list[_Block] = []

  @property
  def memory_kind(self) -> str:
    """Where the blocks live: ``pinned_host`` or ``numpy``."""
    return PINNED_HOST if self.host_sharding is not None else "numpy"

  def start(self, out: jax.Array, blk: _Block):
    """``out`` on its way to the host, as ``blk``'s data from now on."""
    if self.host_sharding is not None:
      return jax.device_put(out, self.host_sharding)   # async DMA
    out.copy_to_host_async()
    self._unlanded.append(blk)
    return out

  def land(self) -> None:
    """numpy mode: the copies started before, as numpy."""
    landing, self._unlanded = self._unlanded, []
    for blk in landing:
      if isinstance(blk.data, jax.Array):
        blk.data = np.asarray(blk.data)


class HostKVTier:
  """LRU store of KV blocks in host memory, by block hash.

  Thread-safe. ``capacity_blocks`` bounds the number of blocks held (each
  ``2 * prod(page_shape) * itemsize`` bytes); adding one more drops the
  least recently used.
  """

  def __init__(self, capacity_blocks: int, page_shape: Sequence[int], dtype,
               *, use_pinned_host: bool = True):
    """``page_shape``: one block of one of K, V for all layers,
    ``(L, P, K, hd)``. ``use_pinned_host=False`` forces numpy storage."""
    if capacity_blocks < 1:
      raise ValueError(f"a host tier needs capacity >= 1, got "
                       f"{capacity_blocks}")
    self.capacity_blocks = capacity_blocks
    self.page_shape = tuple(int(d) for d in page_shape)
    self.dtype = np.dtype(dtype)
    self.block_shape = (2, *self.page_shape)
    self.block_bytes = 2 * math.prod(self.page_shape) * self.dtype.itemsize
    self.use_pinned_host = use_pinned_host
    self._blocks: collections.OrderedDict[Hashable, _Block] = (
        collections.OrderedDict())
    self._lock = threading.RLock()
    self._counts = collections.Counter()
    self._host_shardings: dict = {}
    # Told (name, data) of each block the LRU drops for good, outside the
    # lock (shared KV: written to the host's store on eviction); a block
    # whose read from the device is still queued (no data) is not told.
    self.on_drop: Callable[[Hashable, object], None] | None = None

  # ---------------------------------------------------------------- store
  def __len__(self) -> int:
    return len(self._blocks)

  def contains(self, block_hash: Hashable, *, touch: bool = False) -> bool:
    with self._lock:
      if block_hash not in self._blocks:
        return False
      if touch:
        self._blocks.move_to_end(block_hash)
      return True

  def get(self, block_hash: Hashable) -> _Block | None:
    """The entry for ``block_hash`` (now most recently used), counting a hit
    or a miss."""
    with self._lock:
      blk = self._blocks.get(block_hash)
      if blk is None:
        self._counts["misses"] += 1
        return None
      self._blocks.move_to_end(block_hash)
      self._counts["hits"] += 1
      return blk

  def put(self, block_hash: Hashable, blk: _Block) -> None:
    """Adds (or refreshes) an entry, dropping LRU ones beyond capacity."""
    dropped = []
    with self._lock:
      old = self._blocks.pop(block_hash, None)
      if old is not None and old is not blk:
        old.in_tier = False
      self._blocks[block_hash] = blk
      blk.in_tier = True
      while len(self._blocks) > self.capacity_blocks:
        name, gone = self._blocks.popitem(last=False)
        gone.in_tier = False
        self._counts["evictions"] += 1
        dropped.append((name, gone.data))
    if self.on_drop is not None:
      for name, data in dropped:
        if data is not None:
          self.on_drop(name, data)

  def count(self, stat: str, n: int = 1) -> None:
    with self._lock:
      self._counts[stat] += n

  def clear(self) -> None:
    """Drops everything (e.g. the weights changed, so every block is
    stale)."""
    with self._lock:
      for blk in self._blocks.values():
        blk.in_tier = False
      self._blocks.clear()

  @property
  def stats(self) -> dict[str, int]:
    """Cumulative hits, misses, evictions (LRU drops), demotions (blocks
    copied in); current blocks and bytes held."""
    with self._lock:
      out = {s: self._counts[s] for s in ("hits", "misses", "evictions",
                                          "demotions")}
      out["blocks"] = len(self._blocks)
      out["bytes"] = len(self._blocks) * self.block_bytes
      return out

  # ---------------------------------------------------------------- memory
  def host_sharding(self, device_sharding):
    """``device_sharding`` in pinned host memory, or None where the backend
    (or this JAX version) lacks it: then blocks are kept as numpy arrays.
    Checked once per sharding with a real round trip of one block, since
    advertising the memory kind does not guarantee transfers to it work."""
    if not self.use_pinned_host:
      return None
    key = device_sharding
    if key not in self._host_shardings:
      self._host_shardings[key] = pinned_host_sharding(
          device_sharding, self.block_shape, self.dtype)
    return self._host_shardings[key]


def pinned_host_sharding(device_sharding, block_shape, dtype):
  """``device_sharding`` in pinned host memory, or None where the backend
  (or this JAX version) lacks it, checked with a real round trip of one
  ``block_shape`` block of ``dtype``."""
  try:
    for dev in device_sharding.device_set:
      kinds = {m.kind for m in dev.addressable_memories()}
      if PINNED_HOST not in kinds:
        raise ValueError(f"{dev} has no {PINNED_HOST} memory")
    cand = device_sharding.with_memory_kind(PINNED_HOST)
    probe = np.arange(math.prod(block_shape)).astype(dtype).reshape(
        block_shape)
    x = jax.device_put(probe, device_sharding)
    h = jax.device_put(x, cand)
    back = np.asarray(jax.device_put(h, device_sharding))
    if h.sharding.memory_kind != PINNED_HOST or not np.array_equal(
        back, probe):
      raise ValueError("pinned_host round trip changed the data")
    return cand
  except Exception as e:  # noqa: BLE001 - any failure: numpy fallback
    log.info("host KV blocks: no %s memory (%s); using numpy", PINNED_HOST,
             e)
    return None


def _next_pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


# ------------------------------------------------------------------ programs
def _read_pages(k_pool, v_pool, pages, *, num_layers):
  """Blocks ``[2, L, P, K, hd]`` of pool pages ``pages[i]`` (page p of
  layer l is row ``l * N + p``), one output per page."""
  N = k_pool.shape[0] // num_layers
  rows = jnp.arange(num_layers, dtype=jnp.int32)[None, :] * N + pages[:, None]
  blocks = jnp.stack([k_pool[rows], v_pool[rows]], axis=1)
  return tuple(blocks[i] for i in range(pages.shape[0]))


def _write_pages(k_pool, v_pool, pages, blocks, *, num_layers):
  """Writes ``blocks[i]`` into pool page ``pages[i]`` (0: the null page,
  padding)."""
  L = num_layers
  N = k_pool.shape[0] // L
  b = jnp.stack(blocks)                         # [n, 2, L, P, K, hd]
  n = b.shape[0]
  rows = (jnp.arange(L, dtype=jnp.int32)[None, :] * N
          + pages[:, None]).reshape(n * L)
  k = b[:, 0].reshape(n * L, *b.shape[3:]).astype(k_pool.dtype)
  v = b[:, 1].reshape(n * L, *b.shape[3:]).astype(v_pool.dtype)
  return k_pool.at[rows].set(k), v_pool.at[rows].set(v)


def _read_program(num_layers: int, n: int, block_sharding):
  """The jitted ``_read_pages`` of ``n`` pages (shared by every tier and
  swap space of the same layout, so each compiles once)."""
  return shared_jit(functools.partial(_read_pages, num_layers=num_layers),
                    out_shardings=(block_sharding,) * n)


def _write_program(num_layers: int, pool_sharding):
  """The jitted, pool-donating ``_write_pages`` (one executable per batch
  size in its cache)."""
  return shared_jit(functools.partial(_write_pages, num_layers=num_layers),
                    out_shardings=(pool_sharding, pool_sharding),
                    donate_argnums=(0, 1))


def _block_sharding(pool_sharding):
  """The layout of one block ``[2, L, P, K, hd]`` matching a pool's
  ``[L*N, P, K, hd]`` (same split of slots, heads and head dim)."""
  if isinstance(pool_sharding, NamedSharding):
    spec = tuple(pool_sharding.spec) + (None,) * (4 - len(pool_sharding.spec))
    return NamedSharding(pool_sharding.mesh,
                         PartitionSpec(None, None, *spec[1:]))
  return pool_sharding


class HostTierLink:
  """Connects one device pool (its ``BlockPool`` and K/V pools) to a
  ``HostKVTier``: installs the pool's ``on_evict`` hook, promotes on device
  misses, and runs the queued copies in ``flush``.

  Threads: ``promote`` and the hook may run on any thread (they only queue);
  ``flush`` must run on the thread that dispatches the owner's programs.
  """

  def __init__(self, tier: HostKVTier, pool: BlockPool,
               get_pools: Callable[[], tuple[jax.Array, jax.Array]],
               set_pools: Callable[[jax.Array, jax.Array], None], *,
               num_layers: int, max_batch: int = 32):
    self.tier = tier
    self.pool = pool
    self._get_pools = get_pools
    self._set_pools = set_pools
    self.num_layers = num_layers
    self.max_batch = _next_pow2(max_batch)
    k, _ = get_pools()
    self._pool_sharding = k.sharding
    self._block_sharding = _block_sharding(k.sharding)
    self._copies = _HostCopies(tier.host_sharding(self._block_sharding))
    self._lock = threading.Lock()
    self._demote: list[tuple[int, _Block]] = []
    self._upload: dict[int, _Block] = {}       # page -> source, FIFO
    self.stats = collections.Counter()         # device-side: promotions...
    pool.on_evict = self._on_evict

  @property
  def memory_kind(self) -> str:
    """Where tier blocks live: ``pinned_host`` or ``numpy``."""
    return self._copies.memory_kind

  # ---------------------------------------------------------------- hooks
  def _on_evict(self, page: int, block_hash: Hashable | None) -> None:
    """Called by ``BlockPool.allocate`` (under its lock) for each cached
    page it takes back, before the page is handed out: queues the read."""
    if block_hash is None:
      return
    with self._lock:
      src = self._upload.pop(page, None)
      if src is not None:
        # Promoted, then evicted before its upload ran: the page's content
        # is the upload's source; no device copy exists to read.
        self.tier.put(block_hash, src)
        return
      if self.tier.contains(block_hash, touch=True):
        self.stats["demotions_skipped"] += 1   # inclusive: already there
        return
      blk = _Block()
      self.tier.put(block_hash, blk)
      self._demote.append((page, blk))

  def promote(self, block_hash: Hashable) -> int | None:
    """After a device miss: a fresh device page named ``block_hash`` (one
    reference, like ``BlockPool.lookup``) whose upload from the host tier is
    queued, or None when the tier lacks the block or no page is available
    without breaking a reservation."""
    if self.pool.available < 1:
      return None
    blk = self.tier.get(block_hash)
    if blk is None:
      return None
    return self._promote(block_hash, blk)

  def promote_block(self, block_hash: Hashable, data) -> int | None:
    """A block from elsewhere (``pdjax.engine.remote_tier``: a peer or a
    store), ``[2, L, P, K, hd]`` in host memory or (pulled) on a device of
    this process: kept in the host tier (so a later eviction costs no
    copy) and uploaded into a fresh device page named ``block_hash``, as
    ``promote``; None when no page is available. Owner thread."""
    if self.pool.available < 1:
      return None
    blk = _Block()
    if isinstance(data, jax.Array):
      # Pulled onto a device: uploaded from there, and copied to the host
      # for the tier (asynchronously, as a demotion's read).
      source = _Block()
      source.data = jax.device_put(data, self._block_sharding)
      blk.data = self._copies.start(source.data, blk)
    else:
      source = blk
      blk.data = data
    self.tier.put(block_hash, blk)
    self.stats["remote_blocks"] += 1
    return self._promote(block_hash, source)

  def _promote(self, block_hash: Hashable, blk: _Block) -> int | None:
    try:
      (page,) = self.pool.allocate(1)   # may evict: its read queues first
    except PoolExhausted:
      return None
    with self._lock:
      self._upload[page] = blk
    if self.pool.register(page, block_hash) != page:
      # Another thread named a page by this hash meanwhile: use that one.
      with self._lock:
        self._upload.pop(page, None)
      self.pool.free([page])
      return self.pool.lookup(block_hash)
    self.stats["promotions"] += 1
    return page

  # ---------------------------------------------------------------- device
  def flush(self) -> None:
    """Runs the queued copies: first every read (demotions), then every
    upload (promotions), each batched into as few programs as possible."""
    with self._lock:
      demote, self._demote = self._demote, []
      upload, self._upload = self._upload, {}
    self._copies.land()
    if demote:
      needed = {id(b) for b in upload.values()}
      # Blocks the tier already dropped again need no copy, unless an
      # upload still reads them.
      demote = [(p, b) for p, b in demote if b.in_tier or id(b) in needed]
      self._read(demote)
    if upload:
      self._write(list(upload.items()))

  def read_blocks(self, pages: Sequence[int]) -> list[jax.Array]:
    """Owner thread: the blocks ``[2, L, P, K, hd]`` of device ``pages``
    as device arrays, their programs dispatched now (after every queued
    copy: call ``flush`` first where uploads may be queued). The arrays
    are the caller's; reading them on the host may happen on any
    thread."""
    out: list[jax.Array] = []
    for part, n, arr in self._chunks([(p, None) for p in pages]):
      k, v = self._get_pools()
      out.extend(self._read_fn(n)(k, v, arr)[:len(part)])
    return out

  def host_block(self, block_hash: Hashable):
    """The host tier's data of ``block_hash`` (counted as neither hit nor
    miss), or None when absent or still being read from the device."""
    with self.tier._lock:  # pylint: disable=protected-access
      blk = self.tier._blocks.get(block_hash)  # pylint: disable=protected-access
    return None if blk is None else blk.data

  def _read_fn(self, n: int):
    return _read_program(self.num_layers, n, self._block_sharding)

  def _write_fn(self, n: int):
    del n   # one program, an executable per batch size
    return _write_program(self.num_layers, self._pool_sharding)

  def _chunks(self, items):
    for s in range(0, len(items), self.max_batch):
      part = items[s:s + self.max_batch]
      n = _next_pow2(len(part))
      pages = np.zeros((n,), np.int32)
      pages[:len(part)] = [p for p, _ in part]
      yield part, n, pages

  def _read(self, items: list[tuple[int, _Block]]) -> None:
    for part, n, pages in self._chunks(items):
      k, v = self._get_pools()
      outs = self._read_fn(n)(k, v, pages)
      for (_, blk), out in zip(part, outs):
        blk.data = self._copies.start(out, blk)
      self.tier.count("demotions", len(part))

  def _write(self, items: list[tuple[int, _Block]]) -> None:
    for part, n, pages in self._chunks(items):
      blocks = [jax.device_put(blk.data, self._block_sharding)
                for _, blk in part]
      blocks += [blocks[0]] * (n - len(part))   # padding -> the null page
      k, v = self._get_pools()
      self._set_pools(*self._write_fn(n)(k, v, pages, tuple(blocks)))

  def warmup(self) -> None:
    """Compiles every read and upload program (batch sizes up to
    ``max_batch``) on the null page only, so serving never compiles them;
    leaves the tier and the pool as they were."""
    n = 1
    while n <= self.max_batch:
      k, v = self._get_pools()
      pages = np.zeros((n,), np.int32)
      outs = self._read_fn(n)(k, v, pages)
      blk = _Block()
      blk.data = self._copies.start(outs[0], blk)
      self._copies.land()
      dev = jax.device_put(blk.data, self._block_sharding)
      k, v = self._get_pools()
      self._set_pools(*self._write_fn(n)(k, v, pages, (dev,) * n))
      n *= 2
    jax.block_until_ready(self._get_pools())


class SwapSpace:
  """Host memory for the KV of rows a decode replica preempted (vLLM's swap
  space): ``swap_out`` copies a row's pages to the host before the replica
  frees them, ``swap_in`` writes them, bit for bit, into the pages the row
  gets back. At most ``capacity_pages`` pages are held at once.

  Both run on the replica's own thread, between its programs, which JAX
  runs in dispatch order: a swap-out reads the pages after every generate
  call already dispatched has written them (a call in flight included),
  and the pages it frees are written by later calls only after it has
  read them. Blocks live where the tier's do: pinned host memory, or numpy
  arrays (their device copies land in ``land``).
  """

  def __init__(self, capacity_pages: int,
               get_pools: Callable[[], tuple[jax.Array, jax.Array]],
               set_pools: Callable[[jax.Array, jax.Array], None], *,
               num_layers: int, page_shape: Sequence[int], dtype,
               max_batch: int = 32, use_pinned_host: bool = True):
    if capacity_pages < 1:
      raise ValueError(f"a swap space needs capacity >= 1, got "
                       f"{capacity_pages}")
    self.capacity_pages = capacity_pages
    self._get_pools = get_pools
    self._set_pools = set_pools
    self.num_layers = num_layers
    # A row of more pages than the space holds is never swapped out.
    self.max_batch = _next_pow2(min(max_batch, capacity_pages))
    k, _ = get_pools()
    self._pool_sharding = k.sharding
    self._block_sharding = _block_sharding(k.sharding)
    block_shape = (2, *(int(d) for d in page_shape))
    self.block_bytes = math.prod(block_shape) * np.dtype(dtype).itemsize
    self._copies = _HostCopies(pinned_host_sharding(
        self._block_sharding, block_shape, np.dtype(dtype))
                               if use_pinned_host else None)
    self._rows: dict[Hashable, list[_Block]] = {}
    self.used = 0                                 # pages held
    self.stats = collections.Counter()

  @property
  def memory_kind(self) -> str:
    return self._copies.memory_kind

  def fits(self, num_pages: int) -> bool:
    return self.used + num_pages <= self.capacity_pages

  def held(self, key: Hashable) -> int:
    """Pages held for ``key`` (0: none)."""
    return len(self._rows.get(key, ()))

  def _chunks(self, pages: Sequence[int]):
    for s in range(0, len(pages), self.max_batch):
      part = list(pages[s:s + self.max_batch])
      n = _next_pow2(len(part))
      idx = np.zeros((n,), np.int32)
      idx[:len(part)] = part
      yield len(part), n, idx

  def swap_out(self, key: Hashable, pages: Sequence[int]) -> None:
    """Copies ``pages`` (in order) to the host under ``key``; the caller
    may free them as soon as this returns."""
    if key in self._rows:
      raise AssertionError(f"swap space already holds {key!r}")
    if not self.fits(len(pages)):
      raise AssertionError(f"{len(pages)} pages do not fit the swap space "
                           f"({self.used} of {self.capacity_pages} held)")
    self._rows[key] = self._read(pages)
    self.used += len(pages)
    self.stats["swapped_out"] += len(pages)

  def swap_in(self, key: Hashable, pages: Sequence[int]) -> None:
    """Writes ``key``'s blocks into ``pages`` (as many as were swapped
    out) and forgets them."""
    blocks = self._rows[key]
    if len(blocks) != len(pages):
      raise AssertionError(f"{key!r}: {len(blocks)} pages swapped out, "
                           f"{len(pages)} given back")
    del self._rows[key]
    self.used -= len(blocks)
    self._write(blocks, pages)
    self.stats["swapped_in"] += len(blocks)

  def _read(self, pages: Sequence[int]) -> list[_Block]:
    blocks = []
    for m, n, idx in self._chunks(pages):
      k, v = self._get_pools()
      outs = _read_program(self.num_layers, n, self._block_sharding)(k, v,
                                                                      idx)
      for out in outs[:m]:
        blk = _Block()
        blk.data = self._copies.start(out, blk)
        blocks.append(blk)
    return blocks

  def _write(self, blocks: Sequence[_Block], pages: Sequence[int]) -> None:
    done = 0
    for m, n, idx in self._chunks(pages):
      dev = [jax.device_put(b.data, self._block_sharding)
             for b in blocks[done:done + m]]
      dev += [dev[0]] * (n - m)               # padding -> the null page
      done += m
      k, v = self._get_pools()
      self._set_pools(*_write_program(self.num_layers, self._pool_sharding)(
          k, v, idx, tuple(dev)))

  def drop(self, key: Hashable) -> None:
    """Forgets ``key``'s blocks (its row finished or was cancelled)."""
    blocks = self._rows.pop(key, None)
    if blocks is not None:
      self.used -= len(blocks)

  def land(self) -> None:
    """numpy mode: turns earlier swap-outs' device copies into numpy
    (their transfers were started then), freeing the device memory."""
    self._copies.land()

  def warmup(self) -> None:
    """Compiles every read and write program (batch sizes up to
    ``max_batch``) on the null page; holds nothing afterwards."""
    n = 1
    while n <= self.max_batch:
      blocks = self._read([0] * n)
      self.land()
      self._write(blocks, [0] * n)
      n *= 2
    jax.block_until_ready(self._get_pools())


def make_swap(capacity_pages: int, cfg, page_size: int, get_pools, set_pools,
              dtype=None, **kw) -> SwapSpace | None:
  """A swap space of ``capacity_pages`` pool pages (None when 0: off);
  ``dtype``: the pool's (default the model's)."""
  if capacity_pages <= 0:
    return None
  return SwapSpace(capacity_pages, get_pools, set_pools,
                   num_layers=cfg.num_layers,
                   page_shape=(cfg.num_layers, page_size, cfg.num_kv_heads,
                               cfg.head_dim),
                   dtype=cfg.jnp_dtype if dtype is None else dtype, **kw)


def make_link(capacity_blocks: int, pool: BlockPool, cfg, page_size: int,
              get_pools, set_pools, dtype=None, **kw) -> HostTierLink | None:
  """A tier of ``capacity_blocks`` linked to ``pool`` (None when 0: off);
  ``dtype``: the pool's (default the model's)."""
  if capacity_blocks <= 0:
    return None
  tier = HostKVTier(capacity_blocks, (cfg.num_layers, page_size,
                                      cfg.num_kv_heads, cfg.head_dim),
                    cfg.jnp_dtype if dtype is None else dtype, **kw)
  return HostTierLink(tier, pool, get_pools, set_pools,
                      num_layers=cfg.num_layers)


def match_with_tier(pool: BlockPool, hashes: Sequence[Hashable],
                    link: HostTierLink | None = None) -> list[int]:
  """Pages of the longest prefix of ``hashes`` found on the device or, with
  ``link``, promoted from its host tier; each pinned (one reference, the
  caller frees it). Promoted pages are ordinary named pages: their upload is
  queued and runs at the owner's next ``flush``."""
  pages = []
  for h in hashes:
    page = pool.lookup(h)
    if page is None and link is not None:
      page = link.promote(h)
    if page is None:
      break
    pages.append(page)
  return pages


def flush(link: HostTierLink | None) -> None:
  """``link.flush()``, or nothing when the tier is off."""
  if link is not None:
    link.flush()


__all__ = ["HostKVTier", "HostTierLink", "SwapSpace", "make_link",
           "make_swap", "match_with_tier", "flush", "pinned_host_sharding",
           "STATS", "PINNED_HOST"]
