"""Scalers: how the planner loop (``pdjax.planner.control``) adds and
removes workers of a pool.

A scaler owns the workers of fixed role (a worker of both pools is moved
by the loop itself, never added or removed): ``replicas(role)`` is how many
it has asked for (started or starting, not the ones draining away), and
``scale(role, n)`` asks for ``n``. Removing a worker always drains it
first: it gets SIGTERM, deregisters from the router (no new request comes),
lets its running requests finish, and exits; so a scale-down fails no
request.

* ``LocalScaler``: worker processes on this machine, started and stopped
  through a ``pdjax.launch.cluster.LocalCluster`` of an elastic deployment
  (``launch_elastic``). The newest workers go first.
* ``KubernetesScaler``: sets ``spec.replicas`` of a pool's StatefulSet,
  Deployment or LeaderWorkerSet through the ``scale`` subresource (the
  official ``kubernetes`` client). Kubernetes then starts pods (which the
  router finds through its pod watch, or which register themselves) or
  terminates them (SIGTERM: the same drain, within the pod's
  ``terminationGracePeriodSeconds``). Needs RBAC to ``get`` and ``patch``
  the ``<kind>/scale`` subresource (deploy/k8s/).
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


class Scaler:
  """The interface the control loop uses."""

  async def replicas(self, role: str) -> int:
    raise NotImplementedError

  async def scale(self, role: str, n: int) -> None:
    raise NotImplementedError


class StaticScaler(Scaler):
  """Changes nothing (the loop only advises): ``replicas`` is what was
  last asked for, starting from ``initial``."""

  def __init__(self, initial: dict[str, int]):
    self.asked = dict(initial)

  async def replicas(self, role: str) -> int:
    return self.asked.get(role, 0)

  async def scale(self, role: str, n: int) -> None:
    log.info("advice: %s pool to %d worker(s)", role, n)
    self.asked[role] = n


class LocalScaler(Scaler):
  """Worker processes of a local elastic deployment (see the module
  docstring). Call it from the thread that started the deployment: a
  process's parent-death signal follows the thread that started it."""

  def __init__(self, cluster):
    self.cluster = cluster

  def _live(self, role: str) -> list:
    return [p for p in self.cluster.procs
            if p.role == role and not p.stopping]

  async def replicas(self, role: str) -> int:
    return len(self._live(role))

  async def scale(self, role: str, n: int) -> None:
    if n < 0:
      raise ValueError(f"cannot scale {role} to {n}")
    live = self._live(role)
    for _ in range(n - len(live)):
      p = self.cluster.spawn_worker(role)
      log.info("started %s (%s pool)", p.name, role)
    for p in reversed(live[n:] if n < len(live) else []):
      log.info("draining %s away (%s pool)", p.name, role)
      self.cluster.stop_proc(p)


# kind -> (API group, version, plural) of the workload objects a pool may be.
_KINDS = {
    "statefulset": ("apps", "v1", "statefulsets"),
    "deployment": ("apps", "v1", "deployments"),
    "leaderworkerset": ("leaderworkerset.x-k8s.io", "v1", "leaderworkersets"),
}


def parse_target(spec: str) -> tuple[str, str]:
  """'statefulset/pdjax-decode' -> ('statefulset', 'pdjax-decode')."""
  kind, _, name = spec.partition("/")
  kind = kind.lower()
  if kind not in _KINDS or not name:
    raise ValueError(f"a pool's workload is KIND/NAME with KIND one of "
                     f"{sorted(_KINDS)}, got {spec!r}")
  return kind, name


class KubernetesScaler(Scaler):
  """Sets the replica count of each pool's workload (see the module
  docstring). ``targets``: role -> 'kind/name'."""

  def __init__(self, targets: dict[str, str], namespace: str,
               api_client=None):
    from kubernetes import client
    self.targets = {r: parse_target(t) for r, t in targets.items() if t}
    self.namespace = namespace
    self.api = client.CustomObjectsApi(api_client)
    self._asked: dict[str, int] = {}

  def _call(self, fn, *args, **kw):
    return asyncio.get_running_loop().run_in_executor(
        None, lambda: fn(*args, **kw))

  def _path(self, role: str):
    kind, name = self.targets[role]
    group, version, plural = _KINDS[kind]
    return dict(group=group, version=version, namespace=self.namespace,
                plural=plural, name=name)

  async def replicas(self, role: str) -> int:
    if role not in self.targets:
      return 0
    got = await self._call(self.api.get_namespaced_custom_object_scale,
                           **self._path(role))
    return int((got.get("spec") or {}).get("replicas") or 0)

  async def scale(self, role: str, n: int) -> None:
    if role not in self.targets:
      if n:
        log.warning("no workload for the %s pool (--%s_workload): cannot "
                    "scale it to %d", role, role, n)
      return
    kind, name = self.targets[role]
    await self._call(self.api.patch_namespaced_custom_object_scale,
                     body={"spec": {"replicas": int(n)}},
                     **self._path(role))
    self._asked[role] = n
    log.info("%s/%s (%s pool) scaled to %d", kind, name, role, n)


__all__ = ["KubernetesScaler", "LocalScaler", "Scaler", "StaticScaler",
           "parse_target"]
