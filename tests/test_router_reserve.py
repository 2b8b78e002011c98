"""The router's reservation beside the prefill, in one process over real
gRPC: the router, a prefill worker and decode workers assembled as their
launchers assemble them (servicers, workers, the ``local`` transport), with
scripted engines (``tests/fake_engines.py``) and decode servicers whose
Reserve a test holds until the prefill has started or run, then answers or
refuses.

Checked: the prefill starts while Reserve is still unanswered and its KV
waits for the destination; the tokens are those of the order where Reserve
goes first (a decode worker keeping a prefix cache); a reservation refused
while the prefill computes or after it ran answers the client
RESOURCE_EXHAUSTED, or is waited for under the queue policy, and a decode
worker gone is routed around; a client that cancels while Reserve is held,
or before the decode worker took the KV, leaves nothing behind. After each
request every worker's accounting (and the router's) is back where it
started.
"""

from __future__ import annotations

import asyncio
import threading
import time
import types

import grpc
import jax.numpy as jnp
import pytest

from fake_engines import FakeDecodeBackend, FakePrefillEngine
from pdjax.client import AsyncClient, GenerationError
from pdjax.engine.requests import PrefillResult, RequestKV
from pdjax.service import common
from pdjax.service.decode_service import DecodeServicer, DecodeWorker
from pdjax.service.prefill_service import PrefillServicer, PrefillWorker
from pdjax.service.registry import WorkerRegistry
from pdjax.service.router import RouterConfig, RouterServicer
from pdjax.transfer.local import LocalKvExchange, LocalReceiver, LocalSender
from pdjax.v1 import (common_pb2, decode_pb2_grpc, generate_pb2_grpc,
                      prefill_pb2_grpc)

pytestmark = pytest.mark.timeout(60)

MODEL = common_pb2.ModelInfo(name="fake", fingerprint="f", vocab_size=64,
                             max_seq_len=64, page_size=16)
PROMPT = [5, 6, 7]
DECODED = [7, 8, 9]                    # FakeDecodeBackend's tokens
FIRST = 10 + len(PROMPT)               # _Engine's first token
TOKENS = [FIRST, *DECODED]


class _Engine(FakePrefillEngine):
  """First token 10 + prompt length, a one-page KV; ``started`` and
  ``finished`` are set as its batch starts and once it has run; a batch
  computes once ``gate`` is set (None: at once)."""
  cfg = types.SimpleNamespace(vocab_size=MODEL.vocab_size)
  config = types.SimpleNamespace(max_batch=2, max_seq_len=MODEL.max_seq_len)

  def __init__(self):
    self.started = threading.Event()
    self.finished = threading.Event()
    self.gate: threading.Event | None = None
    self.batches = 0

  def prefill(self, reqs, kv_ready=None, on_result=None):
    self.batches += 1
    self.started.set()
    if self.gate is not None:
      assert self.gate.wait(10), "the prefill's gate stayed shut"
    out = [PrefillResult(r.request_id, 10 + len(r.prompt_ids), -0.5,
                         RequestKV(jnp.zeros((1, 2, 1, 16, 1, 2)),
                                   len(r.prompt_ids)), len(r.prompt_ids))
           for r in reqs]
    for i, r in enumerate(out):
      kv_ready(i, r.kv)
      on_result(i, r)
    self.finished.set()
    return out


class _Decode(DecodeServicer):
  """A decode worker's servicer whose Reserve waits for ``hold`` (a
  threading.Event; None: no wait) and then answers, or refuses with
  ``refuse`` (a status code) for its first ``refusals`` calls (and sets
  ``refused``)."""

  def __init__(self, worker, info):
    super().__init__(worker, info)
    self.hold: threading.Event | None = None
    self.refuse: grpc.StatusCode | None = None
    self.refusals = 1 << 30
    self.refused = threading.Event()
    self.held_until_set: list[bool] = []   # per call: was the hold set?
    self.decode_called = threading.Event()
    self.hold_decode: threading.Event | None = None

  async def _decode(self, request, context):
    """A Decode call's body (a call of its own or in a session), held
    (``hold_decode``) before it touches the hand-off: a call cancelled
    meanwhile leaves the reservation as Reserve made it."""
    self.decode_called.set()
    if self.hold_decode is not None:
      await asyncio.to_thread(self.hold_decode.wait, 10)
    async for message in super()._decode(request, context):
      yield message

  async def Reserve(self, request, context):
    if self.hold is not None:
      self.held_until_set.append(await asyncio.to_thread(self.hold.wait, 10))
    if self.refuse is not None and self.refusals > 0:
      self.refusals -= 1
      self.refused.set()
      await context.abort(self.refuse, "refused by the test")
    return await super().Reserve(request, context)


