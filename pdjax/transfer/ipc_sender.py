"""Prefill side of the ``cuda_ipc`` path (``pdjax.transfer.cuda_ipc`` says
how the path works and who owns a landing region when): copies a request's
KV into the landing region its decode worker lent, and signals the copies'
completion with an interprocess event that travels in the handle. A peer's
block pull (``pdjax.transfer.block_pulls``) is written the same way, into
the region the pulling worker lent (``CudaIpcSender.write``)."""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from pdjax.engine.requests import RequestKV
from pdjax.transfer.base import (PATH_CUDA_IPC, KvSender, TransferError,
                                 handle_for)
from pdjax.transfer.cuda_driver import (CudaDriver, CudaError, device_ordinal,
                                        release_quietly)
from pdjax.v1 import kv_pb2

log = logging.getLogger(__name__)


def _single_device(arr: jax.Array) -> jax.Array:
  """``arr`` as one contiguous buffer on one device: a kv_heads-split (TP)
  prefill KV is gathered onto the first device of its mesh (the landing
  buffer holds the decode replica's whole payload)."""
  if len(arr.sharding.device_set) == 1:
    return arr
  if not arr.is_fully_addressable:
    raise TransferError("the KV spans processes; CUDA IPC sends one "
                        "process's single-device copy")
  if arr.is_fully_replicated:
    return arr.addressable_data(0)
  mesh = getattr(arr.sharding, "mesh", None)
  first = (mesh.devices.flat[0] if mesh is not None
           else min(arr.sharding.device_set, key=lambda d: d.id))
  return jax.device_put(arr, SingleDeviceSharding(first))


class _Retirement:
  """Keeps what a hand-off's copies still use until they have run: the
  source arrays (once their last reference goes, XLA may free or reuse the
  memory under the copy) and the landing buffer's place in the sender's
  handle cache (``done``: the cache must not unmap it under the copy).
  ``CudaIpcSender.send`` returns while its copies run, so it hands both here.

  One daemon thread per sender, started by its first hand-off, takes
  everything queued so far, waits with one stream sync per device (a
  device's copies run in order on its one stream, so that sync covers every
  copy issued before it) and retires the lot. So it lags the copies by at
  most one sync, and what it holds is bounded by the copies in flight; its
  wait is off the sender's path and the receiver's.
  """

  def __init__(self, driver: CudaDriver):
    self.driver = driver
    self._cond = threading.Condition()
    self._queued: list[tuple[int, list[jax.Array], Callable[[], None]]] = []
    self._held = 0
    self._closing = False
    self._thread: threading.Thread | None = None

  @property
  def held(self) -> int:
    """Hand-offs whose copies may still be running."""
    with self._cond:
      return self._held

  def add(self, ordinal: int, sources: list[jax.Array],
          done: Callable[[], None]) -> None:
    with self._cond:
      self._queued.append((ordinal, sources, done))
      self._held += 1
      if self._thread is None:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="cuda-ipc-retire")
        self._thread.start()
      self._cond.notify()

  def close(self) -> None:
    """Returns once everything queued has been retired, its copies having
    run, and the thread has ended (a later ``add`` starts another)."""
    with self._cond:
      thread = self._thread
      self._closing = True
      self._cond.notify()
    if thread is not None:
      thread.join()
    with self._cond:
      self._closing = False

  def _take(self):
    with self._cond:
      self._cond.wait_for(lambda: self._queued or self._closing)
      if not self._queued:
        self._thread = None
        return None
      batch, self._queued = self._queued, []
      return batch

  def _retire(self, batch) -> None:
    for ordinal in sorted({b[0] for b in batch}):
      try:
        self.driver.synchronize(ordinal)
      except CudaError as e:
        # The context is broken: nothing it still had queued will run.
        log.error("waiting for CUDA IPC copies on GPU %d failed: %s",
                  ordinal, e)
    for _, _, done in batch:
      done()
    with self._cond:
      self._held -= len(batch)

  def _run(self) -> None:
    while (batch := self._take()) is not None:
      self._retire(batch)
      del batch       # holding no source while waiting for the next


