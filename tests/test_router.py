"""The router in process, over a fake decode worker: its health (readiness
and liveness), its drain on shutdown, and the context rule for max_tokens.

The router is assembled as ``pdjax.launch.router`` assembles it (its gRPC
server, health service and registry) and called through
``pdjax.client.AsyncClient``, or (``in_process``) through
``pdjax.service.router_in_process.InProcessRouterClient`` as the router's
own HTTP API calls it: the same answers and errors either way. Only the
decode worker is a stub (no JAX, no worker process), whose stream is paced
by ``step_s`` and can be held.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from pdjax.client import AsyncClient, GenerationError
from pdjax.service import common
from pdjax.service.registry import WorkerRegistry
from pdjax.service.router import (GENERATION_SERVICE, RouterConfig,
                                  RouterServicer)
from pdjax.service.router_in_process import InProcessRouterClient
from pdjax.v1 import common_pb2, decode_pb2, generate_pb2_grpc

MAX_SEQ_LEN = 256
CACHED = 2        # prompt tokens the fake's prefix cache held
MODEL = common_pb2.ModelInfo(name="fake", fingerprint="f", vocab_size=320,
                             max_seq_len=MAX_SEQ_LEN, page_size=16)


class _Down(grpc.RpcError):

  def code(self):
    return grpc.StatusCode.UNAVAILABLE

  def details(self):
    return "connection refused"


class _Call:
  """A Decode call: tokens 100, 101, ... one per ``step_s`` while the
  worker's gate is open, the last with finish reason "length"."""

  def __init__(self, worker: "FakeDecode", request):
    self.worker = worker
    self.request = request
    self.cancelled = False

  def __aiter__(self):
    return self._stream()

  async def _stream(self):
    n = self.request.sampling.max_tokens
    for i in range(n):
      await self.worker.gate.wait()
      await asyncio.sleep(self.worker.step_s)
      last = i == n - 1
      msg = decode_pb2.DecodeResponse(
          token_ids=[100 + i], logprobs=[-0.5],
          finish_reason=(common_pb2.FINISH_REASON_LENGTH if last
                         else common_pb2.FINISH_REASON_UNSPECIFIED))
      if i == 0:   # a local prefill's first message reports it
        msg.prefill_s = 0.001
        msg.cached_tokens = CACHED
      if last:     # a speculating pool's counts come with the end
        msg.spec_draft_tokens, msg.spec_accepted_tokens = self.worker.spec
      yield msg

  def cancel(self):
    self.cancelled = True


class FakeDecode:
  """A decode worker's stub, as the registry and router call it."""

  def __init__(self, step_s: float = 0.01):
    self.up = True
    self.step_s = step_s
    self.spec = (0, 0)       # (drafted, accepted) on each call's end
    self.gate = asyncio.Event()
    self.gate.set()
    self.calls: list[_Call] = []

  async def GetWorkerInfo(self, request, timeout=None):
    if not self.up:
      raise _Down()
    return common_pb2.WorkerInfo(
        role="decode", model=MODEL, process_id="fake",
        load=common_pb2.WorkerLoad(kv_pages_total=1000,
                                   kv_pages_available=1000, rows_free=64))

  def Decode(self, request, timeout=None):
    call = _Call(self, request)
    self.calls.append(call)
    return call


