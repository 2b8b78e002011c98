"""Landing buffers a decode worker allocates once, exports by CUDA IPC and
lends in regions to the prefill workers on its host (a prefill worker
pulling a peer's blocks lends regions of its own the same way:
``pdjax.transfer.block_pulls``).

Who may write or read a region, and when it is reused, follows the rules in
``pdjax.transfer.cuda_ipc``'s docstring; this module is the bookkeeping that
enforces them (leases, quarantine of regions released unread, reads that
defer a release).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Callable

from pdjax.transfer.base import TransferError
from pdjax.transfer.cuda_driver import CudaDriver, release_quietly

log = logging.getLogger(__name__)

REGION_ALIGN = 4096          # landing regions start on this boundary


@dataclasses.dataclass
class LandingSlot:
  """A region of a landing buffer lent to one transfer."""
  transfer_id: str
  buffer: int            # index of the buffer in its pool
  offset: int            # bytes from the buffer's base (KvDestination)
  nbytes: int            # region size: the most the sender may write
  handle: bytes          # the buffer's IPC handle
  device: int            # CUDA ordinal of the buffer
  ptr: int               # the region's address in the pool's process
  deadline: float        # wall clock (s): the sender must not write after
  reading: bool = False

  @property
  def deadline_ms(self) -> int:
    return int(self.deadline * 1000)


class LandingPool:
  """Pre-allocated, IPC-exported landing buffers of one decode worker, lent
  in regions to one transfer each (the ownership rules: ``pdjax.transfer.cuda_ipc``).

  ``num_buffers`` buffers of ``buffer_bytes`` are allocated and exported
  once (exporting is costly and the handles are what peers cache); regions
  are carved from them best-fit and coalesced when freed, so several small
  payloads share a buffer and one payload never spans two.
  """

  def __init__(self, driver: CudaDriver, device_ordinal: int,
               num_buffers: int, buffer_bytes: int, *, lease_s: float = 60.0,
               grace_s: float = 2.0, clock: Callable[[], float] = time.time,
               align: int = REGION_ALIGN):
    if num_buffers <= 0 or buffer_bytes <= 0:
      raise ValueError("a landing pool needs at least one non-empty buffer")
    self.driver = driver
    self.device = device_ordinal
    self.buffer_bytes = buffer_bytes - buffer_bytes % align
    if self.buffer_bytes <= 0:
      raise ValueError(f"buffer_bytes {buffer_bytes} < alignment {align}")
    self.lease_s = lease_s
    self.grace_s = grace_s
    self.align = align
    self._clock = clock
    self._lock = threading.Lock()
    self._bases: list[int] = []
    self._handles: list[bytes] = []
    try:
      for _ in range(num_buffers):
        ptr = driver.mem_alloc(device_ordinal, self.buffer_bytes)
        self._bases.append(ptr)
        self._handles.append(driver.ipc_get_handle(device_ordinal, ptr))
    except BaseException:
      self._free_buffers()
      raise
    # Free extents [start, end) per buffer, sorted and coalesced.
    self._free: list[list[list[int]]] = [[[0, self.buffer_bytes]]
                                         for _ in self._bases]
    self._slots: dict[str, LandingSlot] = {}
    self._quarantine: list[tuple[float, LandingSlot]] = []
    self.closed = False
    self.counts = collections.Counter()

  # ------------------------------------------------------------- accounting
  def live(self) -> int:
    """Regions lent to a transfer (waiting for it, or being read)."""
    with self._lock:
      return len(self._slots)

  def quarantined(self) -> int:
    """Regions released unread, out of use until their lease ends."""
    with self._lock:
      return len(self._quarantine)

  def free_bytes(self) -> int:
    with self._lock:
      return sum(e - s for ext in self._free for s, e in ext)

  @property
  def total_bytes(self) -> int:
    return self.buffer_bytes * len(self._bases)

  def stats(self) -> dict:
    with self._lock:
      out = dict(self.counts)
      out.update(buffers=len(self._bases), buffer_bytes=self.buffer_bytes,
                 lent=len(self._slots), quarantined=len(self._quarantine),
                 free_bytes=sum(e - s for ext in self._free for s, e in ext))
    return out

  # ------------------------------------------------------------- lending
  def acquire(self, transfer_id: str, nbytes: int) -> LandingSlot | None:
    """Lends a region of at least ``nbytes`` to ``transfer_id``, or None
    (none free, or larger than a buffer): the hand-off then takes the
    transfer path. Asking again for the same id returns its region."""
    now = self._clock()
    with self._lock:
      self._reap_locked(now)
      held = self._slots.get(transfer_id)
      if held is not None:
        return held if held.nbytes >= nbytes else None
      if self.closed or nbytes <= 0:
        return None
      need = -(-nbytes // self.align) * self.align
      if need > self.buffer_bytes:
        self.counts["too_large"] += 1
        return None
      best = None
      for b, extents in enumerate(self._free):
        for i, (s, e) in enumerate(extents):
          if e - s >= need and (best is None or e - s < best[2]):
            best = (b, i, e - s)
      if best is None:
        self.counts["exhausted"] += 1
        return None
      b, i, _ = best
      start = self._free[b][i][0]
      if self._free[b][i][1] - start == need:
        del self._free[b][i]
      else:
        self._free[b][i][0] = start + need
      slot = LandingSlot(transfer_id, b, start, need, self._handles[b],
                         self.device, self._bases[b] + start,
                         now + self.lease_s)
      self._slots[transfer_id] = slot
      self.counts["lent"] += 1
      return slot

  def begin_read(self, transfer_id: str) -> LandingSlot | None:
    """Pins the region for the receiver: nothing reuses it until
    ``end_read``. None when no region is lent under this id (never lent,
    released, or its lease ran out)."""
    with self._lock:
      slot = self._slots.get(transfer_id)
      if slot is None:
        return None
      if slot.reading:
        raise TransferError(f"the landing buffer of transfer {transfer_id} "
                            "is already being read")
      slot.reading = True
      return slot

  def end_read(self, transfer_id: str, *, ok: bool = True) -> None:
    """The receiver is done with the region. ``ok``: what the sender wrote
    has been read (inserted into the decode pools), and the receiver waited
    for the sender's copies before it read (their event, or the sender's
    sync before its handle existed), so no write can still be coming: the
    region is free now. A read that failed (a malformed or premature
    handle, a failed wait) cannot vouch for the sender, so the region then
    waits for its lease to end, as an unread release does. A ``release``
    during the read was deferred to here."""
    now = self._clock()
    with self._lock:
      slot = self._slots.pop(transfer_id, None)
      if slot is None:
        return
      if ok:
        self._free_region_locked(slot)
        self.counts["read"] += 1
      else:
        self._quarantine.append((max(now, slot.deadline) + self.grace_s,
                                 slot))
        self.counts["quarantined"] += 1

  def release(self, transfer_id: str, *, writer_done: bool = False) -> bool:
    """The transfer no longer needs its region (cancelled, expired, failed,
    or its KV came another way). Unless ``writer_done`` (the sender is known
    not to write: it chose another path), the region stays out of use until
    its lease ends, because a slow sender may still be copying into it. A
    region being read is freed when the read ends. Idempotent: False when
    nothing is lent under this id."""
    now = self._clock()
    with self._lock:
      slot = self._slots.get(transfer_id)
      if slot is None:
        return False
      if slot.reading:
        return True   # end_read frees it
      del self._slots[transfer_id]
      if writer_done:
        self._free_region_locked(slot)
        self.counts["released"] += 1
      else:
        until = max(now, slot.deadline) + self.grace_s
        self._quarantine.append((until, slot))
        self.counts["quarantined"] += 1
      return True

  def reap(self) -> int:
    """Reclaims regions whose lease ended unread (the sender can no longer
    write) and quarantined regions whose time is up. Returns how many lent
    regions expired."""
    with self._lock:
      return self._reap_locked(self._clock())

  def _reap_locked(self, now: float) -> int:
    expired = [s for s in self._slots.values()
               if not s.reading and s.deadline + self.grace_s < now]
    for s in expired:
      del self._slots[s.transfer_id]
      self._free_region_locked(s)
      log.warning("landing buffer lease of transfer %s expired unread",
                  s.transfer_id)
    self.counts["expired"] += len(expired)
    if self._quarantine:
      keep = []
      for until, s in self._quarantine:
        if until <= now:
          self._free_region_locked(s)
        else:
          keep.append((until, s))
      self._quarantine = keep
    return len(expired)

  def _free_region_locked(self, slot: LandingSlot) -> None:
    extents = self._free[slot.buffer]
    s, e = slot.offset, slot.offset + slot.nbytes
    for fs, fe in extents:
      if fs < e and s < fe:
        raise AssertionError(f"landing region [{s}, {e}) of buffer "
                             f"{slot.buffer} freed twice")
    extents.append([s, e])
    extents.sort()
    merged: list[list[int]] = []
    for fs, fe in extents:
      if merged and merged[-1][1] == fs:
        merged[-1][1] = fe
      else:
        merged.append([fs, fe])
    self._free[slot.buffer] = merged

  def close(self) -> None:
    """Frees the buffers (worker shutdown). Peers that still hold them
    open keep the memory mapped until they close their handles."""
    with self._lock:
      self.closed = True
      self._slots.clear()
      self._quarantine.clear()
    self._free_buffers()

  def _free_buffers(self) -> None:
    bases, self._bases = self._bases, []
    for ptr in bases:
      release_quietly("freeing a landing buffer", self.driver.mem_free,
                      self.device, ptr)


__all__ = ["REGION_ALIGN", "LandingSlot", "LandingPool"]
