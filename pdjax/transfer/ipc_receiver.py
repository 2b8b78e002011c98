"""Decode side of the ``cuda_ipc`` path (``pdjax.transfer.cuda_ipc`` says
how the path works and who owns a landing region when): lends landing
regions, waits for the sender's copies, and makes a region a JAX array in
the replica's layout without a copy."""

from __future__ import annotations

import collections
import functools
import math
import threading
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from pdjax.engine.kv import reshard_kv
from pdjax.engine.requests import RequestKV
from pdjax.transfer import base as transfer_base
from pdjax.transfer import foreign_memory
from pdjax.transfer.base import (PATH_CUDA_IPC, IssuedKvReceiver,
                                 TransferError, TransferTimeout)
from pdjax.transfer.cuda_driver import release_quietly
from pdjax.transfer.landing_pool import LandingPool, LandingSlot
from pdjax.v1 import kv_pb2


def check_kv_handle(h: kv_pb2.KvHandle, geometry=None,
                    max_pages: int | None = None):
  """``transfer_base.check_kv_handle``, and a dtype DLPack can describe
  (the region is imported as a view of that dtype)."""
  shape, dtype = transfer_base.check_kv_handle(h, geometry, max_pages)
  if not foreign_memory.viewable(dtype):
    raise TransferError(f"KV dtype {h.dtype} cannot be viewed through DLPack")
  return shape, dtype


class IpcEvents:
  """The interprocess events of the senders that copy into one device's
  landing memory, each opened once (opening costs, and a second open could
  race the first) and kept: at most ``max_events``, one per sending device
  (a restarted sender brings new ones; the least recently used go)."""

  def __init__(self, driver, ordinal: int, max_events: int):
    self.driver = driver
    self.ordinal = ordinal
    self.max_events = max_events
    self._events: collections.OrderedDict[bytes, object] = (
        collections.OrderedDict())
    self._lock = threading.Lock()

  def __len__(self) -> int:
    with self._lock:
      return len(self._events)

  def wait(self, event_handle: bytes) -> bool:
    """Returns once the sender's copies recorded before ``event_handle``'s
    event have run; True when they were still running as it was asked (the
    copy overlapped the handle's trip)."""
    driver, ordinal = self.driver, self.ordinal
    with self._lock:
      event = self._events.get(event_handle)
      if event is None:
        event = driver.event_open(ordinal, event_handle)
        self._events[event_handle] = event
        while len(self._events) > self.max_events:
          # The least recently used: max_events other senders' events were
          # used since (its sender is gone, most likely), so nothing is
          # waiting on it.
          _, old = self._events.popitem(last=False)
          release_quietly("destroying a sender's CUDA IPC event",
                          driver.event_destroy, ordinal, old)
      else:
        self._events.move_to_end(event_handle)
    if driver.event_query(ordinal, event):
      return False
    # Blocking, not polling: a receiver polling the event for up to 5 ms
    # before it blocked was no faster (0.437 vs 0.442 ms end to end for
    # 128 MiB, H100; docs/notes/2026-11-26-h100x4-ipc-event.md), and
    # polling would take a core.
    driver.event_synchronize(ordinal, event)
    return True

  def close(self) -> None:
    with self._lock:
      events, self._events = self._events, collections.OrderedDict()
    for event in events.values():
      release_quietly("destroying a sender's CUDA IPC event",
                      self.driver.event_destroy, self.ordinal, event)