class _Deployment:
  """A router, one prefill worker and ``len(capacities)`` decode workers
  (the first with the most room is picked first), on loopback."""

  def __init__(self, capacities=(8,), prefix_caching=False, **router_kw):
    self.capacities = capacities
    self.prefix_caching = prefix_caching
    self.router_kw = router_kw

  async def _serve(self, add, servicer) -> str:
    server = common.make_server(common.Security())
    add(servicer, server)
    port = common.bind(server, "127.0.0.1", 0)
    await server.start()
    self.servers.append(server)
    return f"127.0.0.1:{port}"

  async def __aenter__(self):
    self.servers = []
    exchange = LocalKvExchange()
    self.engine = _Engine()
    self.sender = LocalSender(exchange)
    self.prefill = PrefillWorker(self.engine, self.sender)
    self.prefill.start()
    prefill_address = await self._serve(
        prefill_pb2_grpc.add_PrefillServicer_to_server,
        PrefillServicer(self.prefill, common_pb2.WorkerInfo(
            role="prefill", model=MODEL, process_id="p")))
    self.decodes: list[tuple[_Decode, FakeDecodeBackend]] = []
    decode_addresses = []
    for i, capacity in enumerate(self.capacities):
      backend = FakeDecodeBackend(capacity=capacity, tokens=DECODED)
      worker = DecodeWorker(backend, LocalReceiver(exchange))
      worker.start()
      servicer = _Decode(worker, common_pb2.WorkerInfo(
          role="decode", model=MODEL, process_id=f"d{i}",
          prefix_caching=self.prefix_caching))
      decode_addresses.append(await self._serve(
          decode_pb2_grpc.add_DecodeServicer_to_server, servicer))
      self.decodes.append((servicer, backend))
    self.registry = WorkerRegistry(poll_interval_s=60)
    self.registry.add(prefill_address, "prefill")
    for address in decode_addresses:
      self.registry.add(address, "decode")
    await self.registry.poll_once()
    self.router = RouterServicer(self.registry, None,
                                 RouterConfig(kv_transport="local",
                                              **self.router_kw))
    address = await self._serve(
        generate_pb2_grpc.add_GenerationServicer_to_server, self.router)
    self.client = AsyncClient(address, timeout_s=20)
    return self

  async def __aexit__(self, *exc):
    await self.client.close()
    for server in reversed(self.servers):
      await server.stop(0)
    await self.registry.close()
    self.prefill.stop()
    for servicer, _ in self.decodes:
      servicer.worker.stop()

  async def generate(self, **kw):
    return await self.client.generate(prompt_token_ids=PROMPT, max_tokens=4,
                                      temperature=0.0, **kw)

  async def assert_nothing_left(self) -> None:
    """Every worker's accounting back at its start: no prefill running or
    KV parked, no destination awaited, no reservation or hand-off open;
    the router counts no call on a worker nor holds its channel. (The
    router's last clean-up calls may still be on their way.)"""
    deadline = time.monotonic() + 5
    while True:
      left = {"prefill running": self.prefill.running,
              "KV parked": self.sender.live(),
              "destinations": len(self.prefill.destinations)}
      for w in self.registry.workers.values():
        left[f"router's calls on {w.address}"] = w.inflight
        left[f"router's holds on {w.address}"] = w.holds
      for i, (servicer, backend) in enumerate(self.decodes):
        left[f"d{i} hand-offs"] = len(servicer.worker.handoffs)
        left[f"d{i} reservations"] = len(backend.reservations)
      if not any(left.values()) or time.monotonic() > deadline:
        break
      await asyncio.sleep(0.02)
    assert not any(left.values()), {k: v for k, v in left.items() if v}


def _reserves(metrics, order: str) -> float:
  """Reserve calls the router made in that order to the prefill."""
  return metrics.registry.get_sample_value(
      "pdjax_reserve_seconds_count", {"order": order}) or 0


def test_reserve_runs_beside_the_prefill_and_the_kv_waits_for_it():
  """Reserve is held until the prefill has run: the request still
  completes (so the prefill did not wait for Reserve), the KV waited for
  its destination, and the tokens are the prefill's then the decode's."""

  async def go():
    async with _Deployment() as dep:
      decode, _ = dep.decodes[0]
      decode.hold = dep.engine.finished
      result = await dep.generate()
      await dep.assert_nothing_left()
      return (result, decode.held_until_set, dep.router.metrics,
              dep.prefill.metrics)

  result, held, router_metrics, prefill_metrics = asyncio.run(go())
  assert result.token_ids == TOKENS
  assert held == [True]           # answered only once the prefill had run
  assert result.usage.decode_worker and result.usage.prefill_worker
  assert _reserves(router_metrics, "beside") == 1
  assert _reserves(router_metrics, "before") == 0
  sample = prefill_metrics.registry.get_sample_value
  assert sample("pdjax_kv_destination_wait_seconds_count") == 1
  assert sample("pdjax_kv_destination_wait_seconds_sum") > 0
  # The first token waited for the reservation: that wait is reserve_s.
  stages = result.usage.ttft_stages
  assert 0 < stages["reserve"] <= result.usage.ttft_s


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_the_tokens_do_not_depend_on_the_order(prefix_caching):
  """Beside the prefill, or before it where the decode worker keeps a
  prefix cache (its answer may shorten the prefill): the same tokens, and
  before it the prefill starts only once Reserve answered."""

  async def go():
    async with _Deployment(prefix_caching=prefix_caching) as dep:
      result = await dep.generate()
      await dep.assert_nothing_left()
      return result, dep.router.metrics

  result, metrics = asyncio.run(go())
  assert result.token_ids == TOKENS
  order = "before" if prefix_caching else "beside"
  assert _reserves(metrics, order) == 1