class Router:
  """A router serving on loopback, as the launcher starts it; ``client``
  calls it over gRPC, or in its process (``in_process``)."""

  def __init__(self, worker: FakeDecode,
               security: common.Security = common.Security(),
               in_process: bool = False):
    self.worker = worker
    self.security = security
    self.in_process = in_process

  async def __aenter__(self):
    self.registry = WorkerRegistry(poll_interval_s=0.05)
    self.registry.add("127.0.0.1:1", "decode").stub = self.worker
    # The fake answers Decode calls of their own (sessions are the real
    # servicer's: tests/test_worker_sessions.py).
    self.servicer = RouterServicer(self.registry, None,
                                   RouterConfig(worker_sessions=False))
    self.server = common.make_server(self.security, client_facing=True)
    generate_pb2_grpc.add_GenerationServicer_to_server(self.servicer,
                                                       self.server)
    self.health = await common.add_health(self.server, [GENERATION_SERVICE])
    port = common.bind(self.server, "127.0.0.1", 0)
    await self.registry.poll_once()
    self.registry.start()
    await self.server.start()
    await common.set_live(self.health)
    self.watch = asyncio.ensure_future(
        self.servicer.watch_health(self.health, 0.05))
    self.address = f"127.0.0.1:{port}"
    self.client = (InProcessRouterClient(self.servicer, timeout_s=30)
                   if self.in_process else
                   AsyncClient(self.address, timeout_s=30,
                               token=self.security.token))
    return self

  async def __aexit__(self, *exc):
    self.watch.cancel()
    await self.client.close()
    await self.server.stop(0)
    await self.registry.close()

  async def statuses(self) -> tuple[str, str, str]:
    """("" , Generation, liveness) as a probe reads them."""
    return tuple([await self.client.health(s, timeout_s=5) for s in (
        "", GENERATION_SERVICE, common.LIVENESS_SERVICE)])

  async def wait_statuses(self, want, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while (got := await self.statuses()) != want:
      assert time.monotonic() < deadline, got
      await asyncio.sleep(0.02)


async def _collect(client: AsyncClient, **kw):
  """(tokens, None) of a whole stream, or (tokens so far, GenerationError)."""
  tokens = []
  try:
    async for d in client.stream(prompt_token_ids=[5, 6, 7], **kw):
      tokens.extend(d.token_ids)
  except GenerationError as e:
    return tokens, e
  return tokens, None


SERVING = ("SERVING", "SERVING", "SERVING")
NOT_READY = ("NOT_SERVING", "NOT_SERVING", "SERVING")


# ------------------------------------------------------------------ health
@pytest.mark.parametrize("in_process", [False, True],
                         ids=["grpc", "in_process"])
def test_readiness_follows_the_decode_workers(in_process):
  """Readiness ("" and the Generation service, what probes and the gateway
  ask) is NOT_SERVING while no decode worker is ready, when every request
  would fail; liveness stays SERVING."""
  async def run():
    worker = FakeDecode()
    worker.up = False
    async with Router(worker, in_process=in_process) as r:
      await r.wait_statuses(NOT_READY)
      tokens, err = await _collect(r.client, max_tokens=2)
      assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE
      worker.up = True
      await r.wait_statuses(SERVING)
      assert await _collect(r.client, max_tokens=2) == ([100, 101], None)
      worker.up = False                 # the worker goes away again
      await r.wait_statuses(NOT_READY)

  asyncio.run(run())


# ------------------------------------------------------------------- drain
@pytest.mark.parametrize("in_process", [False, True],
                         ids=["grpc", "in_process"])
def test_drain_finishes_running_streams_and_refuses_new_ones(in_process):
  async def run():
    async with Router(FakeDecode(step_s=0.02), in_process=in_process) as r:
      await r.wait_statuses(SERVING)
      running = [asyncio.create_task(_collect(r.client, max_tokens=40))
                 for _ in range(3)]
      while r.servicer.inflight < 3:
        await asyncio.sleep(0.01)
      t0 = time.monotonic()
      drain = asyncio.create_task(r.servicer.drain(30.0, r.health))
      await r.wait_statuses(NOT_READY, timeout_s=1.0)
      _, err = await _collect(r.client, max_tokens=2)
      assert err.code() == grpc.StatusCode.UNAVAILABLE, err
      assert "draining" in err.details()
      assert await drain == 0                  # none had to be cut
      assert time.monotonic() - t0 < 10        # not the whole 30 s
      for tokens, err in await asyncio.gather(*running):
        assert err is None and tokens == list(range(100, 140))

  asyncio.run(run())


@pytest.mark.parametrize("in_process", [False, True],
                         ids=["grpc", "in_process"])
def test_drain_deadline_ends_streams_with_unavailable(in_process):
  """Streams still running at the drain deadline end with UNAVAILABLE
  (clients and the gateway retry that), and their decode calls are
  cancelled, at the deadline (not at a fixed grace)."""
  async def run():
    worker = FakeDecode()
    async with Router(worker, in_process=in_process) as r:
      await r.wait_statuses(SERVING)
      worker.gate.clear()                      # the worker stops streaming
      stuck = asyncio.create_task(_collect(r.client, max_tokens=40))
      while r.servicer.inflight < 1:
        await asyncio.sleep(0.01)
      t0 = time.monotonic()
      assert await r.servicer.drain(0.5, r.health) == 1
      tokens, err = await stuck
      assert 0.4 < time.monotonic() - t0 < 5
      assert err.code() == grpc.StatusCode.UNAVAILABLE, err
      assert "drain deadline" in err.details()
      assert worker.calls[-1].cancelled
      assert r.servicer.inflight == 0

  asyncio.run(run())


# ------------------------------------------------------------------- usage
@pytest.mark.parametrize("in_process", [False, True],
                         ids=["grpc", "in_process"])
def test_the_first_message_carries_the_prompts_usage(in_process):
  """The prompt's accounting (prompt and cached tokens) comes with the first
  tokens, not only with the last message: a client that stops reading
  early (the gateway, at a stop string) still has it."""
  async def run():
    async with Router(FakeDecode(), in_process=in_process) as r:
      deltas = [d async for d in r.client.stream(prompt_token_ids=[5, 6, 7],
                                                 max_tokens=3)]
      first, last = deltas[0], deltas[-1]
      assert first.token_ids and first.finish_reason is None
      assert (first.usage.prompt_tokens,
              first.usage.cached_prompt_tokens) == (3, CACHED)
      assert first.usage.completion_tokens == 1
      assert (last.usage.prompt_tokens, last.usage.cached_prompt_tokens,
              last.usage.completion_tokens) == (3, CACHED, 3)

  asyncio.run(run())


@pytest.mark.parametrize("in_process", [False, True],
                         ids=["grpc", "in_process"])
def test_speculative_counts_and_the_opt_out_pass_through(in_process):
  """The decode worker's draft/accepted counts (its final message) reach
  the request's final usage, not the first; the client's opt-out reaches
  the decode worker, and an absent one stays absent (the pool decides)."""
  async def run():
    worker = FakeDecode(step_s=0)
    worker.spec = (9, 4)
    async with Router(worker, in_process=in_process) as r:
      deltas = [d async for d in r.client.stream(prompt_token_ids=[5, 6, 7],
                                                 max_tokens=3)]
      assert not worker.calls[-1].request.sampling.HasField("speculative")
      first, last = deltas[0].usage, deltas[-1].usage
      assert (first.spec_draft_tokens, first.spec_accepted_tokens) == (0, 0)
      assert (last.spec_draft_tokens, last.spec_accepted_tokens) == (9, 4)
      await r.client.generate(prompt_token_ids=[5, 6, 7], max_tokens=2,
                              speculative=False)
      s = worker.calls[-1].request.sampling
      assert s.HasField("speculative") and not s.speculative

  asyncio.run(run())


# -------------------------------------------------------------------- auth
def test_bearer_scheme_is_case_insensitive():
  """RFC 7235: "bearer" and "BEARER" name the same scheme."""
  from pdjax.client import build_request

  async def code(address: str, header: str):
    async with grpc.aio.insecure_channel(address) as ch:
      call = generate_pb2_grpc.GenerationStub(ch).Generate(
          build_request(prompt_token_ids=[5], max_tokens=1),
          metadata=(("authorization", header),), timeout=10)
      try:
        async for _ in call:
          pass
      except grpc.aio.AioRpcError as e:
        return e.code()
      return None

  async def run():
    async with Router(FakeDecode(), security=common.Security(token="tok")
                      ) as r:
      for header in ("Bearer tok", "bearer tok", "BEARER   tok"):
        assert await code(r.address, header) is None, header
      for header in ("Bearer tok2", "Basic tok", "Bearertok", "tok"):
        assert await code(r.address, header) == (
            grpc.StatusCode.UNAUTHENTICATED), header

  asyncio.run(run())


# -------------------------------------------------------- max_tokens rule
@pytest.mark.parametrize("in_process", [False, True],
                         ids=["grpc", "in_process"])
def test_max_tokens_past_the_context_is_invalid_argument(in_process):
  async def run():
    worker = FakeDecode(step_s=0)
    async with Router(worker, in_process=in_process) as r:
      with pytest.raises(GenerationError) as info:
        await r.client.generate(prompt_token_ids=[7] * 200, max_tokens=57)
      assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
      assert info.value.details().startswith(
          "sampling.max_tokens: This model's maximum context length is 256 "
          "tokens. However, you requested 257 tokens (200 in the messages, "
          "57 in the completion).")
      assert not worker.calls                  # refused before any worker
      ok = await r.client.generate(prompt_token_ids=[7] * 200, max_tokens=56)
      assert len(ok.token_ids) == 56
      # Unset, max_tokens is vLLM's default (16) cut to what the context
      # leaves.
      short = await r.client.generate(prompt_token_ids=[7] * 250)
      assert worker.calls[-1].request.sampling.max_tokens == 6
      assert len(short.token_ids) == 6

  asyncio.run(run())


def test_router_process_is_live_but_not_ready_without_workers(tmp_path):
  """The launcher's wiring: a router whose only decode worker does not
  exist answers its probes at once, live but not ready (every request
  would fail), as the gateway's /health and Kubernetes read them; so does
  the HTTP API it serves with --http_port."""
  import json
  import urllib.error
  import urllib.request

  from pdjax.client import Client
  from pdjax.launch.cluster import LocalCluster
  cluster = LocalCluster(tmp_path)
  try:
    # The test deployment's tiny tokenizer, not the default SmolLM2's (4 s
    # to parse from its GGUF).
    router = cluster.start("router", "pdjax.launch.router",
                           ["--config=test", "--decode_workers=127.0.0.1:1",
                            "--http_port=0"], devices=0)
    cluster.wait_ready([router], 120)
    with Client(f"127.0.0.1:{router.port()}", timeout_s=10) as c:
      got = tuple(c.health(s) for s in ("", GENERATION_SERVICE,
                                         common.LIVENESS_SERVICE))
    assert got == NOT_READY, got
    url = f"http://127.0.0.1:{router.http_port}"
    with urllib.request.urlopen(f"{url}/livez", timeout=10) as r:
      assert r.status == 200
    with pytest.raises(urllib.error.HTTPError) as info:
      urllib.request.urlopen(f"{url}/health", timeout=10)
    assert info.value.code == 503
    assert json.loads(info.value.read())["status"] == "NOT_SERVING"
  finally:
    cluster.stop()


def test_placement_counts_the_pages_the_worker_admits_with():
  """Between polls the router counts, per request it places, the pages the
  worker's admission promises: the prompt's and the first calls' where the
  worker allocates pages on demand, the whole budget where it does not."""
  from pdjax.engine.sampling_params import SamplingParams
  from pdjax.service.registry import Worker

  servicer = RouterServicer(WorkerRegistry(), None, RouterConfig())
  servicer.registry.expected = MODEL
  sampling = SamplingParams(max_tokens=200)
  on_demand = Worker("a:1", "decode", None, None, info=common_pb2.WorkerInfo(
      admission_tokens_past_prompt=8))
  whole = Worker("b:1", "decode", None, None, info=common_pb2.WorkerInfo())
  assert servicer._page_estimate(on_demand, 40, sampling) == 3   # 48 / 16
  assert servicer._page_estimate(whole, 40, sampling) == 15      # 240 / 16
  # Never past the context, nor past max_tokens when that is shorter.
  assert servicer._page_estimate(whole, 200, sampling) == MAX_SEQ_LEN // 16
  assert servicer._page_estimate(on_demand, 47,
                                 SamplingParams(max_tokens=1)) == 3   # 48


# ------------------------------------------------------------ full pools
class _FullFor(FakeDecode):
  """A decode worker whose pool is full for its first ``full_for``
  Reserve calls: each holds the call for the wait it is allowed (as a
  worker waiting for room does), then answers RESOURCE_EXHAUSTED."""

  def __init__(self, full_for: int):
    super().__init__()
    self.full_for = full_for
    self.asks: list[int] = []
    self.waited: list[int] = []

  async def Reserve(self, request, timeout=None):
    self.asks.append(request.wait_ms)
    self.waited.append(request.waited_ms)
    if len(self.asks) <= self.full_for:
      await asyncio.sleep(request.wait_ms / 1000)
      raise grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 grpc.aio.Metadata(), grpc.aio.Metadata(),
                                 "decode KV capacity is full")
    return decode_pb2.ReserveResponse(replica=0, pages=1)