class CudaIpcReceiver(IssuedKvReceiver):
  """Decode side of the ``cuda_ipc`` path: lends landing regions (``lend``,
  when the prefill starts) and imports what the sender copied into them.

  A handle may arrive while the sender's copies still run: it then carries
  the sender's interprocess event (``ipc_event_handle``), recorded after
  them, and ``receive`` waits on it before it makes the region an array.
  A handle without one comes from a sender that synchronized before it
  answered. Each sender's event is opened once and kept (``MAX_EVENTS``).
  """

  name = PATH_CUDA_IPC

  # Views kept for reuse. Regions recur at the same offsets with the same
  # shapes (payloads are bucketed, regions carved best-fit from each
  # buffer's start), and an import costs about 0.3 ms whatever the size
  # (docs/notes/2026-11-26-h200x2-ipc-receiver.md): most of a small
  # hand-off's receive.
  MAX_VIEWS = 256
  # Senders' events kept open: one per prefill device that sends here (a
  # restarted prefill worker brings new ones; the least recently used go).
  MAX_EVENTS = 64

  def __init__(self, pool: LandingPool, device, *, geometry=None):
    """``device``: the JAX device of the pool's GPU (where the KV is
    imported before it is resharded onto the replica)."""
    self.pool = pool
    self.device = device
    self.geometry = geometry
    super().__init__()
    self._views: collections.OrderedDict[tuple, jax.Array] = (
        collections.OrderedDict())
    self._views_lock = threading.Lock()
    self.view_imports = 0
    self._events = IpcEvents(pool.driver, pool.device, self.MAX_EVENTS)
    # The latest receive's phases (ms), as CudaIpcSender.last_phases.
    self.last_phases: dict[str, float] = {}

  def _view(self, slot: LandingSlot, shape, dtype,
            sharding: NamedSharding) -> jax.Array:
    """The region as a JAX array: a view made for an earlier hand-off into
    the same bytes with the same shape, or a fresh import. A view is only a
    description of memory, so one array may stand for many hand-offs in
    turn; the pool's lending rules keep each hand-off's bytes in place until
    its reader is done, whichever array object reads them.

    When the replica is this one device, the view is given the replica's
    sharding directly (no ``device_put``: that costs about 0.1 ms even when
    it moves nothing); otherwise it stays on the pool's device and
    ``reshard_kv`` copies it onto the replica."""
    in_place = sharding.device_set == {self.device}
    key = (slot.ptr, tuple(shape), jnp.dtype(dtype).name,
           sharding if in_place else None)
    with self._views_lock:
      arr = self._views.get(key)
      if arr is not None:
        self._views.move_to_end(key)
        return foreign_memory.retype(arr, dtype)
    arr = self.pool.driver.view(slot.device, slot.ptr, shape, dtype,
                                self.device)
    if in_place:
      arr = jax.make_array_from_single_device_arrays(tuple(shape), sharding,
                                                     [arr])
    with self._views_lock:
      self.view_imports += 1
      self._views[key] = arr
      while len(self._views) > self.MAX_VIEWS:
        # Only the reference goes: a reader still holding it keeps the
        # array, and the memory lives as long as the pool.
        self._views.popitem(last=False)
    return foreign_memory.retype(arr, dtype)

  def _wait_for_copies(self, event_handle: bytes) -> bool:
    """Returns once the sender's copies recorded before ``event_handle``'s
    event have run (``IpcEvents.wait``)."""
    return self._events.wait(event_handle)

  def lend(self, transfer_id: str, nbytes: int) -> LandingSlot | None:
    """A region for a transfer issued to this worker (``TransferDenied``
    otherwise: only a reserved request may hold landing memory)."""
    self._issued.check(transfer_id)
    return self.pool.acquire(transfer_id, nbytes)

  def forget(self, transfer_id: str) -> None:
    super().forget(transfer_id)
    self.pool.release(transfer_id)

  def discard(self, transfer_id: str) -> None:
    """The KV came by another path: the sender never wrote the region."""
    self.pool.release(transfer_id, writer_done=True)

  def reap(self) -> int:
    return self.pool.reap()

  def live(self) -> int:
    return self.pool.live()

  def close(self) -> None:
    with self._views_lock:
      self._views.clear()     # before the memory they describe is freed
    self._events.close()
    self.pool.close()

  def receive(self, handle: kv_pb2.KvHandle, sharding: NamedSharding, *,
              timeout_s: float) -> RequestKV:
    t0 = time.perf_counter()
    tid = handle.transfer_id
    max_pages = self._issued.check(tid)
    if handle.transport != PATH_CUDA_IPC:
      raise TransferError(f"handle of transport {handle.transport!r} given "
                          "to the cuda_ipc receiver")
    shape, dtype = check_kv_handle(handle, self.geometry, max_pages)
    nbytes = math.prod(shape) * dtype.itemsize
    slot = self.pool.begin_read(tid)
    if slot is None:
      self._issued.discard(tid)
      raise TransferTimeout(f"no landing buffer is lent for transfer {tid} "
                            "(its lease ended, or it was released)")
    try:
      if nbytes > slot.nbytes:
        raise TransferError(f"KV of {nbytes} bytes cannot be in the "
                            f"{slot.nbytes}-byte landing region of {tid}")
      # The view first, while the copies may still run: it only describes
      # the region (nothing reads it until the consumer runs a program on
      # it, after this returns), and made after the wait it would be on the
      # hand-off's critical path.
      imports = self.view_imports
      t = time.perf_counter()
      arr = self._view(slot, shape, dtype, sharding)
      view_s = time.perf_counter() - t
      # end_read is idempotent (a second call finds no region under this
      # unique id), so a resharded copy of the RequestKV may release too.
      kv = RequestKV(arr, handle.num_tokens, handle.first_page,
                     release_fn=functools.partial(self.pool.end_read, tid,
                                                  ok=True))
      t = time.perf_counter()
      pending = bool(handle.ipc_event_handle) and self._wait_for_copies(
          handle.ipc_event_handle)
      t_waited = time.perf_counter()
      wait_s = t_waited - t
      # A copy onto a replica spanning devices reads the region: after the
      # wait (a no-op where the view is already in the replica's layout).
      out = reshard_kv(kv, sharding)
      t_end = time.perf_counter()
      self.last_phases = {"wait_ms": wait_s * 1e3,
                          "copies_pending": float(pending),
                          "view_ms": view_s * 1e3,
                          "imported": float(self.view_imports > imports),
                          "after_wait_ms": (t_end - t_waited) * 1e3,
                          "total_ms": (t_end - t0) * 1e3}
      return out
    except BaseException:
      self.pool.end_read(tid, ok=False)
      raise
    finally:
      self._issued.discard(tid)


__all__ = ["CudaIpcReceiver", "IpcEvents", "check_kv_handle"]