class CudaIpcSender(KvSender):
  """Prefill side of the ``cuda_ipc`` path: device-to-device copies into the
  landing region the decode worker lent (``send``; ``write`` copies any
  arrays into any region lent). ``release`` has nothing to do.

  The KV's layer axis leads, so each layer group of a prefill run in groups
  (``RequestKV.layer_groups``) is one contiguous byte range of the region:
  each is copied as soon as its program has finished, while later groups
  still compute, and the hand-off that remains after the prefill is the
  last group's copy. A KV in one piece is one copy of the whole padded
  payload (one large copy runs at the link's rate).

  Copies go on one stream per device, in the order issued: one copy
  already fills NVLink. The lock covers the handle cache and the issuing,
  never the wait for a group's program, so the hand-offs of one batch
  interleave their groups as they become ready.

  How the decode side learns the copies are done (``signal``):

  * ``"event"`` (default): after issuing them, ``send`` records the device's
    interprocess event on the copy stream and returns at once, the event's
    handle in the ``KvHandle``; the receiver waits on the event before it
    reads. So the copy runs while the handle travels, where a sync here
    would add the copy's tail, the sync's own latency and the notification
    after it (a 128 MiB hand-off reached 61% of the raw copy rate so). One
    event per device suffices: its copies run in order on one stream, and
    the receiver waits only once it has the handle, made after the record,
    so the record its wait sees is this hand-off's or a later one, which
    completes after this hand-off's copies too. The sources stay referenced
    until their copies have run (``_Retirement``), and so does the landing
    buffer's mapping. The event lives as long as the sender: CUDA leaves a
    wait on an event its maker destroyed undefined (it may never return),
    so ``close`` is for shutdown, once the hand-offs sent are received.
  * ``"sync"``: ``send`` synchronizes the stream before it returns and the
    handle carries no event (what older senders do; receivers accept both).
    For comparisons (tools/gpu/ipc_bandwidth.py), and for callers that time
    the copy's completion from the sender.
  """

  name = PATH_CUDA_IPC

  def __init__(self, driver: CudaDriver, *, deadline_margin_s: float = 1.0,
               clock: Callable[[], float] = time.time,
               max_open_handles: int = 64, signal: str = "event"):
    if signal not in ("event", "sync"):
      raise ValueError(f"signal must be 'event' or 'sync', got {signal!r}")
    self.driver = driver
    self.deadline_margin_s = deadline_margin_s
    self._clock = clock
    self.max_open_handles = max_open_handles
    self.signal = signal
    self._open: collections.OrderedDict[tuple[int, bytes], int] = (
        collections.OrderedDict())
    # Sends with copies possibly in flight, per open handle.
    self._copying: collections.Counter[tuple[int, bytes]] = (
        collections.Counter())
    self._lock = threading.Lock()
    # Per device: the interprocess event recorded after each hand-off's
    # copies, and its handle (made on first use).
    self._events: dict[int, tuple[object, bytes]] = {}
    self._retirement = _Retirement(driver)
    # The latest send's phases (ms: waiting for the KV's programs, issuing
    # the copies and the event record, from the call to the first copy
    # issued, the stream sync -- 0 with the event signal, whose wait is the
    # receiver's --, all): where a small
    # hand-off's time goes (tools/gpu/ipc_bandwidth.py). Any one send when
    # they overlap.
    self.last_phases: dict[str, float] = {}

  @property
  def in_flight(self) -> int:
    """Hand-offs whose copies may still be running (their sources held)."""
    return self._retirement.held

  def remote_pointer(self, ordinal: int, handle: bytes) -> int:
    """This process's address of a peer's landing buffer, opened once per
    (device, handle) and cached: opening costs milliseconds, and a handle
    may be opened only once per context. Call with the lock held."""
    key = (ordinal, bytes(handle))
    ptr = self._open.get(key)
    if ptr is not None:
      self._open.move_to_end(key)
      return ptr
    ptr = self.driver.ipc_open(ordinal, key[1])
    self._open[key] = ptr
    # Least recently used first; never one a send may still be copying into
    # (its copies are in flight until they are retired).
    for old_key in list(self._open):
      if len(self._open) <= self.max_open_handles:
        break
      if old_key == key or self._copying[old_key]:
        continue
      release_quietly("closing a peer's landing buffer",
                      self.driver.ipc_close, old_key[0],
                      self._open.pop(old_key))
    return ptr

  def _done_copying(self, key: tuple[int, bytes] | None) -> None:
    """A send's copies have run (or never will): the cache may close its
    buffer again."""
    if key is None:
      return
    with self._lock:
      self._copying[key] -= 1
      if not self._copying[key]:
        del self._copying[key]

  def _record(self, ordinal: int) -> bytes:
    """Records the device's interprocess event after every copy issued so
    far on its stream; returns the event's handle."""
    with self._lock:
      made = self._events.get(ordinal)
      if made is None:
        made = self._events[ordinal] = self.driver.event_create_ipc(ordinal)
    self.driver.event_record(ordinal, made[0])
    return made[1]

  def _check_lease(self, deadline_ms: int, what: str) -> None:
    if deadline_ms and (self._clock() * 1000
                        > deadline_ms - self.deadline_margin_s * 1000):
      raise TransferError(f"the landing buffer lent for {what} is past its "
                          "lease; not writing into it")

  def send(self, kv: RequestKV, dest: kv_pb2.KvDestination, *,
           timeout_s: float) -> kv_pb2.KvHandle:
    if not dest.ipc_handle:
      raise TransferError(f"transfer {dest.transfer_id}: the decode worker "
                          "lent no landing buffer")
    what = f"transfer {dest.transfer_id}"
    self._check_lease(dest.ipc_deadline_ms, what)
    nbytes = kv.payload_bytes
    if nbytes > dest.ipc_bytes:
      raise TransferError(
          f"KV payload of {nbytes} bytes ({list(kv.shape)} "
          f"{jnp.dtype(kv.dtype)}) does not fit the {dest.ipc_bytes}-byte "
          f"landing buffer lent for {what}")
    event = self.write(kv.pieces, dest.ipc_handle, dest.ipc_offset,
                       dest.ipc_bytes, deadline_ms=dest.ipc_deadline_ms,
                       what=what)
    handle = handle_for(kv, self.name, dest.transfer_id)
    handle.shards = 1
    handle.ipc_event_handle = event
    return handle

  def write(self, pieces, ipc_handle: bytes, offset: int, nbytes: int, *,
            deadline_ms: int = 0, what: str = "a peer") -> bytes:
    """Copies ``pieces`` (arrays, each as one device's contiguous bytes),
    one after the other, into the region of a peer's landing buffer
    ``ipc_handle`` that starts at ``offset``, ``nbytes`` long, lent until
    ``deadline_ms`` (0: no lease) for ``what``; returns the handle of the
    event recorded after the copies (``signal="event"``), or b"" (the copies
    have run: ``"sync"``, or nothing to copy). TransferError (a CudaError
    from the driver) when it cannot, with nothing left writing."""
    t0 = time.perf_counter()
    total = sum(p.nbytes for p in pieces)
    if total > nbytes:
      raise TransferError(f"{total} bytes do not fit the {nbytes}-byte "
                          f"landing buffer lent for {what}")
    sources, ordinal, copying = [], None, None
    waited = issued = synced = first_copy = 0.0
    event = b""
    try:
      for piece in pieces:
        arr = _single_device(piece)
        t = time.perf_counter()
        arr.block_until_ready()     # this group's program has finished
        waited += time.perf_counter() - t
        (dev,) = arr.devices()
        if ordinal is None:
          ordinal = device_ordinal(dev)
        src = arr.unsafe_buffer_pointer()
        t = time.perf_counter()
        with self._lock:
          base = self.remote_pointer(ordinal, ipc_handle)
          # A group or the open may have been slow.
          self._check_lease(deadline_ms, what)
          if copying is None:
            copying = (ordinal, bytes(ipc_handle))
            self._copying[copying] += 1
          self.driver.memcpy_dtod(ordinal, base + offset, src, arr.nbytes)
        if not sources:
          first_copy = time.perf_counter() - t0
        issued += time.perf_counter() - t
        sources.append(arr)         # must live until its copy has run
        offset += arr.nbytes
      if copying is not None and self.signal == "event":
        t = time.perf_counter()
        event = self._record(ordinal)
        issued += time.perf_counter() - t
      elif copying is not None:
        t = time.perf_counter()
        self.driver.synchronize(ordinal)
        synced = time.perf_counter() - t
    except BaseException:
      try:
        if ordinal is not None:     # nothing may still be writing on failure
          self.driver.synchronize(ordinal)
      finally:
        self._done_copying(copying)
      raise
    if copying is not None and self.signal == "event":
      self._retirement.add(ordinal, sources,
                           functools.partial(self._done_copying, copying))
    else:
      self._done_copying(copying)
    del sources
    self.last_phases = {"wait_ms": waited * 1e3, "issue_ms": issued * 1e3,
                        "first_copy_ms": first_copy * 1e3,
                        "sync_ms": synced * 1e3,
                        "total_ms": (time.perf_counter() - t0) * 1e3}
    return event

  def close(self) -> None:
    # Every copy has run before a buffer is unmapped or an event destroyed.
    self._retirement.close()
    with self._lock:
      events, self._events = self._events, {}
      while self._open:
        (ordinal, _), ptr = self._open.popitem()
        release_quietly("closing a peer's landing buffer",
                        self.driver.ipc_close, ordinal, ptr)
    for ordinal, (event, _) in events.items():
      release_quietly("destroying a CUDA IPC event",
                      self.driver.event_destroy, ordinal, event)


__all__ = ["CudaIpcSender"]
