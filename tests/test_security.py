"""Security, end to end: TLS + mutual TLS + bearer token on a real
deployment (router, prefill and decode worker processes, grpc KV transport),
the KV transfer-id rule, loopback binding, message size limits, and no
unsafe deserialisation of network input.

One deployment (module fixture) runs every service with ``--tls_mtls``, so a
successful generation proves each internal channel speaks mutual TLS:
router -> workers, prefill -> decode (``KvTransfer.PushKv``) and decode ->
prefill (``ReleaseKv``). Certificates come from ``pdjax.security.certs``.
The small in-process servers at the end check certificate-name rules that
need certificates a deployment would not use.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import ipaddress
import re
import secrets
import stat
import time
import tokenize
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

pytest.importorskip("cryptography")

# pylint: disable=g-import-not-at-top
from pdjax.client import Client, GenerationError, TlsConfig
from pdjax.security import certs as certs_lib
from pdjax.service import common
from pdjax.v1 import (common_pb2, decode_pb2, decode_pb2_grpc, kv_pb2,
                      prefill_pb2, prefill_pb2_grpc)

pytestmark = pytest.mark.timeout(600)

_ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-token-" + secrets.token_hex(8)
# The deployment's internal credential (router <-> workers, worker <->
# worker), distinct from the client-facing TOKEN.
SERVICE_TOKEN = "service-token-" + secrets.token_hex(8)
# The router's limit: small enough that a test request can exceed it.
ROUTER_MAX_MESSAGE_BYTES = 1 << 20
# The workers' limit: below the grpc transport's default 4 MiB chunk and
# below one (layer, K/V) slab of a long prompt's KV, so KV pushes only work
# if the sender sizes its chunks by the limit.
WORKER_MAX_MESSAGE_BYTES = 16 << 10
MAX_NEW = 6
LONG_PROMPT = [(7 * i) % 400 + 3 for i in range(200)]  # 13 KV pages


# --------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> certs_lib.DevCerts:
  return certs_lib.write_dev_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> certs_lib.DevCerts:
  """A second, unrelated CA and its certificates (an outsider's)."""
  return certs_lib.write_dev_certs(tmp_path_factory.mktemp("foreign"),
                                   ca_name="someone else's CA")


class _Deployment:

  def __init__(self, cluster, address: str,
               certs: certs_lib.DevCerts):
    self.cluster = cluster
    self.address = address
    self.certs = certs
    # What every service of the deployment presents (and the router dials
    # the workers with).
    self.service_security = common.Security(
        cert=str(certs.server_cert), key=str(certs.server_key),
        ca=str(certs.ca), mtls=True, service_token=SERVICE_TOKEN)

  def proc(self, name: str):
    return next(p for p in self.cluster.procs if p.name == name)

  def worker_address(self, name: str) -> str:
    return f"127.0.0.1:{self.proc(name).port()}"

  def metrics(self, name: str) -> str:
    import urllib.request
    port = self.proc(name).metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                timeout=10) as r:
      return r.read().decode()

  def client_tls(self) -> TlsConfig:
    c = self.certs
    return TlsConfig(root_ca=str(c.ca), cert=str(c.client_cert),
                     key=str(c.client_key))

  def client(self, *, tls: TlsConfig | None | str = "mtls",
             token: str | None = TOKEN, **kw) -> Client:
    if tls == "mtls":
      tls = self.client_tls()
    return Client(self.address, tls=tls, token=token, timeout_s=60, **kw)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, certs):
  from pdjax.launch.cluster import LocalCluster, launch
  tls = certs.service_flags(mtls=True)
  cluster = LocalCluster(tmp_path_factory.mktemp("tls_cluster"))
  try:
    address = launch(
        cluster, config="test", kv_transport="grpc", num_prefill=1,
        num_decode=1, ready_timeout_s=300,
        # --nowarmup: these tests check who may call what, not compiles.
        worker_flags=[*tls, "--metrics_port=0", "--nowarmup",
                      f"--max_message_bytes={WORKER_MAX_MESSAGE_BYTES}",
                      f"--service_token={SERVICE_TOKEN}"],
        router_flags=[*tls, f"--auth_token={TOKEN}",
                      f"--max_message_bytes={ROUTER_MAX_MESSAGE_BYTES}",
                      f"--service_token={SERVICE_TOKEN}"])
    yield _Deployment(cluster, address, certs)
  finally:
    cluster.stop()