class _NoDeadline:
  def time_remaining(self):
    return None


@pytest.mark.parametrize("on_full", ["queue", "reject"])
def test_a_full_pool_is_waited_for_at_the_worker(on_full):
  """Queueing, the router lets the worker hold each Reserve a while
  (``wait_ms``) and asks again when it answers full, saying how long the
  request has waited so far (``waited_ms``: its place in the worker's
  line); rejecting, it asks once without a wait and answers
  RESOURCE_EXHAUSTED."""
  from pdjax.engine.sampling_params import SamplingParams
  from pdjax.service.router import _RESERVE_WAIT_S, _Failed

  async def go():
    worker = _FullFor(full_for=2)
    registry = WorkerRegistry(poll_interval_s=60)
    registry.add("127.0.0.1:1", "decode").stub = worker
    await registry.poll_once()
    servicer = RouterServicer(registry, None, RouterConfig(on_full=on_full))
    servicer.registry.expected = MODEL
    try:
      d, res = await servicer._reserve(
          "r", [5, 6, 7], SamplingParams(max_tokens=4), _NoDeadline(), set())
      got = ("reserved", res.pages)
    except _Failed as e:
      got = (e.code, None)
    await registry.close()
    return worker.asks, worker.waited, got

  asks, waited, got = asyncio.run(go())
  if on_full == "queue":
    assert got == ("reserved", 1)
    assert asks == [int(_RESERVE_WAIT_S * 1000)] * 3
    # Each ask after a full wait carries at least the waits before it.
    wait_ms = int(_RESERVE_WAIT_S * 1000)
    assert waited[0] < wait_ms
    assert waited[1] >= wait_ms and waited[2] >= 2 * wait_ms
  else:
    assert got == (grpc.StatusCode.RESOURCE_EXHAUSTED, None)
    assert asks == [0] and waited == [0]


