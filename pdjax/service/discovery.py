"""Discovery: how the router learns its workers while it runs.

Router side (``RegistryServicer``, the ``pdjax.v1.Registry`` service on the
router's port): a worker started with ``--router=ADDRESS`` registers each
pool it serves (its ``WorkerInfo``: role, advertised address, model
fingerprint, mesh, KV layout, the roles it can serve), renews the lease it
gets well within the lease's length, and deregisters when it drains. The
compatibility handshake runs on every registration: a worker whose model
differs from the deployment's is refused with FAILED_PRECONDITION naming the
field. A lease that lapses (the worker died, or lost its network) drops the
worker; a router that restarts knows no lease, so the workers' next renewal
gets NOT_FOUND and they register again by themselves. The service is
internal: the router requires the deployment's service token on it
(``common.make_server``'s ``internal`` prefixes), never the client token.

Worker side (``Announcer``): the loop that registers, renews, re-registers
after NOT_FOUND or a router that was away, and deregisters. It keeps one
lease per pool the worker serves, so a worker of both pools that is moved
between them (``pdjax.v1.WorkerControl.SetRole``) leaves one pool and joins
the other without touching the rest.

``ListWorkers`` is the router's view (state, load, requests in flight,
source, lease), what the planner (``pdjax.planner.control``) reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import grpc

from pdjax.service import common
from pdjax.service.registry import WorkerRegistry
from pdjax.v1 import common_pb2, registry_pb2, registry_pb2_grpc

log = logging.getLogger(__name__)

REGISTRY_SERVICE = "pdjax.v1.Registry"
CONTROL_SERVICE = "pdjax.v1.WorkerControl"
# The router's internal API, behind the service token.
INTERNAL_PREFIXES = (f"/{REGISTRY_SERVICE}/",)
DEFAULT_LEASE_S = 10.0
MAX_LEASE_S = 300.0
MIN_LEASE_S = 1.0
ROLES = ("prefill", "decode")


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
  """``pdjax.v1.Registry`` over a ``WorkerRegistry``."""

  def __init__(self, registry: WorkerRegistry, *,
               default_lease_s: float = DEFAULT_LEASE_S,
               max_lease_s: float = MAX_LEASE_S):
    self.registry = registry
    self.default_lease_s = default_lease_s
    self.max_lease_s = max_lease_s

  def _grant(self, asked: float) -> float:
    if not asked:
      return self.default_lease_s
    return min(max(asked, MIN_LEASE_S), self.max_lease_s)

  async def Register(self, request, context):
    info = request.info
    if info.role not in ROLES:
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"info.role: must be one of {ROLES}, got "
                          f"{info.role!r}")
    if not info.address or ":" not in info.address:
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "info.address: the host:port the router dials "
                          f"this worker at is required, got {info.address!r}")
    if not info.model.fingerprint:
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "info.model: the model (fingerprint, page size, "
                          "KV layout) is required for the handshake")
    if request.lease_s < 0:
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"lease_s: must be >= 0, got {request.lease_s}")
    lease_s = self._grant(request.lease_s)
    w, problem = await self.registry.register(info, lease_s)
    if problem:
      await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"{info.role} worker {info.address} refused: "
                          f"{problem}")
    log.info("%s worker %s registered (lease %.0f s, %s)", info.role,
             info.address, lease_s, w.state.value)
    return registry_pb2.Lease(lease_id=w.lease_id, lease_s=lease_s)

  async def Renew(self, request, context):
    w = self.registry.leases.get(request.lease_id)
    if w is None:
      await context.abort(grpc.StatusCode.NOT_FOUND,
                          "unknown lease (the router restarted, or the lease "
                          "lapsed): register again")
    granted = w.lease_s or self.default_lease_s
    self.registry.renew(request.lease_id, granted)
    return registry_pb2.Lease(lease_id=request.lease_id, lease_s=granted)

  async def Deregister(self, request, context):
    self.registry.deregister(request.lease_id)
    return common_pb2.Empty()

  async def ListWorkers(self, request, context):
    return list_workers(self.registry)


def list_workers(registry: WorkerRegistry) -> registry_pb2.WorkerList:
  now = time.monotonic()
  out = registry_pb2.WorkerList()
  for w in [*registry.workers.values(), *registry.retiring]:
    st = out.workers.add(address=w.address, role=w.role,
                         state=w.state.value, source=w.source,
                         inflight=max(w.inflight, 0))
    if w.info is not None:
      st.load.CopyFrom(w.info.load)
      st.roles.extend(w.info.roles or [w.role])
    else:
      st.roles.append(w.role)
    if w.lease_id and not w.retired:
      st.lease_left_s = max(0.0, w.lease_expires - now)
  return out


class Announcer:
  """A worker's membership in the router's pools (see the module
  docstring): ``join(role)`` / ``leave(role)``; ``run()`` renews.

  ``info_for(role)`` gives the ``WorkerInfo`` to register under ``role``.
  """

  def __init__(self, router: str, security: common.Security,
               info_for: Callable[[str], common_pb2.WorkerInfo], *,
               lease_s: float = DEFAULT_LEASE_S, rpc_timeout_s: float = 5.0):
    self.router = router
    self.security = security
    self.info_for = info_for
    self.lease_s = lease_s
    self.rpc_timeout_s = rpc_timeout_s
    self.wanted: set[str] = set()           # pools this worker serves
    self.leases: dict[str, registry_pb2.Lease] = {}
    self.refused: dict[str, str] = {}       # role -> the router's refusal
    self._channel = None
    self._stub = None
    self._task: asyncio.Task | None = None
    self._wake = asyncio.Event()
    self.registrations = 0                  # successful Register calls

  def _registry(self):
    if self._stub is None:
      self._channel = common.make_channel(self.router, self.security,
                                          aio=True)
      self._stub = registry_pb2_grpc.RegistryStub(self._channel)
    return self._stub

  async def _register(self, role: str) -> bool:
    try:
      lease = await self._registry().Register(
          registry_pb2.RegisterRequest(info=self.info_for(role),
                                       lease_s=self.lease_s),
          timeout=self.rpc_timeout_s)
    except grpc.aio.AioRpcError as e:
      if e.code() in (grpc.StatusCode.FAILED_PRECONDITION,
                      grpc.StatusCode.INVALID_ARGUMENT,
                      grpc.StatusCode.UNAUTHENTICATED,
                      grpc.StatusCode.PERMISSION_DENIED):
        if self.refused.get(role) != e.details():
          log.error("the router at %s refused this worker's %s "
                    "registration: %s: %s", self.router, role,
                    e.code().name, e.details())
        self.refused[role] = e.details()
      else:
        log.info("registering as %s with the router at %s: %s (will "
                 "retry)", role, self.router, e.code().name)
      return False
    self.refused.pop(role, None)
    self.leases[role] = lease
    self.registrations += 1
    log.info("registered with the router at %s as a %s worker (lease %.0f "
             "s)", self.router, role, lease.lease_s)
    return True

  async def _renew(self, role: str) -> None:
    lease = self.leases[role]
    try:
      got = await self._registry().Renew(
          registry_pb2.RenewRequest(lease_id=lease.lease_id),
          timeout=self.rpc_timeout_s)
      self.leases[role] = got
    except grpc.aio.AioRpcError as e:
      if e.code() == grpc.StatusCode.NOT_FOUND:
        log.warning("the router at %s no longer holds this worker's %s "
                    "lease; registering again", self.router, role)
        del self.leases[role]
        await self._register(role)
      else:
        log.info("renewing the %s lease at %s: %s (will retry)", role,
                 self.router, e.code().name)

  async def join(self, role: str, timeout_s: float | None = None) -> bool:
    """Serves ``role`` from now: registers (retrying until ``timeout_s``,
    None: once, then the renewal loop keeps trying)."""
    self.wanted.add(role)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    backoff = 0.05
    while True:
      if await self._register(role):
        return True
      if deadline is None or time.monotonic() + backoff > deadline:
        self._wake.set()
        return False
      await asyncio.sleep(backoff)
      backoff = min(backoff * 2, 1.0)

  async def leave(self, role: str) -> None:
    """Stops serving ``role``: deregisters (the router routes no new
    request here for it)."""
    self.wanted.discard(role)
    lease = self.leases.pop(role, None)
    if lease is None:
      return
    try:
      await self._registry().Deregister(
          registry_pb2.DeregisterRequest(lease_id=lease.lease_id),
          timeout=self.rpc_timeout_s)
      log.info("deregistered from the router's %s pool", role)
    except grpc.aio.AioRpcError as e:
      # The lease lapses by itself; the worker's own draining flag turns
      # the router's requests away meanwhile.
      log.warning("deregistering (%s) at %s failed: %s", role, self.router,
                  e.code().name)

  async def run(self) -> None:
    """Renews each lease at a third of its length; registers the pools
    wanted but not held (after a refusal, every 10 lease periods)."""
    retry_at: dict[str, float] = {}
    while True:
      try:
        now = time.monotonic()
        for role in sorted(self.wanted):
          if role in self.leases:
            await self._renew(role)
          elif now >= retry_at.get(role, 0.0):
            if not await self._register(role) and role in self.refused:
              retry_at[role] = now + 10 * self.lease_s
      except Exception:  # noqa: BLE001 - never let membership die
        log.exception("renewing the worker's registration failed")
      periods = [l.lease_s for l in self.leases.values()] or [self.lease_s]
      missing = any(r not in self.leases for r in self.wanted)
      wait = min(periods) / 3 if not missing else min(1.0, self.lease_s / 3)
      self._wake.clear()
      try:
        await asyncio.wait_for(self._wake.wait(), wait)
      except asyncio.TimeoutError:
        pass

  def start(self) -> None:
    if self._task is None:
      self._task = asyncio.ensure_future(self.run())

  async def close(self) -> None:
    """Deregisters every pool and stops."""
    if self._task is not None:
      self._task.cancel()
    for role in list(self.leases):
      await self.leave(role)
    if self._channel is not None:
      await self._channel.close()


class RoleControl(registry_pb2_grpc.WorkerControlServicer):
  """``pdjax.v1.WorkerControl`` of a worker that holds both pools'
  programs: which pool it serves (``active``), and moving it.

  ``pools``: role -> the PrefillWorker / DecodeWorker of that role (each
  has ``draining`` and ``active()``). A pool the worker does not serve is
  kept ``draining`` (its API turns requests away with UNAVAILABLE and its
  ``GetWorkerInfo`` says so, so a router that polls it routes around it)
  and its health name is NOT_SERVING. A move (``switch``): leave the old
  pool at the router (deregister), drain it (its running requests finish:
  streams, queued prompts, reservations not redeemed yet), then serve the
  new one and register there. Nothing restarts: both programs stay
  compiled, so the new capacity serves as soon as the router has it.
  """

  def __init__(self, pools: dict, active: set[str], *,
               announcer: Announcer | None = None, health=None,
               health_names: dict[str, str] | None = None,
               drain_timeout_s: float = 60.0):
    unknown = set(active) - set(pools)
    if unknown or not active:
      raise ValueError(f"cannot serve {sorted(active)} with the programs "
                       f"of {sorted(pools)}")
    self.pools = pools
    self.active = set(active)
    self.announcer = announcer
    self.health = health
    self.health_names = health_names or {}
    self.drain_timeout_s = drain_timeout_s
    self._lock = asyncio.Lock()
    self.switches = 0
    for role, w in pools.items():   # before the server takes a request
      w.draining = role not in self.active

  async def _set_health(self, role: str, serving: bool) -> None:
    if self.health is None or role not in self.health_names:
      return
    from grpc_health.v1 import health_pb2
    await self.health.set(
        self.health_names[role],
        health_pb2.HealthCheckResponse.SERVING if serving else
        health_pb2.HealthCheckResponse.NOT_SERVING)

  async def start(self) -> None:
    """Once serving: each pool's health name, and the served pools
    joined at the router."""
    for role in self.pools:
      await self._set_health(role, role in self.active)
    if self.announcer is not None:
      for role in sorted(self.active):
        await self.announcer.join(role)
      self.announcer.start()

  async def leave_all(self) -> None:
    """Shutdown: leave every pool at the router first (no new request
    comes), then the caller drains."""
    if self.announcer is not None:
      await self.announcer.close()

  async def switch(self, role: str, drain_timeout_s: float | None = None
                   ) -> tuple[float, float]:
    """Serves ``role`` only from now: (seconds draining the old pool,
    seconds joining the new)."""
    if role not in self.pools:
      raise ValueError(f"this worker holds no {role} programs (it serves "
                       f"{'/'.join(sorted(self.pools))}); start it with "
                       "--role=both to move it between pools")
    timeout = self.drain_timeout_s if not drain_timeout_s else drain_timeout_s
    async with self._lock:
      if self.active == {role}:
        return 0.0, 0.0
      t0 = time.monotonic()
      old = sorted(self.active - {role})
      log.info("moving from the %s pool to the %s pool", "/".join(old), role)
      for r in old:
        if self.announcer is not None:
          await self.announcer.leave(r)
        self.pools[r].draining = True
        await self._set_health(r, False)
      deadline = t0 + timeout
      while (any(self.pools[r].active() for r in old)
             and time.monotonic() < deadline):
        await asyncio.sleep(0.02)
      left = sum(self.pools[r].active() for r in old)
      if left:
        log.warning("the %s pool's drain timed out with %d request(s) "
                    "left; they finish while the worker serves %s",
                    "/".join(old), left, role)
      t1 = time.monotonic()
      self.active = {role}
      self.pools[role].draining = False
      await self._set_health(role, True)
      if self.announcer is not None:
        await self.announcer.join(role, timeout_s=timeout)
      t2 = time.monotonic()
      self.switches += 1
      log.info("serving the %s pool (drained %.2f s, joined %.2f s)", role,
               t1 - t0, t2 - t1)
      return t1 - t0, t2 - t1

  async def SetRole(self, request, context):
    if request.role not in ROLES:
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"role: must be one of {ROLES}, got "
                          f"{request.role!r}")
    if request.drain_timeout_s < 0:
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "drain_timeout_s: must be >= 0")
    try:
      drain_s, join_s = await self.switch(request.role,
                                          request.drain_timeout_s)
    except ValueError as e:
      await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
    return registry_pb2.SetRoleResponse(role=request.role, drain_s=drain_s,
                                        join_s=join_s)


__all__ = ["Announcer", "RoleControl", "CONTROL_SERVICE", "DEFAULT_LEASE_S",
           "INTERNAL_PREFIXES", "REGISTRY_SERVICE", "RegistryServicer",
           "list_workers"]
