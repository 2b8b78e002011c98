"""Kubernetes discovery: the router watches the pods of one label selector
per pool, through the official ``kubernetes`` client (as SGLang's router
discovers its prefill and decode pods), so scaling a StatefulSet or a
LeaderWorkerSet is all it takes to grow or shrink a pool.

Per pool, a thread lists the pods that match its selector (``list``), then
watches them from the list's resource version (``watch``), and lists again
whenever the watch ends or fails (an expired resource version, 410, or the
API server going away). A pod is a member while it is Running and Ready,
has an IP and is not being deleted; it is dialled at its IP and the port
its containers name ``--k8s_port_name`` (or a fixed ``--k8s_port``).
Membership changes go to the router's event loop: a pod that becomes a
member is added to the registry (which then polls it and runs the
handshake); one that stops being one (deleted, not ready: draining) is
retired, so no new request goes to it while those the router has on it
finish.

The pods' readiness is the workers' own (their gRPC health): a worker that
drains reports NOT_SERVING, its pod stops being Ready, and it leaves the
pool here as it does through its own polls. The router needs RBAC to
``get``, ``list`` and ``watch`` pods in its namespace (deploy/k8s/).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from pdjax.service.registry import WorkerRegistry

log = logging.getLogger(__name__)


_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def current_namespace(explicit: str | None = None) -> str:
  """``explicit``, else the pod's own namespace, else 'default'."""
  if explicit:
    return explicit
  try:
    with open(_NAMESPACE_FILE) as f:
      return f.read().strip() or "default"
  except OSError:
    return "default"


def load_api(api_host: str | None = None):
  """A ``CoreV1Api``: in a pod, its service account's; else the local
  kubeconfig's; ``api_host`` (tests: a fake API server) overrides both."""
  from kubernetes import client, config
  if api_host:
    cfg = client.Configuration()
    cfg.host = api_host
    return client.CoreV1Api(client.ApiClient(cfg))
  try:
    config.load_incluster_config()
  except config.ConfigException:
    config.load_kube_config()
  return client.CoreV1Api()


def pod_address(pod, port_name: str = "grpc", port: int | None = None
                ) -> str | None:
  """``ip:port`` of a pod that may serve now, else None (not running, not
  ready, being deleted, no IP, or no port of that name)."""
  if pod.metadata.deletion_timestamp is not None:
    return None
  status = pod.status
  if status is None or status.phase != "Running" or not status.pod_ip:
    return None
  ready = any(c.type == "Ready" and c.status == "True"
              for c in status.conditions or ())
  if not ready:
    return None
  if port is None:
    for c in pod.spec.containers or ():
      for p in c.ports or ():
        if p.name == port_name:
          port = p.container_port
          break
      if port is not None:
        break
  if port is None:
    return None
  ip = status.pod_ip
  return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class PodWatch:
  """Keeps a registry's pools equal to the ready pods of their selectors."""

  def __init__(self, registry: WorkerRegistry, selectors: dict[str, str],
               namespace: str, *, port_name: str = "grpc",
               port: int | None = None, api=None,
               watch_timeout_s: int = 300, retry_s: float = 2.0):
    self.registry = registry
    self.selectors = {r: s for r, s in selectors.items() if s}
    self.namespace = namespace
    self.port_name = port_name
    self.port = port
    self.api = api
    self.watch_timeout_s = watch_timeout_s
    self.retry_s = retry_s
    self._loop: asyncio.AbstractEventLoop | None = None
    self._stop = threading.Event()
    self._threads: list[threading.Thread] = []
    # role -> pod name -> address (members only).
    self.members: dict[str, dict[str, str]] = {r: {} for r in self.selectors}
    self.synced = {r: threading.Event() for r in self.selectors}

  def start(self) -> None:
    self._loop = asyncio.get_running_loop()
    if self.api is None:
      self.api = load_api()
    for role in self.selectors:
      t = threading.Thread(target=self._run, args=(role,), daemon=True,
                           name=f"k8s-watch-{role}")
      t.start()
      self._threads.append(t)

  def stop(self) -> None:
    self._stop.set()

  # ------------------------------------------------------- watcher threads
  def _run(self, role: str) -> None:
    from kubernetes import watch
    from kubernetes.client.exceptions import ApiException
    selector = self.selectors[role]
    while not self._stop.is_set():
      try:
        pods = self.api.list_namespaced_pod(self.namespace,
                                            label_selector=selector)
        found = {}
        for pod in pods.items:
          address = pod_address(pod, self.port_name, self.port)
          if address:
            found[pod.metadata.name] = address
        self._post(self._sync, role, found)
        self.synced[role].set()
        w = watch.Watch()
        for event in w.stream(
            self.api.list_namespaced_pod, self.namespace,
            label_selector=selector,
            resource_version=pods.metadata.resource_version,
            timeout_seconds=self.watch_timeout_s):
          if self._stop.is_set():
            w.stop()
            break
          pod = event["object"]
          address = (None if event["type"] == "DELETED"
                     else pod_address(pod, self.port_name, self.port))
          self._post(self._apply, role, pod.metadata.name, address)
      except ApiException as e:
        if e.status != 410:   # 410 Gone: the version expired; list again
          log.warning("watching %s pods (%s): %s %s; retrying", role,
                      selector, e.status, e.reason)
          self._stop.wait(self.retry_s)
      except Exception as e:  # noqa: BLE001 - the API server went away
        log.warning("watching %s pods (%s): %s; retrying", role, selector,
                    e)
        self._stop.wait(self.retry_s)

  def _post(self, fn, *args) -> None:
    if self._loop is not None and not self._loop.is_closed():
      self._loop.call_soon_threadsafe(fn, *args)

  # ------------------------------------------------- on the router's loop
  def _sync(self, role: str, found: dict[str, str]) -> None:
    for name in set(self.members[role]) - set(found):
      self._apply(role, name, None)
    for name, address in found.items():
      self._apply(role, name, address)

  def _apply(self, role: str, name: str, address: str | None) -> None:
    known = self.members[role].get(name)
    if known == address:
      return
    if known is not None:
      w = self.registry.get(known, role)
      if w is not None and w.source == "kubernetes":
        self.registry.retire(w, f"pod {name} is "
                             + ("gone" if address is None else "moved"))
      del self.members[role][name]
    if address is not None:
      log.info("%s pod %s is ready at %s: joining", role, name, address)
      self.registry.add(address, role, "kubernetes")
      self.members[role][name] = address

  def wait_synced(self, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    return all(e.wait(max(0.0, deadline - time.monotonic()))
               for e in self.synced.values())


__all__ = ["PodWatch", "current_namespace", "load_api", "pod_address"]
