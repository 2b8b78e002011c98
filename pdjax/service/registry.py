"""The router's view of the workers: who exists, who is healthy, who fits.

Workers are polled (``GetWorkerInfo``) every ``poll_interval_s``. The first
answer is the compatibility handshake: a worker whose model fingerprint,
page size or KV dtype differs from the deployment's is refused (logged, never
routed to), since a mismatch would otherwise surface as garbage tokens at the
first hand-off. A worker that stops answering is marked down and routed
around; one that answers again rejoins. Workers can be added and removed
while the router runs (the registry a future discovery service will feed).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time

import grpc

from pdjax.service import common
from pdjax.service.kv_router import (DEFAULT_FETCH_WEIGHT,
                                     DEFAULT_STALE_AFTER_S, CacheMirror,
                                     KvScorer)
from pdjax.v1 import (blockstore_pb2_grpc, common_pb2, decode_pb2_grpc,
                      prefill_pb2_grpc)

log = logging.getLogger(__name__)


class WorkerState(enum.Enum):
  JOINING = "joining"          # never answered yet
  READY = "ready"
  DOWN = "down"                # stopped answering
  DRAINING = "draining"        # finishing its streams, takes no new work
  INCOMPATIBLE = "incompatible"


@dataclasses.dataclass
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


class WorkerRegistry:

  def __init__(self, security: common.Security = common.Security(), *,
               poll_interval_s: float = 0.5, rpc_timeout_s: float = 2.0,
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

  # ---------------------------------------------------------------- members
  def add(self, address: str, role: str) -> Worker:
    key = (role, address)
    if key in self.workers:
      return self.workers[key]
    if role not in ("prefill", "decode", "kvstore"):
      raise ValueError(f"unknown worker role {role!r}")
    channel = common.make_channel(address, self.security, aio=True)
    stub = {"prefill": prefill_pb2_grpc.PrefillStub,
            "decode": decode_pb2_grpc.DecodeStub,
            # Shared KV: a store is polled (its blocks count as fetchable),
            # never routed to.
            "kvstore": blockstore_pb2_grpc.BlockStoreStub}[role](channel)
    w = Worker(address, role, channel, stub)
    self.workers[key] = w
    return w

  async def remove(self, address: str, role: str) -> None:
    w = self.workers.pop((role, address), None)
    if w is not None:
      if self.metrics is not None:
        try:
          self.metrics.worker_inflight.remove(role, address)
        except KeyError:
          pass
      await w.channel.close()

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

  def _show_inflight(self, w: Worker) -> None:
    if self.metrics is not None:
      self.metrics.worker_inflight.labels(w.role, w.address).set(w.inflight)

  def of_role(self, role: str) -> list[Worker]:
    return [w for w in self.workers.values() if w.role == role]

  def usable(self, role: str) -> list[Worker]:
    return [w for w in self.of_role(role) if w.usable]

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
    await asyncio.gather(*(self._poll(w) for w in list(self.workers.values())))
    if self.metrics is not None:
      for role in ("prefill", "decode", "kvstore"):
        for state in WorkerState:
          self.metrics.workers.labels(role, state.value).set(
              sum(w.state is state for w in self.of_role(role)))

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
    if w.state is WorkerState.INCOMPATIBLE:
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
    for field in ("fingerprint", "page_size", "dtype", "num_layers",
                  "num_kv_heads", "head_dim", "vocab_size"):
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
    for w in self.workers.values():
      await w.channel.close()


__all__ = ["Worker", "WorkerRegistry", "WorkerState"]
