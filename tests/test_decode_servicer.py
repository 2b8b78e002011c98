"""The decode worker's RPCs over a fake engine and a fake receiver (no JAX
programs): each disaggregated request's hand-off (its reservation, its
transfer id and what the receiver lent or staged under it, its share of
the receive budget) is given back exactly once on every path: the KV
redeemed, Unreserve, a wrong transfer id, a failed or cancelled receive,
the reservation's TTL."""

from __future__ import annotations

import asyncio
import threading

import grpc
import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from fake_engines import FakeDecodeBackend
from pdjax.engine.requests import RequestKV
from pdjax.service.decode_service import DecodeServicer, DecodeWorker
from pdjax.service.handoffs import HandoffState
from pdjax.transfer.base import (KvReceiver, TransferDenied, TransferError,
                                 TransferTimeout)
from pdjax.v1 import decode_pb2, kv_pb2


class FakeReceiver(KvReceiver):
  """Redeems only issued ids; lends one landing 'region' per id when asked;
  counts what was issued, lent, forgotten and handed out."""
  name = "fake"

  def __init__(self):
    self.issued: set[str] = set()
    self.lent: set[str] = set()
    self.forgotten: list[str] = []
    self.fail: dict[str, BaseException] = {}
    self.gate: threading.Event | None = None   # holds receive() while set
    self.released = 0

  def expect(self, transfer_id, request_id, *, max_pages=None):
    self.issued.add(transfer_id)

  def forget(self, transfer_id):
    self.forgotten.append(transfer_id)
    self.issued.discard(transfer_id)
    self.lent.discard(transfer_id)

  def lend_landing(self, transfer_id, prompt_tokens):
    if transfer_id not in self.issued:
      raise TransferDenied(f"{transfer_id} was not issued here")
    self.lent.add(transfer_id)
    return None

  def receive(self, handle, sharding, *, timeout_s):
    tid = handle.transfer_id
    if tid not in self.issued:
      raise TransferDenied(f"{tid} was not issued here")
    if self.gate is not None:         # the KV is on its way
      self.gate.wait(5)
    if tid in self.fail:
      raise self.fail[tid]
    self.issued.discard(tid)          # redeemed
    self.lent.discard(tid)

    def release():
      self.released += 1
    return RequestKV(np.zeros((1, 2, 1, 2, 2, 8), np.float32), 3,
                     release_fn=release)


class _Aborted(Exception):
  pass


class _Ctx:
  def __init__(self):
    self.code = None

  async def abort(self, code, details):
    self.code = code
    raise _Aborted(details)

  def time_remaining(self):
    return None

  def set_trailing_metadata(self, metadata):
    self.trailing = metadata


def _worker(capacity=8, **engine_kw):
  engine = FakeDecodeBackend(capacity=capacity, **engine_kw)
  receiver = FakeReceiver()
  worker = DecodeWorker(engine, receiver, transfer_timeout_s=2.0,
                        reservation_ttl_s=60.0, max_receive_bytes=1 << 20)
  return worker, engine, receiver, DecodeServicer(worker, None)


def _reserve_req(i, tid=None):
  return decode_pb2.ReserveRequest(request_id=f"r{i}", prompt_tokens=3,
                                   max_tokens=4, transfer_id=tid or f"t{i}")


def _decode_req(i, tid=None):
  req = decode_pb2.DecodeRequest(
      request_id=f"r{i}", prompt_token_ids=[1, 2, 3], first_token=4,
      kv=kv_pb2.KvHandle(transfer_id=tid or f"t{i}", shape=[1, 2, 1, 2, 2, 8],
                         dtype="float32", num_tokens=3, transport="fake"))
  req.sampling.max_tokens = 4
  return req


async def _decode(servicer, req):
  """(token ids, status code or None) of one Decode call."""
  ctx = _Ctx()
  tokens = []
  try:
    async for msg in servicer.Decode(req, ctx):
      tokens.extend(msg.token_ids)
  except _Aborted:
    pass
  return tokens, ctx.code


async def _call(method, req):
  ctx = _Ctx()
  try:
    out = await method(req, ctx)
  except _Aborted:
    return None, ctx.code
  return out, None


def _assert_all_returned(worker, engine, receiver):
  assert len(worker.handoffs) == 0
  assert engine.reservations == {}
  assert engine.reserved == engine.returned + len(engine.taken)
  assert receiver.issued == set() and receiver.lent == set()
  # An id is forgotten at most once, and only if it was never redeemed.
  assert len(receiver.forgotten) == len(set(receiver.forgotten))
  assert worker.receive_budget.held == 0
  assert worker.streams == 0