def _metric(text: str, name: str, labels: str = "") -> float:
  want = name + (("{" + labels + "}") if labels else " ")
  for line in text.splitlines():
    if line.startswith(want):
      return float(line.rsplit(" ", 1)[1])
  raise KeyError(f"{name}{{{labels}}} not in metrics")


def _rpc_code(fn) -> grpc.StatusCode | None:
  """The status code ``fn()`` failed with (None if it succeeded)."""
  try:
    result = fn()
    if hasattr(result, "__iter__") and not isinstance(result, (str, bytes)):
      for _ in result:
        pass
  except grpc.RpcError as e:
    return e.code()
  except GenerationError as e:
    return e.code()
  return None


# ------------------------------------------------- the client-facing router
def test_mtls_client_with_token_generates(deployment):
  """The whole request path is mutual TLS: router -> prefill, prefill ->
  decode KV push (chunked under the workers' 16 KiB message limit),
  router -> decode, decode -> prefill ReleaseKv."""
  with deployment.client() as c:
    r = c.generate(prompt_token_ids=LONG_PROMPT, max_tokens=MAX_NEW,
                   temperature=0.0, ignore_eos=True)
    assert len(r.token_ids) == MAX_NEW and r.finish_reason == "length"
    assert r.usage.prefill_worker, "not disaggregated: no prefill worker"
    assert r.usage.kv_transfer_s > 0
    streamed = [t for d in c.stream(prompt_token_ids=LONG_PROMPT,
                                    max_tokens=MAX_NEW, temperature=0.0,
                                    ignore_eos=True) for t in d.token_ids]
    assert streamed == r.token_ids
  # ReleaseKv is fire-and-forget: its failure (e.g. a plaintext channel to
  # the mTLS prefill server) only shows in the decode worker's log.
  time.sleep(1.0)
  log = deployment.proc("decode0").log.read_text(errors="replace")
  assert "ReleaseKv to" not in log, log[-2000:]


def test_missing_or_wrong_token_is_unauthenticated(deployment):
  for token in (None, "wrong-" + TOKEN, TOKEN + "x"):
    with deployment.client(token=token) as c:
      with pytest.raises(GenerationError) as e:
        c.generate(prompt_token_ids=[5, 6, 7], max_tokens=2)
      assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, token
      with pytest.raises(GenerationError) as e:
        c.model_info()
      assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, token