# ------------------------------------------- the first token and the hand-off
class _PrefillCall:
  """A streaming Prefill call: the first token at once, then the KV
  handle once the worker's ``handed`` event is set, or the hand-off's
  failure (ABORTED) where the worker says so."""

  def __init__(self, worker: "FakePrefill", request):
    self.worker = worker
    self.request = request
    self.sent = 0

  async def read(self):
    from pdjax.v1 import kv_pb2, prefill_pb2
    self.sent += 1
    if self.sent == 1:
      return prefill_pb2.PrefillResponse(first_token=42, first_logprob=-0.1,
                                         prefill_s=0.001)
    if self.sent > 2:
      return grpc.aio.EOF
    await self.worker.handed.wait()
    if self.worker.failures:
      self.worker.failures -= 1
      raise grpc.aio.AioRpcError(grpc.StatusCode.ABORTED,
                                 grpc.aio.Metadata(), grpc.aio.Metadata(),
                                 "KV hand-off failed: peer went away")
    return prefill_pb2.PrefillResponse(
        kv=kv_pb2.KvHandle(transport="grpc",
                           transfer_id=self.request.destination.transfer_id),
        transfer_s=0.002)

  def cancel(self):
    pass


class FakePrefill:
  def __init__(self, failures: int):
    self.failures = failures
    self.handed = asyncio.Event()
    self.calls: list[_PrefillCall] = []

  async def GetWorkerInfo(self, request, timeout=None):
    return common_pb2.WorkerInfo(role="prefill", model=MODEL,
                                 process_id="fake-p")

  def Prefill(self, request, timeout=None):
    self.calls.append(_PrefillCall(self, request))
    return self.calls[-1]

  async def CompleteDestination(self, request, timeout=None):
    return common_pb2.Empty()

  async def ReleaseKv(self, request, timeout=None):
    return common_pb2.Empty()


