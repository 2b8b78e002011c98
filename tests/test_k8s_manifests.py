"""The Kubernetes example (deploy/k8s/) against the code it runs: every
flag a container passes is one its launcher defines, every ``$(VAR)`` is
set for the container (by its env or by the LeaderWorkerSet controller),
the deployment files it names exist, the router's label selectors pick the
pools' serving pods (and its RBAC lets it watch them), the planner scales
workloads that exist (and its RBAC lets it), the meshes fit the GPUs each
pod asks for, and the grace periods outlast the drains. No cluster is
needed: a manifest that would fail at start-up fails here."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((REPO / "deploy" / "k8s").glob("*.yaml"))
# Launchers of the pools (they hold a mesh of GPUs).
WORKERS = ("pdjax.launch.prefill", "pdjax.launch.decode",
           "pdjax.launch.worker")
# What the LeaderWorkerSet controller sets in every pod of a group.
LWS_ENV = {"LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX"}


@functools.lru_cache(maxsize=None)
def launcher_flags(module: str) -> frozenset[str]:
  """The flags ``python -m module`` defines (its --helpfull)."""
  proc = subprocess.run([sys.executable, "-m", module, "--helpfull"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  names = re.findall(r"^\s+--(?:\[no\])?(\w+):", proc.stdout, re.M)
  assert names, f"{module} --helpfull listed no flags:\n{proc.stderr[-2000:]}"
  return frozenset(names)


def _docs(path: Path) -> dict[tuple[str, str], dict]:
  return {(d["kind"], d["metadata"]["name"]): d
          for d in yaml.safe_load_all(path.read_text()) if d}


def _pod_specs(doc: dict) -> list[tuple[dict, bool]]:
  """(pod spec, made by LeaderWorkerSet) of every pod template in doc."""
  if doc["kind"] == "LeaderWorkerSet":
    t = doc["spec"]["leaderWorkerTemplate"]
    return [(t[k]["spec"], True) for k in ("leaderTemplate", "workerTemplate")
            if k in t]
  if doc["kind"] in ("Deployment", "StatefulSet"):
    return [(doc["spec"]["template"]["spec"], False)]
  return []


def _flags(container: dict) -> dict[str, str]:
  out = {}
  for arg in container.get("args", []):
    assert arg.startswith("--"), f"{container['name']}: {arg!r} is not a flag"
    name, _, value = arg[2:].partition("=")
    out[name] = value
  return out


def _gpus(container: dict) -> int:
  return int(container.get("resources", {}).get("limits", {}).get(
      "nvidia.com/gpu", 0))


def _mesh_size(spec: str) -> int:
  size = 1
  for part in spec.split(","):
    size *= int(part.split("=")[1])
  return size


def test_there_is_an_example():
  assert MANIFESTS, "deploy/k8s/ has no manifest"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_containers_start_with_flags_their_launchers_define(path):
  for doc in _docs(path).values():
    for spec, by_lws in _pod_specs(doc):
      for c in spec["containers"]:
        assert c["command"][:2] == ["python", "-m"], c["command"]
        module = c["command"][2]
        defined = launcher_flags(module)
        flags = _flags(c)
        unknown = [f for f in flags
                   if f not in defined and not (f.startswith("no")
                                                and f[2:] in defined)]
        assert not unknown, f"{module} has no flag(s) {unknown}"
        env = {e["name"] for e in c.get("env", [])} | (LWS_ENV if by_lws
                                                       else set())
        for arg in c["args"]:
          for var in re.findall(r"\$\((\w+)\)", arg):
            assert var in env, f"{c['name']}: $({var}) is never set"
        config = flags.get("config")
        if config:
          from pdjax import resources
          assert resources.packaged("deployment", config), config
        if module in WORKERS:
          # A mesh may not ask for more devices than the pod has: the
          # local ones, times the processes of a group spanning pods.
          procs = doc["spec"]["leaderWorkerTemplate"]["size"] if by_lws else 1
          assert _mesh_size(flags["mesh"]) == _gpus(c) * procs, (
              module, flags["mesh"], _gpus(c), procs)
          if by_lws:
            assert flags["num_processes"] == "$(LWS_GROUP_SIZE)"
            assert flags["process_id"] == "$(LWS_WORKER_INDEX)"
        # Serving workers are dialled at their pod IP.
        if "advertise_address" in flags:
          assert flags["advertise_address"].endswith(":" + flags["port"])
        if "port" in flags:     # a server (the planner serves nothing)
          assert flags.get("host") == "0.0.0.0", (
              "bind beyond the pod's loopback")
        if "port" in flags:     # a server drains on SIGTERM
          drain = float(flags.get("drain_timeout_s", 60))
          assert spec.get("terminationGracePeriodSeconds", 30) > drain
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
          if probe in c:
            how = c[probe].get("grpc") or c[probe]["httpGet"]
            assert how["port"] == int(flags["port"]), probe


def _gateway_paths() -> set[str]:
  from pdjax.gateway import GatewayConfig, create_app
  app = create_app(GatewayConfig("127.0.0.1:1"))
  return {r.canonical for r in app.router.resources()}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_probes_ask_what_the_services_answer(path):
  """Readiness asks whether a process can serve (a router: whether a
  decode worker is ready; a gateway: whether its router is), liveness only
  whether it runs, so that Kubernetes takes a process out of rotation when
  its backends are gone but restarts only a hung one. Every serving
  container has both; a gRPC liveness probe names the liveness service the
  launchers register, an HTTP probe a path the gateway serves."""
  from pdjax.service.common import LIVENESS_SERVICE
  from pdjax.service.router import GENERATION_SERVICE
  paths = _gateway_paths()
  ready_paths = {"/health", "/readyz"} & paths
  seen = 0
  for doc in _docs(path).values():
    for spec, _ in _pod_specs(doc):
      for c in spec["containers"]:
        if "readinessProbe" not in c:
          continue
        seen += 1
        assert "livenessProbe" in c, c["name"]
        ready, alive = c["readinessProbe"], c["livenessProbe"]
        if "grpc" in ready:
          assert ready["grpc"].get("service", "") in ("",
                                                      GENERATION_SERVICE)
          assert alive["grpc"].get("service") == LIVENESS_SERVICE, c["name"]
        else:
          assert ready["httpGet"]["path"] in ready_paths, c["name"]
          assert alive["httpGet"]["path"] == "/livez", c["name"]
          assert "/livez" in paths
  assert seen >= 4      # decode, prefill leader, router, gateway


def _selects(selector: str, labels: dict) -> bool:
  """Whether an equality-based label selector ('a=b,c=d') matches."""
  want = dict(part.split("=", 1) for part in selector.split(","))
  return all(labels.get(k) == v for k, v in want.items())


def _pod_templates(doc: dict) -> list[dict]:
  """The pod templates (metadata + spec) of a workload."""
  if doc["kind"] == "LeaderWorkerSet":
    t = doc["spec"]["leaderWorkerTemplate"]
    return [t[k] for k in ("leaderTemplate", "workerTemplate") if k in t]
  if doc["kind"] in ("Deployment", "StatefulSet"):
    return [doc["spec"]["template"]]
  return []


def _role_allows(docs: dict, account: str, group: str, resource: str,
                 verbs: set[str]) -> bool:
  """Whether a Role bound to ServiceAccount ``account`` grants ``verbs``
  on ``resource`` of API ``group``."""
  for (kind, _), b in docs.items():
    if kind != "RoleBinding" or not any(
        s["kind"] == "ServiceAccount" and s["name"] == account
        for s in b["subjects"]):
      continue
    role = docs.get(("Role", b["roleRef"]["name"]))
    for rule in (role or {}).get("rules", []):
      if (group in rule["apiGroups"] and resource in rule["resources"]
          and verbs <= set(rule["verbs"])):
        return True
  return False


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_the_router_watches_each_pools_serving_pods(path):
  """Each pool's selector picks exactly the pods that serve it (an LWS
  group's leader, not its followers), on a container port of the name the
  router dials, and the router's service account may watch pods."""
  docs = _docs(path)
  (router,) = [d for (k, _), d in docs.items() if k == "Deployment"
               and _module(d) == "pdjax.launch.router"]
  spec = _pod_specs(router)[0][0]
  flags = _flags(spec["containers"][0])
  assert "prefill_workers" not in flags and "decode_workers" not in flags
  launchers = {"prefill": "pdjax.launch.prefill",
               "decode": "pdjax.launch.decode"}
  for role, module in launchers.items():
    selector = flags[f"k8s_{role}_selector"]
    picked = served = 0
    for doc in docs.values():
      for t in _pod_templates(doc):
        c = t["spec"]["containers"][0]
        if _selects(selector, t["metadata"]["labels"]):
          picked += 1
          assert c["command"][2] == module, (role, c["command"])
          ports = {p.get("name"): p["containerPort"] for p in c["ports"]}
          assert ports[flags["k8s_port_name"]] == int(_flags(c)["port"])
          assert "readinessProbe" in c     # joins when Ready
        elif c["command"][2] == module and "readinessProbe" in c:
          served += 1                      # a serving pod left out
    assert picked == 1 and served == 0, (role, picked, served)
  account = spec.get("serviceAccountName")
  assert account and ("ServiceAccount", account) in docs
  assert _role_allows(docs, account, "", "pods", {"get", "list", "watch"})
  # Every worker serves the transport the router expects.
  for d in docs.values():
    for pspec, _ in _pod_specs(d):
      c = pspec["containers"][0]
      if c["command"][2] in WORKERS:
        assert _flags(c)["kv_transport"] == flags["kv_transport"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_the_planner_scales_the_pools_workloads(path):
  docs = _docs(path)
  planners = [d for (k, _), d in docs.items() if k == "Deployment"
              and _module(d) == "pdjax.launch.planner"]
  if not planners:
    pytest.skip("no planner in this example")
  (planner,) = planners
  assert planner["spec"]["replicas"] == 1      # one planner per deployment
  spec = _pod_specs(planner)[0][0]
  flags = _flags(spec["containers"][0])
  assert flags["scaler"] == "kubernetes"
  groups = {"statefulset": "apps", "deployment": "apps",
            "leaderworkerset": "leaderworkerset.x-k8s.io"}
  kinds = {"statefulset": "StatefulSet", "deployment": "Deployment",
           "leaderworkerset": "LeaderWorkerSet"}
  launchers = {"prefill": "pdjax.launch.prefill",
               "decode": "pdjax.launch.decode"}
  account = spec["serviceAccountName"]
  for role, module in launchers.items():
    kind, name = flags[f"{role}_workload"].split("/")
    doc = docs[(kinds[kind], name)]
    assert _module(doc) == module, (role, kind, name)
    assert _role_allows(docs, account, groups[kind], f"{kind}s/scale",
                        {"get", "patch"}), (role, kind)
    lo, hi = int(flags[f"min_{role}"]), int(flags[f"max_{role}"])
    assert 1 <= lo <= doc["spec"]["replicas"] <= hi, (role, lo, hi)
  # It dials the router's Service: gRPC and metrics ports.
  (router_svc,) = [d for (k, n), d in docs.items() if k == "Service"
                   and d["spec"]["selector"].get("app") == "pdjax-router"]
  ports = {p["name"]: p["port"] for p in router_svc["spec"]["ports"]}
  host, _, port = flags["router"].partition(":")
  assert host == router_svc["metadata"]["name"] and int(port) == ports["grpc"]
  assert flags["router_metrics"] == (f"http://{host}:{ports['metrics']}"
                                     "/metrics")
  (router,) = [d for (k, _), d in docs.items() if k == "Deployment"
               and _module(d) == "pdjax.launch.router"]
  assert int(_flags(_pod_specs(router)[0][0]["containers"][0])[
      "metrics_port"]) == ports["metrics"]
  # The profile file is on a mounted volume.
  mounts = spec["containers"][0]["volumeMounts"]
  assert any(flags["profile"].startswith(m["mountPath"] + "/")
             for m in mounts)


def _module(doc: dict) -> str:
  return _pod_specs(doc)[0][0]["containers"][0]["command"][2]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_gateways_dial_the_routers_service(path):
  """A gateway's --router is the router Service's name and port, and the
  Service in front of each gateway forwards to the port it serves."""
  docs = _docs(path)
  services = {name: d for (kind, name), d in docs.items()
              if kind == "Service"}
  routers = {d["spec"]["template"]["metadata"]["labels"]["app"]
             for (kind, _), d in docs.items()
             if kind == "Deployment" and _module(d) == "pdjax.launch.router"}
  gateways = [d for (kind, _), d in docs.items() if kind == "Deployment"
              and _module(d) == "pdjax.launch.gateway"]
  assert gateways, "the example has no gateway"
  for gw in gateways:
    target, _, port = _flags(_pod_specs(gw)[0][0]["containers"][0])[
        "router"].partition(":")
    svc = services[target]
    assert svc["spec"]["selector"]["app"] in routers
    assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
    own = [s for s in services.values() if s["spec"]["selector"]["app"]
           == gw["spec"]["template"]["metadata"]["labels"]["app"]]
    served = int(_flags(_pod_specs(gw)[0][0]["containers"][0])["port"])
    assert own and all(p.get("targetPort", p["port"]) == served
                       for s in own for p in s["spec"]["ports"])
