"""Shared KV's device pulls (``PullBlocks``, ``pdjax.service.kvstore``): how
a prefill worker gets a run of prefix blocks from a peer prefill worker
device to device, by the best path the two have.

* Same host, another process, and the CUDA IPC fast path on
  (``cuda_ipc.fast_path_on``, as for KV hand-offs): the worker asking lends
  a region of its landing pool (``LandingPool``: a buffer allocated with
  ``cuMemAlloc`` and exported once), sized for the blocks it asks for, and
  sends the region's IPC handle, offset, size and lease, with its process
  id and host, in the request (``BlockLanding``). The peer copies the run it
  holds, stacked on its device, into the region (``CudaIpcSender.write``)
  and answers with the handle of the interprocess event it recorded after
  the copies. The worker waits on the event, views the region as the
  blocks' array (an FP8 KV's bytes retyped, as a hand-off's:
  ``foreign_memory``), copies that into memory JAX owns and gives the
  region back; the copy is then used as a transfer-pulled array is
  (``HostTierLink.promote_block``).
* Anything else: ``jax.experimental.transfer`` (``pdjax.transfer.device
  .BlockPulls``): the peer offers the run, the worker pulls it.

The peer decides, by the test a hand-off's sender makes of its decode
worker (``cuda_ipc.locate``: process ids and hosts): it copies only for a
worker on its host in another process, and only where it can (a driver,
the handle opens, the run fits the region, the lease is not ending);
otherwise it offers the run for a transfer pull, so a problem on its side
of the fast path costs speed, never the blocks. Its answer names the path
(``transport``) and its own process and host: a worker does not lend again
to a peer it learns runs elsewhere. Where this worker's side fails (the
event's wait, the view: the driver), it stops lending and raises
``CudaError``, and ``GrpcBlockSource.pull`` asks again, by the transfer
path.

A lent region has one owner, the pull it was lent to (``PullLanding``, a
context manager), and goes back to the pool when that pull ends, however
it ends (the pool's rules: ``pdjax.transfer.landing_pool``):

* read (the copies waited for, the bytes copied out): free at once;
* not written (the peer answered by another path, or held none of the
  blocks): free at once;
* anything else (no answer: the peer down, the deadline passed, the call
  cancelled; a read that failed): out of use until its lease ends, since
  the peer may still be copying into it. The lease is the fetch's timeout
  and a margin, so such a region is back within seconds.

An ``AutoBlockPulls`` owns its landing pool, the events it opened and the
peers' buffers its writer opened; ``close`` gives them all back.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import socket
import threading

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.transfer import foreign_memory
from pdjax.transfer.base import (PATH_CUDA_IPC, PATH_TRANSFER, TransferError,
                                 TransferTimeout)
from pdjax.transfer.cuda_driver import CudaDriver, CudaError, device_ordinal
from pdjax.transfer.cuda_ipc import fast_path_on, locate, real_driver
from pdjax.transfer.device import BlockPulls
from pdjax.transfer.ipc_receiver import IpcEvents
from pdjax.transfer.ipc_sender import CudaIpcSender
from pdjax.transfer.landing_pool import LandingPool, LandingSlot
from pdjax.v1 import blockstore_pb2

log = logging.getLogger(__name__)

# Senders' events kept open (one per peer device that copies here).
MAX_EVENTS = 64


class PullLanding:
  """The landing region lent to one pull (``AutoBlockPulls.lend``; none
  where the pull cannot take CUDA IPC), given back as the ``with`` it is
  used in ends: free at once when it was read or the peer did not write
  it, else once its lease ends (module doc)."""

  def __init__(self, peer: str, pool: LandingPool | None = None,
               slot: LandingSlot | None = None,
               landing: blockstore_pb2.BlockLanding | None = None):
    self.peer = peer
    self.pool = pool
    self.slot = slot
    # What the request carries (None: nothing lent).
    self.landing = landing
    self.unwritten = False   # the peer answered without writing

  def __enter__(self) -> PullLanding:
    return self

  def __exit__(self, *exc) -> bool:
    if self.slot is not None:
      # A region read is back already (a no-op then).
      self.pool.release(self.slot.transfer_id, writer_done=self.unwritten)
    return False


class AutoBlockPulls:
  """A worker's two roles in device pulls of shared KV, by CUDA IPC where
  it can (module doc), else by ``transfer``: as the source, ``offer`` a
  run to the peer asking; as the one asking, ``lend`` a region for the
  request and ``pull`` the run the answer names. Built without ``ipc``,
  it is ``transfer``'s pulls; without ``pool``, it writes into the regions
  peers lend but lends none."""

  def __init__(self, transfer: BlockPulls, *,
               ipc: CudaIpcSender | None = None,
               pool: LandingPool | None = None, process_id: str = "",
               hostname: str | None = None):
    self.transfer = transfer
    self.device = transfer.device
    self.ipc = ipc
    self.pool = pool
    self.events = (IpcEvents(pool.driver, pool.device, MAX_EVENTS)
                   if pool is not None else None)
    self.process_id = process_id
    self.hostname = socket.gethostname() if hostname is None else hostname
    self.offers = collections.Counter()     # path -> runs offered by it
    self.fallbacks = collections.Counter()  # reason -> pulls off CUDA IPC
    self.lending_stopped: str | None = None  # why, once this side failed
    self._elsewhere: set[str] = set()        # peers not on this host
    self._ids = itertools.count()
    self._lock = threading.Lock()

  @property
  def lends(self) -> bool:
    """Whether pulls from peers on this host may take CUDA IPC."""
    return self.pool is not None and not self.lending_stopped

  # ---------------------------------------------------------------- source
  def offer(self, blocks, landing: blockstore_pb2.BlockLanding | None = None
            ) -> blockstore_pb2.BlockPull:
    """The answer's path fields for the run ``blocks`` (arrays ``[2, L, P,
    K, hd]``, on devices or the host), stacked on this worker's device:
    copied into ``landing`` when the worker asking lent one and CUDA IPC
    can carry it, else offered for its transfer pull (OverflowError when
    offers hold too much already). The names and layout are the
    caller's."""
    out = blockstore_pb2.BlockPull(process_id=self.process_id,
                                   hostname=self.hostname)
    stacked = self.transfer.stack(blocks)
    if self._writes_for(landing):
      try:
        out.ipc_event_handle = self.ipc.write(
            [stacked], landing.ipc_handle, landing.ipc_offset,
            landing.ipc_bytes, deadline_ms=landing.ipc_deadline_ms,
            what=f"a block pull of {landing.process_id}")
        out.transport = PATH_CUDA_IPC
        self._count(self.offers, PATH_CUDA_IPC)
        return out
      except TransferError as e:
        # A driver failure is news; a lease ending is routine.
        self._count(self.fallbacks, type(e).__name__)
        log.log(logging.WARNING if isinstance(e, CudaError) else logging.INFO,
                "CUDA IPC block pull for %s not possible, offering it to "
                "jax.experimental.transfer: %s", landing.process_id, e)
    out.transfer_address, out.pull_uuid = self.transfer.offer_stacked(
        stacked)
    out.transport = PATH_TRANSFER
    self._count(self.offers, PATH_TRANSFER)
    return out

  def _writes_for(self, landing) -> bool:
    return (self.ipc is not None and landing is not None
            and bool(landing.ipc_handle)
            and locate(landing.process_id, landing.hostname,
                       my_process_id=self.process_id,
                       my_hostname=self.hostname) == "this host")

  # ---------------------------------------------------------------- asking
  def lend(self, peer: str, nbytes: int) -> PullLanding:
    """A region of ``nbytes`` for a pull from ``peer`` (an address), to
    use in a ``with``: none (``landing`` None) when this worker lends no
    regions, ``peer`` runs elsewhere, or none is free that large."""
    with self._lock:
      elsewhere = peer in self._elsewhere
    if not self.lends or elsewhere:
      return PullLanding(peer)
    slot = self.pool.acquire(f"pull-{next(self._ids)}", nbytes)
    if slot is None:
      self._count(self.fallbacks, "no_landing")
      return PullLanding(peer)
    return PullLanding(peer, self.pool, slot, blockstore_pb2.BlockLanding(
        ipc_handle=slot.handle, ipc_offset=slot.offset, ipc_bytes=slot.nbytes,
        ipc_deadline_ms=slot.deadline_ms, process_id=self.process_id,
        hostname=self.hostname))

  def pull(self, answer: blockstore_pb2.BlockPull, lent: PullLanding, shape,
           dtype, *, timeout_s: float) -> tuple[jax.Array | None, str]:
    """The run ``answer`` names (``shape``: ``[n, 2, L, P, K, hd]`` of
    ``dtype``) on this worker's device, an array it owns, and the path it
    came by; (None, "") when the peer held none. TransferError /
    TransferTimeout when it cannot be had; CudaError when this side of
    CUDA IPC failed (lending stops)."""
    if answer.process_id and locate(
        answer.process_id, answer.hostname, my_process_id=self.process_id,
        my_hostname=self.hostname) != "this host":
      with self._lock:
        self._elsewhere.add(lent.peer)
    if answer.transport == PATH_CUDA_IPC and answer.hashes:
      if lent.slot is None:
        raise TransferError("the peer answered by CUDA IPC, but no landing "
                            "region was lent")
      return (self._read(lent.slot.transfer_id, answer, shape, dtype),
              PATH_CUDA_IPC)
    lent.unwritten = True
    if not answer.hashes:
      return None, ""
    return self.transfer.pull(answer.transfer_address, answer.pull_uuid,
                              shape, dtype, timeout_s=timeout_s), PATH_TRANSFER

  def _read(self, lent_id: str, answer, shape, dtype) -> jax.Array:
    """The bytes of the region lent under ``lent_id`` as a ``shape`` /
    ``dtype`` array JAX owns, once the peer's copies have run; the region
    goes back read (or, failing, once its lease ends)."""
    slot = self.pool.begin_read(lent_id)
    if slot is None:
      raise TransferTimeout("the landing region of a block pull was reaped "
                            "before it was read (its lease ended)")
    ok = False
    try:
      nbytes = math.prod(shape) * np.dtype(dtype).itemsize
      if nbytes > slot.nbytes:
        raise TransferError(f"{nbytes} bytes of blocks cannot be in the "
                            f"{slot.nbytes}-byte landing region lent")
      if answer.ipc_event_handle:
        self.events.wait(answer.ipc_event_handle)
      view = self.pool.driver.view(slot.device, slot.ptr, tuple(shape), dtype,
                                   self.device)
      out = _owned(view, dtype)
      del view
      out.block_until_ready()   # read: the region may be lent again
      ok = True
      return out
    except CudaError as e:
      if not self.lending_stopped:
        self.lending_stopped = str(e)
        log.error("CUDA IPC read of a peer's blocks failed; no more landing "
                  "regions are lent (block pulls use "
                  "jax.experimental.transfer): %s", e)
      raise
    finally:
      self.pool.end_read(lent_id, ok=ok)

  def _count(self, counter: collections.Counter, key: str) -> None:
    with self._lock:
      counter[key] += 1

  def close(self) -> None:
    """Gives back the landing pool, the events opened and the peers'
    buffers opened (shutdown: nothing pulls or offers any more)."""
    if self.ipc is not None:
      self.ipc.close()
    if self.events is not None:
      self.events.close()
    if self.pool is not None:
      self.pool.close()


