"""A worker's cached-block set as a stream of changes, for KV-aware routing.

The router wants to know which blocks each worker holds, so that it can send
a request where its prefix is already cached (Dynamo's KV router). Shipping
the whole set on every poll would cost O(cache) per poll; instead the
worker's pools report each change (a block named, a block forgotten) to a
``CacheEventLog``, and a reader asks for the changes since the last sequence
number it saw. The log is bounded: a reader that fell too far behind (or
talks to a restarted worker) is told the delta is incomplete and gets the
whole set instead (``snapshot``).

Keys are the first ``KEY_BYTES`` bytes of a block's name: enough to tell
blocks apart for routing (a collision only misjudges one routing choice,
never the tokens: the workers look blocks up by their full names), and half
the bytes on the wire.

One log may serve several pools (a decode worker's data-parallel replicas):
it counts how many pools hold each key and publishes only the transitions
(first pool stores it, last pool drops it), so the published set is "held
somewhere on this worker" and a reader's mirror is a plain set.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import threading
from typing import Hashable

KEY_BYTES = 8


class EventKind(enum.Enum):
  STORED = "stored"
  EVICTED = "evicted"


@dataclasses.dataclass(frozen=True)
class CacheEvent:
  seq: int             # 1 for the log's first event, then +1 each
  kind: EventKind
  key: bytes


def routing_key(block_hash: Hashable) -> bytes:
  """The key the router knows a block by (a prefix of its name)."""
  return bytes(block_hash)[:KEY_BYTES]


@dataclasses.dataclass(frozen=True)
class CacheDelta:
  """What a reader at some sequence number must apply to catch up.

  ``complete``: ``stored``/``evicted`` are the net changes since the
  reader's number (disjoint: apply in any order). Otherwise ``stored`` is
  the whole current set and the reader replaces its copy with it.
  """
  seq: int
  complete: bool
  stored: list[bytes]
  evicted: list[bytes]


class CacheEventLog:
  """Bounded, sequence-numbered log of one worker's block-set changes.

  Thread-safe: pools record from engine threads while the gRPC servicer
  reads from its event loop.
  """

  def __init__(self, capacity: int = 8192):
    if capacity < 1:
      raise ValueError(f"capacity must be positive, got {capacity}")
    self.capacity = capacity
    self._events: collections.deque[CacheEvent] = collections.deque(
        maxlen=capacity)
    self._holders: collections.Counter[bytes] = collections.Counter()
    self._seq = 0
    self._lock = threading.RLock()

  @property
  def seq(self) -> int:
    """The number of the latest event (0: none yet)."""
    return self._seq

  def __len__(self) -> int:
    """Keys held now."""
    return len(self._holders)

  # ---------------------------------------------------------------- record
  def on_event(self, kind: str, block_hash: Hashable) -> None:
    """The ``BlockPool(on_event=...)`` callback."""
    if kind == EventKind.STORED.value:
      self.record_stored(block_hash)
    elif kind == EventKind.EVICTED.value:
      self.record_evicted(block_hash)
    else:
      raise ValueError(f"unknown cache event {kind!r}")

  def record_stored(self, block_hash: Hashable) -> None:
    key = routing_key(block_hash)
    with self._lock:
      self._holders[key] += 1
      if self._holders[key] == 1:
        self._append(EventKind.STORED, key)

  def record_evicted(self, block_hash: Hashable) -> None:
    key = routing_key(block_hash)
    with self._lock:
      n = self._holders.get(key, 0)
      if n <= 0:
        return   # never published (or already dropped): nothing to say
      if n == 1:
        del self._holders[key]
        self._append(EventKind.EVICTED, key)
      else:
        self._holders[key] = n - 1

  def _append(self, kind: EventKind, key: bytes) -> None:
    self._seq += 1
    self._events.append(CacheEvent(self._seq, kind, key))

  # ---------------------------------------------------------------- read
  def since(self, seq: int) -> tuple[list[CacheEvent], int, bool]:
    """Events after ``seq``, the latest number, and whether those events
    are all that happened since ``seq`` (False: some fell out of the log,
    or ``seq`` is from another life of this worker; resync with
    ``snapshot``)."""
    with self._lock:
      if seq > self._seq:
        return [], self._seq, False
      first = self._events[0].seq if self._events else self._seq + 1
      if seq + 1 < first:
        return [], self._seq, False
      skip = seq + 1 - first
      return list(self._events)[skip:], self._seq, True

  def snapshot(self) -> set[bytes]:
    with self._lock:
      return set(self._holders)

  def delta(self, seq: int) -> CacheDelta:
    """What a reader at ``seq`` needs: net changes, or the whole set."""
    with self._lock:
      events, now, complete = self.since(seq)
      if not complete:
        return CacheDelta(now, False, sorted(self._holders), [])
    last: dict[bytes, EventKind] = {}
    for ev in events:
      last.pop(ev.key, None)    # keep the order of each key's last change
      last[ev.key] = ev.kind
    return CacheDelta(
        now, True,
        [k for k, kind in last.items() if kind is EventKind.STORED],
        [k for k, kind in last.items() if kind is EventKind.EVICTED])


__all__ = ["CacheDelta", "CacheEvent", "CacheEventLog", "EventKind",
           "KEY_BYTES", "routing_key"]
