"""The ``device`` transport's fast paths: same process, same host (CUDA IPC).

``jax.experimental.transfer`` moves KV through pinned host memory and TCP:
about 7 GB/s between two processes on one host, where NVLink between two
H100s carries about 395 GB/s (a CUDA IPC peer copy, measured). So the ``device``
transport picks the best path per hand-off, by itself:

* same process (``--role=both``): the array is parked in a process-wide
  exchange and ``device_put`` onto the decode replica (the ``local`` path);
* same host, and the decode worker lent a landing buffer: a CUDA IPC copy
  straight into that buffer (the ``cuda_ipc`` path, below);
* otherwise ``jax.experimental.transfer`` (``pdjax.transfer.device``).

Shared KV's pulls of a peer prefill worker's blocks take the same CUDA IPC
path between workers of one host (``pdjax.transfer.block_pulls``).

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

Ownership of a landing region (against the ways memory shared between
processes fails: data overwritten before it was read, memory stranded by
peers that vanished):

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

This module chooses the path and builds the senders and receivers; the
path's two sides are ``pdjax.transfer.ipc_sender`` (``CudaIpcSender``) and
``pdjax.transfer.ipc_receiver`` (``CudaIpcReceiver``). The CUDA driver is
behind a small seam (``pdjax.transfer.cuda_driver``: the real
``cuda.bindings`` driver on GPUs, a fake over host memory on CPU), and the
landing buffers' bookkeeping is ``pdjax.transfer.landing_pool``.
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from pdjax.engine.kv import pages_for, payload_pages
from pdjax.engine.requests import RequestKV
from pdjax.transfer.base import (PATH_CUDA_IPC, PATH_LOCAL, PATH_TRANSFER,
                                 KvReceiver, KvSender, TransferError)
from pdjax.transfer.cuda_driver import (IPC_EVENT_HANDLE_BYTES,
                                        IPC_HANDLE_BYTES, CudaDriver,
                                        CudaError, FakeCudaDriver,
                                        FakeIpcRegistry, RealCudaDriver,
                                        device_ordinal)
from pdjax.transfer.ipc_receiver import CudaIpcReceiver, check_kv_handle
from pdjax.transfer.ipc_sender import CudaIpcSender
from pdjax.transfer.landing_pool import (REGION_ALIGN, LandingPool,
                                         LandingSlot)
from pdjax.transfer.local import (LocalKvExchange, LocalReceiver,
                                  LocalSender)
from pdjax.v1 import kv_pb2

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- path choice
def _host_of(process_id: str) -> str:
  """The hostname in ``pdjax.service.common.PROCESS_ID`` (host:pid:nonce)."""
  parts = process_id.rsplit(":", 2)
  return parts[0] if len(parts) == 3 else ""


def locate(process_id: str, hostname: str, *, my_process_id: str,
           my_hostname: str) -> str:
  """Where the process ``process_id`` (on ``hostname``; empty: the host in
  its id) runs from here: ``"this process"``, ``"this host"`` or
  ``"elsewhere"`` (also when nothing says). A hand-off's sender asks it of
  its decode worker, a peer asked for blocks of the worker asking."""
  if process_id and process_id == my_process_id:
    return "this process"
  host = hostname or _host_of(process_id)
  if host and my_hostname and host == my_hostname:
    return "this host"
  return "elsewhere"


def _decode_is(dest: kv_pb2.KvDestination, *, my_process_id: str,
               my_hostname: str) -> str:
  """Where ``dest``'s decode worker runs from here (``locate``)."""
  return locate(dest.decode_process_id, dest.decode_hostname,
                my_process_id=my_process_id, my_hostname=my_hostname)


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

  @property
  def writes_landing(self) -> bool:
    return self.ipc is not None

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


def real_driver() -> RealCudaDriver | None:
  """The CUDA driver, or None (logged) where it does not load: then every
  same-host move (hand-offs, peers' block pulls) takes
  jax.experimental.transfer."""
  try:
    return RealCudaDriver()
  except (CudaError, ImportError, OSError, RuntimeError) as e:
    log.warning("CUDA IPC KV fast path unavailable (%s); same-host hand-offs "
                "and block pulls use jax.experimental.transfer", e)
    return None


def make_sender(transfer: KvSender, *, fast_path: str = "auto",
                process_id: str = "", hostname: str | None = None,
                driver: CudaDriver | None = None) -> AutoDeviceSender:
  """The ``device`` transport's sender. Fast path off (or no GPU): exactly
  ``transfer``. On: the same-process path, and CUDA IPC when the driver
  loads (``driver`` overrides it, for tests)."""
  if driver is None and not fast_path_on(fast_path):
    return AutoDeviceSender(transfer)
  driver = driver or real_driver()
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
    driver = driver or real_driver()
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
           "check_kv_handle", "fast_path_on", "locate", "real_driver"]