def test_health_needs_tls_but_no_token(deployment):
  with deployment.client(token=None) as c:
    # Readiness follows the decode worker as the router's polls see it (a
    # loaded machine can make them late): wait for it, then ask.
    c.wait_ready(30)
    assert c.health("pdjax.v1.Generation", timeout_s=10) == "SERVING"
  with deployment.client(tls=TlsConfig(root_ca=str(deployment.certs.ca)),
                         token=None) as c:
    with pytest.raises(GenerationError) as e:
      c.health(timeout_s=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("who", [
    "plaintext", "no_client_cert", "foreign_client_cert",
    "does_not_trust_server"])
def test_untrusted_clients_are_refused(deployment, foreign, who):
  """A handshake that fails looks like UNAVAILABLE to the caller; the token
  alone never gets a request in."""
  certs = deployment.certs
  tls = {
      "plaintext": None,
      "no_client_cert": TlsConfig(root_ca=str(certs.ca)),
      "foreign_client_cert": TlsConfig(
          root_ca=str(certs.ca), cert=str(foreign.client_cert),
          key=str(foreign.client_key)),
      # Our own client certificate, but we trust another CA: the client must
      # refuse the server's certificate.
      "does_not_trust_server": TlsConfig(
          root_ca=str(foreign.ca), cert=str(certs.client_cert),
          key=str(certs.client_key)),
  }[who]
  with deployment.client(tls=tls) as c:
    with pytest.raises(GenerationError) as e:
      c.generate(prompt_token_ids=[5, 6, 7], max_tokens=2, timeout_s=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
  # The router is unharmed.
  with deployment.client() as c:
    assert len(c.generate(prompt_token_ids=[5, 6, 7], max_tokens=2,
                          ignore_eos=True).token_ids) == 2


def test_oversized_request_is_refused_and_router_keeps_serving(deployment):
  ids = [123_456] * 400_000  # 3 bytes a varint: ~1.2 MB > 1 MiB
  with deployment.client() as c:
    with pytest.raises(GenerationError) as e:
      c.generate(prompt_token_ids=ids, max_tokens=2)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(c.generate(prompt_token_ids=[5, 6, 7], max_tokens=2,
                          ignore_eos=True).token_ids) == 2


# ------------------------------------------------------- the worker APIs
def _worker_info(address: str, security: common.Security, role: str):
  with common.make_channel(address, security) as ch:
    stub = (prefill_pb2_grpc.PrefillStub(ch) if role == "prefill"
            else decode_pb2_grpc.DecodeStub(ch))
    return stub.GetWorkerInfo(common_pb2.WorkerInfoRequest(), timeout=10)


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_workers_accept_only_deployment_certificates(deployment, foreign,
                                                     role):
  address = deployment.worker_address(f"{role}0")
  certs = deployment.certs
  info = _worker_info(address, deployment.service_security, role)
  assert info.role == role
  if role == "decode":   # test.toml: pages on demand, 4 steps per call
    assert info.admission_tokens_past_prompt == 2 * 4
  outsiders = {
      "plaintext": common.Security(),
      "no_client_cert": common.Security(ca=str(certs.ca)),
      "foreign_cert": common.Security(
          cert=str(foreign.server_cert), key=str(foreign.server_key),
          ca=str(certs.ca)),
  }
  for who, sec in outsiders.items():
    code = _rpc_code(lambda: _worker_info(address, sec, role))
    assert code == grpc.StatusCode.UNAVAILABLE, (who, code)


def test_workers_refuse_internal_rpcs_without_the_service_token(deployment):
  """A client certificate (what the quick start gives external callers)
  gets through the workers' TLS, but not their API: every internal RPC
  needs the service token, which the client token is not. Health stays
  open (probes carry no token)."""
  certs = deployment.certs
  callers = {
      "client cert": common.Security(cert=str(certs.client_cert),
                                     key=str(certs.client_key),
                                     ca=str(certs.ca)),
      "client cert + client token": common.Security(
          cert=str(certs.client_cert), key=str(certs.client_key),
          ca=str(certs.ca), service_token=TOKEN),
      "service cert, no token": common.Security(
          cert=str(certs.server_cert), key=str(certs.server_key),
          ca=str(certs.ca)),
  }
  decode = deployment.worker_address("decode0")
  prefill = deployment.worker_address("prefill0")
  sampling = common_pb2.SamplingParams(max_tokens=4, temperature=0.0)
  for who, sec in callers.items():
    with common.make_channel(decode, sec) as ch:
      stub = decode_pb2_grpc.DecodeStub(ch)
      reserve = _rpc_code(lambda: stub.Reserve(decode_pb2.ReserveRequest(
          request_id="sec-intruder", prompt_tokens=3, max_tokens=4,
          transfer_id=secrets.token_hex(16)), timeout=10))
      local = _rpc_code(lambda: stub.Decode(decode_pb2.DecodeRequest(
          request_id="sec-intruder", prompt_token_ids=[5, 6, 7],
          sampling=sampling, local_prefill=True), timeout=10))
      assert (reserve, local) == (grpc.StatusCode.UNAUTHENTICATED,) * 2, who
      health_code = _rpc_code(lambda: health_pb2_grpc.HealthStub(ch).Check(
          health_pb2.HealthCheckRequest(), timeout=10))
      assert health_code is None, (who, health_code)
    with common.make_channel(prefill, sec) as ch:
      code = _rpc_code(lambda: prefill_pb2_grpc.PrefillStub(ch).Prefill(
          prefill_pb2.PrefillRequest(request_id="sec-intruder",
                                     prompt_token_ids=[5, 6, 7],
                                     sampling=sampling), timeout=10))
      assert code == grpc.StatusCode.UNAUTHENTICATED, who
    # The sessions that carry the router's calls: refused alike, by the
    # interceptor, before the session's handler could run a call.
    for address, stub_cls, req in (
        (decode, decode_pb2_grpc.DecodeStub, decode_pb2.DecodeSessionRequest(
            call=1, start=decode_pb2.DecodeCall(
                request=decode_pb2.DecodeRequest(
                    request_id="sec-intruder", prompt_token_ids=[5, 6, 7],
                    sampling=sampling, local_prefill=True)))),
        (prefill, prefill_pb2_grpc.PrefillStub,
         prefill_pb2.PrefillSessionRequest(
             call=1, start=prefill_pb2.PrefillCall(
                 request=prefill_pb2.PrefillRequest(
                     request_id="sec-intruder", prompt_token_ids=[5, 6, 7],
                     sampling=sampling))))):
      with common.make_channel(address, sec) as ch:
        method = ("DecodeSession" if stub_cls is decode_pb2_grpc.DecodeStub
                  else "PrefillSession")
        session = getattr(stub_cls(ch), method)
        code = _rpc_code(lambda: session(iter([req]), timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED, (who, method)
    for address, role in ((decode, "decode"), (prefill, "prefill")):
      code = _rpc_code(lambda: _worker_info(address, sec, role))
      assert code == grpc.StatusCode.UNAUTHENTICATED, (who, role)
  # The deployment's own credential: generates locally on the decode worker.
  with common.make_channel(decode, deployment.service_security) as ch:
    msgs = list(decode_pb2_grpc.DecodeStub(ch).Decode(
        decode_pb2.DecodeRequest(
            request_id="sec-peer", prompt_token_ids=[5, 6, 7],
            sampling=common_pb2.SamplingParams(max_tokens=2, temperature=0.0,
                                               ignore_eos=True),
            local_prefill=True), timeout=30))
  assert sum(len(m.token_ids) for m in msgs) == 2


def test_service_token_must_differ_from_the_client_token():
  """One secret for both would let every API client call the workers: a
  server is not made with such settings (the launchers exit with the
  message, pdjax.launch.flags.security)."""
  same = common.Security(token="same", service_token="same")
  with pytest.raises(ValueError, match="--service_token must differ"):
    same.check()
  with pytest.raises(ValueError, match="--service_token must differ"):
    common.make_server(same)
  common.Security(token="a", service_token="b").check()


def test_make_dev_certs_needs_no_test_extra():
  """The quick start's first step runs where tools/run_local.sh installs
  pdjax (`pip install -e .`, no test extra): cryptography is a dependency
  of the package, and without it the tool says what to install."""
  import subprocess
  import sys
  import tomllib
  project = tomllib.loads((_ROOT / "pyproject.toml").read_text())["project"]
  assert any(re.match(r"cryptography\b", d) for d in project["dependencies"])
  hide = ("import runpy, sys; sys.modules['cryptography'] = None; "
          "sys.argv = ['make_dev_certs.py', '--out=/nonexistent/x']; "
          "runpy.run_path('tools/make_dev_certs.py', run_name='__main__')")
  out = subprocess.run([sys.executable, "-c", hide], capture_output=True,
                       text=True, timeout=60, cwd=_ROOT)
  assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
  assert "pip install" in out.stderr and "cryptography" in out.stderr


def test_prefill_release_kv_over_mtls(deployment):
  """decode -> prefill: ReleaseKv takes the deployment's certificate."""
  address = deployment.worker_address("prefill0")
  with common.make_channel(address, deployment.service_security) as ch:
    prefill_pb2_grpc.PrefillStub(ch).ReleaseKv(
        prefill_pb2.ReleaseKvRequest(transfer_id=secrets.token_hex(16)),
        timeout=10)


def _decode_idle_state(deployment) -> tuple[int, int, float, float]:
  """(pages available, pages total, staged transfers, reservations) once
  the worker's 0.25 s metrics tick has caught up."""
  time.sleep(0.6)
  info = _worker_info(deployment.worker_address("decode0"),
                      deployment.service_security, "decode")
  text = deployment.metrics("decode0")
  return (info.load.kv_pages_available, info.load.kv_pages_total,
          _metric(text, "pdjax_kv_live_allocations",
                  'owner="staged_transfers"'),
          _metric(text, "pdjax_kv_live_allocations", 'owner="reservations"'))


def _fake_handle(transfer_id: str, num_tokens: int = 16) -> kv_pb2.KvHandle:
  return kv_pb2.KvHandle(transport="grpc", transfer_id=transfer_id,
                         num_tokens=num_tokens, shape=[2, 2, 1, 16, 4, 16],
                         dtype="float32")


def test_push_with_unissued_transfer_id_gets_nothing(deployment):
  before = _decode_idle_state(deployment)
  assert before[2] == 0 and before[3] == 0
  handle = _fake_handle(secrets.token_hex(16))
  data = bytes(16 * 4 * 16 * 4)
  import zlib

  def chunks():
    yield kv_pb2.KvChunk(handle=handle, layer=0, kv=0, page_start=0,
                         num_pages=1, head_start=0, num_heads=4, data=data,
                         crc32=zlib.crc32(data))
    yield kv_pb2.KvChunk(last=True)

  address = deployment.worker_address("decode0")
  with common.make_channel(address, deployment.service_security) as ch:
    stub = decode_pb2_grpc.KvTransferStub(ch)
    with pytest.raises(grpc.RpcError) as e:
      stub.PushKv(chunks(), timeout=10)
  assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
  assert "not issued" in e.value.details()
  assert _decode_idle_state(deployment) == before


def _decode(stub, rid: str, handle: kv_pb2.KvHandle, timeout: float = 10):
  req = decode_pb2.DecodeRequest(
      request_id=rid, prompt_token_ids=[5, 6, 7], first_token=9,
      sampling=common_pb2.SamplingParams(max_tokens=4, temperature=0.0),
      kv=handle)
  return _rpc_code(lambda: stub.Decode(req, timeout=timeout))


def test_decode_with_unknown_transfer_id_allocates_nothing(deployment):
  before = _decode_idle_state(deployment)
  address = deployment.worker_address("decode0")
  with common.make_channel(address, deployment.service_security) as ch:
    stub = decode_pb2_grpc.DecodeStub(ch)
    # No reservation at all.
    code = _decode(stub, "sec-unreserved",
                   _fake_handle(secrets.token_hex(16), 3))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    # A reservation, redeemed with a transfer id nobody issued.
    rid, tid = "sec-reserved", secrets.token_hex(16)
    res = stub.Reserve(decode_pb2.ReserveRequest(
        request_id=rid, prompt_tokens=3, max_tokens=4, transfer_id=tid),
        timeout=10)
    assert res.pages > 0
    code = _decode(stub, rid, _fake_handle(secrets.token_hex(16), 3))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # The failed redemption gave the reservation back.
    assert stub.GetWorkerInfo(common_pb2.WorkerInfoRequest(), timeout=10
                              ).load.kv_pages_available == before[0]
  assert _decode_idle_state(deployment) == before


def test_transfer_id_dies_with_its_failed_redemption(deployment):
  address = deployment.worker_address("decode0")
  rid, tid = "sec-dead", secrets.token_hex(16)
  with common.make_channel(address, deployment.service_security) as ch:
    stub = decode_pb2_grpc.DecodeStub(ch)
    stub.Reserve(decode_pb2.ReserveRequest(
        request_id=rid, prompt_tokens=3, max_tokens=4, transfer_id=tid),
        timeout=10)
    assert _decode(stub, rid, _fake_handle(secrets.token_hex(16), 3)) == (
        grpc.StatusCode.PERMISSION_DENIED)
    code = _rpc_code(lambda: decode_pb2_grpc.KvTransferStub(ch).PushKv(
        iter([kv_pb2.KvChunk(handle=_fake_handle(tid, 3)),
              kv_pb2.KvChunk(last=True)]), timeout=10))
    assert code == grpc.StatusCode.PERMISSION_DENIED, code


def test_push_cannot_choose_the_buffer_size(deployment):
  """A sender holding a valid transfer id still cannot make the decode
  worker allocate more than the reservation (or another KV layout)."""
  address = deployment.worker_address("decode0")
  rid, tid = "sec-big", secrets.token_hex(16)
  with common.make_channel(address, deployment.service_security) as ch:
    stub = decode_pb2_grpc.DecodeStub(ch)
    kv_stub = decode_pb2_grpc.KvTransferStub(ch)
    stub.Reserve(decode_pb2.ReserveRequest(
        request_id=rid, prompt_tokens=3, max_tokens=4, transfer_id=tid),
        timeout=10)
    try:
      for shape in ([2, 2, 1 << 20, 16, 4, 16], [2, 2, 1, 16, 4, 1024]):
        handle = kv_pb2.KvHandle(transport="grpc", transfer_id=tid,
                                 num_tokens=3, shape=shape, dtype="float32")
        with pytest.raises(grpc.RpcError) as info:
          kv_stub.PushKv(iter([kv_pb2.KvChunk(handle=handle),
                               kv_pb2.KvChunk(last=True)]), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
      stub.Unreserve(decode_pb2.UnreserveRequest(request_id=rid), timeout=10)


def test_decode_cannot_redeem_another_requests_transfer_id(deployment):
  address = deployment.worker_address("decode0")
  with common.make_channel(address, deployment.service_security) as ch:
    stub = decode_pb2_grpc.DecodeStub(ch)
    ids = {"sec-a": secrets.token_hex(16), "sec-b": secrets.token_hex(16)}
    try:
      for rid, tid in ids.items():
        stub.Reserve(decode_pb2.ReserveRequest(
            request_id=rid, prompt_tokens=3, max_tokens=4, transfer_id=tid),
            timeout=10)
      code = _decode(stub, "sec-a", _fake_handle(ids["sec-b"], 3), timeout=3)
      assert code in (grpc.StatusCode.PERMISSION_DENIED,
                      grpc.StatusCode.FAILED_PRECONDITION), code
    finally:
      for rid in ids:
        stub.Unreserve(decode_pb2.UnreserveRequest(request_id=rid),
                       timeout=10)


# ------------------------------------------------------------- binding
def test_services_listen_on_loopback_only(deployment):
  psutil = pytest.importorskip("psutil")
  from pdjax.launch.cluster import LocalCluster
  # The launchers' --host defaults (each defines its flags on a throwaway
  # FlagValues here).
  from absl import flags
  for module in ("pdjax.launch.prefill", "pdjax.launch.decode",
                 "pdjax.launch.worker", "pdjax.launch.router",
                 "pdjax.launch.gateway", "pdjax.launch.local",
                 "pdjax.launch.kvstore"):
    fv = flags.FlagValues()
    importlib.import_module(module).define_flags(fv)
    assert fv["host"].default == "127.0.0.1", module
  assert LocalCluster(Path(".")).host == "127.0.0.1"
  for p in deployment.cluster.procs:
    listening = [c.laddr for c in psutil.Process(p.popen.pid).net_connections(
        kind="inet") if c.status == psutil.CONN_LISTEN]
    ports = {a.port for a in listening}
    assert p.port() in ports, (p.name, listening)
    if p.metrics_port and p.metrics_port > 0:
      assert p.metrics_port in ports, (p.name, listening)
    # gRPC listens on a dual-stack socket: 127.0.0.1 shows as its
    # IPv4-mapped form there.
    ips = {ipaddress.ip_address(a.ip) for a in listening}
    ips = {getattr(ip, "ipv4_mapped", None) or ip for ip in ips}
    assert ips == {ipaddress.ip_address("127.0.0.1")}, (p.name, listening)


# ------------------------------------------- no unsafe deserialisation
_UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill",
                   "marshal", "shelve", "jsonpickle"}
_UNSAFE_CALLS = {"eval", "exec", "__import__", "compile"}
_UNSAFE_NAMES = {"allow_pickle", "unsafe_load", "UnsafeLoader"}


def _unsafe_uses(path: Path) -> list[str]:
  """Code (not comments or docstrings) that could turn bytes into code."""
  found = []
  with open(path, "rb") as f:
    toks = [t for t in tokenize.tokenize(f.readline)
            if t.type not in (tokenize.COMMENT, tokenize.NL,
                              tokenize.NEWLINE, tokenize.INDENT,
                              tokenize.DEDENT)]
  for i, t in enumerate(toks):
    if t.type != tokenize.NAME:
      continue
    prev = toks[i - 1].string if i else ""
    nxt = toks[i + 1].string if i + 1 < len(toks) else ""
    where = f"{path}:{t.start[0]}: {t.line.strip()}"
    if t.string in _UNSAFE_MODULES and prev in ("import", "from", ",", "="):
      found.append(where)
    elif t.string in _UNSAFE_MODULES and nxt == ".":
      found.append(where)
    elif t.string in _UNSAFE_CALLS and nxt == "(" and prev not in (".",
                                                                   "def"):
      found.append(where)
    elif t.string in _UNSAFE_NAMES:
      found.append(where)
    elif (t.string in ("torch", "yaml") and nxt == "." and i + 2 < len(toks)
          and toks[i + 2].string == "load"):
      found.append(where)  # torch.load unpickles; yaml.load runs tags
  return found


def test_no_pickle_or_eval_in_the_package(tmp_path):
  """Network input is protobuf only: nothing in pdjax (services, transfer,
  engine, client, launchers) may unpickle or eval. Offline tools that need
  it belong outside the package."""
  files = sorted((_ROOT / "pdjax").rglob("*.py"))
  assert len(files) > 20
  found = [u for f in files for u in _unsafe_uses(f)]
  assert not found, "\n".join(found)
  # The scanner itself sees what it must, and only that.
  probe = tmp_path / "probe.py"
  probe.write_text("import pickle\nx = eval('1')\nmodel.eval()\n"
                   "# pickle.loads in a comment is fine\n"
                   "y = torch.load(f)\nre.compile('x')\n")
  assert [u.split(":")[1] for u in _unsafe_uses(probe)] == ["1", "2", "5"]


# ------------------------------------------ certificate names, in-process
def _health_server(security: common.Security):
  server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
  servicer = health.HealthServicer()
  health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
  port = common.bind(server, "127.0.0.1", 0, security)
  server.start()
  return server, port


def _check(target: str, security: common.Security) -> grpc.StatusCode | None:
  def call():
    with common.make_channel(target, security) as ch:
      health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                           timeout=10)
  return _rpc_code(call)


def _leaf_files(tmp: Path, ca: certs_lib.Issued, name: str, hosts, **kw):
  leaf = certs_lib.make_leaf(ca, name, hosts=hosts, **kw)
  (tmp / f"{name}.pem").write_bytes(leaf.cert_pem)
  (tmp / f"{name}.key").write_bytes(leaf.key_pem)
  return str(tmp / f"{name}.pem"), str(tmp / f"{name}.key")


def test_server_name_is_verified_and_can_be_overridden(tmp_path):
  ca = certs_lib.make_ca()
  (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
  ca_path = str(tmp_path / "ca.pem")
  cert, key = _leaf_files(tmp_path, ca, "internal", ["pd.internal"])
  server, port = _health_server(common.Security(cert=cert, key=key,
                                                ca=ca_path))
  try:
    target = f"127.0.0.1:{port}"
    # The certificate names pd.internal only: dialing an IP fails.
    assert _check(target, common.Security(ca=ca_path)) == (
        grpc.StatusCode.UNAVAILABLE)
    # --tls_server_name checks the certificate against the right name.
    assert _check(target, common.Security(
        ca=ca_path, server_name="pd.internal")) is None
    assert _check(target, common.Security(
        ca=ca_path, server_name="other.internal")) == (
            grpc.StatusCode.UNAVAILABLE)
  finally:
    server.stop(0)


def test_ip_address_needs_an_ip_san(tmp_path):
  ca = certs_lib.make_ca()
  (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
  ca_path = str(tmp_path / "ca.pem")
  for hosts, ok in ((["localhost"], False), (["127.0.0.1"], True)):
    cert, key = _leaf_files(tmp_path, ca, "leaf", hosts)
    server, port = _health_server(common.Security(cert=cert, key=key))
    try:
      code = _check(f"127.0.0.1:{port}", common.Security(ca=ca_path))
      assert (code is None) == ok, (hosts, code)
    finally:
      server.stop(0)


def test_mtls_server_and_tls_only_caller(tmp_path):
  """A process without --tls_mtls still presents its certificate to a
  server that requires one (e.g. a TLS + token router dialing mTLS
  workers); a caller without a certificate is refused."""
  dev = certs_lib.write_dev_certs(tmp_path)
  server, port = _health_server(common.Security(
      cert=str(dev.server_cert), key=str(dev.server_key), ca=str(dev.ca),
      mtls=True))
  try:
    target = f"127.0.0.1:{port}"
    assert _check(target, common.Security(
        cert=str(dev.server_cert), key=str(dev.server_key), ca=str(dev.ca),
        mtls=False)) is None
    assert _check(target, common.Security(ca=str(dev.ca))) == (
        grpc.StatusCode.UNAVAILABLE)
  finally:
    server.stop(0)


def test_dev_certs(tmp_path):
  from cryptography import x509
  from cryptography.x509.oid import ExtendedKeyUsageOID
  dev = certs_lib.write_dev_certs(tmp_path / "d")
  names = sorted(p.name for p in (tmp_path / "d").iterdir())
  assert names == ["ca.pem", "client.key", "client.pem", "server.key",
                   "server.pem"]
  for key in (dev.server_key, dev.client_key):
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
  server = x509.load_pem_x509_certificate(dev.server_cert.read_bytes())
  san = server.extensions.get_extension_for_class(
      x509.SubjectAlternativeName).value
  assert "localhost" in san.get_values_for_type(x509.DNSName)
  assert "127.0.0.1" in {str(ip) for ip in
                         san.get_values_for_type(x509.IPAddress)}
  eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
  assert {ExtendedKeyUsageOID.SERVER_AUTH,
          ExtendedKeyUsageOID.CLIENT_AUTH} <= set(eku)
  client = x509.load_pem_x509_certificate(dev.client_cert.read_bytes())
  eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
  assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
  ca = x509.load_pem_x509_certificate(dev.ca.read_bytes())
  server.verify_directly_issued_by(ca)
  client.verify_directly_issued_by(ca)
  assert dev.service_flags()[-1] == "--tls_mtls"


def test_make_dev_certs_cli(tmp_path):
  import subprocess
  import sys
  out = subprocess.run(
      [sys.executable, str(_ROOT / "tools" / "make_dev_certs.py"),
       f"--out={tmp_path}", "--hosts=127.0.0.1,pd.internal"],
      capture_output=True, text=True, timeout=60, cwd=_ROOT)
  assert out.returncode == 0, out.stderr
  assert re.search(r"--tls_cert=\S+server\.pem", out.stdout)
  assert (tmp_path / "server.key").exists()


def test_local_launcher_prompt_speaks_the_routers_security(certs, tmp_path):
  """``pdjax serve MODEL --prompt`` (pdjax.launch.local) on a TLS + mTLS +
  token deployment (the docs' quick start) dials the router with its
  security; run from outside the checkout, it finds its deployment file
  and the model's chat template in the package."""
  import subprocess
  import sys
  tls = ",".join(certs.service_flags(mtls=True))
  out = subprocess.run(
      [sys.executable, "-m", "pdjax.cli", "serve", "tiny", "--config=test",
       "--prompt=Once upon a time", "--max_tokens=4",
       f"--run_dir={tmp_path / 'run'}", f"--worker_flags={tls},--nowarmup",
       f"--router_flags={tls},--auth_token={TOKEN}"],
      capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "completion:" in out.stdout
  assert "4 tokens" in out.stdout
  assert "chat template of" in out.stdout


def test_router_client_settings():
  from pdjax.launch.cluster import router_client_settings
  assert router_client_settings(["--port=1"])[0] is None
  tls, token = router_client_settings(
      ["--tls_cert=s.pem", "--tls_key=s.key", "--tls_ca=ca.pem",
       "--tls_mtls", "--auth_token=t"])
  assert (tls.root_ca, tls.cert, tls.key, token) == ("ca.pem", "s.pem",
                                                     "s.key", "t")
  tls, _ = router_client_settings(
      ["--tls_cert=s.pem", "--tls_key=s.key", "--tls_ca=ca.pem",
       "--notls_mtls"])
  assert (tls.root_ca, tls.cert, tls.key) == ("ca.pem", None, None)