def test_redeemed_kv_joins_the_engine_and_nothing_is_left():
  worker, engine, receiver, servicer = _worker()

  async def go():
    resp, code = await _call(servicer.Reserve, _reserve_req(0))
    assert code is None and resp.pages == 1      # 3 + 4 tokens, 16 a page
    assert worker.handoffs._open["r0"].state == HandoffState.RESERVED
    tokens, code = await _decode(servicer, _decode_req(0))
    assert code is None and tokens == [7, 8, 9]
  asyncio.run(go())
  assert engine.taken == ["r0"] and receiver.forgotten == []
  assert receiver.released == 1
  _assert_all_returned(worker, engine, receiver)


def test_a_wrong_transfer_id_closes_the_hand_off():
  worker, engine, receiver, servicer = _worker()

  async def go():
    await _call(servicer.Reserve, _reserve_req(0))
    tokens, code = await _decode(servicer, _decode_req(0, tid="forged"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and tokens == []
    # The real id no longer redeems it either: the reservation is gone.
    tokens, code = await _decode(servicer, _decode_req(0))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
  asyncio.run(go())
  assert receiver.forgotten == ["t0"] and engine.returned == 1
  _assert_all_returned(worker, engine, receiver)


def test_a_cancelled_receive_gives_everything_back():
  """The caller goes away while the KV is landing: the hand-off closes at
  once, and the KV the receive still brings is released, not stranded."""
  worker, engine, receiver, servicer = _worker()
  receiver.gate = threading.Event()

  async def go():
    await _call(servicer.Reserve, _reserve_req(0))
    task = asyncio.ensure_future(_decode(servicer, _decode_req(0)))
    for _ in range(500):   # up to 5 s: a loaded 2-core machine is slow
      await asyncio.sleep(0.01)
      if worker.handoffs._open["r0"].state == HandoffState.RECEIVING:
        break
    assert worker.receive_budget.held > 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
      await task
    receiver.gate.set()
    for _ in range(100):          # the receive thread ends by itself
      await asyncio.sleep(0.01)
      if receiver.released:
        break
  asyncio.run(go())
  assert receiver.released == 1 and engine.taken == []
  _assert_all_returned(worker, engine, receiver)


@pytest.mark.parametrize("closer", ["unreserve", "reap"])
def test_unreserve_or_the_reaper_leave_a_landing_kv_to_its_call(closer):
  """Unreserve (a client's deadline reached the router) or the TTL reaper
  while the KV is landing: the hand-off stays the Decode call's, so the
  reservation it submits with is still held; the request joins the engine
  once and nothing is given back twice. (Closing it there freed the
  reservation under the receive: the engine then admitted the request on
  pages it no longer held and failed its whole batch.)"""
  worker, engine, receiver, servicer = _worker()
  receiver.gate = threading.Event()

  async def go():
    await _call(servicer.Reserve, _reserve_req(0))
    task = asyncio.ensure_future(_decode(servicer, _decode_req(0)))
    for _ in range(500):
      await asyncio.sleep(0.01)
      if worker.handoffs._open["r0"].state == HandoffState.RECEIVING:
        break
    if closer == "unreserve":
      _, code = await _call(servicer.Unreserve,
                            decode_pb2.UnreserveRequest(request_id="r0"))
      assert code is None
    else:
      assert worker.handoffs.reap(-1.0) == []
    assert worker.handoffs._open["r0"].state == HandoffState.RECEIVING
    assert engine.returned == 0 and receiver.forgotten == []
    receiver.gate.set()
    tokens, code = await task
    assert code is None and tokens == [7, 8, 9]
  asyncio.run(go())
  assert engine.taken == ["r0"] and engine.returned == 0
  _assert_all_returned(worker, engine, receiver)


def test_a_receive_after_the_hand_off_closed_is_refused():
  """The reaper (the worker's loop thread) closes a reserved hand-off
  between a Decode call's redeem and its receive: the receive is refused
  (FAILED_PRECONDITION, as for a reservation already gone) and nothing
  is given back twice."""
  from pdjax.service.handoffs import HandoffClosed
  worker, engine, receiver, _ = _worker()

  async def go():
    h = worker.handoffs.reserve("r0", 3, 4, transfer_id="t0")
    assert worker.handoffs.redeem("r0", "t0") is h
    assert worker.handoffs.reap(-1.0) == [h]
    with pytest.raises(HandoffClosed):
      async with h.receiving(16, 1.0):
        pass
    assert h.close()                  # the call's own close: a no-op now
  asyncio.run(go())
  assert engine.returned == 1 and receiver.forgotten == ["t0"]
  _assert_all_returned(worker, engine, receiver)


OPS = ("reserve", "lend", "decode", "decode_fail", "decode_timeout",
       "decode_wrong_id", "unreserve", "reap")


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(st.lists(st.tuples(st.sampled_from(OPS),
                                     st.integers(0, 3)),
                           min_size=1, max_size=25),
                  st.integers(1, 4))
def test_every_path_returns_every_hand_off_once(ops, capacity):
  """Any interleaving of Reserve, LendLanding, Decode (redeemed, failed,
  timed out, with a forged id), Unreserve and the TTL reaper, over four
  requests and a pool of ``capacity``: afterwards (everything still open
  unreserved) every reservation went back exactly once or was taken by
  the engine, every issued id was redeemed or forgotten once, nothing lent
  or budgeted is left; and a Decode call, whatever its end, leaves no
  hand-off open behind it."""
  worker, engine, receiver, servicer = _worker(capacity)
  # The router issues a fresh id for every Reserve of a request.
  tids = {i: f"t{i}" for i in range(4)}

  async def go():
    for n, (op, i) in enumerate(ops):
      if op == "reserve":
        if f"r{i}" not in worker.handoffs._open:
          tids[i] = f"t{i}.{n}"
        await _call(servicer.Reserve, _reserve_req(i, tids[i]))
      elif op == "lend":
        await _call(servicer.LendLanding, decode_pb2.LendLandingRequest(
            transfer_id=tids[i], prompt_tokens=3))
      elif op == "unreserve":
        await _call(servicer.Unreserve,
                    decode_pb2.UnreserveRequest(request_id=f"r{i}"))
      elif op == "reap":
        worker.handoffs.reap(-1.0)
      else:
        tid = tids[i]
        receiver.fail.pop(tid, None)
        if op == "decode_fail":
          receiver.fail[tid] = TransferError("peer died")
        elif op == "decode_timeout":
          receiver.fail[tid] = TransferTimeout("too slow")
        await _decode(servicer, _decode_req(
            i, tid="forged" if op == "decode_wrong_id" else tid))
        # Redeemed or not, the hand-off is over at once (not at its TTL).
        assert f"r{i}" not in worker.handoffs._open
        assert tid not in receiver.issued and tid not in receiver.lent
    for i in range(4):
      await _call(servicer.Unreserve,
                  decode_pb2.UnreserveRequest(request_id=f"r{i}"))
  asyncio.run(go())
  _assert_all_returned(worker, engine, receiver)


def test_the_worker_publishes_the_engines_admission_events():
  """The reaper's tick copies the engine's preemption and refusal counts
  to ``pdjax_kv_admission_events`` and closes hand-offs past their TTL."""
  from prometheus_client import generate_latest
  worker, engine, receiver, servicer = _worker()
  engine.preemption_stats = lambda: {"preempted_swap": 3, "stalled": 1}
  asyncio.run(_call(servicer.Reserve, _reserve_req(0)))
  worker.reservation_ttl_s = -1.0
  worker._tick()
  text = generate_latest(worker.metrics.registry).decode()
  assert 'pdjax_kv_admission_events{event="preempted_swap"} 3.0' in text
  assert 'pdjax_kv_admission_events{event="stalled"} 1.0' in text
  _assert_all_returned(worker, engine, receiver)
  assert receiver.forgotten == ["t0"]


async def _messages(servicer, req):
  ctx = _Ctx()
  out = [m async for m in servicer.Decode(req, ctx)]
  assert ctx.code is None
  return out


def test_speculative_counts_go_on_the_final_message_and_the_metrics():
  """The engine's per-request draft/accepted counts (its last event) go on
  the final DecodeResponse only, for local and remote prefill alike, and
  advance the worker's counters; the request's opt-out reaches the
  engine."""
  from prometheus_client import generate_latest
  worker, engine, receiver, servicer = _worker(spec=(12, 5))

  async def go():
    await _call(servicer.Reserve, _reserve_req(0))
    remote = await _messages(servicer, _decode_req(0))
    local = _decode_req(1)
    local.local_prefill = True
    local.ClearField("kv")
    local.sampling.speculative = False
    local_msgs = await _messages(servicer, local)
    return remote, local_msgs
  remote, local = asyncio.run(go())
  for msgs in (remote, local):
    *rest, last = msgs
    assert last.finish_reason and (last.spec_draft_tokens,
                                   last.spec_accepted_tokens) == (12, 5)
    assert all(m.spec_draft_tokens == m.spec_accepted_tokens == 0
               for m in rest)
  assert len(local) == 2
  assert engine.sampling["r0"].speculative      # absent: the pool's setting
  assert not engine.sampling["r1"].speculative  # opted out
  text = generate_latest(worker.metrics.registry).decode()
  assert "pdjax_spec_draft_tokens_total 24.0" in text
  assert "pdjax_spec_accepted_tokens_total 10.0" in text
  _assert_all_returned(worker, engine, receiver)


def test_no_speculative_counts_without_drafts():
  from prometheus_client import generate_latest
  worker, engine, receiver, servicer = _worker()

  async def go():
    await _call(servicer.Reserve, _reserve_req(0))
    return await _messages(servicer, _decode_req(0))
  (last,) = asyncio.run(go())
  assert last.spec_draft_tokens == last.spec_accepted_tokens == 0
  text = generate_latest(worker.metrics.registry).decode()
  assert "pdjax_spec_draft_tokens_total 0.0" in text


# ------------------------------------------------ waiting for room to free
def _waiting_reserve_req(i, wait_ms):
  req = _reserve_req(i)
  req.wait_ms = wait_ms
  return req


def test_a_full_pool_answers_at_once_unless_the_caller_waits():
  """Without ``wait_ms`` a full pool answers RESOURCE_EXHAUSTED (with the
  retry hint) at once; nobody is left waiting."""
  worker, engine, receiver, servicer = _worker(capacity=1)

  async def go():
    assert (await _call(servicer.Reserve, _reserve_req(0)))[1] is None
    resp, code = await _call(servicer.Reserve, _reserve_req(1))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert worker.room.waiting == 0
    assert (await _decode(servicer, _decode_req(0)))[1] is None
  asyncio.run(go())
  assert receiver.issued == set()
  _assert_all_returned(worker, engine, receiver)


@pytest.mark.parametrize("frees_by", ["stream_ends", "unreserve"])
def test_a_waiting_reserve_takes_the_room_a_stream_or_unreserve_frees(
    frees_by):
  """A Reserve that may wait is held while the pool is full and answered
  as soon as room frees: woken by the stream that ended or the Unreserve
  (the fallback poll is set far beyond the test's patience, so only the
  wake-up can answer it)."""
  worker, engine, receiver, servicer = _worker(capacity=1)
  worker.room.poll_s = 3600

  async def go():
    assert (await _call(servicer.Reserve, _reserve_req(0)))[1] is None
    waiting = asyncio.ensure_future(
        _call(servicer.Reserve, _waiting_reserve_req(1, 600_000)))
    for _ in range(100):
      await asyncio.sleep(0.01)
      if worker.room.waiting:
        break
    assert worker.room.waiting == 1 and not waiting.done()
    assert "r1" not in engine.reservations
    assert worker.load().queued == 1     # the router sees it queued here
    if frees_by == "stream_ends":
      assert (await _decode(servicer, _decode_req(0)))[1] is None
    else:
      await servicer.Unreserve(decode_pb2.UnreserveRequest(request_id="r0"),
                               _Ctx())
    resp, code = await asyncio.wait_for(waiting, 10)
    assert code is None and "r1" in engine.reservations
    assert worker.room.waiting == 0
    assert (await _decode(servicer, _decode_req(1)))[1] is None
  asyncio.run(go())
  _assert_all_returned(worker, engine, receiver)


def test_a_waiting_reserve_ends_with_its_deadline_or_the_drain():
  """The wait is bounded by the call's deadline (a wait_ms past it is cut
  to it) and ends when the worker starts draining (UNAVAILABLE: another
  worker may serve it)."""
  worker, engine, receiver, servicer = _worker(capacity=1)
  worker.room.poll_s = 0.01

  class _Deadline(_Ctx):
    def time_remaining(self):
      return 0.2

  async def go():
    assert (await _call(servicer.Reserve, _reserve_req(0)))[1] is None
    ctx = _Deadline()
    with pytest.raises(_Aborted):
      await asyncio.wait_for(
          servicer.Reserve(_waiting_reserve_req(1, 600_000), ctx), 10)
    assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    waiting = asyncio.ensure_future(
        _call(servicer.Reserve, _waiting_reserve_req(2, 600_000)))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    worker.draining = True
    resp, code = await asyncio.wait_for(waiting, 10)
    assert code == grpc.StatusCode.UNAVAILABLE
    worker.draining = False
    assert (await _decode(servicer, _decode_req(0)))[1] is None
  asyncio.run(go())
  assert worker.room.waiting == 0
  _assert_all_returned(worker, engine, receiver)
