"""pdjax.client against an in-process fake router.

The fake ``Generation`` servicer answers according to the prompt text (see
``_FakeGeneration``) and records what it received, so each test can check
both what the client sent and how it read the answer. It serves the standard
``grpc.health.v1`` service next to it, as the real router does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pickle
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pdjax import client as pc
from pdjax.v1 import common_pb2, generate_pb2, generate_pb2_grpc

_ROOT = Path(__file__).resolve().parents[1]
_USAGE = dict(ttft_s=0.01, total_time_s=0.05, prefill_s=0.002,
              kv_transfer_s=0.001, prefill_worker="p0:1", decode_worker="d0:1")


class _FakeGeneration(generate_pb2_grpc.GenerationServicer):
  """Answers by prompt text.

  "hang": one token, then waits until the client goes away.
  "abort:CODE": fails with that status before any token.
  "midfail": two tokens, then RESOURCE_EXHAUSTED.
  "nofinish": one token, then ends with OK but no finish reason.
  anything else (or token ids): tokens 100, 101, ... up to max_tokens
  (16 when unset), two per message, "<id>" text each; the first id in
  stop_token_ids ends it with "stop".
  """

  def __init__(self):
    self.requests: dict[str, generate_pb2.GenerateRequest] = {}
    self.metadata: dict[str, dict[str, str]] = {}
    self.cancelled: dict[str, threading.Event] = {}
    self._lock = threading.Lock()
    self._next = 0

  def Generate(self, request, context):
    with self._lock:
      self._next += 1
      rid = request.request_id or f"router-{self._next}"
      done = self.cancelled[rid] = threading.Event()
    self.requests[rid] = request
    self.metadata[rid] = dict(context.invocation_metadata())
    context.add_callback(done.set)  # runs on cancellation and on the end
    text = request.text if request.WhichOneof("prompt") == "text" else None
    msg = lambda ids, **kw: generate_pb2.GenerateResponse(  # noqa: E731
        request_id=rid, token_ids=ids, text="".join(f"<{t}>" for t in ids),
        logprobs=[-t / 1000 for t in ids], **kw)

    if text == "hang":
      yield msg([100])
      while context.is_active():
        time.sleep(0.01)
      return
    if text is not None and text.startswith("abort:"):
      context.abort(grpc.StatusCode[text.split(":", 1)[1]], "boom")
    if text == "midfail":
      yield msg([100, 101])
      context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "out of KV pages")
    if text == "nofinish":
      yield msg([100])
      return

    s = request.sampling
    n = s.max_tokens if s.HasField("max_tokens") else 16
    ids, reason = [], common_pb2.FINISH_REASON_LENGTH
    for i in range(n):
      ids.append(100 + i)
      if ids[-1] in s.stop_token_ids:
        reason = common_pb2.FINISH_REASON_STOP
        break
    prompt_len = (len(text) if text is not None
                  else len(request.token_ids.ids))
    chunks = [ids[i:i + 2] for i in range(0, len(ids), 2)]
    for chunk in chunks[:-1]:
      yield msg(chunk)
    yield msg(chunks[-1], finish_reason=reason, usage=common_pb2.Usage(
        prompt_tokens=prompt_len, completion_tokens=len(ids), **_USAGE))

  def GetModelInfo(self, request, context):
    return common_pb2.ModelInfo(name="fake", architecture="LlamaForCausalLM",
                                vocab_size=320, max_seq_len=1024,
                                eos_token_ids=[2])


def _start_server(port: int = 0, credentials=None):
  server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
  fake = _FakeGeneration()
  generate_pb2_grpc.add_GenerationServicer_to_server(fake, server)
  health_servicer = health.HealthServicer()
  health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
  health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
  health_servicer.set("pdjax.v1.Generation",
                      health_pb2.HealthCheckResponse.SERVING)
  health_servicer.set("never", health_pb2.HealthCheckResponse.NOT_SERVING)
  addr = f"127.0.0.1:{port}"
  port = (server.add_secure_port(addr, credentials) if credentials
          else server.add_insecure_port(addr))
  server.start()
  return server, fake, health_servicer, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def router():
  server, fake, health_servicer, address = _start_server()
  yield fake, health_servicer, address
  server.stop(0)


@pytest.fixture
def client(router):
  with pc.Client(router[2], timeout_s=10) as c:
    yield c


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# ---------------------------------------------------------------------------
# Request building (no server).


def test_build_request_leaves_unset_fields_unset():
  req = pc.build_request("hello")
  assert req.WhichOneof("prompt") == "text" and req.text == "hello"
  s = req.sampling
  # The router's default applies (16, or what the context leaves).
  for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
    assert not s.HasField(name), name
  assert not req.HasField("add_special_tokens")
  assert list(s.stop_token_ids) == [] and not s.ignore_eos
  assert req.request_id == "" and req.cache_salt == ""
  assert pc.build_request("x", max_tokens=16).sampling.max_tokens == 16


def test_build_request_sets_every_field():
  req = pc.build_request(
      prompt_token_ids=np.array([1, 2, 3]), max_tokens=7, temperature=0,
      top_p=0.5, top_k=-1, seed=2**40, stop_token_ids=[np.int64(9)],
      ignore_eos=True, request_id="r1", add_special_tokens=False,
      skip_special_tokens=True, cache_salt="tenant")
  assert req.WhichOneof("prompt") == "token_ids"
  assert list(req.token_ids.ids) == [1, 2, 3]
  s = req.sampling
  # temperature=0 (greedy) is a value, not "unset".
  assert s.HasField("temperature") and s.temperature == 0.0
  assert (s.max_tokens, s.top_p, s.top_k, s.seed) == (7, 0.5, -1, 2**40)
  assert list(s.stop_token_ids) == [9] and s.ignore_eos
  assert req.HasField("add_special_tokens") and not req.add_special_tokens
  assert req.skip_special_tokens and req.cache_salt == "tenant"
  assert req.request_id == "r1"
  # None for ignore_eos (the batch-eval adapter passes it through) is False.
  assert not pc.build_request("x", ignore_eos=None).sampling.ignore_eos


def test_speculative_opt_out_round_trips_through_the_protos():
  """``speculative``: unset unless given; the router reads an absent field
  as "the pool's setting applies" (True) and forwards only an opt-out, so
  the decode worker sees what the client asked."""
  from pdjax.service.validation import sampling_from_proto, sampling_to_proto
  assert not pc.build_request("x").sampling.HasField("speculative")
  for given, want in ((None, True), (True, True), (False, False)):
    p = pc.build_request("x", speculative=given).sampling
    assert p.HasField("speculative") == (given is not None)
    s = sampling_from_proto(p, vocab_size=10)
    assert s.speculative is want
    forwarded = sampling_to_proto(s)
    assert forwarded.HasField("speculative") == (not want)
    assert sampling_from_proto(forwarded, vocab_size=10) == s
  with pytest.raises(TypeError, match="speculative"):
    pc.build_request("x", speculative="no")


def test_usage_carries_the_speculative_counts():
  u = pc.Usage.from_proto(common_pb2.Usage(
      prompt_tokens=3, completion_tokens=9, spec_draft_tokens=12,
      spec_accepted_tokens=5))
  assert (u.spec_draft_tokens, u.spec_accepted_tokens) == (12, 5)
  assert pc.Usage.from_proto(common_pb2.Usage()).spec_draft_tokens == 0


@pytest.mark.parametrize("kwargs, exc", [
    (dict(), ValueError),
    (dict(prompt="a", prompt_token_ids=[1]), ValueError),
    (dict(prompt_token_ids=[]), ValueError),
    (dict(prompt=[1, 2]), TypeError),
    (dict(prompt_token_ids="abc"), TypeError),
    (dict(prompt_token_ids=[1.5]), TypeError),
    (dict(prompt="a", stop_token_ids=[2.0]), TypeError),
    (dict(prompt="a", temprature=0.5), TypeError),
])
def test_build_request_rejects(kwargs, exc):
  with pytest.raises(exc):
    pc.build_request(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(prompt="a", max_tokens=2**40), "max_tokens"),
    (dict(prompt="a", max_tokens=-2**31 - 1), "max_tokens"),
    (dict(prompt="a", top_k=2**31), "top_k"),
    (dict(prompt_token_ids=[1, 2**31]), "prompt_token_ids[1]"),
    (dict(prompt="a", stop_token_ids=[-2**31 - 1]), "stop_token_ids[0]"),
    (dict(prompt="a", seed=-1), "seed"),
    (dict(prompt="a", seed=2**64), "seed"),
])
def test_build_request_names_the_field_out_of_range(kwargs, field):
  """Values the proto's fields cannot hold are a ValueError naming the
  field (not protobuf's bare "Value out of range")."""
  with pytest.raises(ValueError) as info:
    pc.build_request(**kwargs)
  assert str(info.value).startswith(field + ":"), str(info.value)
  assert "out of range" in str(info.value)


def test_build_request_token_ids_any_integer_sequence():
  """Ids from a list, a tuple, a numpy array or a generator go out as the
  same repeated field; a long prompt's one bad id is named by its index."""
  ids = list(range(3000))
  want = pc.build_request(prompt_token_ids=ids).token_ids.ids
  for given in (tuple(ids), np.arange(3000, dtype=np.int64),
                np.arange(3000, dtype=np.uint16), iter(ids)):
    assert pc.build_request(prompt_token_ids=given).token_ids.ids == want
  assert pc.build_request(prompt_token_ids=[True, 2]).token_ids.ids == [1, 2]
  with pytest.raises(ValueError, match=r"^prompt_token_ids\[2999\]:"):
    pc.build_request(prompt_token_ids=ids[:-1] + [2**31])
  with pytest.raises(ValueError, match=r"^prompt_token_ids\[5\]:"):
    pc.build_request(prompt_token_ids=np.r_[np.zeros(5, np.int64), -2**31 - 1])
  with pytest.raises(TypeError):
    pc.build_request(prompt_token_ids=np.ones(4))


def test_generation_error_carries_status():
  e = pc.GenerationError(grpc.StatusCode.INVALID_ARGUMENT, "top_p: bad")
  assert isinstance(e, RuntimeError)
  assert e.code() is grpc.StatusCode.INVALID_ARGUMENT
  assert e.details() == "top_p: bad"
  assert str(e) == "INVALID_ARGUMENT: top_p: bad"
  e2 = pickle.loads(pickle.dumps(e))
  assert (e2.code(), e2.details()) == (e.code(), e.details())


def test_tls_config_needs_cert_and_key_together():
  with pytest.raises(ValueError):
    pc.TlsConfig(cert="c.pem")


# ---------------------------------------------------------------------------
# Sync client.


def test_stream_deltas_concatenate_to_generate(client):
  deltas = list(client.stream("hi", max_tokens=5, request_id="s1"))
  assert [d.token_ids for d in deltas] == [[100, 101], [102, 103], [104]]
  assert all(d.finish_reason is None and d.usage is None
             for d in deltas[:-1])
  assert deltas[-1].finish_reason == "length"

  result = client.generate("hi", max_tokens=5, request_id="g1")
  assert result.token_ids == sum((d.token_ids for d in deltas), [])
  assert result.text == "".join(d.text for d in deltas)
  assert result.text == "<100><101><102><103><104>"
  assert result.logprobs == sum((d.logprobs for d in deltas), [])
  assert result.request_id == "g1" and result.finish_reason == "length"
  assert result.usage == pc.Usage(prompt_tokens=2, completion_tokens=5,
                                  **_USAGE)
  assert result.usage == deltas[-1].usage


def test_finish_reason_stop_and_router_request_id(client, router):
  fake = router[0]
  r = client.generate(prompt_token_ids=[5, 6, 7], stop_token_ids=[102],
                      temperature=0.0)
  assert r.finish_reason == "stop" and r.token_ids == [100, 101, 102]
  assert r.request_id.startswith("router-")  # assigned by the server
  sent = fake.requests[r.request_id]
  assert list(sent.token_ids.ids) == [5, 6, 7]
  assert sent.sampling.HasField("temperature")
  assert not sent.sampling.HasField("top_p")
  assert r.usage.prompt_tokens == 3


def test_early_close_cancels_server_call(client, router):
  fake = router[0]
  it = client.stream("hang", request_id="close1")
  first = next(it)
  assert first.token_ids == [100]
  assert not fake.cancelled["close1"].is_set()
  it.close()
  assert fake.cancelled["close1"].wait(5)

  for _ in client.stream("hang", request_id="break1"):
    break  # the dropped generator closes itself
  assert fake.cancelled["break1"].wait(5)


def test_rpc_errors_become_generation_error(client):
  with pytest.raises(pc.GenerationError) as ei:
    client.generate("abort:INVALID_ARGUMENT")
  assert ei.value.code() is grpc.StatusCode.INVALID_ARGUMENT
  assert ei.value.details() == "boom"
  assert ei.value.code().name == "INVALID_ARGUMENT"

  got = []
  with pytest.raises(pc.GenerationError) as ei:
    for d in client.stream("midfail"):
      got.append(d)
  assert ei.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
  assert ei.value.details() == "out of KV pages"
  assert [d.token_ids for d in got] == [[100, 101]]

  with pytest.raises(pc.GenerationError) as ei:
    client.generate("hang", timeout_s=0.3)
  assert ei.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED

  with pytest.raises(pc.GenerationError) as ei:
    client.generate("nofinish")
  assert ei.value.code() is grpc.StatusCode.INTERNAL


def test_validation_happens_before_any_rpc(client, router):
  before = len(router[0].requests)
  with pytest.raises(ValueError):
    client.stream()  # raised at the call, not at the first next()
  with pytest.raises(ValueError):
    client.generate("a", prompt_token_ids=[1])
  assert len(router[0].requests) == before


def test_bearer_token_metadata(router):
  fake, _, address = router
  with pc.Client(address, token="s3cret") as c:
    c.generate("hi", max_tokens=1, request_id="tok1")
  assert fake.metadata["tok1"][pc.AUTHORIZATION_METADATA_KEY] == \
      "Bearer s3cret"
  with pc.Client(address) as c:
    c.generate("hi", max_tokens=1, request_id="tok2")
  assert pc.AUTHORIZATION_METADATA_KEY not in fake.metadata["tok2"]


def test_model_info_and_health(client):
  info = client.model_info()
  assert info["name"] == "fake" and info["vocab_size"] == 320
  assert info["eos_token_ids"] == [2]
  assert info["bos_token_id"] is None  # optional and unset
  assert info["num_layers"] == 0  # every field present
  assert client.health() == "SERVING"
  assert client.health("pdjax.v1.Generation") == "SERVING"
  assert client.health("never") == "NOT_SERVING"
  with pytest.raises(pc.GenerationError) as ei:
    client.health("no.such.Service")
  assert ei.value.code() is grpc.StatusCode.NOT_FOUND


def test_wait_ready(client, router):
  health_servicer = router[1]
  # By default it waits for the Generation service, not for "" (which the
  # health servicer reports SERVING from the start).
  health_servicer.set(pc.GENERATION_SERVICE,
                      health_pb2.HealthCheckResponse.NOT_SERVING)
  timer = threading.Timer(0.3, health_servicer.set, (
      pc.GENERATION_SERVICE, health_pb2.HealthCheckResponse.SERVING))
  timer.start()
  start = time.monotonic()
  client.wait_ready(5)
  assert 0.25 < time.monotonic() - start < 3
  timer.join()

  # A service the server registers only later (NOT_FOUND until then).
  timer = threading.Timer(0.3, health_servicer.set, (
      "later", health_pb2.HealthCheckResponse.SERVING))
  timer.start()
  start = time.monotonic()
  client.wait_ready(5, service="later")
  assert 0.25 < time.monotonic() - start < 3
  timer.join()

  start = time.monotonic()
  with pytest.raises(TimeoutError, match="NOT_SERVING"):
    client.wait_ready(0.4, service="never")
  assert time.monotonic() - start < 2


def test_wait_ready_gives_up_at_once_without_a_health_service():
  server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
  generate_pb2_grpc.add_GenerationServicer_to_server(_FakeGeneration(), server)
  port = server.add_insecure_port("127.0.0.1:0")
  server.start()
  try:
    with pc.Client(f"127.0.0.1:{port}") as c:
      start = time.monotonic()
      with pytest.raises(pc.GenerationError) as ei:
        c.wait_ready(10)
      assert ei.value.code() is grpc.StatusCode.UNIMPLEMENTED
      assert time.monotonic() - start < 5
  finally:
    server.stop(0)


def test_wait_ready_for_a_server_that_starts_late():
  port = _free_port()
  with pc.Client(f"127.0.0.1:{port}") as c:
    with pytest.raises(pc.GenerationError) as ei:
      c.health()
    assert ei.value.code() is grpc.StatusCode.UNAVAILABLE
    with pytest.raises(TimeoutError):
      c.wait_ready(0.3)
    started = []
    timer = threading.Timer(
        0.5, lambda: started.append(_start_server(port)[0]))
    timer.start()
    try:
      start = time.monotonic()
      c.wait_ready(10)
      assert time.monotonic() - start < 5
      assert c.generate("hi", max_tokens=2).token_ids == [100, 101]
    finally:
      timer.join()
      for s in started:
        s.stop(0)


class _SlowConnectFront:
  """A TCP front for a server whose connections take about a second to open.

  Its listen queue (backlog 0) is kept full by one connection it does not
  accept for ``hold_s``; the kernel drops SYNs meanwhile, so a client's
  connect completes only on its SYN retransmit (about 1 s later), as over a
  slow network or on a loaded host. Accepted connections are piped to
  ``target``."""

  def __init__(self, target: str, hold_s: float = 0.3):
    host, port = target.rsplit(":", 1)
    self._target = (host, int(port))
    self._listener = socket.socket()
    self._listener.bind(("127.0.0.1", 0))
    self._listener.listen(0)
    self.address = "127.0.0.1:%d" % self._listener.getsockname()[1]
    self._filler = socket.create_connection(self._listener.getsockname())
    self._hold_s = hold_s
    self._socks: list[socket.socket] = [self._filler]
    threading.Thread(target=self._serve, daemon=True).start()

  def _serve(self):
    time.sleep(self._hold_s)
    self._listener.accept()[0].close()   # the filler: room in the queue
    while True:
      try:
        conn, _ = self._listener.accept()
      except OSError:                    # closed
        return
      upstream = socket.create_connection(self._target)
      self._socks += [conn, upstream]
      for a, b in ((conn, upstream), (upstream, conn)):
        threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

  @staticmethod
  def _pipe(src: socket.socket, dst: socket.socket):
    try:
      while data := src.recv(65536):
        dst.sendall(data)
    except OSError:
      pass
    finally:
      with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)

  def close(self):
    for s in [self._listener, *self._socks]:
      with contextlib.suppress(OSError):
        s.close()


