"""KV-aware routing: send a request where its prompt prefix is cached.

Dynamo's KV router, on pdjax's poll loop. Three parts:

* Worker side (``fill_cache_info``): ``GetWorkerInfo`` answers carry the
  changes to the worker's cached-block set since the caller's last answer
  (``pdjax.engine.cache_events``), or the whole set when the caller fell
  behind the worker's bounded event log.
* Router side, per worker (``CacheMirror``): a copy of that set, kept
  current by the registry's polls. It is *stale* when the last poll failed
  or the last good one is older than ``stale_after_s``; a stale mirror is
  not trusted (its worker is judged on load alone).
* The choice (``KvScorer``): for each candidate,

    score = overlap_weight * overlap_blocks - load

  where ``overlap_blocks`` is how many of the request's leading full
  blocks the worker's mirror holds (the prefix its cache would serve), and
  ``load`` is the registry's existing signal, in its own units:

    - prefill: requests queued or in flight there (the router's count plus
      the worker's polled queue). ``overlap_weight`` = how many queued
      requests one cached block is worth.
    - decode: KV pages fewer free than the candidate with the most free
      pages (0 for the roomiest). A cached block also saves one page of the
      request's reservation, so ``overlap_weight = 1`` trades pages 1:1.

  The highest score wins; ties go to fewer in-flight streams (decode) and
  then to the worker chosen least recently, so equally loaded workers take
  turns. ``overlap_weight = 0`` is load-only routing.

  Shared KV (``pdjax.service.kvstore``): a prefill worker that shares its
  cache can fetch the blocks a peer or a store holds instead of computing
  them, so a block it can fetch counts too, at ``fetch_weight`` (0..1) of a
  block it holds:

    overlap_blocks = own + fetch_weight * max(0, fetchable - own)

  where ``fetchable`` is the longest prefix held by any block source (a
  prefill worker that serves blocks, or a store the router polls) other
  than the candidate. After the pick, ``sources`` names the sources that
  hold more than the chosen worker (``PrefillRequest.kv_sources``): the
  worker fetches from them, whatever the weights (load-only routing
  included).

The router names blocks itself, exactly as the workers do
(``pdjax.engine.prefix_cache.block_hashes``) with the layout fingerprint the
workers announce in the handshake (``ModelInfo.layout_fingerprint``), once
per request.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Sequence

from pdjax.engine.cache_events import CacheEventLog, routing_key
from pdjax.engine.block_names import block_hashes
from pdjax.v1 import common_pb2

log = logging.getLogger(__name__)

DEFAULT_STALE_AFTER_S = 2.0
# Shared KV: a block a prefill worker can fetch, as a share of one it holds.
DEFAULT_FETCH_WEIGHT = 0.5


# ------------------------------------------------------------------ worker
def fill_cache_info(info: common_pb2.WorkerInfo, events: CacheEventLog | None,
                    since: int) -> None:
  """Writes the cache fields of a ``GetWorkerInfo`` answer for a caller
  whose last answer had ``cache_seq == since``. ``events`` None: this
  worker caches nothing (``prefix_caching`` stays false)."""
  if events is None:
    return
  delta = events.delta(since)
  info.prefix_caching = True
  info.cache_seq = delta.seq
  info.cache_complete = delta.complete
  info.cache_stored.extend(delta.stored)
  info.cache_evicted.extend(delta.evicted)


# ------------------------------------------------------------------ names
def request_keys(ids: Sequence[int], salt: str,
                 model: common_pb2.ModelInfo | None) -> list[bytes]:
  """Routing keys of the prompt blocks a cache could serve: the full
  blocks before the last prompt token (that one is always computed, for
  the first token's logits), as both engines limit their lookups. Empty
  when the workers did not announce a layout fingerprint."""
  if model is None or not model.layout_fingerprint or model.page_size <= 0:
    return []
  P = model.page_size
  n = max(len(ids) - 1, 0) // P
  return [routing_key(h) for h in block_hashes(
      list(ids[:n * P]), P, model.layout_fingerprint, salt)]


# ------------------------------------------------------------------ mirror
class CacheMirror:
  """The router's copy of one worker's cached-block keys."""

  def __init__(self):
    self.keys: set[bytes] = set()
    self.seq = 0                  # pass back as cache_events_since
    self.enabled = False          # the worker caches at all
    self.synced_at: float | None = None
    self.failed = False           # the latest poll failed
    self.process_id = ""
    self.resyncs = 0              # full snapshots taken

  def apply(self, info: common_pb2.WorkerInfo, now: float | None = None
            ) -> None:
    """Brings the mirror up to date with a poll's answer (made for
    ``cache_events_since == self.seq``)."""
    now = time.monotonic() if now is None else now
    if info.process_id != self.process_id:
      restarted = bool(self.process_id) and self.seq != 0
      self._reset()
      self.process_id = info.process_id
      if restarted:
        # The answer is relative to a sequence number of the old process:
        # useless. The next poll (since 0) starts over.
        return
    self.enabled = info.prefix_caching
    if not self.enabled:
      self.keys.clear()
      self.seq = 0
    elif info.cache_complete:
      self.keys.difference_update(info.cache_evicted)
      self.keys.update(info.cache_stored)
      self.seq = info.cache_seq
    else:
      self.keys = set(info.cache_stored)
      self.seq = info.cache_seq
      self.resyncs += 1
    self.synced_at = now
    self.failed = False

  def mark_failed(self) -> None:
    """A poll failed: distrust the mirror until one succeeds."""
    self.failed = True

  def _reset(self) -> None:
    self.keys = set()
    self.seq = 0
    self.enabled = False
    self.synced_at = None
    self.failed = False

  def stale(self, stale_after_s: float, now: float | None = None) -> bool:
    if self.failed or self.synced_at is None:
      return True
    now = time.monotonic() if now is None else now
    return now - self.synced_at > stale_after_s

  def overlap(self, keys: Sequence[bytes]) -> int:
    """Leading ``keys`` held (blocks chain: a gap ends the prefix)."""
    n = 0
    for k in keys:
      if k not in self.keys:
        break
      n += 1
    return n


# ------------------------------------------------------------------ choice
@dataclasses.dataclass
class Choice:
  """One candidate's terms, for the pick and for tests and logs."""
  worker: object
  overlap: int
  load: float
  score: float
  stale: bool
  fetchable: int = 0      # blocks past ``overlap`` it could fetch


