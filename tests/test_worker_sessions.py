"""Calls as messages on one long-lived stream (``DecodeSession``,
``PrefillSession``): the router's side (``pdjax.client.sessions``)
against the workers' real servicers (``pdjax.service.call_sessions``) over
loopback gRPC, with fake engines. A call in a session ends as the same
call of its own ends: the same messages, the same status, details and
trailing metadata; cancelling it, its deadline, and the session's end free
what the worker holds for it."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from fake_engines import FakeDecodeBackend
from pdjax.client.sessions import CallSession
from pdjax.service import common
from pdjax.service.decode_service import DecodeServicer, DecodeWorker
from pdjax.v1 import decode_pb2, decode_pb2_grpc

from test_decode_servicer import FakeReceiver


class _HeldBackend(FakeDecodeBackend):
  """Local prefills whose request ids start with ``held`` get no token
  (they run until cancelled); the rest answer at once."""

  def __init__(self, **kw):
    super().__init__(**kw)
    self.held: dict[str, object] = {}
    self.arrived = asyncio.Event()

  def submit(self, request_id, prompt_ids, sampling, callback, seed_u32=0,
             **kw):
    if request_id.startswith("held"):
      self.local.append(request_id)
      self.held[request_id] = callback
      self.arrived.set()
      return
    super().submit(request_id, prompt_ids, sampling, callback, seed_u32,
                   **kw)


class _Worker:
  """A decode worker's servicer on loopback: the real ``DecodeServicer``
  over ``_HeldBackend``; ``servicer_cls`` swaps it."""

  def __init__(self, servicer_cls=DecodeServicer, port: int = 0,
               security: common.Security = common.Security()):
    self.servicer_cls = servicer_cls
    self.port = port
    self.security = security

  async def __aenter__(self):
    self.engine = _HeldBackend()
    self.worker = DecodeWorker(self.engine, FakeReceiver(),
                               transfer_timeout_s=2.0)
    self.servicer = self.servicer_cls(self.worker, None)
    self.server = common.make_server(self.security)
    decode_pb2_grpc.add_DecodeServicer_to_server(self.servicer, self.server)
    self.port = common.bind(self.server, "127.0.0.1", self.port)
    await self.server.start()
    self.address = f"127.0.0.1:{self.port}"
    self.channel = common.make_channel(self.address, common.Security(),
                                       aio=True)
    self.stub = decode_pb2_grpc.DecodeStub(self.channel)
    self.session = CallSession(self.stub, "Decode",
                               decode_pb2.DecodeSessionRequest,
                               self.address)
    return self

  async def __aexit__(self, *exc):
    await self.session.close()
    await self.channel.close()
    await self.server.stop(None)


def _local(rid: str, ids=(1, 2, 3), max_tokens=3) -> decode_pb2.DecodeRequest:
  req = decode_pb2.DecodeRequest(request_id=rid, prompt_token_ids=list(ids),
                                 local_prefill=True)
  req.sampling.max_tokens = max_tokens
  return req


async def _outcome(call):
  """(messages, (code, details, trailing metadata) or None) of a call."""
  msgs = []
  try:
    async for m in call:
      msgs.append(m)
  except grpc.aio.AioRpcError as e:
    return msgs, (e.code(), e.details(), tuple(e.trailing_metadata() or ()))
  return msgs, None


def test_calls_in_a_session_end_as_calls_of_their_own():
  """Eight calls at once on one session, and one refused for a bad token
  id, give the messages and statuses the same calls give on their own;
  they shared one stream."""

  async def go():
    async with _Worker() as w:
      reqs = [_local(f"r{i}", ids=(1, 2, 3 + i)) for i in range(8)]
      bad = _local("bad", ids=(1, 99))            # vocab_size is 64
      own = [await _outcome(w.stub.Decode(r, timeout=10))
             for r in [*reqs, bad]]
      in_session = await asyncio.gather(*[
          _outcome(w.session.call(r, timeout=10)) for r in [*reqs, bad]])
      assert in_session == own
      assert own[-1][1][0] == grpc.StatusCode.INVALID_ARGUMENT
      assert all(o[1] is None and o[0][-1].finish_reason for o in own[:-1])
      assert w.servicer.sessions.open == 1
      assert w.session.calls == 0 and w.worker.streams == 0

  asyncio.run(go())


def test_a_refusal_keeps_its_retry_hint():
  """RESOURCE_EXHAUSTED (too many streams) carries its pushback trailer in
  a session as on a call of its own."""

  async def go():
    async with _Worker() as w:
      w.worker.max_streams = 0
      own = await _outcome(w.stub.Decode(_local("r"), timeout=10))
      in_session = await _outcome(w.session.call(_local("r"), timeout=10))
      code, details, trailing = in_session[1]
      assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
      assert (common.RETRY_PUSHBACK_KEY, "100") in trailing
      assert in_session[1][:2] == own[1][:2]
      assert dict(trailing)[common.RETRY_PUSHBACK_KEY] == dict(
          own[1][2])[common.RETRY_PUSHBACK_KEY]

  asyncio.run(go())


def test_cancel_frees_the_slot_and_the_session_carries_on():
  async def go():
    async with _Worker() as w:
      call = w.session.call(_local("held-1"), timeout=10)
      reading = asyncio.ensure_future(_outcome(call))
      await asyncio.wait_for(w.engine.arrived.wait(), 5)
      assert w.worker.streams == 1
      assert call.cancel() and not call.cancel()
      reading.cancel()
      for _ in range(200):
        if w.engine.cancelled == ["held-1"] and w.worker.streams == 0:
          break
        await asyncio.sleep(0.01)
      assert w.engine.cancelled == ["held-1"] and w.worker.streams == 0
      msgs, status = await _outcome(w.session.call(_local("r2"), timeout=10))
      assert status is None and msgs[-1].finish_reason
      assert w.servicer.sessions.open == 1

  asyncio.run(go())


def test_a_read_waiting_when_the_call_is_cancelled_raises_cancelled():
  """As on gRPC's own calls (the router cancels a Prefill call from another
  task while its handler waits in ``read``, and tells the two apart by
  this); the worker frees both."""

  async def go():
    async with _Worker() as w:
      own = w.stub.Decode(_local("held-own"), timeout=10)
      mine = w.session.call(_local("held-session"), timeout=10)
      reads = [asyncio.ensure_future(c.read()) for c in (own, mine)]
      for _ in range(500):
        if len(w.engine.held) == 2:
          break
        await asyncio.sleep(0.01)
      assert len(w.engine.held) == 2
      assert own.cancel() and mine.cancel()
      for r in reads:
        with pytest.raises(asyncio.CancelledError):
          await r
      for _ in range(200):
        if len(w.engine.cancelled) == 2:
          break
        await asyncio.sleep(0.01)
      assert sorted(w.engine.cancelled) == ["held-own", "held-session"]

  asyncio.run(go())


def test_the_deadline_ends_the_call_on_both_sides():
  """A held call's deadline ends it here and cancels it on the worker. The
  deadline leaves the start time to reach the worker on a loaded machine
  (at 0.3 s a 2-core machine running the suite once did not)."""
  async def go():
    async with _Worker() as w:
      msgs, status = await _outcome(w.session.call(_local("held-1"),
                                                   timeout=1.0))
      assert msgs == [] and status[0] == grpc.StatusCode.DEADLINE_EXCEEDED
      for _ in range(200):
        if w.engine.cancelled == ["held-1"] and w.worker.streams == 0:
          break
        await asyncio.sleep(0.01)
      assert w.engine.cancelled == ["held-1"] and w.worker.streams == 0
      assert w.session.calls == 0

  asyncio.run(go())


def test_a_worker_gone_ends_its_calls_and_a_new_session_follows():
  """The worker's server stops with a call running: the call in the
  session fails with the status a call of its own gets; a worker at the
  same address then serves the next call on a new session."""

  async def go():
    async with _Worker() as w:
      own = asyncio.ensure_future(_outcome(w.stub.Decode(
          _local("held-own"), timeout=10)))
      mine = asyncio.ensure_future(_outcome(w.session.call(
          _local("held-session"), timeout=10)))
      for _ in range(500):
        if len(w.engine.held) == 2:
          break
        await asyncio.sleep(0.01)
      assert len(w.engine.held) == 2
      await w.server.stop(None)
      (own_msgs, own_status), (msgs, status) = await asyncio.gather(own, mine)
      assert own_msgs == msgs == []
      assert status[0] == own_status[0], (status, own_status)
      assert status[0] in (grpc.StatusCode.UNAVAILABLE,
                           grpc.StatusCode.CANCELLED)
      assert sorted(w.engine.cancelled) == ["held-own", "held-session"]
      async with _Worker(port=w.port) as again:
        # The old session's stream is gone: the call opens another.
        msgs, status = await _outcome(w.session.call(_local("r"), timeout=10))
        assert status is None and msgs[-1].finish_reason
        assert again.servicer.sessions.open == 1

  asyncio.run(go())


def test_a_drain_ends_the_sessions_once_nothing_runs():
  """``CallSessions.end`` closes the open sessions with OK (a server's
  graceful stop then has nothing to wait for); a call the router starts
  meanwhile fails with UNAVAILABLE, which it retries elsewhere."""

  async def go():
    async with _Worker() as w:
      msgs, status = await _outcome(w.session.call(_local("r"), timeout=10))
      assert status is None and w.servicer.sessions.open == 1
      await w.servicer.sessions.end()
      assert w.servicer.sessions.open == 0
      msgs, status = await _outcome(w.session.call(_local("r2"), timeout=10))
      assert msgs == [] and status[0] == grpc.StatusCode.UNAVAILABLE

  asyncio.run(go())


def test_a_call_the_drain_cuts_short_ends_unavailable():
  """A call still running when ``CallSessions.end`` closes its session (a
  drain that ran out of time, or a start that came in just before the end)
  ends UNAVAILABLE, the status of a server going away, not CANCELLED: its
  caller cancelled nothing; the worker frees what it held."""

  async def go():
    async with _Worker() as w:
      call = asyncio.ensure_future(_outcome(w.session.call(
          _local("held-1"), timeout=10)))
      await asyncio.wait_for(w.engine.arrived.wait(), 5)
      await w.servicer.sessions.end()
      msgs, status = await call
      assert msgs == [] and status[0] == grpc.StatusCode.UNAVAILABLE, status
      assert "shutting down" in status[1]
      assert w.engine.cancelled == ["held-1"] and w.worker.streams == 0

  asyncio.run(go())


class _Silent(DecodeServicer):
  """A worker that takes the session and never answers it (hung)."""

  async def DecodeSession(self, request_iterator, context):
    await asyncio.sleep(3600)


def test_a_worker_that_never_answers_the_session_holds_no_call(monkeypatch):
  """A session that gets no headers: a call with a deadline ends at it
  (DEADLINE_EXCEEDED), one without when the opening times out
  (UNAVAILABLE, which the router retries elsewhere); neither waits on."""
  from pdjax.client import sessions
  monkeypatch.setattr(sessions, "_OPEN_TIMEOUT_S", 0.5)

  async def go():
    async with _Worker(servicer_cls=_Silent) as w:
      msgs, status = await asyncio.wait_for(
          _outcome(w.session.call(_local("a"), timeout=0.2)), 5)
      assert msgs == [] and status[0] == grpc.StatusCode.DEADLINE_EXCEEDED
      msgs, status = await asyncio.wait_for(
          _outcome(w.session.call(_local("b"))), 5)
      assert msgs == [] and status[0] == grpc.StatusCode.UNAVAILABLE
      assert "no answer" in status[1]
      assert w.session.calls == 0 and w.engine.local == []

  asyncio.run(go())


def test_a_session_without_the_service_token_is_refused_at_once():
  """A worker that wants the service token refuses a session without it
  as soon as it opens (UNAUTHENTICATED), not after waiting for a first
  message the session sends only once the worker has answered."""

  async def go():
    async with _Worker(security=common.Security(service_token="s3")) as w:
      msgs, status = await asyncio.wait_for(
          _outcome(w.session.call(_local("a"), timeout=10)), 5)
      assert msgs == [] and status[0] == grpc.StatusCode.UNAUTHENTICATED
      assert w.engine.local == []

  asyncio.run(go())


class _CallsOnly(decode_pb2_grpc.DecodeServicer):
  """A worker from before sessions: Decode calls only."""

  def __init__(self, worker, info):
    self.inner = DecodeServicer(worker, info)

  async def Decode(self, request, context):
    async for msg in self.inner.Decode(request, context):
      yield msg


def test_a_worker_without_sessions_gets_calls_of_their_own():
  """A worker that answers the session UNIMPLEMENTED (one older than the
  router) serves every call, the first included, as a call of its own."""

  async def go():
    async with _Worker(servicer_cls=_CallsOnly) as w:
      first, second = await asyncio.gather(
          _outcome(w.session.call(_local("a"), timeout=10)),
          _outcome(w.session.call(_local("b"), timeout=10)))
      assert first[1] is None and second[1] is None
      assert first[0][-1].finish_reason and second[0][-1].finish_reason
      assert w.session.supported is False
      assert sorted(w.engine.local) == ["a", "b"]
      msgs, status = await _outcome(w.session.call(_local("c"), timeout=10))
      assert status is None and w.engine.local[-1] == "c"

  asyncio.run(go())


@contextlib.asynccontextmanager
async def router_with_a_worker(config=None, security=common.Security()):
  """(worker, router servicer, router address): the real router on
  loopback in front of one ``_Worker`` (a model of vocabulary 64)."""
  from pdjax.service.registry import WorkerRegistry
  from pdjax.service.router import RouterConfig, RouterServicer
  from pdjax.v1 import common_pb2, generate_pb2_grpc
  async with _Worker() as w:
    w.servicer.info = common_pb2.WorkerInfo(
        role="decode", process_id="p",
        model=common_pb2.ModelInfo(name="fake", vocab_size=64,
                                   max_seq_len=64, page_size=16),
        load=common_pb2.WorkerLoad(kv_pages_total=100,
                                   kv_pages_available=100, rows_free=8))
    registry = WorkerRegistry(poll_interval_s=60)
    registry.add(w.address, "decode")
    await registry.poll_once()
    servicer = RouterServicer(registry, None, config or RouterConfig())
    server = common.make_server(security, client_facing=True)
    generate_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    port = common.bind(server, "127.0.0.1", 0)
    await server.start()
    try:
      yield w, servicer, f"127.0.0.1:{port}"
    finally:
      await server.stop(None)
      await registry.close()


@pytest.mark.parametrize("sessions", [True, False])
def test_the_router_streams_a_request_either_way(sessions):
  """The router's Decode path over sessions and over calls of their own
  gives the same tokens (its setting, ``worker_sessions``)."""
  from pdjax.client import AsyncClient
  from pdjax.service.router import RouterConfig

  async def go():
    async with router_with_a_worker(
        RouterConfig(worker_sessions=sessions)) as (w, _, address):
      async with AsyncClient(address, timeout_s=10) as client:
        got = [d async for d in client.stream(prompt_token_ids=[1, 2, 3],
                                              max_tokens=3)]
      tokens = [t for d in got for t in d.token_ids]
      assert tokens == w.engine.tokens
      assert w.servicer.sessions.open == (1 if sessions else 0)

  asyncio.run(go())


class _HeldWrites:
  """A session stream as grpc.aio's: headers at once, writes held until
  ``release`` (a cancelled write cancels the whole stream, as grpc.aio
  does), iteration that ends with CancelledError once cancelled."""

  def __init__(self):
    self.written = []
    self.cancelled = False
    self.gate = asyncio.Event()
    self.writing = asyncio.Event()
    self._ended = asyncio.Event()

  async def initial_metadata(self):
    from pdjax.client.sessions import SESSION_HEADER
    return ((SESSION_HEADER, "1"),)

  async def write(self, msg):
    self.writing.set()
    try:
      await self.gate.wait()
    except asyncio.CancelledError:
      self.cancel()
      raise
    self.written.append(msg)

  def cancel(self):
    self.cancelled = True
    self._ended.set()
    return True

  def __aiter__(self):
    return self

  async def __anext__(self):
    await self._ended.wait()
    raise asyncio.CancelledError()


class _HeldStub:
  def __init__(self):
    self.streams = []

  def DecodeSession(self, metadata=None):
    self.streams.append(_HeldWrites())
    return self.streams[-1]


@pytest.mark.parametrize("how", ["caller cancelled", "deadline"])
def test_a_call_given_up_while_its_start_is_written_leaves_the_session(how):
  """A caller that gives up (its task cancelled, or its deadline passing)
  while its start message is still being written: the write finishes and
  a cancel follows it, and the session's stream stands for the other
  calls on it (grpc.aio cancels the whole stream when a write is
  cancelled: every call on the session would have ended CANCELLED)."""

  async def go():
    stub = _HeldStub()
    session = CallSession(stub, "Decode", decode_pb2.DecodeSessionRequest,
                          "held")
    timeout = 0.05 if how == "deadline" else None
    call = session.call(_local("r1"), timeout=timeout)
    reading = asyncio.ensure_future(_outcome(call))
    stream = None
    for _ in range(500):
      if stub.streams and stub.streams[0].writing.is_set():
        stream = stub.streams[0]
        break
      await asyncio.sleep(0.001)
    assert stream is not None
    if how == "caller cancelled":
      reading.cancel()
    else:
      await asyncio.sleep(0.1)       # past the deadline, the write held
    await asyncio.sleep(0.01)
    assert not stream.cancelled
    stream.gate.set()
    if how == "caller cancelled":
      with pytest.raises(asyncio.CancelledError):
        await reading
      call.cancel()                  # as the router's callers do
    else:
      msgs, status = await reading
      assert msgs == [] and status[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(500):
      if len(stream.written) == 2:
        break
      await asyncio.sleep(0.001)
    kinds = [m.WhichOneof("kind") for m in stream.written]
    assert kinds == ["start", "cancel"] and not stream.cancelled
    # The next call goes on the same stream.
    nxt = asyncio.ensure_future(_outcome(session.call(_local("r2"))))
    for _ in range(500):
      if len(stream.written) == 3:
        break
      await asyncio.sleep(0.001)
    assert len(stub.streams) == 1 and len(stream.written) == 3
    nxt.cancel()
    await session.close()

  asyncio.run(go())