class _Reserving(FakeDecode):
  def __init__(self):
    super().__init__(step_s=0.0)
    self.unreserved: list[str] = []

  async def Reserve(self, request, timeout=None):
    return decode_pb2.ReserveResponse(replica=0, pages=1)

  async def Unreserve(self, request, timeout=None):
    self.unreserved.append(request.request_id)
    return common_pb2.Empty()


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_the_first_token_and_a_failed_hand_off(policy):
  """Recomputing after a failed hand-off, the router sends the prefill's
  first token before the hand-off ends, and when the hand-off then fails it
  gives the reservation back and continues from that token on a decode
  worker (local prefill, the token forced). Failing instead, the first token
  waits for the hand-off, so a failed one retries the whole request, the
  client none the wiser. (The fake's hand-offs end once the client has a
  token, or after 0.3 s.)"""

  async def go():
    decode, prefill = _Reserving(), FakePrefill(failures=1)
    registry = WorkerRegistry(poll_interval_s=60)
    registry.add("127.0.0.1:1", "decode").stub = decode
    registry.add("127.0.0.1:2", "prefill").stub = prefill
    await registry.poll_once()
    servicer = RouterServicer(registry, None,
                              RouterConfig(kv_failure_policy=policy,
                                           worker_sessions=False))
    server = common.make_server(common.Security(), client_facing=True)
    generate_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    port = common.bind(server, "127.0.0.1", 0)
    await server.start()
    client = AsyncClient(f"127.0.0.1:{port}", timeout_s=30)
    timer = asyncio.get_running_loop().call_later(0.3, prefill.handed.set)
    tokens, early = [], None
    try:
      async for d in client.stream(prompt_token_ids=[5, 6, 7], max_tokens=3,
                                   temperature=0.0):
        if not tokens:
          early = not prefill.handed.is_set()
          prefill.handed.set()
        tokens.extend(d.token_ids)
    finally:
      timer.cancel()
      await client.close()
      await server.stop(0)
      await registry.close()
    return tokens, early, decode, prefill

  tokens, early, decode, prefill = asyncio.run(go())
  assert len(decode.unreserved) == 1          # the failed attempt's room
  (redeem,) = [c.request for c in decode.calls]
  if policy == "recompute":
    assert early and len(prefill.calls) == 1
    assert redeem.local_prefill and redeem.forced_first_token == 42
    # (the fake decode worker streams max_tokens tokens after the first)
    assert tokens == [42, 100, 101, 102]
  else:
    assert not early and len(prefill.calls) == 2
    assert not redeem.local_prefill and redeem.first_token == 42
    assert redeem.kv.transfer_id and tokens == [42, 100, 101, 102]