def _serves_blocks(w) -> bool:
  """Whether ``w`` fetches and serves blocks (its last poll said so)."""
  return bool(getattr(getattr(w, "info", None), "serves_blocks", False))


def _fresh_overlap(w, keys, stale_after_s: float, now: float) -> int | None:
  """Leading ``keys`` in ``w``'s mirror, or None when it is not to be
  trusted (never synced, or stale)."""
  mirror = w.cache
  if mirror.synced_at is None or (mirror.enabled and
                                  mirror.stale(stale_after_s, now)):
    return None
  return mirror.overlap(keys) if keys else 0


class KvScorer:
  """Picks a worker by ``overlap_weight * overlap - load`` (module doc)."""

  def __init__(self, overlap_weight: float = 0.0,
               stale_after_s: float = DEFAULT_STALE_AFTER_S, metrics=None,
               fetch_weight: float = DEFAULT_FETCH_WEIGHT):
    if overlap_weight < 0:
      raise ValueError(f"kv_overlap_weight must be >= 0, got "
                       f"{overlap_weight}")
    if not 0 <= fetch_weight <= 1:
      raise ValueError(f"kv_fetch_weight must be in [0, 1], got "
                       f"{fetch_weight}")
    self.overlap_weight = overlap_weight
    self.fetch_weight = fetch_weight
    self.stale_after_s = stale_after_s
    self._picks = itertools.count(1)
    self._last_pick: dict[tuple[str, str], int] = {}
    self._overlap_blocks = self._query_blocks = self._stale = None
    if metrics is not None:
      from prometheus_client import Counter
      r = metrics.registry
      self._overlap_blocks = Counter(
          "pdjax_router_kv_overlap_blocks",
          "Prompt blocks the chosen worker was predicted to hold (its "
          "cached prefix), summed over routing choices.", ["role"],
          registry=r)
      self._query_blocks = Counter(
          "pdjax_router_kv_query_blocks",
          "Prompt blocks a cache could have served, summed over routing "
          "choices (the overlap counter's denominator).", ["role"],
          registry=r)
      self._stale = Counter(
          "pdjax_router_kv_stale_fallbacks",
          "Routing choices with a candidate judged on load alone because "
          "its cache mirror was stale.", ["role"], registry=r)
      self._fetchable_blocks = Counter(
          "pdjax_router_kv_fetchable_blocks_total",
          "Prompt blocks past its own cached prefix the chosen prefill "
          "worker could fetch from a peer or a store, summed over routing "
          "choices.", ["role"], registry=r)

  def score(self, role: str, workers: Sequence, keys: Sequence[bytes],
            now: float | None = None, sources: Sequence = ()
            ) -> list[Choice]:
    """Each candidate's terms. ``sources``: workers and stores that serve
    blocks (their mirrors say what a candidate could fetch)."""
    now = time.monotonic() if now is None else now
    if role == "prefill":
      loads = [float(w.load_score()) for w in workers]
    else:
      free = [w.free_pages() for w in workers]
      top = max(free, default=0)
      loads = [float(top - f) for f in free]
    held = []
    if keys:
      for s in sources:
        n = _fresh_overlap(s, keys, self.stale_after_s, now)
        if n:
          held.append((s.address, getattr(s, "role", ""), n))
    out = []
    for w, load in zip(workers, loads):
      # Never synced: nothing known. A worker without a cache has nothing
      # to be stale about.
      fresh = _fresh_overlap(w, keys, self.stale_after_s, now)
      stale = fresh is None
      overlap = fresh or 0
      fetchable = 0
      if not stale and _serves_blocks(w):
        me = (w.address, getattr(w, "role", ""))
        best = max((n for a, r, n in held if (a, r) != me), default=0)
        fetchable = max(0, best - overlap)
      blocks = overlap + self.fetch_weight * fetchable
      out.append(Choice(w, overlap, load,
                        self.overlap_weight * blocks - load, stale,
                        fetchable))
    return out

  def sources(self, chosen, keys: Sequence[bytes], sources: Sequence, *,
              limit: int = 2, now: float | None = None
              ) -> list[tuple[str, int]]:
    """(address, blocks) of the block sources holding more of ``keys``
    than ``chosen``, most first (at most ``limit``)."""
    if not keys:
      return []
    now = time.monotonic() if now is None else now
    own = _fresh_overlap(chosen, keys, self.stale_after_s, now) or 0
    found = []
    for s in sources:
      if s is chosen:
        continue
      n = _fresh_overlap(s, keys, self.stale_after_s, now)
      if n and n > own:
        found.append((s.address, n))
    found.sort(key=lambda f: -f[1])
    return found[:limit]

  def pick(self, role: str, workers: Sequence, keys: Sequence[bytes] = (),
           now: float | None = None, sources: Sequence = ()):
    """The best of ``workers`` (all of ``role``) for a request whose block
    keys are ``keys``, or None when there are none."""
    if not workers:
      return None
    choices = self.score(role, workers, keys, now, sources)

    def rank(c: Choice):
      streams = c.worker.inflight if role == "decode" else 0
      return (-c.score, streams,
              self._last_pick.get((role, c.worker.address), 0))

    best = min(choices, key=rank)
    self._last_pick[(role, best.worker.address)] = next(self._picks)
    if self._overlap_blocks is not None and keys:
      self._overlap_blocks.labels(role).inc(best.overlap)
      self._fetchable_blocks.labels(role).inc(best.fetchable)
      self._query_blocks.labels(role).inc(len(keys))
      if self.overlap_weight > 0 and any(c.stale for c in choices):
        self._stale.labels(role).inc()
    return best.worker


__all__ = ["CacheMirror", "Choice", "DEFAULT_FETCH_WEIGHT",
           "DEFAULT_STALE_AFTER_S", "KvScorer",
           "fill_cache_info", "request_keys"]
