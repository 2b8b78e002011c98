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
``pdjax.service.landing.LandingRequests``). The prefill worker opens the handle (once per
buffer, cached), and ``cuMemcpyDtoD``s its single-device KV into the region
(``CudaIpcSender``): layer group by layer group when the prefill runs its
layers as several programs, each group as soon as it is computed, so the
copy runs under the rest of the prefill. The decode worker makes the region a JAX array
without a copy (a DLPack view, ``pdjax.transfer.foreign_memory``) in the
replica's layout (``CudaIpcReceiver``); the decode engine's insert program
reads it straight into the page pools, and the region goes back to the pool
once that program has completed (``RequestKV.release``,
``pdjax.engine.borrowed_kv``). The one device-local copy of the hand-off is
the insert every path has; an earlier version copied the region out first,
which held the hand-off to 62% of the link.

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
  completed (the sender finished before its handle existed);
* released unread (cancel, Unreserve, reservation expiry, failed Decode):
  the region stays out of use until its lease has ended (+ ``grace_s``),
  because a slow sender may still be writing into it; an unread lease that
  simply runs out is reclaimed by ``reap`` the same way;
* a release that arrives while the region is being read (imported, then
  inserted) is deferred to the end of the read: a region is never reused
  while read.

The CUDA driver is behind a small seam (``CudaDriver``): ``RealCudaDriver``
(``cuda.bindings.driver``, imported lazily) on GPUs, ``FakeCudaDriver`` on
CPU, whose "device memory" is host memory and whose copies move real bytes,
so what lands can be checked byte for byte in tests.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import functools
import logging
import math
import secrets
import socket
import threading
import time
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, SingleDeviceSharding

from pdjax.engine.kv import pages_for, payload_pages, reshard_kv
from pdjax.engine.requests import RequestKV
from pdjax.transfer import base as transfer_base
from pdjax.transfer import foreign_memory
from pdjax.transfer.base import (KvReceiver, KvSender, TransferError,
                                 TransferTimeout, handle_for)
from pdjax.transfer.local import (LocalKvExchange, LocalReceiver,
                                  LocalSender)
from pdjax.v1 import kv_pb2

log = logging.getLogger(__name__)

IPC_HANDLE_BYTES = 64        # sizeof(CUipcMemHandle)
REGION_ALIGN = 4096          # landing regions start on this boundary
PATH_LOCAL, PATH_CUDA_IPC, PATH_TRANSFER = "local", "cuda_ipc", "transfer"

class CudaError(TransferError):
  """A CUDA driver call failed, or CUDA IPC is unavailable here."""


# --------------------------------------------------------------------- driver
class CudaDriver(Protocol):
  """The few driver calls the IPC path makes. Every call names the CUDA
  ordinal it works on and makes that device's context current on the calling
  thread first: contexts are per thread, and senders run on a thread pool."""

  kind: str   # "cuda" | "fake"

  def activate(self, ordinal: int) -> None: ...
  def mem_alloc(self, ordinal: int, nbytes: int) -> int: ...
  def mem_free(self, ordinal: int, ptr: int) -> None: ...
  def ipc_get_handle(self, ordinal: int, ptr: int) -> bytes: ...
  def ipc_open(self, ordinal: int, handle: bytes) -> int: ...
  def ipc_close(self, ordinal: int, ptr: int) -> None: ...
  def memcpy_dtod(self, ordinal: int, dst: int, src: int,
                  nbytes: int) -> None: ...
  def synchronize(self, ordinal: int) -> None: ...

  def view(self, ordinal: int, ptr: int, shape: tuple[int, ...], dtype,
           device) -> jax.Array:
    """The memory at ``ptr`` as a ``shape`` / ``dtype`` array on ``device``,
    without a copy: it must stay unchanged until nothing reads the array."""
    ...


def _import_cuda_driver():
  try:
    from cuda.bindings import driver as cu  # cuda-bindings >= 12.6
  except ImportError:
    try:
      from cuda import cuda as cu  # older cuda-python layout
    except ImportError as e:
      raise CudaError("CUDA IPC needs the cuda-bindings package (pip "
                      "install 'pdjax[cuda-ipc]')") from e
  return cu


