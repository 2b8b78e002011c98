"""The CUDA driver calls the same-host KV path makes, behind one seam.

``RealCudaDriver`` calls ``cuda.bindings.driver`` (imported lazily: CPU
deployments and CI never need it); ``FakeCudaDriver`` stands in on CPU: its
"device memory" is host memory and its copies move real bytes, bounds-
checked against the destination allocation, so what lands can be checked
byte for byte and an offset bug fails loudly. With ``deferred=True`` its
copies also run late, as a GPU's do (only when something waits for them), so
a reader that skips the wait reads stale bytes and its test fails. The path
itself, and the ownership rules of the memory it lends, are in
``pdjax.transfer.cuda_ipc``.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import math
import secrets
import threading
from typing import Protocol

import jax
import numpy as np

from pdjax.transfer import foreign_memory
from pdjax.transfer.base import TransferError

log = logging.getLogger(__name__)

IPC_HANDLE_BYTES = 64        # sizeof(CUipcMemHandle)
IPC_EVENT_HANDLE_BYTES = 64  # sizeof(CUipcEventHandle)


class CudaError(TransferError):
  """A CUDA driver call failed, or CUDA IPC is unavailable here."""


def release_quietly(what: str, call, *args) -> None:
  """A driver call that gives something back (frees a buffer, unmaps a
  peer's, destroys an event): its failure is logged, not raised, since the
  caller is letting go either way (closing, evicting a cache entry)."""
  try:
    call(*args)
  except CudaError as e:
    log.warning("%s failed: %s", what, e)


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

  # Interprocess events: the sender records one after a hand-off's copies
  # on its copy stream, and the receiver waits on it, instead of the sender
  # waiting for the copies before it may say they are there.
  def event_create_ipc(self, ordinal: int) -> tuple[object, bytes]:
    """A new interprocess event, and its handle for other processes."""
    ...

  def event_record(self, ordinal: int, event) -> None:
    """Records ``event`` on the copy stream: it completes once every copy
    issued before has."""
    ...

  def event_open(self, ordinal: int, handle: bytes) -> object: ...
  def event_synchronize(self, ordinal: int, event) -> None: ...
  def event_query(self, ordinal: int, event) -> bool: ...
  def event_destroy(self, ordinal: int, event) -> None: ...

  def view(self, ordinal: int, ptr: int, shape: tuple[int, ...], dtype,
           device) -> jax.Array:
    """The memory at ``ptr`` as a ``shape`` / ``dtype`` array on ``device``,
    without a copy: it must stay unchanged until nothing reads the array
    (8-bit floats come as their bytes: ``foreign_memory.retype``)."""
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

  def _handle(self, kind, nbytes: int, handle: bytes, what: str):
    """A peer's exported handle bytes as the driver's handle struct."""
    if len(handle) != nbytes:
      raise CudaError(f"an IPC {what} handle has {nbytes} bytes, got "
                      f"{len(handle)}")
    h = kind()
    h.reserved = bytes(handle)
    return h

  def ipc_open(self, ordinal: int, handle: bytes) -> int:
    h = self._handle(self._cu.CUipcMemHandle, IPC_HANDLE_BYTES, handle,
                     "memory")
    self.activate(ordinal)
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

  def event_create_ipc(self, ordinal: int) -> tuple[object, bytes]:
    self.activate(ordinal)
    cu = self._cu
    flags = (cu.CUevent_flags.CU_EVENT_DISABLE_TIMING
             | cu.CUevent_flags.CU_EVENT_INTERPROCESS)
    event = self._check(cu.cuEventCreate(int(flags)), "cuEventCreate")
    try:
      h = self._check(cu.cuIpcGetEventHandle(event), "cuIpcGetEventHandle")
    except CudaError:
      cu.cuEventDestroy(event)
      raise
    return event, bytes(h.reserved)

  def event_record(self, ordinal: int, event) -> None:
    self.activate(ordinal)
    self._check(self._cu.cuEventRecord(event, self._stream(ordinal)),
                "cuEventRecord")

  def event_open(self, ordinal: int, handle: bytes) -> object:
    h = self._handle(self._cu.CUipcEventHandle, IPC_EVENT_HANDLE_BYTES,
                     handle, "event")
    self.activate(ordinal)
    return self._check(self._cu.cuIpcOpenEventHandle(h),
                       "cuIpcOpenEventHandle")

  def event_synchronize(self, ordinal: int, event) -> None:
    self.activate(ordinal)
    self._check(self._cu.cuEventSynchronize(event), "cuEventSynchronize")

  def event_query(self, ordinal: int, event) -> bool:
    self.activate(ordinal)
    result = self._cu.cuEventQuery(event)
    err = result[0] if isinstance(result, tuple) else result
    if err == self._cu.CUresult.CUDA_ERROR_NOT_READY:
      return False
    self._check(result, "cuEventQuery")
    return True

  def event_destroy(self, ordinal: int, event) -> None:
    self.activate(ordinal)
    self._check(self._cu.cuEventDestroy(event), "cuEventDestroy")

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
    self.events: dict[bytes, _FakeEvent] = {}        # handle -> event
    self.events_opened: collections.Counter = collections.Counter()
    self.copies = 0           # copies that have run (not merely issued)
    self.bytes_copied = 0

  def find(self, ptr: int, nbytes: int) -> tuple[int, int] | None:
    """(base, size) of the allocation holding [ptr, ptr + nbytes)."""
    with self.lock:
      for base, (_, size) in self.allocations.items():
        if base <= ptr and ptr + nbytes <= base + size:
          return base, size
    return None


class _FakeEvent:
  """An interprocess event of the fake driver. A driver that opens its
  handle gets this same object, as an opened CUevent is the same event.
  ``recorded``: the driver whose copy queue it was last recorded on, and
  how many copies that driver had issued then (one tuple, so a reader on
  another thread never sees half a record)."""

  def __init__(self, handle: bytes):
    self.handle = handle
    self.recorded: tuple[FakeCudaDriver, int] | None = None
    self.destroyed = False


class FakeCudaDriver:
  """A CUDA driver for CPU tests. "Device memory" is host memory; pointers
  are real host addresses (a JAX CPU array's ``unsafe_buffer_pointer`` can be
  the source of a copy); copies move real bytes and are bounds-checked
  against the destination allocation, so an offset or size bug fails loudly
  instead of corrupting memory.

  ``deferred``: a copy is only queued when issued (bounds checked then), and
  the queue runs, in order, when something waits for it: ``synchronize``,
  or ``event_synchronize`` on an event recorded after the copies (by any
  driver that opened it: events are shared through the registry as memory
  handles are). ``event_query`` runs nothing; it says whether the copies
  before the record have run. So a reader that does not wait reads what
  was there before, deterministically, where a GPU would race. One queue
  stands for the streams of all devices. Off, copies run when issued.

  ``fail_open``: every ``ipc_open`` fails (a peer on another host, a stale
  handle). ``ipc_open`` and ``event_open`` refuse a handle this same driver
  exported, as CUDA refuses to open a handle in the process that made it.
  """

  kind = "fake"

  def __init__(self, registry: FakeIpcRegistry | None = None, *,
               fail_open: bool = False, deferred: bool = False):
    self.registry = registry or FakeIpcRegistry()
    self.fail_open = fail_open
    self.deferred = deferred
    self._exported: set[bytes] = set()
    self.open_handles: dict[int, bytes] = {}
    self.open_events: collections.Counter = collections.Counter()
    self.activated: set[int] = set()
    self.syncs = 0
    self._copy_lock = threading.Lock()
    self._queued: collections.deque[tuple[int, int, int]] = (
        collections.deque())
    self.copies_issued = 0
    self.copies_done = 0

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

  def _open_peer(self, handle: bytes, table: dict, opened, call: str):
    """What a handle another driver of the registry exported names in
    ``table``, counted open, refused as CUDA refuses it: a handle of this
    same process, or one unknown (never exported, freed, destroyed)."""
    if handle in self._exported:
      raise CudaError(f"{call} failed: CUDA_ERROR_INVALID_CONTEXT (handle "
                      "of this process)")
    with self.registry.lock:
      found = table.get(handle)
      if found is None:
        raise CudaError(f"{call} failed: CUDA_ERROR_INVALID_VALUE (unknown, "
                        "freed or destroyed)")
      opened[handle] += 1
    return found

  def ipc_open(self, ordinal: int, handle: bytes) -> int:
    self.activate(ordinal)
    handle = bytes(handle)
    if self.fail_open:
      raise CudaError("cuIpcOpenMemHandle failed: CUDA_ERROR_INVALID_VALUE")
    ptr = self._open_peer(handle, self.registry.handles, self.registry.opened,
                          "cuIpcOpenMemHandle")
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
    with self._copy_lock:
      self._queued.append((dst, src, nbytes))
      self.copies_issued += 1
      issued = self.copies_issued
    if not self.deferred:
      self._run_until(issued)

  def _run_until(self, issued: int | None = None) -> None:
    """Runs the queued copies, in order, until ``issued`` copies (all when
    None) have run."""
    with self._copy_lock:
      n = self.copies_issued if issued is None else issued
      while self.copies_done < n:
        dst, src, nbytes = self._queued.popleft()
        ctypes.memmove(dst, src, nbytes)
        self.copies_done += 1
        with self.registry.lock:
          self.registry.copies += 1
          self.registry.bytes_copied += nbytes

  def synchronize(self, ordinal: int) -> None:
    self.syncs += 1
    self._run_until()

  def event_create_ipc(self, ordinal: int) -> tuple[_FakeEvent, bytes]:
    self.activate(ordinal)
    handle = secrets.token_bytes(IPC_EVENT_HANDLE_BYTES)
    event = _FakeEvent(handle)
    with self.registry.lock:
      self.registry.events[handle] = event
    self._exported.add(handle)
    return event, handle

  @staticmethod
  def _live(event: _FakeEvent, what: str) -> None:
    if event.destroyed:
      raise CudaError(f"{what} failed: CUDA_ERROR_INVALID_HANDLE (the event "
                      "was destroyed by the process that made it)")

  def event_record(self, ordinal: int, event: _FakeEvent) -> None:
    self.activate(ordinal)
    self._live(event, "cuEventRecord")
    with self._copy_lock:
      event.recorded = (self, self.copies_issued)

  def event_open(self, ordinal: int, handle: bytes) -> _FakeEvent:
    self.activate(ordinal)
    handle = bytes(handle)
    event = self._open_peer(handle, self.registry.events,
                            self.registry.events_opened,
                            "cuIpcOpenEventHandle")
    self.open_events[handle] += 1
    return event

  def event_synchronize(self, ordinal: int, event: _FakeEvent) -> None:
    self._live(event, "cuEventSynchronize")
    recorded = event.recorded
    if recorded is not None:
      recorder, issued = recorded
      recorder._run_until(issued)  # pylint: disable=protected-access

  def event_query(self, ordinal: int, event: _FakeEvent) -> bool:
    self._live(event, "cuEventQuery")
    recorded = event.recorded
    return recorded is None or recorded[0].copies_done >= recorded[1]

  def event_destroy(self, ordinal: int, event: _FakeEvent) -> None:
    if event.handle in self._exported:
      with self.registry.lock:
        self.registry.events.pop(event.handle, None)
      event.destroyed = True
      return
    if not self.open_events[event.handle]:
      raise CudaError("cuEventDestroy: CUDA_ERROR_INVALID_HANDLE (not an "
                      "event of this process)")
    self.open_events[event.handle] -= 1
    with self.registry.lock:
      self.registry.events_opened[event.handle] -= 1

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


__all__ = ["IPC_HANDLE_BYTES", "IPC_EVENT_HANDLE_BYTES", "CudaError",
           "release_quietly",
           "CudaDriver", "RealCudaDriver", "FakeIpcRegistry", "FakeCudaDriver",
           "device_ordinal"]