def test_slow_connect_is_waited_for(router):
  """A connection that takes a second to open (a loaded host, a far
  network) is waited for by a fail-fast call, not given up after 100 ms:
  gRPC takes ``grpc.min_reconnect_backoff_ms`` as its connect timeout."""
  front = _SlowConnectFront(router[2])
  try:
    with pc.Client(front.address, timeout_s=30) as c:
      start = time.monotonic()
      assert c.health() == "SERVING"
      assert time.monotonic() - start > 0.5   # the front did slow it
      assert c.generate("hi", max_tokens=2).token_ids == [100, 101]
  finally:
    front.close()


# ---------------------------------------------------------------------------
# Async client.


@pytest.mark.parametrize("sessions", [False, True])
def test_async_client(router, sessions):
  """Every method; with ``sessions`` against a router that serves no
  ``GenerateSession`` (this fake): each request goes as a call of its own,
  the first one included, with the same results, token and cancellations."""
  fake, _, address = router

  async def go():
    async with pc.AsyncClient(address, token="t", timeout_s=10,
                              sessions=sessions) as c:
      assert await c.health() == "SERVING"
      await c.wait_ready(2)
      assert (await c.model_info())["name"] == "fake"

      deltas = [d async for d in c.stream("hi", max_tokens=3)]
      result = await c.generate(prompt_token_ids=[1], max_tokens=3,
                                request_id="a1")
      assert result.token_ids == [100, 101, 102]
      assert result.text == "".join(d.text for d in deltas)
      assert result.finish_reason == "length"
      assert result.usage.completion_tokens == 3
      assert fake.metadata["a1"]["authorization"] == "Bearer t"

      agen = c.stream("hang", request_id="aclose1")
      assert (await agen.__anext__()).token_ids == [100]
      await agen.aclose()
      assert await asyncio.to_thread(fake.cancelled["aclose1"].wait, 5)

      # Cancelling the consuming task cancels the RPC too.
      async def consume():
        async for _ in c.stream("hang", request_id="acancel1"):
          pass
      task = asyncio.create_task(consume())
      while "acancel1" not in fake.cancelled:
        await asyncio.sleep(0.01)
      await asyncio.sleep(0.05)
      task.cancel()
      with pytest.raises(asyncio.CancelledError):
        await task
      assert await asyncio.to_thread(fake.cancelled["acancel1"].wait, 5)

      with pytest.raises(pc.GenerationError) as ei:
        await c.generate("abort:PERMISSION_DENIED")
      assert ei.value.code() is grpc.StatusCode.PERMISSION_DENIED
      with pytest.raises(pc.GenerationError) as ei:
        async for _ in c.stream("midfail"):
          pass
      assert ei.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
      with pytest.raises(ValueError):
        c.stream()
      with pytest.raises(TimeoutError):
        await c.wait_ready(0.3, service="never")

  asyncio.run(go())