def _owned(view: jax.Array, dtype) -> jax.Array:
  """``view``'s contents as ``dtype`` in memory JAX owns: an 8-bit float's
  bytes retyped (itself a copy), anything else copied."""
  out = foreign_memory.retype(view, dtype)
  return jnp.copy(out) if out is view else out


def make_block_pulls(transfer: BlockPulls, *, fast_path: str = "auto",
                     process_id: str = "", hostname: str | None = None,
                     landing_bytes: int = 256 << 20, lease_s: float = 4.0,
                     driver: CudaDriver | None = None) -> AutoBlockPulls:
  """A worker's device pulls of shared KV. Fast path off (or no GPU):
  exactly ``transfer``'s. On, where the driver loads (``driver`` overrides
  it, for tests): CUDA IPC with peers on this host, writing into the
  regions they lend, and lending regions of a landing buffer of
  ``landing_bytes`` on ``transfer``'s device (0: none; a pull larger than
  the buffer takes the transfer path), each for ``lease_s`` (at least the
  fetch's timeout and the writer's margin). A buffer that cannot be
  allocated is logged and left out."""
  if driver is None and not fast_path_on(fast_path):
    return AutoBlockPulls(transfer)
  driver = driver or real_driver()
  if driver is None:
    return AutoBlockPulls(transfer)
  pool = None
  if landing_bytes > 0:
    try:
      pool = LandingPool(driver, device_ordinal(transfer.device), 1,
                         landing_bytes, lease_s=lease_s)
      log.info("CUDA IPC landing buffer for peers' blocks: %.1f MiB on GPU "
               "%d", landing_bytes / 2**20, pool.device)
    except (CudaError, ValueError) as e:
      log.warning("no CUDA IPC landing buffer for peers' blocks (%s); they "
                  "are pulled with jax.experimental.transfer", e)
  return AutoBlockPulls(transfer, ipc=CudaIpcSender(driver), pool=pool,
                        process_id=process_id, hostname=hostname)


__all__ = ["AutoBlockPulls", "PullLanding", "make_block_pulls"]
