"""The router's view of the workers: who exists, who is healthy, who fits.

Workers are polled (``GetWorkerInfo``) every ``poll_interval_s``. The first
answer is the compatibility handshake: a worker whose model fingerprint,
page size, KV dtype or KV scales differ from the deployment's is refused
(logged, never routed to), since a mismatch would otherwise surface as
garbage tokens at the first hand-off. A worker that stops answering is marked down and routed
around; one that answers again rejoins.

Members come from three sources (``Worker.source``): the router's flags
(``static``: kept for the router's life), registration (``registered``: a
worker announced itself through ``pdjax.v1.Registry`` and holds a lease it
renews; ``register`` runs the handshake before admitting it and polls it
once, so it is routed to as soon as the call returns; a lease that lapses
drops the worker; a listed worker that also registers stays listed), and a
Kubernetes pod watch (``kubernetes``,
``pdjax.service.k8s_discovery``). A worker leaves by ``retire``: it is no
longer picked for new requests at once, and its channel is closed only when
the requests the router has on it have finished, so leaving loses none.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
import uuid

import grpc

from pdjax.client.sessions import CallSession
from pdjax.service import common
from pdjax.service.kv_router import (DEFAULT_FETCH_WEIGHT,
                                     DEFAULT_STALE_AFTER_S, CacheMirror,
                                     KvScorer)
from pdjax.v1 import (blockstore_pb2_grpc, common_pb2, decode_pb2,
                      decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc)

log = logging.getLogger(__name__)

# The calls the router makes on a session with each kind of worker: the
# method and the session's request message.
_SESSIONS = {"prefill": ("Prefill", prefill_pb2.PrefillSessionRequest),
             "decode": ("Decode", decode_pb2.DecodeSessionRequest)}

# How often each worker is asked for its state (GetWorkerInfo).
DEFAULT_POLL_INTERVAL_S = 0.5


class WorkerState(enum.Enum):
  JOINING = "joining"          # never answered yet
  READY = "ready"
  DOWN = "down"                # stopped answering
  DRAINING = "draining"        # finishing its streams, takes no new work
  INCOMPATIBLE = "incompatible"


@dataclasses.dataclass(eq=False)   # one object per membership: by identity
class Worker:
  address: str
  role: str                     # "prefill" | "decode" | "kvstore"
  channel: grpc.aio.Channel
  stub: object
  state: WorkerState = WorkerState.JOINING
  info: common_pb2.WorkerInfo | None = None
  last_ok: float = 0.0
  inflight: int = 0             # requests the router has on it now
  reserved_pages: int = 0       # pages reserved since the last poll
  poll_failures: int = 0        # polls unanswered in a row
  # KV-aware routing: the worker's cached blocks, as last polled.
  cache: CacheMirror = dataclasses.field(default_factory=CacheMirror)
  # Membership: where the worker came from; a registered one's lease.
  source: str = "static"        # "static" | "registered" | "kubernetes"
  lease_id: str = ""
  lease_expires: float = 0.0    # time.monotonic() when the lease lapses
  lease_s: float = 0.0          # the lease's length, granted at register
  retired: bool = False         # left: finishing the router's requests
  holds: int = 0                # requests that will still call it (hold)
  # Decode and prefill workers: the router's Decode or Prefill calls to it,
  # as messages on one stream.
  session: CallSession | None = None

  @property
  def usable(self) -> bool:
    return self.state is WorkerState.READY

  def load_score(self) -> float:
    """Prefill: queue length; lower is better."""
    queued = self.info.load.queued if self.info else 0
    return self.inflight + queued

  def free_pages(self) -> int:
    """Decode: KV pages still promisable; higher is better."""
    if self.info is None:
      return 0
    return self.info.load.kv_pages_available - self.reserved_pages

  def call(self, request, timeout: float | None, *, on_session: bool):
    """The router's Decode or Prefill call to this decode or prefill
    worker (by its role): a message on its session (``on_session``), or
    a call of its own."""
    if on_session:
      return self.session.call(request, timeout)
    method = _SESSIONS[self.role][0]
    return getattr(self.stub, method)(request, timeout=timeout)

  async def close(self) -> None:
    """Ends the router's session and channel to the worker (calls still on
    them fail)."""
    if self.session is not None:
      await self.session.close()
    await self.channel.close()


class WorkerRegistry:

  def __init__(self, security: common.Security = common.Security(), *,
               poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
               rpc_timeout_s: float = 2.0,
               expected_model: common_pb2.ModelInfo | None = None,
               metrics=None, kv_overlap_weight: float = 0.0,
               kv_stale_after_s: float = DEFAULT_STALE_AFTER_S,
               late_polls_down: int = 3,
               kv_fetch_weight: float = DEFAULT_FETCH_WEIGHT):
    self.security = security
    self.poll_interval_s = poll_interval_s
    self.rpc_timeout_s = rpc_timeout_s
    # A worker whose polls time out this many times in a row is down; one
    # late answer is a busy worker (a GPU under load, a long host-side
    # step), and calling it down would turn every request away from it.
    # A refused connection (UNAVAILABLE) is down at once.
    self.late_polls_down = max(1, late_polls_down)
    self.expected = expected_model
    self.metrics = metrics
    self.workers: dict[tuple[str, str], Worker] = {}
    # KV-aware routing (pdjax.service.kv_router); weight 0: load only.
    self.kv = KvScorer(kv_overlap_weight, kv_stale_after_s, metrics,
                       fetch_weight=kv_fetch_weight)
    self._task: asyncio.Task | None = None
    # Registered workers by lease id, and workers that left but still run
    # requests of this router (their channels close when those end).
    self.leases: dict[str, Worker] = {}
    self.retiring: set[Worker] = set()
    self._closers: set[asyncio.Task] = set()

  # ---------------------------------------------------------------- members
  def add(self, address: str, role: str, source: str = "static") -> Worker:
    if role not in ("prefill", "decode", "kvstore"):
      raise ValueError(f"role must be prefill, decode or kvstore, got "
                       f"{role!r}")
    key = (role, address)
    if key in self.workers:
      return self.workers[key]
    channel = common.make_channel(address, self.security, aio=True)
    stub = {"prefill": prefill_pb2_grpc.PrefillStub,
            "decode": decode_pb2_grpc.DecodeStub,
            # Shared KV: a store is polled (its blocks count as fetchable),
            # never routed to.
            "kvstore": blockstore_pb2_grpc.BlockStoreStub}[role](channel)
    method = _SESSIONS.get(role)
    w = Worker(address, role, channel, stub, source=source,
               session=method and CallSession(stub, *method, address))
    self.workers[key] = w
    return w

  def get(self, address: str, role: str) -> Worker | None:
    return self.workers.get((role, address))

  def retire(self, w: Worker, why: str) -> None:
    """Takes ``w`` out of its pool now (no new request picks it); its
    channel closes once the requests the router has on it have ended."""
    if self.workers.get((w.role, w.address)) is w:
      del self.workers[(w.role, w.address)]
    if w.lease_id:
      self.leases.pop(w.lease_id, None)
    if w.retired:
      return
    w.retired = True
    w.state = WorkerState.DRAINING
    log.info("%s worker %s leaves the pool (%s); %d request(s) of this "
             "router still on it", w.role, w.address, why, w.inflight)
    self.retiring.add(w)
    task = asyncio.ensure_future(self._close_when_idle(w))
    self._closers.add(task)
    task.add_done_callback(self._closers.discard)

  async def _close_when_idle(self, w: Worker) -> None:
    try:
      while w.inflight > 0 or w.holds > 0:
        await asyncio.sleep(0.05)
    finally:
      self.retiring.discard(w)
      if self.metrics is not None:
        try:
          self.metrics.worker_inflight.remove(w.role, w.address)
        except KeyError:
          pass
      await w.close()

  # ------------------------------------------------------------ registration
  async def register(self, info: common_pb2.WorkerInfo, lease_s: float
                     ) -> tuple[Worker, str | None]:
    """Admits a worker that announced itself: (the worker, None) once it
    passed the handshake and answered a poll, else (it or None, why not).
    The worker holds a lease of ``lease_s`` from now."""
    problem = self.check_compatible(info)
    if problem:
      log.error("refusing %s worker %s: %s", info.role, info.address,
                problem)
      return None, problem
    old = self.get(info.address, info.role)
    if old is not None and old.info is not None and (
        old.info.process_id != info.process_id):
      # Another process at a known address (a restart): start afresh.
      self.retire(old, "replaced by a new process at its address")
      old = None
    w = old or self.add(info.address, info.role, "registered")
    if not w.lease_id:
      w.lease_id = uuid.uuid4().hex
      self.leases[w.lease_id] = w
    w.lease_s = lease_s
    w.lease_expires = time.monotonic() + lease_s
    if w.state is not WorkerState.READY:
      await self._poll(w)
      if w.state is WorkerState.INCOMPATIBLE:
        self.retire(w, "incompatible")
        return w, self.check_compatible(w.info) or "incompatible"
    return w, None

  def renew(self, lease_id: str, lease_s: float) -> Worker | None:
    w = self.leases.get(lease_id)
    if w is not None:
      w.lease_expires = time.monotonic() + lease_s
    return w

  def deregister(self, lease_id: str) -> Worker | None:
    """Ends a lease: the worker leaves (one the router's flags list stays
    a member, its polls telling whether it serves)."""
    w = self.leases.get(lease_id)
    if w is not None:
      self._end_lease(w, "deregistered")
    return w

  def _end_lease(self, w: Worker, why: str) -> None:
    if w.source == "static":
      self.leases.pop(w.lease_id, None)
      w.lease_id = ""
    else:
      self.retire(w, why)

  def expire_leases(self) -> list[Worker]:
    now = time.monotonic()
    lapsed = [w for w in self.leases.values() if w.lease_expires < now]
    for w in lapsed:
      log.warning("%s worker %s: its lease lapsed (%.1f s without a "
                  "renewal); %s", w.role, w.address, now - w.lease_expires,
                  "polling it as listed" if w.source == "static"
                  else "dropped")
      self._end_lease(w, "lease lapsed")
    return lapsed

  async def remove(self, address: str, role: str) -> None:
    """Drops a worker at once, closing its channel (requests still on it
    fail); ``retire`` lets them finish."""
    w = self.workers.pop((role, address), None)
    if w is not None:
      if w.lease_id:
        self.leases.pop(w.lease_id, None)
      if self.metrics is not None:
        try:
          self.metrics.worker_inflight.remove(role, address)
        except KeyError:
          pass
      await w.close()

  @contextlib.contextmanager
  def busy(self, w: Worker):
    """Counts one request on ``w`` for as long as the block runs: the load
    the scorer reads and the ``pdjax_worker_inflight`` gauge."""
    w.inflight += 1
    self._show_inflight(w)
    try:
      yield w
    finally:
      w.inflight -= 1
      self._show_inflight(w)

  @contextlib.contextmanager
  def hold(self, w: Worker):
    """Keeps ``w``'s channel open for as long as the block runs, should it
    leave meanwhile: a request that reserved KV there still calls it
    (Decode, Unreserve) after other awaits. Not a load signal."""
    w.holds += 1
    try:
      yield w
    finally:
      w.holds -= 1

  def _show_inflight(self, w: Worker) -> None:
    if self.metrics is not None:
      self.metrics.worker_inflight.labels(w.role, w.address).set(w.inflight)

  def of_role(self, role: str) -> list[Worker]:
    return [w for w in self.workers.values() if w.role == role]

  def usable(self, role: str) -> list[Worker]:
    return [w for w in self.of_role(role) if w.usable]

  def caches_prefixes(self) -> bool:
    """Whether a ready worker caches prompt blocks or a store serves them:
    only then can a request's block keys (``kv_router.request_keys``) weigh
    in a choice."""
    return any(w.usable and (w.cache.enabled or w.role == "kvstore")
               for w in self.workers.values())

  # ---------------------------------------------------------------- choice
  def pick_prefill(self, exclude=(), keys=()) -> Worker | None:
    """Shortest queue, less the cached (or fetchable) prefix of the
    request's block ``keys`` times the KV overlap weight
    (``kv_router.KvScorer``)."""
    cands = [w for w in self.usable("prefill") if w.address not in exclude]
    return self.kv.pick("prefill", cands, keys,
                        sources=self.block_sources())

  def block_sources(self) -> list[Worker]:
    """Shared KV: the ready prefill workers that serve their blocks, and
    the ready stores."""
    return [w for w in self.usable("prefill")
            if w.info is not None and w.info.serves_blocks] + self.usable(
                "kvstore")

  def kv_sources(self, chosen: Worker, keys=()) -> list[tuple[str, int]]:
    """(address, blocks) of the sources holding more of the request's
    leading blocks than ``chosen`` (``PrefillRequest.kv_sources``)."""
    if chosen.info is None or not chosen.info.serves_blocks:
      return []
    return self.kv.sources(chosen, keys, self.block_sources())

  def pick_decode(self, exclude=(), keys=()) -> Worker | None:
    """Most free KV capacity (plus the weighted cached prefix of ``keys``),
    then fewest streams."""
    cands = [w for w in self.usable("decode") if w.address not in exclude]
    return self.kv.pick("decode", cands, keys)

  def mark_down(self, w: Worker, why: str) -> None:
    if w.state is not WorkerState.DOWN:
      log.warning("%s worker %s is down: %s", w.role, w.address, why)
    w.state = WorkerState.DOWN

  # ---------------------------------------------------------------- polling
  async def poll_once(self) -> None:
    self.expire_leases()
    await asyncio.gather(*(self._poll(w) for w in list(self.workers.values())))
    if self.metrics is not None:
      for role in ("prefill", "decode", "kvstore"):
        for state in WorkerState:
          self.metrics.workers.labels(role, state.value).set(
              sum(w.state is state for w in self.of_role(role))
              + (state is WorkerState.DRAINING) * sum(
                  w.role == role for w in self.retiring))

  async def _poll(self, w: Worker) -> None:
    try:
      info = await w.stub.GetWorkerInfo(common_pb2.WorkerInfoRequest(
          cache_events_since=w.cache.seq), timeout=self.rpc_timeout_s)
    except grpc.RpcError as e:
      w.cache.mark_failed()
      w.poll_failures += 1
      if w.state is WorkerState.READY or w.state is WorkerState.DRAINING:
        late = e.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        if late and w.poll_failures < self.late_polls_down:
          log.info("%s worker %s answered no poll within %.1f s (%d in a "
                   "row); still routing to it", w.role, w.address,
                   self.rpc_timeout_s, w.poll_failures)
          return
        self.mark_down(w, f"{e.code().name} ({w.poll_failures} polls in a "
                       "row)")
      elif w.state is WorkerState.JOINING:
        pass
      else:
        w.state = (WorkerState.DOWN if w.state is not
                   WorkerState.INCOMPATIBLE else w.state)
      return
    if w.state is WorkerState.INCOMPATIBLE or w.retired:
      return
    # A store holds blocks of any model (each served to its own layout).
    problem = None if w.role == "kvstore" else self.check_compatible(info)
    if problem:
      log.error("refusing %s worker %s: %s", w.role, w.address, problem)
      w.state = WorkerState.INCOMPATIBLE
      w.info = info
      return
    if w.state is not WorkerState.READY and not info.draining:
      log.info("%s worker %s joined (%s, mesh %s)", w.role, w.address,
               info.model.name, info.mesh)
    # --- KV-aware routing: the cache events, then keep info small --------
    w.cache.apply(info)
    info.ClearField("cache_stored")
    info.ClearField("cache_evicted")
    # --- end KV-aware routing ---------------------------------------------
    w.info = info
    w.reserved_pages = 0
    w.poll_failures = 0
    w.last_ok = time.monotonic()
    w.state = WorkerState.DRAINING if info.draining else WorkerState.READY

  def check_compatible(self, info: common_pb2.WorkerInfo) -> str | None:
    """The handshake: None if the worker may join, else why not."""
    m = info.model
    if self.expected is None:
      self.expected = m
      return None
    e = self.expected
    # kv_scales first: the fingerprint covers them too, but a mismatch
    # of scales alone is best named as such.
    for field in ("kv_scales", "fingerprint", "page_size", "dtype",
                  "kv_dtype", "num_layers", "num_kv_heads", "head_dim",
                  "vocab_size"):
      if getattr(m, field) != getattr(e, field):
        return (f"{field} {getattr(m, field)!r} differs from the deployment's"
                f" {getattr(e, field)!r}")
    return None

  async def run(self) -> None:
    while True:
      try:
        await self.poll_once()
      except Exception:  # noqa: BLE001 - never let polling die
        log.exception("worker poll failed")
      await asyncio.sleep(self.poll_interval_s)

  def start(self) -> None:
    if self._task is None:
      self._task = asyncio.ensure_future(self.run())

  async def wait_ready(self, timeout_s: float, *, prefill: int = 0,
                       decode: int = 1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      await self.poll_once()
      if (len(self.usable("prefill")) >= prefill
          and len(self.usable("decode")) >= decode):
        return True
      await asyncio.sleep(0.1)
    return False

  async def close(self) -> None:
    if self._task is not None:
      self._task.cancel()
    for t in list(self._closers):
      t.cancel()
    for w in [*self.workers.values(), *self.retiring]:
      await w.close()


__all__ = ["Worker", "WorkerRegistry", "WorkerState"]