# -------------------------------------------------------------- in process
def test_in_process_deadline_and_early_close_free_the_worker_call():
  """In the router's process a call's deadline ends it DEADLINE_EXCEEDED and
  a caller that stops reading early ends it: either way the worker's call
  is cancelled and the router holds nothing for it."""
  async def run():
    worker = FakeDecode(step_s=0.01)
    async with Router(worker, in_process=True) as r:
      await r.wait_statuses(SERVING)
      worker.gate.clear()
      t0 = time.monotonic()
      tokens, err = await _collect(r.client, max_tokens=40, timeout_s=0.3)
      assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err
      assert 0.25 < time.monotonic() - t0 < 5
      await _until(lambda: r.servicer.inflight == 0)
      assert worker.calls[-1].cancelled
      # Under a millisecond is a deadline too, not none.
      _, err = await _collect(r.client, max_tokens=40, timeout_s=1e-4)
      assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err
      await _until(lambda: r.servicer.inflight == 0)
      worker.gate.set()
      stream = r.client.stream(prompt_token_ids=[5, 6, 7], max_tokens=40)
      first = await stream.__anext__()
      assert first.token_ids == [100]
      await stream.aclose()
      await _until(lambda: r.servicer.inflight == 0)
      assert worker.calls[-1].cancelled
      # A stream never read never reaches the router.
      calls = len(worker.calls)
      r.client.stream(prompt_token_ids=[5], max_tokens=2)
      assert len(worker.calls) == calls

  asyncio.run(run())


