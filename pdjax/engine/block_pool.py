"""The owner of one KV pool's pages: allocation, reservation, reference counts
and (for prefix reuse) content-addressed caching with LRU eviction.

Page 0 is the null page: never handed out, written by idle rows and padding,
never read unmasked. Every other page is in exactly one of three places:

* free: holds nothing anyone may read;
* in use: ``ref_count > 0``, owned by the sequences that reference it;
* cached: ``ref_count == 0`` but its content is named by a block hash, kept
  for reuse until evicted (least recently used first) when space is needed.

Free pages are handed out lowest-numbered first, so a pool's pages in use
stay packed at its start however traffic churns them: a first-in-first-out
free list would, after enough requests, spread every new sequence over the
whole pool (tens of GB on a GPU), and the attention's page reads with it
(``order="fifo"`` keeps that policy, for measuring the difference).

Reservations are promises of future pages: decode-side admission reserves
the pages a request's insert will take (or, with whole-budget admission,
every page it may ever need) before its KV is computed, so the KV always
finds its pages. ``available`` = free + cached - reserved is what
admission may still promise, and what rows growing beyond their
reservations may take.
"""

from __future__ import annotations

import collections
import heapq
import threading
from typing import Callable, Hashable, Iterable


class PoolExhausted(RuntimeError):
  """Asked for more pages than are free or evictable (a bug: reserve first)."""


def _check_count(n: int) -> None:
  if n < 0:
    raise ValueError(f"page count must be >= 0, got {n}")