def test_batch_eval_backend_adapter(router):
  """The driver's router adapter (``pdjax.eval.backends``) works with
  this client."""
  from pdjax.eval.backends import make_backend
  from pdjax.eval.load import run_workload
  from pdjax.eval.workloads import WorkItem
  fake, _, address = router
  items = [WorkItem(request_id="be0", max_tokens=4, prompt_token_ids=[1, 2]),
           WorkItem(request_id="be1", max_tokens=3, prompt="hello", index=1),
           WorkItem(request_id="be2", max_tokens=2,
                    prompt="abort:UNAVAILABLE", index=2)]

  async def go():
    backend = make_backend(address)
    try:
      return await run_workload(
          backend, items, sampling=dict(temperature=0.0, seed=7,
                                        ignore_eos=None, stop_token_ids=None),
          progress=False)
    finally:
      await backend.aclose()

  recs = asyncio.run(go())
  assert fake.requests["be1"].sampling.seed == 8  # seed + item.index
  assert fake.requests["be1"].text == "hello"
  by_id = {r.request_id: r for r in recs}
  assert by_id["be0"].error is None and by_id["be1"].error is None
  assert by_id["be0"].token_ids == [100, 101, 102, 103]
  assert by_id["be0"].usage["completion_tokens"] == 4
  assert by_id["be2"].status_code == "UNAVAILABLE" and by_id["be2"].error == "boom"


