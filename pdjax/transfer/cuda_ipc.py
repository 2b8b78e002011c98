"""The ``device`` transport's fast paths: same process, same host (CUDA IPC).

``jax.experimental.transfer`` moves KV through pinned host memory and TCP:
about 7 GB/s between two processes on one host, where NVLink between two
H100s carries about 395 GB/s (``/work/shared/README.md``). So the ``device``
transport picks the best path per hand-off, by itself:

* same process (``--role=both``): the array is parked in a process-wide
  exchange and ``device_put`` onto the decode replica (the ``local`` path);
* same host, and the decode worker lent a landing buffer: a CUDA IPC copy
  straight into that buffer (the ``cuda_ipc`` path, below);
* otherwise ``jax.experimental.transfer`` (``pdjax.transfer.device``).

The handle's ``transport`` says which path carried the KV, so the receiver
redeems it the matching way; a sender may always fall back to the transfer
path (and says so in the handle), so every fast-path problem costs speed,
never a request.

Why the decode side lends the memory: XLA's own device buffers cannot be
exported by legacy CUDA IPC (``cuIpcGetMemHandle`` answers
``CUDA_ERROR_INVALID_VALUE`` for them). So the decode worker allocates a few
landing buffers with ``cuMemAlloc`` once, exports them with
``cuIpcGetMemHandle`` (``LandingPool``), and lends a region of one to each
request when the prefill worker asks, as it starts the request's prefill
(``LendLanding``, answered while the prefill runs;
``pdjax.service.landing.LandingRequests``). The prefill worker opens the
handle (once per buffer, cached), and ``cuMemcpyDtoD``s its single-device
KV into the region (``CudaIpcSender``): layer group by layer group when the
prefill runs its layers as several programs, each group as soon as it is
computed, so the copy runs under the rest of the prefill.

One hand-off, in order:

1. the sender issues the copies on its device's copy stream;
2. it records its interprocess event on that stream, after them;
3. it answers with the ``KvHandle``, which carries the event's handle
   (``ipc_event_handle``), without waiting for the copies: they run while
   the handle travels;
4. the receiver opens the event (once per sender device, cached) and waits
   on it (``cuEventSynchronize``);
5. then it makes the region a JAX array without a copy (a DLPack view,
   ``pdjax.transfer.foreign_memory``) in the replica's layout
   (``CudaIpcReceiver``); the decode engine's insert program reads it
   straight into the page pools, and the region goes back to the pool once
   that program has completed (``RequestKV.release``,
   ``pdjax.engine.borrowed_kv``).

A sender may instead synchronize its stream before answering
(``signal="sync"``, and senders older than the event): the handle then has
no event, and the receiver reads at once. The one device-local copy of the
hand-off is the insert every path has; an earlier version copied the region
out first, which held the hand-off to 62% of the link.

Ownership of a landing region (the failure modes of FIELD_NOTES §4: data
overwritten before it was read, memory stranded by peers that vanished):

* it is lent under one transfer id issued to the worker (a reserved
  request), when the prefill worker starts that request's prefill
  (``LendLanding``; a region lent at Reserve would sit idle while the
  request queues for prefill, and under load every region would be held by
  queued requests), with a lease that ends at a wall-clock deadline
  (``ipc_deadline_ms``; both sides are on one host, so one clock);
* the sender never starts a copy later than ``deadline_margin_s`` before
  that deadline (it falls back to the transfer path instead);
* read successfully: the region is free once the insert that reads it has
  completed (the receiver waited for the sender's copies before reading:
  their event, or the sender's own sync before its handle existed);
* released unread (cancel, Unreserve, reservation expiry, failed Decode):
  the region stays out of use until its lease has ended (+ ``grace_s``),
  because a slow sender may still be writing into it; an unread lease that
  simply runs out is reclaimed by ``reap`` the same way;
* a release that arrives while the region is being read (imported, then
  inserted) is deferred to the end of the read: a region is never reused
  while read.

The CUDA driver is behind a small seam (``pdjax.transfer.cuda_driver``:
the real ``cuda.bindings`` driver on GPUs, a fake over host memory on CPU),
and the landing buffers' bookkeeping is ``pdjax.transfer.landing_pool``.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import socket
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, SingleDeviceSharding

from pdjax.engine.kv import pages_for, payload_pages, reshard_kv
from pdjax.engine.requests import RequestKV
from pdjax.transfer import base as transfer_base
from pdjax.transfer import foreign_memory
from pdjax.transfer.base import (KvReceiver, KvSender, TransferError,
                                 TransferTimeout, handle_for)
from pdjax.transfer.cuda_driver import (IPC_EVENT_HANDLE_BYTES,
                                        IPC_HANDLE_BYTES, CudaDriver,
                                        CudaError, FakeCudaDriver,
                                        FakeIpcRegistry, RealCudaDriver,
                                        device_ordinal)
from pdjax.transfer.landing_pool import (REGION_ALIGN, LandingPool,
                                         LandingSlot)
from pdjax.transfer.local import (LocalKvExchange, LocalReceiver,
                                  LocalSender)
from pdjax.v1 import kv_pb2

log = logging.getLogger(__name__)

PATH_LOCAL, PATH_CUDA_IPC, PATH_TRANSFER = "local", "cuda_ipc", "transfer"

# ---------------------------------------------------------------- path choice
def _host_of(process_id: str) -> str:
  """The hostname in ``pdjax.service.common.PROCESS_ID`` (host:pid:nonce)."""
  parts = process_id.rsplit(":", 2)
  return parts[0] if len(parts) == 3 else ""


def _decode_is(dest: kv_pb2.KvDestination, *, my_process_id: str,
               my_hostname: str) -> str:
  """Where ``dest``'s decode worker runs from here: ``"this process"``,
  ``"this host"`` or ``"elsewhere"`` (also when nothing says)."""
  if dest.decode_process_id and dest.decode_process_id == my_process_id:
    return "this process"
  host = dest.decode_hostname or _host_of(dest.decode_process_id)
  if host and my_hostname and host == my_hostname:
    return "this host"
  return "elsewhere"


def select_path(dest: kv_pb2.KvDestination, *, my_process_id: str,
                my_hostname: str) -> str:
  """Which path a hand-off from this process to ``dest`` can take:
  ``"local"`` (the decode worker is this process), ``"cuda_ipc"`` (same host,
  and it lent a landing buffer) or ``"transfer"`` (anything else)."""
  where = _decode_is(dest, my_process_id=my_process_id,
                     my_hostname=my_hostname)
  if where == "this process":
    return PATH_LOCAL
  if where == "this host" and dest.ipc_handle:
    return PATH_CUDA_IPC
  return PATH_TRANSFER


# ---------------------------------------------------------------- sender
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
  landing region the decode worker lent. ``release`` has nothing to do.

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
    # the copies and the event record, the stream sync -- 0 with the event
    # signal, whose wait is the receiver's --, all): where a small
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
      old = self._open.pop(old_key)
      try:
        self.driver.ipc_close(old_key[0], old)
      except CudaError as e:
        log.warning("closing a peer's landing buffer failed: %s", e)
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

  def _check_lease(self, dest: kv_pb2.KvDestination) -> None:
    if dest.ipc_deadline_ms and (self._clock() * 1000 > dest.ipc_deadline_ms
                                 - self.deadline_margin_s * 1000):
      raise TransferError(f"the landing buffer lent for transfer "
                          f"{dest.transfer_id} is past its lease; not "
                          "writing into it")

  def send(self, kv: RequestKV, dest: kv_pb2.KvDestination, *,
           timeout_s: float) -> kv_pb2.KvHandle:
    if not dest.ipc_handle:
      raise TransferError(f"transfer {dest.transfer_id}: the decode worker "
                          "lent no landing buffer")
    self._check_lease(dest)
    nbytes = kv.payload_bytes
    if nbytes > dest.ipc_bytes:
      raise TransferError(
          f"KV payload of {nbytes} bytes ({list(kv.shape)} "
          f"{jnp.dtype(kv.dtype)}) does not fit the {dest.ipc_bytes}-byte "
          f"landing buffer lent for transfer {dest.transfer_id}")
    sources, offset, ordinal, copying = [], dest.ipc_offset, None, None
    t0 = time.perf_counter()
    waited = issued = synced = 0.0
    try:
      for piece in kv.pieces:
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
          base = self.remote_pointer(ordinal, dest.ipc_handle)
          self._check_lease(dest)   # a group or the open may have been slow
          if copying is None:
            copying = (ordinal, bytes(dest.ipc_handle))
            self._copying[copying] += 1
          self.driver.memcpy_dtod(ordinal, base + offset, src, arr.nbytes)
        issued += time.perf_counter() - t
        sources.append(arr)         # must live until its copy has run
        offset += arr.nbytes
      # Built while the last copy runs: the fixed cost of a small hand-off
      # is mostly host work, and this part of it need not wait.
      handle = handle_for(kv, self.name, dest.transfer_id)
      handle.shards = 1
      if copying is not None and self.signal == "event":
        t = time.perf_counter()
        handle.ipc_event_handle = self._record(ordinal)
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
                        "sync_ms": synced * 1e3,
                        "total_ms": (time.perf_counter() - t0) * 1e3}
    return handle

  def close(self) -> None:
    # Every copy has run before a buffer is unmapped or an event destroyed.
    self._retirement.close()
    with self._lock:
      events, self._events = self._events, {}
      while self._open:
        (ordinal, _), ptr = self._open.popitem()
        try:
          self.driver.ipc_close(ordinal, ptr)
        except CudaError as e:
          log.warning("closing a peer's landing buffer failed: %s", e)
    for ordinal, (event, _) in events.items():
      try:
        self.driver.event_destroy(ordinal, event)
      except CudaError as e:
        log.warning("destroying a CUDA IPC event failed: %s", e)


# ---------------------------------------------------------------- receiver
def check_kv_handle(h: kv_pb2.KvHandle, geometry=None,
                    max_pages: int | None = None):
  """``transfer_base.check_kv_handle``, and a dtype DLPack can describe
  (the region is imported as a view of that dtype)."""
  shape, dtype = transfer_base.check_kv_handle(h, geometry, max_pages)
  if not foreign_memory.viewable(dtype):
    raise TransferError(f"KV dtype {h.dtype} cannot be viewed through DLPack")
  return shape, dtype


class CudaIpcReceiver(KvReceiver):
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
  # (BENCHMARKS.md): most of a small hand-off's receive.
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
    self._issued = transfer_base.IssuedTransfers()
    self._views: collections.OrderedDict[tuple, jax.Array] = (
        collections.OrderedDict())
    self._views_lock = threading.Lock()
    self.view_imports = 0
    self._events: collections.OrderedDict[bytes, object] = (
        collections.OrderedDict())
    self._events_lock = threading.Lock()
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
        return arr
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
    return arr

  def _wait_for_copies(self, event_handle: bytes) -> bool:
    """Returns once the sender's copies recorded before ``event_handle``'s
    event have run; True when they were still running as the handle came
    (the copy overlapped the handle's trip). The event is opened under the
    lock, once per handle: a second open could race the first."""
    driver, ordinal = self.pool.driver, self.pool.device
    with self._events_lock:
      event = self._events.get(event_handle)
      if event is None:
        event = driver.event_open(ordinal, event_handle)
        self._events[event_handle] = event
        while len(self._events) > self.MAX_EVENTS:
          # The least recently used: MAX_EVENTS other senders' events were
          # used since (its sender is gone, most likely), so nothing is
          # waiting on it.
          _, old = self._events.popitem(last=False)
          try:
            driver.event_destroy(ordinal, old)
          except CudaError as e:
            log.warning("destroying a sender's CUDA IPC event failed: %s", e)
      else:
        self._events.move_to_end(event_handle)
    if driver.event_query(ordinal, event):
      return False
    driver.event_synchronize(ordinal, event)
    return True

  def lend(self, transfer_id: str, nbytes: int) -> LandingSlot | None:
    """A region for a transfer issued to this worker (``TransferDenied``
    otherwise: only a reserved request may hold landing memory)."""
    self._issued.check(transfer_id)
    return self.pool.acquire(transfer_id, nbytes)

  def expect(self, transfer_id: str, request_id: str, *,
             max_pages: int | None = None) -> None:
    self._issued.add(transfer_id, max_pages)

  def forget(self, transfer_id: str) -> None:
    self._issued.discard(transfer_id)
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
    with self._events_lock:
      events, self._events = self._events, collections.OrderedDict()
    for event in events.values():
      try:
        self.pool.driver.event_destroy(self.pool.device, event)
      except CudaError as e:
        log.warning("destroying a sender's CUDA IPC event failed: %s", e)
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
      t = time.perf_counter()
      pending = bool(handle.ipc_event_handle) and self._wait_for_copies(
          handle.ipc_event_handle)
      wait_s = time.perf_counter() - t
      # A view, not a copy: the region stays being read until the consumer
      # has inserted it (RequestKV.release -> end_read frees it).
      imports = self.view_imports
      t = time.perf_counter()
      arr = self._view(slot, shape, dtype, sharding)
      view_s = time.perf_counter() - t
      # end_read is idempotent (a second call finds no region under this
      # unique id), so a resharded copy of the RequestKV may release too.
      kv = RequestKV(arr, handle.num_tokens, handle.first_page,
                     release_fn=functools.partial(self.pool.end_read, tid,
                                                  ok=True))
      out = reshard_kv(kv, sharding)
      self.last_phases = {"wait_ms": wait_s * 1e3,
                          "copies_pending": float(pending),
                          "view_ms": view_s * 1e3,
                          "imported": float(self.view_imports > imports),
                          "total_ms": (time.perf_counter() - t0) * 1e3}
      return out
    except BaseException:
      self.pool.end_read(tid, ok=False)
      raise
    finally:
      self._issued.discard(tid)


# ---------------------------------------------------------------- auto device
_exchange: LocalKvExchange | None = None
_exchange_lock = threading.Lock()


def process_exchange(ttl_s: float = 60.0) -> LocalKvExchange:
  """The exchange every ``device`` transport of this process shares for the
  same-process path (created on first use)."""
  global _exchange
  with _exchange_lock:
    if _exchange is None:
      _exchange = LocalKvExchange(ttl_s)
    return _exchange


class AutoDeviceSender(KvSender):
  """The ``device`` transport's prefill side: picks the path per hand-off
  (``select_path``) and falls back to ``transfer`` (``DeviceSender``) when a
  fast path is not possible (no landing buffer lent, too small, lease
  ending, the IPC open or copy failed). Built with neither fast path, it is
  the plain ``DeviceSender``."""

  name = "device"

  def __init__(self, transfer: KvSender, *, ipc: CudaIpcSender | None = None,
               local: bool = False, exchange: LocalKvExchange | None = None,
               process_id: str = "", hostname: str | None = None):
    self.transfer = transfer
    self.ipc = ipc
    self.local = LocalSender(exchange or process_exchange()) if local else None
    self.process_id = process_id
    self.hostname = socket.gethostname() if hostname is None else hostname
    self.paths = collections.Counter()   # path -> hand-offs it carried
    self.fallbacks = collections.Counter()  # reason -> hand-offs

  def wants_landing(self, dest: kv_pb2.KvDestination) -> bool:
    """Whether a landing region would let this hand-off take the CUDA IPC
    path: the decode worker is another process on this host, and none is
    lent yet (``pdjax.service.landing`` then asks for one)."""
    if self.ipc is None or dest.ipc_handle or dest.transport not in (
        "device", ""):
      return False
    return _decode_is(dest, my_process_id=self.process_id,
                      my_hostname=self.hostname) == "this host"

  def send(self, kv: RequestKV, dest: kv_pb2.KvDestination, *,
           timeout_s: float) -> kv_pb2.KvHandle:
    path = select_path(dest, my_process_id=self.process_id,
                       my_hostname=self.hostname)
    if path == PATH_LOCAL and self.local is not None:
      self.paths[PATH_LOCAL] += 1
      return self.local.send(kv, dest, timeout_s=timeout_s)
    if path == PATH_CUDA_IPC and self.ipc is not None:
      try:
        handle = self.ipc.send(kv, dest, timeout_s=timeout_s)
        self.paths[PATH_CUDA_IPC] += 1
        return handle
      except TransferError as e:
        # A driver failure is news; a payload larger than the region lent
        # (the decode side's size guess) or a lease ending is routine.
        self.fallbacks[type(e).__name__] += 1
        log.log(logging.WARNING if isinstance(e, CudaError) else logging.INFO,
                "CUDA IPC hand-off of %s not possible, using "
                "jax.experimental.transfer: %s", dest.transfer_id, e)
    self.paths[PATH_TRANSFER] += 1
    return self.transfer.send(kv, dest, timeout_s=timeout_s)

  def release(self, transfer_id: str) -> None:
    if self.local is not None:
      self.local.release(transfer_id)
    self.transfer.release(transfer_id)

  def reap(self) -> int:
    n = self.transfer.reap()
    if self.local is not None:
      n += self.local.reap()
    return n

  def live(self) -> int:
    n = self.transfer.live()
    if self.local is not None:
      n += self.local.live()
    return n

  def address(self) -> str:
    return self.transfer.address()

  def close(self) -> None:
    if self.ipc is not None:
      self.ipc.close()
    self.transfer.close()


class AutoDeviceReceiver(KvReceiver):
  """The ``device`` transport's decode side: lends landing regions when a
  prefill starts (``lend_landing``, asked by ``LendLanding``) when it has a
  pool, and redeems each handle by the path its ``transport`` names. Whatever path a hand-off took, its
  landing region (if any) is returned when it is redeemed or forgotten."""

  name = "device"

  def __init__(self, transfer: KvReceiver, *,
               ipc: CudaIpcReceiver | None = None, local: bool = False,
               exchange: LocalKvExchange | None = None,
               payload_bytes: Callable[[int], int] | None = None):
    """``payload_bytes(prompt_tokens)``: the size of the KV payload a prefill
    worker will send for such a prompt (``landing_payload_bytes``); the
    region lent for it is that large."""
    self.transfer = transfer
    self.ipc = ipc
    self.local = (LocalReceiver(exchange or process_exchange()) if local
                  else None)
    self.payload_bytes = payload_bytes
    self.ipc_disabled: str | None = None   # why lending stopped, if it did

  def _subs(self) -> list[KvReceiver]:
    return [r for r in (self.transfer, self.ipc, self.local) if r is not None]

  def lend_landing(self, transfer_id: str,
                   prompt_tokens: int) -> LandingSlot | None:
    """A landing region for this transfer's KV, or None (no pool, none
    free, or the payload is larger than a buffer). ``TransferDenied`` for
    an id that was not issued here (or was forgotten)."""
    if self.ipc is None or self.payload_bytes is None or self.ipc_disabled:
      return None
    return self.ipc.lend(transfer_id, self.payload_bytes(prompt_tokens))

  def expect(self, transfer_id: str, request_id: str, *,
             max_pages: int | None = None) -> None:
    for r in self._subs():
      r.expect(transfer_id, request_id, max_pages=max_pages)

  def forget(self, transfer_id: str) -> None:
    for r in self._subs():
      r.forget(transfer_id)

  def reap(self) -> int:
    return sum(r.reap() for r in self._subs())

  def live(self) -> int:
    return sum(r.live() for r in (self.transfer, self.ipc) if r is not None)

  def address(self) -> str:
    return self.transfer.address()

  def close(self) -> None:
    for r in self._subs():
      r.close()

  def receive(self, handle: kv_pb2.KvHandle, sharding: NamedSharding, *,
              timeout_s: float) -> RequestKV:
    tid = handle.transfer_id
    path = handle.transport
    try:
      if path == PATH_CUDA_IPC:
        if self.ipc is None:
          raise TransferError("a cuda_ipc handle, but this worker lends no "
                              "landing buffers")
        try:
          return self.ipc.receive(handle, sharding, timeout_s=timeout_s)
        except CudaError as e:
          # The driver or the import failed, not this hand-off's data: stop
          # lending, so later hand-offs take the transfer path instead of
          # failing the same way.
          if not self.ipc_disabled:
            self.ipc_disabled = str(e)
            log.error("CUDA IPC import failed; no more landing buffers are "
                      "lent (hand-offs use jax.experimental.transfer): %s", e)
          raise
      if self.ipc is not None:
        self.ipc.discard(tid)   # lent, but the KV came another way
      if path == PATH_LOCAL:
        if self.local is None:
          raise TransferError("a same-process handle, but this worker's "
                              "same-process path is off")
        return self.local.receive(handle, sharding, timeout_s=timeout_s)
      if path in ("device", ""):
        return self.transfer.receive(handle, sharding, timeout_s=timeout_s)
      raise TransferError(f"handle of transport {path!r} given to the device "
                          "transport")
    finally:
      # Whatever happened, the other paths expect nothing more for this id.
      for r in self._subs():
        r.forget(tid)


# ---------------------------------------------------------------- construction
def landing_payload_bytes(page_bytes: int, page_size: int, *,
                          buckets: tuple[int, ...] | None = None
                          ) -> Callable[[int], int]:
  """``prompt_tokens -> bytes`` of the KV payload a prefill engine sends:
  the smallest bucket that holds the prompt (``bucket // page_size`` pages,
  as ``PrefillEngine._prefill_batch`` makes it), else chunked prefill's
  ``payload_pages``. Exact when ``buckets`` is the prefill pool's; without
  it, the power-of-two page count (right for power-of-two buckets). A wrong
  guess costs only speed: a payload larger than its region takes the
  transfer path."""
  def size(prompt_tokens: int) -> int:
    pages = payload_pages(pages_for(max(prompt_tokens, 1), page_size))
    for b in buckets or ():
      if prompt_tokens <= b:
        pages = b // page_size
        break
    return pages * page_bytes
  return size


def page_bytes_of(geometry) -> int:
  layers, page_size, kv_heads, head_dim, dtype, _ = geometry
  return (layers * 2 * page_size * kv_heads * head_dim
          * jnp.dtype(dtype).itemsize)


def fast_path_on(setting: str) -> bool:
  """``--kv_fast_path``: ``auto`` is on where the backend is a GPU."""
  if setting == "off":
    return False
  if setting != "auto":
    raise ValueError(f"kv_fast_path must be auto or off, got {setting!r}")
  return jax.default_backend() == "gpu"


def _real_driver() -> RealCudaDriver | None:
  try:
    return RealCudaDriver()
  except (CudaError, ImportError, OSError, RuntimeError) as e:
    log.warning("CUDA IPC KV fast path unavailable (%s); same-host hand-offs "
                "use jax.experimental.transfer", e)
    return None


def make_sender(transfer: KvSender, *, fast_path: str = "auto",
                process_id: str = "", hostname: str | None = None,
                driver: CudaDriver | None = None) -> AutoDeviceSender:
  """The ``device`` transport's sender. Fast path off (or no GPU): exactly
  ``transfer``. On: the same-process path, and CUDA IPC when the driver
  loads (``driver`` overrides it, for tests)."""
  if driver is None and not fast_path_on(fast_path):
    return AutoDeviceSender(transfer)
  driver = driver or _real_driver()
  ipc = CudaIpcSender(driver) if driver is not None else None
  return AutoDeviceSender(transfer, ipc=ipc, local=True,
                          process_id=process_id, hostname=hostname)


def make_receiver(transfer: KvReceiver, device, *, geometry,
                  fast_path: str = "auto", landing_buffers: int = 2,
                  landing_bytes: int = 0,
                  prefill_buckets: tuple[int, ...] | None = None,
                  lease_s: float = 60.0,
                  driver: CudaDriver | None = None) -> AutoDeviceReceiver:
  """The ``device`` transport's receiver. ``geometry``: (layers, page_size,
  kv_heads, head_dim, dtype, max_payload_pages) of this worker. With the
  fast path on and ``landing_buffers`` > 0, allocates a landing pool of that
  many buffers of ``landing_bytes`` each on ``device``'s GPU (0: the largest
  payload this worker accepts, so any request fits). A pool that cannot be
  set up is logged and left out: hand-offs then take the transfer path."""
  if driver is None and not fast_path_on(fast_path):
    return AutoDeviceReceiver(transfer)
  ipc = None
  page_bytes = page_bytes_of(geometry)
  if landing_buffers > 0:
    driver = driver or _real_driver()
    if driver is not None:
      size = landing_bytes or page_bytes * geometry[5]
      try:
        pool = LandingPool(driver, device_ordinal(device), landing_buffers,
                           size, lease_s=lease_s)
        ipc = CudaIpcReceiver(pool, device, geometry=geometry)
        log.info("CUDA IPC landing pool: %d x %.1f MiB on GPU %d",
                 landing_buffers, size / 2**20, pool.device)
      except (CudaError, ValueError) as e:
        log.warning("no CUDA IPC landing pool (%s); same-host hand-offs use "
                    "jax.experimental.transfer", e)
  return AutoDeviceReceiver(
      transfer, ipc=ipc, local=True,
      payload_bytes=landing_payload_bytes(page_bytes, geometry[1],
                                          buckets=prefill_buckets))


# The driver seam and the pool are re-exported: this module is the path's
# one entry point.
__all__ = ["IPC_HANDLE_BYTES", "IPC_EVENT_HANDLE_BYTES", "REGION_ALIGN",
           "CudaDriver", "RealCudaDriver", "FakeCudaDriver", "FakeIpcRegistry",
           "CudaError", "LandingPool", "LandingSlot", "CudaIpcSender",
           "CudaIpcReceiver", "AutoDeviceSender", "AutoDeviceReceiver",
           "select_path", "landing_payload_bytes", "make_sender",
           "make_receiver", "process_exchange", "device_ordinal",
           "check_kv_handle", "fast_path_on"]