async def _until(cond, timeout_s: float = 5.0):
  deadline = time.monotonic() + timeout_s
  while not cond():
    assert time.monotonic() < deadline
    await asyncio.sleep(0.01)


def test_the_http_api_over_the_router_in_its_process():
  """The OpenAI app (``pdjax.gateway``) over the router called in its own
  process, as ``pdjax.launch.router --http_port`` serves it: completions
  stream the worker's tokens, /health and /v1/models answer from the
  router, a refusal keeps its HTTP status, a client that leaves cancels the
  worker's call, and a drain answers new requests 503."""
  from aiohttp.test_utils import TestClient, TestServer

  from pdjax.gateway import GatewayConfig, create_app

  async def run():
    worker = FakeDecode(step_s=0.01)
    async with Router(worker, in_process=True) as r:
      await r.wait_statuses(SERVING)
      app = create_app(GatewayConfig(), r.client)
      async with TestClient(TestServer(app)) as http:
        resp = await http.get("/health")
        assert resp.status == 200, await resp.text()
        models = await (await http.get("/v1/models")).json()
        assert models["data"][0]["id"] == "fake"
        resp = await http.post("/v1/completions", json={
            "prompt": [5, 6, 7], "max_tokens": 4, "return_token_ids": True})
        body = await resp.json()
        assert resp.status == 200, body
        assert body["choices"][0]["token_ids"] == [100, 101, 102, 103]
        assert body["usage"]["prompt_tokens"] == 3
        resp = await http.post("/v1/completions", json={
            "prompt": [7] * 200, "max_tokens": 57})
        assert resp.status == 400
        assert "maximum context length" in (await resp.json())[
            "error"]["message"]
        # A streaming client that leaves after its first event.
        resp = await http.post("/v1/completions", json={
            "prompt": [5, 6, 7], "max_tokens": 200, "stream": True})
        assert resp.status == 200
        await resp.content.readline()
        resp.close()
        await _until(lambda: r.servicer.inflight == 0)
        assert worker.calls[-1].cancelled
        drain = asyncio.create_task(r.servicer.drain(5.0, r.health))
        await _until(lambda: r.servicer.draining)
        resp = await http.post("/v1/completions", json={
            "prompt": [5], "max_tokens": 2})
        assert resp.status == 503, await resp.text()
        assert (await http.get("/health")).status == 503
        assert await drain == 0

  asyncio.run(run())
  with pytest.raises(ValueError, match="not both"):
    create_app(GatewayConfig(router="127.0.0.1:1"), InProcessRouterClient(
        RouterServicer(WorkerRegistry(), None)))
  with pytest.raises(ValueError, match="either"):
    create_app(GatewayConfig())