# ---------------------------------------------------------------------------
# TLS / mTLS.


def _openssl(*args, cwd):
  subprocess.run(["openssl", *args], cwd=cwd, check=True,
                 capture_output=True)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_mtls(tmp_path):
  d = tmp_path
  ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes"]
  _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem",
           "-days", "1", "-subj", "/CN=test-ca", cwd=d)
  for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                    ("client", "extendedKeyUsage=clientAuth")):
    _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=d)
    (d / f"{name}.ext").write_text(ext + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem",
             "-CAkey", "ca.key", "-CAcreateserial", "-out", f"{name}.pem",
             "-days", "1", "-extfile", f"{name}.ext", cwd=d)
  creds = grpc.ssl_server_credentials(
      [((d / "server.key").read_bytes(), (d / "server.pem").read_bytes())],
      root_certificates=(d / "ca.pem").read_bytes(),
      require_client_auth=True)
  server, fake, _, address = _start_server(credentials=creds)
  try:
    tls = pc.TlsConfig(root_ca=str(d / "ca.pem"), cert=str(d / "client.pem"),
                       key=str(d / "client.key"))
    with pc.Client(address, tls=tls, token="tk", timeout_s=10) as c:
      r = c.generate("hi", max_tokens=2, request_id="tls1")
      assert r.token_ids == [100, 101]
    assert fake.metadata["tls1"]["authorization"] == "Bearer tk"
    # Without a client certificate the server refuses the handshake.
    with pc.Client(address, tls=pc.TlsConfig(root_ca=str(d / "ca.pem")),
                   timeout_s=5) as c:
      with pytest.raises(pc.GenerationError) as ei:
        c.generate("hi", max_tokens=2)
      assert ei.value.code() is grpc.StatusCode.UNAVAILABLE
    # The CLI's TLS flags reach the same place.
    out = _cli(f"--target={address}", "--prompt=hi", "--max_tokens=2",
               f"--tls_ca={d / 'ca.pem'}", f"--tls_cert={d / 'client.pem'}",
               f"--tls_key={d / 'client.key'}", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["token_ids"] == [100, 101]
  finally:
    server.stop(0)


# ---------------------------------------------------------------------------
# CLI (a subprocess: its absl flags must not meet other tests' flags).


def _cli(*flags_):
  return subprocess.run([sys.executable, "-m", "pdjax.client", *flags_],
                        cwd=_ROOT, capture_output=True, text=True, timeout=60)


def test_cli(router):
  fake, _, address = router
  out = _cli(f"--target={address}", "--prompt=hi", "--max_tokens=3",
             "--temperature=0", "--token=abc", "--request_id=cli1",
             "--wait_ready_s=5")
  assert out.returncode == 0, out.stderr
  assert out.stdout == "<100><101><102>\n"
  assert "[cli1] finish=length tokens=2+3" in out.stderr
  assert "ttft=10.0ms" in out.stderr
  sent = fake.requests["cli1"]
  assert sent.sampling.HasField("temperature")
  assert not sent.sampling.HasField("top_p")
  assert fake.metadata["cli1"]["authorization"] == "Bearer abc"

  out = _cli(f"--target={address}", "--prompt_token_ids=4,5",
             "--stop_token_ids=101", "--json", "--info", "--nostream")
  assert out.returncode == 0, out.stderr
  info_text, result_text = out.stdout.split("\n}\n")
  assert json.loads(info_text + "}")["name"] == "fake"
  result = json.loads(result_text)
  assert result["token_ids"] == [100, 101]
  assert result["finish_reason"] == "stop"
  assert result["usage"]["prompt_tokens"] == 2

  out = _cli(f"--target={address}", "--prompt=abort:INVALID_ARGUMENT")
  assert out.returncode == 1
  assert "error: INVALID_ARGUMENT: boom" in out.stderr