class RealCudaDriver:
  """``cuda.bindings.driver``, with every return code checked.

  Uses each device's primary context (the one XLA uses too, so pointers of
  JAX arrays are valid in it) and one non-blocking stream per device for the
  copies: a copy waits for nothing but itself, not for XLA's streams (a
  ``cuCtxSynchronize`` would wait for the prefill worker's next batch).
  """

  kind = "cuda"

  def __init__(self):
    self._cu = _import_cuda_driver()
    self._check(self._cu.cuInit(0), "cuInit")
    self._lock = threading.Lock()
    self._ctxs: dict[int, object] = {}
    self._streams: dict[int, object] = {}

  def _check(self, result, what: str):
    cu = self._cu
    err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (
        result, ())
    if err != cu.CUresult.CUDA_SUCCESS:
      try:
        name = cu.cuGetErrorName(err)[1].decode()
      except Exception:  # noqa: BLE001 - the message is best effort
        name = str(err)
      raise CudaError(f"{what} failed: {name} "
                      f"({getattr(err, 'value', err)})")
    if not rest:
      return None
    return rest[0] if len(rest) == 1 else rest

  def device_count(self) -> int:
    return int(self._check(self._cu.cuDeviceGetCount(), "cuDeviceGetCount"))

  def activate(self, ordinal: int) -> None:
    cu = self._cu
    with self._lock:
      ctx = self._ctxs.get(ordinal)
      if ctx is None:
        dev = self._check(cu.cuDeviceGet(ordinal), f"cuDeviceGet({ordinal})")
        ctx = self._check(cu.cuDevicePrimaryCtxRetain(dev),
                          f"cuDevicePrimaryCtxRetain({ordinal})")
        self._ctxs[ordinal] = ctx
    self._check(cu.cuCtxSetCurrent(ctx), f"cuCtxSetCurrent({ordinal})")

  def _stream(self, ordinal: int):
    with self._lock:
      stream = self._streams.get(ordinal)
      if stream is None:
        stream = self._check(
            self._cu.cuStreamCreate(
                self._cu.CUstream_flags.CU_STREAM_NON_BLOCKING),
            "cuStreamCreate")
        self._streams[ordinal] = stream
      return stream

  def mem_alloc(self, ordinal: int, nbytes: int) -> int:
    self.activate(ordinal)
    return int(self._check(self._cu.cuMemAlloc(nbytes),
                           f"cuMemAlloc({nbytes}) on GPU {ordinal}"))

  def mem_free(self, ordinal: int, ptr: int) -> None:
    self.activate(ordinal)
    self._check(self._cu.cuMemFree(ptr), "cuMemFree")

  def ipc_get_handle(self, ordinal: int, ptr: int) -> bytes:
    self.activate(ordinal)
    h = self._check(self._cu.cuIpcGetMemHandle(ptr), "cuIpcGetMemHandle")
    return bytes(h.reserved)

  def ipc_open(self, ordinal: int, handle: bytes) -> int:
    if len(handle) != IPC_HANDLE_BYTES:
      raise CudaError(f"an IPC handle has {IPC_HANDLE_BYTES} bytes, got "
                      f"{len(handle)}")
    self.activate(ordinal)
    h = self._cu.CUipcMemHandle()
    h.reserved = bytes(handle)
    return int(self._check(
        self._cu.cuIpcOpenMemHandle(
            h, self._cu.CUipcMem_flags.CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS),
        "cuIpcOpenMemHandle"))

  def ipc_close(self, ordinal: int, ptr: int) -> None:
    self.activate(ordinal)
    self._check(self._cu.cuIpcCloseMemHandle(ptr), "cuIpcCloseMemHandle")

  def memcpy_dtod(self, ordinal: int, dst: int, src: int,
                  nbytes: int) -> None:
    self.activate(ordinal)
    self._check(self._cu.cuMemcpyDtoDAsync(dst, src, nbytes,
                                           self._stream(ordinal)),
                "cuMemcpyDtoDAsync")

  def synchronize(self, ordinal: int) -> None:
    self.activate(ordinal)
    self._check(self._cu.cuStreamSynchronize(self._stream(ordinal)),
                "cuStreamSynchronize")

  def view(self, ordinal: int, ptr: int, shape: tuple[int, ...], dtype,
           device) -> jax.Array:
    self.activate(ordinal)
    try:
      return foreign_memory.view(ptr, shape, dtype, device)
    except (TypeError, ValueError, BufferError, RuntimeError) as e:
      raise CudaError(f"importing a landing buffer into JAX failed: {e}") \
          from e