class BlockPool:

  def __init__(self, num_pages: int,
               on_event: Callable[[str, Hashable], None] | None = None,
               *, order: str = "lowest"):
    if num_pages < 2:
      raise ValueError(f"a KV pool needs at least 2 pages, got {num_pages}")
    if order not in ("lowest", "fifo"):
      raise ValueError(f"order must be 'lowest' or 'fifo', got {order!r}")
    self.num_pages = num_pages
    self.order = order
    # "lowest": a heap of free page ids; "fifo": freed pages go last.
    self._free: list[int] | collections.deque[int] = (
        list(range(1, num_pages)) if order == "lowest"
        else collections.deque(range(1, num_pages)))
    self._ref = [0] * num_pages
    self._hash_of: dict[int, Hashable] = {}
    self._page_of: dict[Hashable, int] = {}
    # Cached pages with no references, oldest first (the eviction order).
    self._evictable: collections.OrderedDict[int, None] = (
        collections.OrderedDict())
    self._reserved = 0
    self._lock = threading.RLock()
    self.stats = collections.Counter()
    # KV-aware routing (pdjax.engine.cache_events): told ("stored", hash)
    # when a hash is first named here and ("evicted", hash) when forgotten.
    self._on_event = on_event
    # --- host KV tier (pdjax.engine.host_tier): on_evict(page, hash) is
    # called inside allocate for each cached page it takes back, before the
    # page is handed out, so the owner can queue a copy of its content. ---
    self.on_evict: Callable[[int, Hashable], None] | None = None

  # ---------------------------------------------------------------- counts
  @property
  def capacity(self) -> int:
    return self.num_pages - 1

  @property
  def num_free(self) -> int:
    return len(self._free)

  @property
  def num_cached(self) -> int:
    return len(self._evictable)

  @property
  def num_used(self) -> int:
    return self.capacity - len(self._free) - len(self._evictable)

  @property
  def reserved(self) -> int:
    return self._reserved

  @property
  def available(self) -> int:
    return len(self._free) + len(self._evictable) - self._reserved

  # ---------------------------------------------------------------- reserve
  def reserve(self, n: int) -> bool:
    _check_count(n)
    with self._lock:
      if n > self.available:
        return False
      self._reserved += n
      return True

  def unreserve(self, n: int) -> None:
    _check_count(n)
    with self._lock:
      if n > self._reserved:
        raise AssertionError(f"unreserve {n} > reserved {self._reserved}")
      self._reserved -= n

  # ---------------------------------------------------------------- allocate
  def allocate(self, n: int, *, reserved: bool = False) -> list[int]:
    """n fresh pages (ref 1). With ``reserved``, they come out of an earlier
    reservation of the caller."""
    _check_count(n)
    with self._lock:
      if reserved:
        self.unreserve(n)
      if n > len(self._free) + len(self._evictable):
        if reserved:
          self._reserved += n
        raise PoolExhausted(f"need {n} pages, {len(self._free)} free and "
                            f"{len(self._evictable)} evictable")
      if not reserved and n > self.available:
        raise PoolExhausted(f"need {n} pages, {self.available} available "
                            f"({self._reserved} reserved by others)")
      out = []
      for _ in range(n):
        if self._free:
          page = self._take_free()
        else:
          page, _ = self._evictable.popitem(last=False)
          evicted_hash = self._hash_of.get(page)   # host KV tier
          self._forget(page)
          self.stats["evictions"] += 1
          if self.on_evict is not None:            # host KV tier
            self.on_evict(page, evicted_hash)
        self._ref[page] = 1
        out.append(page)
      return out

  def free(self, pages: Iterable[int]) -> None:
    """Drops one reference from each page; unreferenced pages become cached
    (if content-named) or free."""
    with self._lock:
      for page in pages:
        if page == 0:
          continue
        if self._ref[page] <= 0:
          raise AssertionError(f"page {page} freed more often than taken")
        self._ref[page] -= 1
        if self._ref[page] == 0:
          if page in self._hash_of:
            self._evictable[page] = None
          else:
            self._put_free(page)

  def _take_free(self) -> int:
    if self.order == "lowest":
      return heapq.heappop(self._free)
    return self._free.popleft()

  def _put_free(self, page: int) -> None:
    if self.order == "lowest":
      heapq.heappush(self._free, page)
    else:
      self._free.append(page)

  def ref_count(self, page: int) -> int:
    return self._ref[page]

  # ---------------------------------------------------------------- caching
  def lookup(self, block_hash: Hashable) -> int | None:
    """A page holding ``block_hash``, with one more reference, or None."""
    with self._lock:
      page = self._page_of.get(block_hash)
      if page is None:
        self.stats["misses"] += 1
        return None
      if self._ref[page] == 0:
        # Reviving a cached page takes one page of ``available``; when all
        # of it is promised to reservations, taking it would break a
        # promise (reserved > free + cached), so it is a miss instead.
        if self.available < 1:
          self.stats["misses"] += 1
          return None
        del self._evictable[page]
      self._ref[page] += 1
      self.stats["hits"] += 1
      return page

  def contains(self, block_hash: Hashable) -> bool:
    return block_hash in self._page_of

  def peek(self, block_hash: Hashable) -> int | None:
    """The page holding ``block_hash``, taking no reference and counting
    no lookup (its owner reading it for a peer, on its own thread)."""
    return self._page_of.get(block_hash)

  def register(self, page: int, block_hash: Hashable) -> int:
    """Names an in-use page by its content. If another page already holds
    that content, the existing one wins and is returned (the caller may swap
    to it); otherwise ``page`` is returned."""
    with self._lock:
      if self._ref[page] <= 0:
        raise AssertionError(f"register of unreferenced page {page}")
      existing = self._page_of.get(block_hash)
      if existing is not None:
        return existing
      if page in self._hash_of:
        return page
      self._hash_of[page] = block_hash
      self._page_of[block_hash] = page
      if self._on_event is not None:
        self._on_event("stored", block_hash)
      return page

  def evict_all(self) -> int:
    """Drops every cached unreferenced page (e.g. on a weights reload)."""
    with self._lock:
      n = len(self._evictable)
      while self._evictable:
        page, _ = self._evictable.popitem(last=False)
        self._forget(page)
        self._put_free(page)
      return n

  def _forget(self, page: int) -> None:
    h = self._hash_of.pop(page, None)
    if h is not None:
      self._page_of.pop(h, None)
      if self._on_event is not None:
        self._on_event("evicted", h)

  def check_invariants(self) -> None:
    """For tests: every page is in exactly one state."""
    with self._lock:
      free = set(self._free)
      ev = set(self._evictable)
      assert not free & ev
      for p in range(1, self.num_pages):
        states = (p in free) + (p in ev) + (self._ref[p] > 0)
        assert states == 1, (p, p in free, p in ev, self._ref[p])
      assert 0 <= self._reserved <= len(free) + len(ev)


__all__ = ["BlockPool", "PoolExhausted"]
