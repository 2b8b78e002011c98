"""Discovery in process: workers that register with the router
(``pdjax.v1.Registry``), leases, the handshake on registration, a router
that restarts, leaving without losing a request, moving a worker between
pools (``RoleControl``), and the Kubernetes pod watch against a fake API
server.

Everything speaks real gRPC on loopback: the router's server is assembled
as ``pdjax.launch.router`` assembles it (Generation + Registry, the service
token on the internal API), and each worker is a small fake ``Decode``
servicer (no JAX) whose token stream can be held.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from pdjax.client import AsyncClient
from pdjax.service import common, discovery
from pdjax.service.registry import WorkerRegistry
from pdjax.service.router import RouterConfig, RouterServicer
from pdjax.v1 import (common_pb2, decode_pb2, decode_pb2_grpc,
                      generate_pb2_grpc, registry_pb2, registry_pb2_grpc)

TOKEN = "service-secret"
CLIENT_TOKEN = "client-secret"
SEC = common.Security(service_token=TOKEN, token=CLIENT_TOKEN)
WORKER_SEC = common.Security(service_token=TOKEN)


def _model(fingerprint: str = "f") -> common_pb2.ModelInfo:
  return common_pb2.ModelInfo(name="fake", fingerprint=fingerprint,
                              vocab_size=320, max_seq_len=256, page_size=16,
                              dtype="float32", num_layers=2)


class FakeDecode(decode_pb2_grpc.DecodeServicer):
  """A decode worker: answers polls, streams tokens 100, 101, ... one per
  ``step_s`` while ``gate`` is open."""

  def __init__(self, fingerprint: str = "f"):
    self.fingerprint = fingerprint
    self.gate = asyncio.Event()
    self.gate.set()
    self.step_s = 0.005
    self.decodes = 0

  def info(self, address: str) -> common_pb2.WorkerInfo:
    return common_pb2.WorkerInfo(
        role="decode", address=address, model=_model(self.fingerprint),
        process_id=f"fake-{id(self)}", roles=["decode"],
        load=common_pb2.WorkerLoad(kv_pages_total=100, kv_pages_available=100,
                                   rows_free=8))

  async def GetWorkerInfo(self, request, context):
    return self.info(self.address)

  async def Decode(self, request, context):
    self.decodes += 1
    n = request.sampling.max_tokens
    for i in range(n):
      await self.gate.wait()
      await asyncio.sleep(self.step_s)
      yield decode_pb2.DecodeResponse(
          token_ids=[100 + i], logprobs=[-0.5],
          finish_reason=(common_pb2.FINISH_REASON_LENGTH if i == n - 1
                         else common_pb2.FINISH_REASON_UNSPECIFIED))


async def _worker(fake: FakeDecode, port: int = 0):
  server = common.make_server(WORKER_SEC)
  decode_pb2_grpc.add_DecodeServicer_to_server(fake, server)
  port = common.bind(server, "127.0.0.1", port)
  await server.start()
  fake.address = f"127.0.0.1:{port}"
  return server


class Router:
  """The router's server: Generation (client token) + Registry (service
  token), over a registry polled every 50 ms."""

  def __init__(self, port: int = 0):
    self.port = port

  async def __aenter__(self):
    self.registry = WorkerRegistry(SEC, poll_interval_s=0.05)
    self.servicer = RouterServicer(self.registry, None, RouterConfig())
    self.server = common.make_server(SEC, client_facing=True,
                                     internal=discovery.INTERNAL_PREFIXES)
    generate_pb2_grpc.add_GenerationServicer_to_server(self.servicer,
                                                       self.server)
    registry_pb2_grpc.add_RegistryServicer_to_server(
        discovery.RegistryServicer(self.registry, default_lease_s=5.0),
        self.server)
    self.port = common.bind(self.server, "127.0.0.1", self.port)
    await self.server.start()
    self.registry.start()
    self.address = f"127.0.0.1:{self.port}"
    self.client = AsyncClient(self.address, timeout_s=30, token=CLIENT_TOKEN)
    return self

  async def __aexit__(self, *exc):
    await self.client.close()
    await self.server.stop(0)
    await self.registry.close()

  def pool(self, role: str = "decode") -> dict[str, str]:
    return {w.address: w.state for w in discovery.list_workers(
        self.registry).workers if w.role == role}


def _announcer(router: Router, fake: FakeDecode, lease_s: float = 5.0):
  return discovery.Announcer(router.address, WORKER_SEC,
                             lambda role: fake.info(fake.address),
                             lease_s=lease_s, rpc_timeout_s=2.0)


async def _until(check, timeout_s: float = 10.0, what: str = ""):
  deadline = time.monotonic() + timeout_s
  while not check():
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    await asyncio.sleep(0.02)


async def _tokens(client: AsyncClient, n: int) -> list[int]:
  out = []
  async for d in client.stream(prompt_token_ids=[5, 6, 7], max_tokens=n):
    out.extend(d.token_ids)
  return out


# ------------------------------------------------------------ registration
def test_registration_is_internal_and_the_worker_is_routed_to_at_once():
  """Register needs the service token (the client token is refused), runs
  the handshake and a poll, so the worker serves as soon as it returns."""
  async def run():
    fake = FakeDecode()
    server = await _worker(fake)
    async with Router() as r:
      info = fake.info(fake.address)
      for token in (None, CLIENT_TOKEN):
        ch = common.make_channel(r.address, common.Security(
            service_token=token), aio=True)
        with pytest.raises(grpc.aio.AioRpcError) as e:
          await registry_pb2_grpc.RegistryStub(ch).Register(
              registry_pb2.RegisterRequest(info=info))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await ch.close()
      ann = _announcer(r, fake)
      assert await ann.join("decode")
      assert r.pool() == {fake.address: "ready"}
      assert await _tokens(r.client, 3) == [100, 101, 102]
      # A malformed registration names its field.
      ch = common.make_channel(r.address, WORKER_SEC, aio=True)
      bad = common_pb2.WorkerInfo(role="both", address=fake.address)
      with pytest.raises(grpc.aio.AioRpcError) as e:
        await registry_pb2_grpc.RegistryStub(ch).Register(
            registry_pb2.RegisterRequest(info=bad))
      assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
      assert "info.role" in e.value.details()
      await ch.close()
      await ann.close()
      assert r.pool() == {}
    await server.stop(0)

  asyncio.run(run())


def test_a_lapsed_lease_drops_the_worker():
  async def run():
    fake = FakeDecode()
    server = await _worker(fake)
    async with Router() as r:
      ann = _announcer(r, fake, lease_s=1.0)
      assert await ann.join("decode")
      ann.start()
      await asyncio.sleep(1.5)          # renewed: still there
      assert r.pool() == {fake.address: "ready"}
      ann._task.cancel()                # the worker stops renewing (hung)
      await _until(lambda: not r.pool(), 5.0, "the lease to lapse")
    await server.stop(0)

  asyncio.run(run())


def test_a_worker_back_with_another_model_is_refused():
  """The handshake runs on every registration: the same address coming
  back with another model fingerprint is refused with FAILED_PRECONDITION
  and never routed to."""
  async def run():
    first = FakeDecode("f")
    server = await _worker(first)
    async with Router() as r:
      ann = _announcer(r, first)
      assert await ann.join("decode")
      await ann.close()                 # it leaves ...
      await server.stop(0)
      other = FakeDecode("g")           # ... and comes back changed
      port = int(first.address.rsplit(":", 1)[1])
      server = await _worker(other, port)
      ann = _announcer(r, other)
      assert not await ann.join("decode")
      assert "fingerprint 'g' differs from the deployment's 'f'" in (
          ann.refused["decode"])
      assert r.pool() == {}
      await ann.close()
    await server.stop(0)

  asyncio.run(run())


def test_a_worker_storing_kv_otherwise_is_refused():
  """The KV's storage is part of the handshake: a worker that hands on (or
  stores) FP8 KV cannot join a deployment of bfloat16 KV, whose other
  workers could not read its hand-offs."""
  reg = WorkerRegistry(expected_model=common_pb2.ModelInfo(
      name="fake", fingerprint="f", dtype="bfloat16", kv_dtype="bfloat16"))
  same = common_pb2.ModelInfo(name="fake", fingerprint="f", dtype="bfloat16",
                              kv_dtype="bfloat16")
  fp8 = common_pb2.ModelInfo(name="fake", fingerprint="f", dtype="bfloat16",
                             kv_dtype="float8_e4m3fn")
  assert reg.check_compatible(common_pb2.WorkerInfo(model=same)) is None
  assert reg.check_compatible(common_pb2.WorkerInfo(model=fp8)) == (
      "kv_dtype 'float8_e4m3fn' differs from the deployment's 'bfloat16'")


def test_workers_register_again_after_the_router_restarts():
  async def run():
    fake = FakeDecode()
    server = await _worker(fake)
    async with Router() as r:
      port = r.port
      ann = _announcer(r, fake, lease_s=1.0)
      assert await ann.join("decode")
      ann.start()
    # The router is gone (its leases with it); a new one on its port.
    await asyncio.sleep(0.5)
    async with Router(port) as r:
      # The router lists the worker as soon as it handles the Register
      # call; the worker counts it once the reply reaches it.
      await _until(lambda: (r.pool() == {fake.address: "ready"}
                            and ann.registrations >= 2), 10.0,
                   "the worker to register again")
      assert await _tokens(r.client, 2) == [100, 101]
    await ann.close()
    await server.stop(0)

  asyncio.run(run())


def test_leaving_loses_no_request():
  """Deregistered while streaming: no new request goes to the worker, the
  running stream finishes through the router, then the channel closes."""
  async def run():
    leaving, staying = FakeDecode(), FakeDecode()
    servers = [await _worker(leaving), await _worker(staying)]
    async with Router() as r:
      anns = [_announcer(r, f) for f in (leaving, staying)]
      assert await anns[0].join("decode")
      leaving.gate.clear()              # holds its streams mid-way
      running = asyncio.ensure_future(_tokens(r.client, 5))
      await _until(lambda: leaving.decodes == 1, 5.0, "a stream to start")
      assert await anns[1].join("decode")
      await anns[0].close()             # deregisters
      assert r.pool() == {leaving.address: "draining",
                          staying.address: "ready"}
      assert await _tokens(r.client, 2) == [100, 101]   # the other one
      assert leaving.decodes == 1 and staying.decodes == 1
      leaving.gate.set()
      assert await running == [100, 101, 102, 103, 104]
      await _until(lambda: r.pool() == {staying.address: "ready"}, 5.0,
                   "the leaving worker's channel to close")
      await anns[1].close()
    for s in servers:
      await s.stop(0)

  asyncio.run(run())


# ---------------------------------------------------------- moving a worker
class _Pool:
  def __init__(self):
    self.draining = False
    self.running = 0

  def active(self) -> int:
    return self.running


def test_a_worker_moves_between_pools_after_draining_the_old_one():
  async def run():
    pools = {"prefill": _Pool(), "decode": _Pool()}
    control = discovery.RoleControl(pools, {"decode"})
    await control.start()
    assert pools["prefill"].draining and not pools["decode"].draining
    pools["decode"].running = 2
    move = asyncio.ensure_future(control.switch("prefill", 10.0))
    await asyncio.sleep(0.2)
    # Draining the old pool: it takes no new work, the new one waits.
    assert not move.done() and pools["decode"].draining
    assert pools["prefill"].draining
    pools["decode"].running = 0
    drain_s, _ = await move
    assert drain_s >= 0.2
    assert control.active == {"prefill"} and not pools["prefill"].draining
    assert await control.switch("prefill") == (0.0, 0.0)
    with pytest.raises(ValueError, match="--role=both"):
      await discovery.RoleControl({"decode": _Pool()}, {"decode"}).switch(
          "prefill")

  asyncio.run(run())


# ------------------------------------------------------ Kubernetes pods
def _pod(name: str, ip: str, ready: bool = True, deleting: bool = False):
  return {
      "kind": "Pod", "apiVersion": "v1",
      "metadata": {"name": name, "namespace": "ns", "resourceVersion": "1",
                   **({"deletionTimestamp": "2026-01-01T00:00:00Z"}
                      if deleting else {})},
      "spec": {"containers": [{"name": "decode", "image": "x", "ports": [
          {"name": "grpc", "containerPort": 50071}]}]},
      "status": {"phase": "Running", "podIP": ip, "conditions": [
          {"type": "Ready", "status": "True" if ready else "False"}]}}


class FakeApiServer:
  """The two calls of a pod watch: list (a PodList) and watch (a stream
  of events the test pushes, one JSON object per line)."""

  def __init__(self, pods: list[dict]):
    self.pods = pods
    self.events: list[dict] = []
    self.cond = threading.Condition()
    self.requests: list[str] = []
    fake = self

    class Handler(BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *a):
        pass

      def do_GET(self):
        fake.requests.append(self.path)
        if "watch=true" in self.path.lower():
          self.send_response(200)
          self.send_header("Content-Type", "application/json")
          self.send_header("Transfer-Encoding", "chunked")
          self.end_headers()
          sent = 0
          deadline = time.monotonic() + 5
          while time.monotonic() < deadline:
            with fake.cond:
              fake.cond.wait_for(lambda: len(fake.events) > sent, 0.2)
              new = fake.events[sent:]
            for ev in new:
              line = (json.dumps(ev) + "\n").encode()
              self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
              self.wfile.flush()
            sent += len(new)
          self.wfile.write(b"0\r\n\r\n")
          return
        body = json.dumps({"kind": "PodList", "apiVersion": "v1",
                           "metadata": {"resourceVersion": "1"},
                           "items": fake.pods}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.thread = threading.Thread(target=self.server.serve_forever,
                                   daemon=True)
    self.thread.start()
    self.url = f"http://127.0.0.1:{self.server.server_port}"

  def push(self, kind: str, pod: dict) -> None:
    with self.cond:
      self.events.append({"type": kind, "object": pod})
      self.cond.notify_all()

  def close(self) -> None:
    self.server.shutdown()


def test_the_router_follows_the_ready_pods_of_a_selector():
  pytest.importorskip("kubernetes")
  from pdjax.service.k8s_discovery import PodWatch, load_api

  async def run():
    api = FakeApiServer([_pod("d-0", "10.0.0.1"),
                         _pod("d-1", "10.0.0.2", ready=False)])
    registry = WorkerRegistry(SEC, poll_interval_s=60)
    watch = PodWatch(registry, {"decode": "app=pdjax-decode"}, "ns",
                     api=load_api(api.url), retry_s=0.1)
    watch.start()

    def pool():
      return sorted(w.address for w in registry.of_role("decode"))
    try:
      await _until(lambda: pool() == ["10.0.0.1:50071"], 10, "the list")
      api.push("MODIFIED", _pod("d-1", "10.0.0.2"))      # became ready
      await _until(lambda: len(pool()) == 2, 10, "d-1 to join")
      api.push("MODIFIED", _pod("d-0", "10.0.0.1", deleting=True))
      await _until(lambda: pool() == ["10.0.0.2:50071"], 10,
                   "d-0 to leave")
      assert registry.retiring == set() or all(
          w.address == "10.0.0.1:50071" for w in registry.retiring)
      api.push("DELETED", _pod("d-1", "10.0.0.2"))
      await _until(lambda: pool() == [], 10, "d-1 to leave")
      assert "labelSelector=app%3Dpdjax-decode" in api.requests[0]
      assert all(w.source == "kubernetes" for w in registry.retiring)
    finally:
      watch.stop()
      await registry.close()
      api.close()

  asyncio.run(run())