def _refuse(dep: _Deployment, decode: _Decode, code: grpc.StatusCode,
            when: str) -> None:
  """``decode`` refuses Reserve with ``code`` once the prefill has run
  (``when="after"``), or while it still computes (``"before"``: once its
  batch has started, which goes on once the refusal is out; a refusal
  sent earlier could have the prefill cancelled before it ran)."""
  decode.refuse = code
  if when == "after":
    decode.hold = dep.engine.finished
  else:
    decode.hold = dep.engine.started
    dep.engine.gate = decode.refused


WHEN = ["before", "after"]   # the refusal, against the prefill's end


@pytest.mark.parametrize("when", WHEN)
@pytest.mark.parametrize("on_full", ["reject", "queue"])
def test_a_reservation_refused_beside_the_prefill(on_full, when):
  """The pool is full, as found by the Reserve beside the prefill.
  Rejecting, the client gets RESOURCE_EXHAUSTED and the prefill worker
  drops the KV; queueing, the router asks again and the KV, computed once,
  waits for the answer."""

  async def go():
    async with _Deployment(on_full=on_full) as dep:
      decode, _ = dep.decodes[0]
      _refuse(dep, decode, grpc.StatusCode.RESOURCE_EXHAUSTED, when)
      decode.refusals = 1
      try:
        got = (await dep.generate()).token_ids
      except GenerationError as e:
        got = e.code()
      await dep.assert_nothing_left()
      return got, dep.engine.batches

  got, batches = asyncio.run(go())
  if on_full == "reject":
    assert got == grpc.StatusCode.RESOURCE_EXHAUSTED
  else:
    assert got == TOKENS
  assert batches == 1   # computed once, waiting for room if queueing


@pytest.mark.parametrize("when", WHEN)
@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE,
                                  grpc.StatusCode.CANCELLED])
def test_a_decode_worker_gone_at_reserve_is_routed_around(code, when):
  """The decode worker picked first (the most room) is gone (Reserve:
  UNAVAILABLE) or gives the call up itself (CANCELLED, which the router
  never asked for: a worker leaving the pool) while the prefill computes or
  once it has run: the router retries the request on the other one, and
  the first prefill's KV is dropped."""

  async def go():
    async with _Deployment(capacities=(16, 8)) as dep:
      gone, _ = dep.decodes[0]
      _refuse(dep, gone, code, when)
      result = await dep.generate()
      await dep.assert_nothing_left()
      return result, dep.engine.batches, dep.decodes[1][1].taken

  result, batches, taken_by_other = asyncio.run(go())
  assert result.token_ids == TOKENS
  assert len(taken_by_other) == 1
  # The first prefill ran (``_refuse`` refuses once its batch started),
  # then the one for the other worker.
  assert batches == 2


def test_a_client_that_cancels_while_reserve_is_held_leaves_nothing():
  """The client goes away after the prefill ran, while Reserve is held:
  the router cancels both calls (and gives back what Reserve may have
  reserved); the prefill worker drops the KV."""

  async def go():
    async with _Deployment() as dep:
      decode, _ = dep.decodes[0]
      release = threading.Event()
      decode.hold = release
      request = asyncio.ensure_future(dep.generate())
      assert await asyncio.to_thread(dep.engine.finished.wait, 10)
      await asyncio.sleep(0.05)   # the first token reaches the router
      request.cancel()
      with pytest.raises(asyncio.CancelledError):
        await request
      release.set()
      await dep.assert_nothing_left()

  asyncio.run(go())


def test_a_client_that_cancels_before_decode_answers_leaves_nothing():
  """The client goes away once it has the first token, while the router's
  Decode call has not reached the decode worker's hand-off (held there):
  the router gives the reservation back itself, and has the prefill worker
  free the KV no one will redeem (rather than at their TTLs)."""

  async def go():
    async with _Deployment() as dep:
      decode, _ = dep.decodes[0]
      release = threading.Event()
      decode.hold_decode = release
      stream = dep.client.stream(prompt_token_ids=PROMPT, max_tokens=4,
                                 temperature=0.0)
      first = await stream.__anext__()
      assert first.token_ids == [FIRST]
      assert await asyncio.to_thread(decode.decode_called.wait, 10)
      await stream.aclose()
      await dep.assert_nothing_left()
      release.set()

  asyncio.run(go())