class FakeIpcRegistry:
  """What the fake drivers of one test share, as the host's CUDA driver is
  shared by two processes: allocations, and the handles exported for them."""

  def __init__(self):
    self.lock = threading.Lock()
    # base address -> (memory, size). Bases are 256-byte aligned, as
    # cuMemAlloc's are (JAX views host memory only at 64-byte alignment).
    self.allocations: dict[int, tuple[ctypes.Array, int]] = {}
    self.handles: dict[bytes, int] = {}              # handle -> base address
    # Freed memory is kept, never returned to the host allocator: a stale
    # view (a lifecycle bug) then reads stale bytes, and a test catches it,
    # instead of reading freed memory.
    self.freed: list[ctypes.Array] = []
    self.opened: collections.Counter = collections.Counter()
    self.copies = 0
    self.bytes_copied = 0

  def find(self, ptr: int, nbytes: int) -> tuple[int, int] | None:
    """(base, size) of the allocation holding [ptr, ptr + nbytes)."""
    with self.lock:
      for base, (_, size) in self.allocations.items():
        if base <= ptr and ptr + nbytes <= base + size:
          return base, size
    return None


class FakeCudaDriver:
  """A CUDA driver for CPU tests. "Device memory" is host memory; pointers
  are real host addresses (a JAX CPU array's ``unsafe_buffer_pointer`` can be
  the source of a copy); copies move real bytes and are bounds-checked
  against the destination allocation, so an offset or size bug fails loudly
  instead of corrupting memory.

  ``fail_open``: every ``ipc_open`` fails (a peer on another host, a stale
  handle). ``ipc_open`` refuses a handle this same driver exported, as CUDA
  refuses to open a handle in the process that made it.
  """

  kind = "fake"

  def __init__(self, registry: FakeIpcRegistry | None = None, *,
               fail_open: bool = False):
    self.registry = registry or FakeIpcRegistry()
    self.fail_open = fail_open
    self._exported: set[bytes] = set()
    self.open_handles: dict[int, bytes] = {}
    self.activated: set[int] = set()
    self.syncs = 0

  def activate(self, ordinal: int) -> None:
    self.activated.add(ordinal)

  def mem_alloc(self, ordinal: int, nbytes: int) -> int:
    self.activate(ordinal)
    buf = (ctypes.c_char * (nbytes + 256))()
    ptr = -(-ctypes.addressof(buf) // 256) * 256
    with self.registry.lock:
      self.registry.allocations[ptr] = (buf, nbytes)
    return ptr

  def mem_free(self, ordinal: int, ptr: int) -> None:
    with self.registry.lock:
      freed = self.registry.allocations.pop(ptr, None)
      if freed is None:
        raise CudaError(f"cuMemFree of {ptr:#x}: not allocated (double "
                        "free?)")
      self.registry.freed.append(freed[0])
      for h in [h for h, p in self.registry.handles.items() if p == ptr]:
        del self.registry.handles[h]

  def ipc_get_handle(self, ordinal: int, ptr: int) -> bytes:
    with self.registry.lock:
      if ptr not in self.registry.allocations:
        raise CudaError("cuIpcGetMemHandle: CUDA_ERROR_INVALID_VALUE (not a "
                        "cuMemAlloc base address)")
      handle = secrets.token_bytes(IPC_HANDLE_BYTES)
      self.registry.handles[handle] = ptr
    self._exported.add(handle)
    return handle

  def ipc_open(self, ordinal: int, handle: bytes) -> int:
    self.activate(ordinal)
    handle = bytes(handle)
    if self.fail_open:
      raise CudaError("cuIpcOpenMemHandle failed: CUDA_ERROR_INVALID_VALUE")
    if handle in self._exported:
      raise CudaError("cuIpcOpenMemHandle failed: CUDA_ERROR_INVALID_CONTEXT"
                      " (handle of this process)")
    with self.registry.lock:
      ptr = self.registry.handles.get(handle)
      if ptr is None:
        raise CudaError("cuIpcOpenMemHandle failed: CUDA_ERROR_INVALID_VALUE"
                        " (unknown or freed handle)")
      self.registry.opened[handle] += 1
    self.open_handles[ptr] = handle
    return ptr

  def ipc_close(self, ordinal: int, ptr: int) -> None:
    handle = self.open_handles.pop(ptr, None)
    if handle is None:
      raise CudaError(f"cuIpcCloseMemHandle of {ptr:#x}: not open")
    with self.registry.lock:
      self.registry.opened[handle] -= 1

  def memcpy_dtod(self, ordinal: int, dst: int, src: int,
                  nbytes: int) -> None:
    self.activate(ordinal)
    if self.registry.find(dst, nbytes) is None:
      raise CudaError(f"cuMemcpyDtoD: destination [{dst:#x}, +{nbytes}) is "
                      "outside every allocation (CUDA_ERROR_INVALID_VALUE)")
    ctypes.memmove(dst, src, nbytes)
    with self.registry.lock:
      self.registry.copies += 1
      self.registry.bytes_copied += nbytes

  def synchronize(self, ordinal: int) -> None:
    self.syncs += 1

  def view(self, ordinal: int, ptr: int, shape: tuple[int, ...], dtype,
           device) -> jax.Array:
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if self.registry.find(ptr, nbytes) is None:
      raise CudaError(f"read of [{ptr:#x}, +{nbytes}) outside every "
                      "allocation")
    try:   # a real zero-copy view of the host memory (JAX's CPU backend)
      return foreign_memory.view(ptr, shape, dtype, device)
    except (TypeError, ValueError, BufferError, RuntimeError) as e:
      raise CudaError(f"importing a landing buffer into JAX failed: {e}") \
          from e


def device_ordinal(device) -> int:
  """The CUDA ordinal of a JAX device in this process (what the driver and
  CuPy call it; ``CUDA_VISIBLE_DEVICES``-relative, as JAX's is)."""
  hw = getattr(device, "local_hardware_id", None)
  return int(device.id if hw is None else hw)


# ---------------------------------------------------------------- landing pool
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
  in regions to one transfer each (module docstring: the ownership rules).

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
    has been read (inserted into the decode pools), and the sender finished
    before its handle existed, so no write can still be coming: the region
    is free now. A read
    that failed (a malformed or premature handle) cannot vouch for the
    sender, so the region then waits for its lease to end, as an unread
    release does. A ``release`` during the read was deferred to here."""
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
      try:
        self.driver.mem_free(self.device, ptr)
      except CudaError as e:
        log.warning("freeing a landing buffer failed: %s", e)


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


class CudaIpcSender(KvSender):
  """Prefill side of the ``cuda_ipc`` path: device-to-device copies into the
  landing region the decode worker lent. Nothing is held afterwards, so
  ``release`` has nothing to do.

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
  """

  name = PATH_CUDA_IPC

  def __init__(self, driver: CudaDriver, *, deadline_margin_s: float = 1.0,
               clock: Callable[[], float] = time.time,
               max_open_handles: int = 64):
    self.driver = driver
    self.deadline_margin_s = deadline_margin_s
    self._clock = clock
    self.max_open_handles = max_open_handles
    self._open: collections.OrderedDict[tuple[int, bytes], int] = (
        collections.OrderedDict())
    self._lock = threading.Lock()
    self.sent = 0
    self.bytes_sent = 0
    self.copies = 0

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
    while len(self._open) > self.max_open_handles:
      (old_ord, _), old = self._open.popitem(last=False)
      try:
        self.driver.ipc_close(old_ord, old)
      except CudaError as e:
        log.warning("closing a peer's landing buffer failed: %s", e)
    return ptr

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
    sources, offset, ordinal = [], dest.ipc_offset, None
    try:
      for piece in kv.pieces:
        arr = _single_device(piece)
        arr.block_until_ready()     # this group's program has finished
        (dev,) = arr.devices()
        if ordinal is None:
          ordinal = device_ordinal(dev)
        src = arr.addressable_data(0).unsafe_buffer_pointer()
        with self._lock:
          base = self.remote_pointer(ordinal, dest.ipc_handle)
          self._check_lease(dest)   # a group or the open may have been slow
          self.driver.memcpy_dtod(ordinal, base + offset, src, arr.nbytes)
          self.copies += 1
        sources.append(arr)         # must live until its copy has run
        offset += arr.nbytes
    finally:
      if ordinal is not None:       # nothing may still be writing on failure
        self.driver.synchronize(ordinal)
    del sources
    self.sent += 1
    self.bytes_sent += nbytes
    handle = handle_for(kv, self.name, dest.transfer_id)
    handle.shards = 1
    return handle

  def close(self) -> None:
    with self._lock:
      while self._open:
        (ordinal, _), ptr = self._open.popitem()
        try:
          self.driver.ipc_close(ordinal, ptr)
        except CudaError as e:
          log.warning("closing a peer's landing buffer failed: %s", e)


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
  when the prefill starts) and imports what the sender copied into them."""

  name = PATH_CUDA_IPC

  def __init__(self, pool: LandingPool, device, *, geometry=None):
    """``device``: the JAX device of the pool's GPU (where the KV is
    imported before it is resharded onto the replica)."""
    self.pool = pool
    self.device = device
    self.geometry = geometry
    self._issued = transfer_base.IssuedTransfers()

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
    self.pool.close()

  def receive(self, handle: kv_pb2.KvHandle, sharding: NamedSharding, *,
              timeout_s: float) -> RequestKV:
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
      # A view, not a copy: the region stays being read until the consumer
      # has inserted it (RequestKV.release -> end_read frees it).
      arr = self.pool.driver.view(slot.device, slot.ptr, shape, dtype,
                                  self.device)
      # end_read is idempotent (a second call finds no region under this
      # unique id), so a resharded copy of the RequestKV may release too.
      kv = RequestKV(arr, handle.num_tokens, handle.first_page,
                     release_fn=functools.partial(self.pool.end_read, tid,
                                                  ok=True))
      return reshard_kv(kv, sharding)
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
  """The ``device`` transport's decode side: lends landing regions at
  Reserve (``lend_landing``) when it has a pool, and redeems each handle by
  the path its ``transport`` names. Whatever path a hand-off took, its
  landing region (if any) is returned when it is redeemed or forgotten."""

  name = "device"

  def __init__(self, transfer: KvReceiver, *,
               ipc: CudaIpcReceiver | None = None, local: bool = False,
               exchange: LocalKvExchange | None = None,
               payload_bytes: Callable[[int], int] | None = None):
    """``payload_bytes(prompt_tokens)``: the size of the KV payload a prefill
    worker will send for such a prompt (``landing_payload_bytes``); the
    region lent at Reserve is that large."""
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


__all__ = ["CudaDriver", "RealCudaDriver", "FakeCudaDriver", "FakeIpcRegistry",
           "CudaError", "LandingPool", "LandingSlot", "CudaIpcSender",
           "CudaIpcReceiver", "AutoDeviceSender", "AutoDeviceReceiver",
           "select_path", "landing_payload_bytes", "make_sender",
           "make_receiver", "process_exchange", "device_ordinal",
           "check_kv_handle", "fast_path_on"]
