"""The prefill worker's batching, with scripted engines and a fake sender:
hand-offs start while the prefill runs, each request of a batch is answered
once its own result is known (its first token before its hand-off ends),
and a batch that fails part way keeps the results it had and gives back
what it sent for the rest."""

from __future__ import annotations

import asyncio
import threading
import time
import types

import jax.numpy as jnp
import pytest

from fake_engines import FakePrefillEngine
from pdjax.engine.requests import PrefillRequest, PrefillResult, RequestKV
from pdjax.engine.sampling import SamplingParams
from pdjax.service.prefill_service import PrefillWorker, _Job
from pdjax.transfer.base import KvSender, TransferError, handle_for
from pdjax.v1 import kv_pb2


def _result(req: PrefillRequest, token: int) -> PrefillResult:
  kv = RequestKV(jnp.zeros((1, 2, 1, 4, 1, 2)), len(req.prompt_ids))
  return PrefillResult(req.request_id, token, -0.5, kv, len(req.prompt_ids))


class _Sender(KvSender):
  name = "fake"

  def __init__(self):
    self.sent = threading.Event()
    self.released = []

  def send(self, kv, dest, *, timeout_s):
    self.sent.set()
    return handle_for(kv, self.name, dest.transfer_id)

  def release(self, transfer_id):
    self.released.append(transfer_id)


class _Engine(FakePrefillEngine):
  """What the worker needs of an engine; ``prefill`` is each test's."""


def _jobs(loop, n: int) -> list[_Job]:
  return [_Job(PrefillRequest(f"r{i}", [3, 4, 5], SamplingParams()),
               kv_pb2.KvDestination(transfer_id=f"t{i}"), None,
               loop.create_future(), loop.create_future(), loop)
          for i in range(n)]


async def _wait_idle(worker: PrefillWorker) -> None:
  """Until nothing counts as running (hand-offs end after their answer)."""
  for _ in range(200):
    if worker.running == 0:
      return
    await asyncio.sleep(0.01)
  assert worker.running == 0


@pytest.mark.parametrize("fail", [False, True])
def test_hand_off_starts_while_the_prefill_runs(fail):
  """Hand-offs start when the engine reports a request's KV dispatched
  (``kv_ready``), not when the prefill returns: here the engine returns
  only once the KV was sent, so the answer's ``transfer_s`` (the part of
  the hand-off TTFT pays) is 0. A prefill that fails after the KV went out
  releases what was sent and reports the prefill's error."""
  sender = _Sender()

  class Engine(_Engine):
    def prefill(self, reqs, kv_ready=None, on_result=None):
      out = [_result(r, 7) for r in reqs]
      for i, r in enumerate(out):
        kv_ready(i, r.kv)
      assert sender.sent.wait(10), "the hand-off did not start"
      if fail:
        raise RuntimeError("the prefill program failed")
      return out

  async def go():
    worker = PrefillWorker(Engine(), sender)
    worker.start()
    try:
      (job,) = _jobs(asyncio.get_running_loop(), 1)
      worker.submit(job)
      if fail:
        with pytest.raises(RuntimeError, match="prefill program failed"):
          await asyncio.wait_for(job.first, 10)
      else:
        first = await asyncio.wait_for(job.first, 10)
        assert first.first_token == 7 and first.prefill_s > 0
        sent = await asyncio.wait_for(job.future, 10)
        assert sent.kv.transfer_id == "t0" and sent.transfer_s == 0.0
      await _wait_idle(worker)
    finally:
      worker.stop()

  asyncio.run(go())
  assert sender.released == (["t0"] if fail else [])


@pytest.mark.parametrize("fail", [False, True])
def test_each_request_is_answered_when_its_result_is_known(fail):
  """The engine computes request 0, then waits for ``gate`` (set once
  request 0 is answered) before request 1, and fails there when ``fail``:
  request 0's answer cannot wait for the rest of its batch, and keeps its
  result when the rest fails."""
  gate = threading.Event()
  sender = _Sender()
  calls = []

  class Engine(_Engine):
    def prefill(self, reqs, kv_ready=None, on_result=None):
      calls.append(len(reqs))
      first = _result(reqs[0], 11)
      kv_ready(0, first.kv)
      on_result(0, first)
      assert gate.wait(10), "request 0 was not answered"
      if fail:
        raise RuntimeError("the second program failed")
      second = _result(reqs[1], 22)
      kv_ready(1, second.kv)
      on_result(1, second)
      return [first, second]

  async def go():
    worker = PrefillWorker(Engine(), sender)
    jobs = _jobs(asyncio.get_running_loop(), 2)
    for j in jobs:             # queued before the batcher runs: one batch
      worker.submit(j)
    worker.start()
    try:
      first = await asyncio.wait_for(jobs[0].first, 10)
      sent = await asyncio.wait_for(jobs[0].future, 10)
      assert not jobs[1].first.done()
      gate.set()
      assert first.first_token == 11 and sent.kv.transfer_id == "t0"
      if fail:
        with pytest.raises(RuntimeError, match="second program failed"):
          await asyncio.wait_for(jobs[1].first, 10)
      else:
        second = await asyncio.wait_for(jobs[1].first, 10)
        assert second.first_token == 22
        assert second.prefill_s >= first.prefill_s
        await asyncio.wait_for(jobs[1].future, 10)
      await _wait_idle(worker)
    finally:
      gate.set()
      worker.stop()

  asyncio.run(go())
  assert calls == [2]
  assert sender.released == []


@pytest.mark.parametrize("fail", [False, True])
def test_the_first_token_does_not_wait_for_the_hand_off(fail):
  """The first token is answered while its KV is still being sent (the
  sender here blocks until the test lets it go); the handle follows once
  the send returns, or the send's error does."""
  release = threading.Event()

  class SlowSender(_Sender):
    def send(self, kv, dest, *, timeout_s):
      self.sent.set()
      assert release.wait(10), "the first token waited for the hand-off"
      if fail:
        raise TransferError("the decode worker went away")
      return super().send(kv, dest, timeout_s=timeout_s)

  class Engine(_Engine):
    def prefill(self, reqs, kv_ready=None, on_result=None):
      out = [_result(r, 9) for r in reqs]
      kv_ready(0, out[0].kv)
      on_result(0, out[0])
      return out

  sender = SlowSender()

  async def go():
    worker = PrefillWorker(Engine(), sender)
    worker.start()
    try:
      (job,) = _jobs(asyncio.get_running_loop(), 1)
      worker.submit(job)
      first = await asyncio.wait_for(job.first, 10)
      assert first.first_token == 9 and not first.HasField("kv")
      assert sender.sent.is_set() and not job.future.done()
      release.set()
      if fail:
        with pytest.raises(TransferError, match="went away"):
          await asyncio.wait_for(job.future, 10)
      else:
        sent = await asyncio.wait_for(job.future, 10)
        assert sent.kv.transfer_id == "t0" and not sent.first_token
      await _wait_idle(worker)
    finally:
      release.set()
      worker.stop()

  asyncio.run(go())
  assert sender.released == []


def test_an_idle_worker_serves_its_peers_at_once():
  """Shared KV: a peer's fetch waits for blocks only the batcher's thread
  may read (``PrefixStore.serve_peers``). An idle batcher is woken for it,
  without counting the wake-up as queued load; a busy one serves between
  batches."""
  from pdjax.engine.api import PrefixStore

  class Store(PrefixStore):
    page_size = 16
    remote = types.SimpleNamespace(close=lambda: None)   # shares

    def __init__(self):
      self.threads = []

    def hashes(self, token_ids, salt=""):
      return []

    def match(self, hashes, sources=()):
      return []

    def release(self, pages):
      pass

    def gather_into(self, pages, k_buf, v_buf):
      return k_buf, v_buf

    def block_stats(self):
      return {}

    def serve_peers(self):
      self.threads.append(threading.current_thread().name)
      return 1

  class Engine(_Engine):
    prefix_store = Store()

    def prefill(self, reqs, kv_ready=None, on_result=None):
      return [_result(r, 5) for r in reqs]

  engine = Engine()
  store = engine.prefix_store
  worker = PrefillWorker(engine, _Sender())
  assert store.wake is not None
  worker.start()
  try:
    store.wake()
    store.wake()                   # coalesced: one wake-up queued at most
    assert worker.queued == 0
    for _ in range(200):
      if store.threads:
        break
      threading.Event().wait(0.01)
    assert store.threads and set(store.threads) == {"prefill-batcher"}
    assert worker.queued == 0
  finally:
    worker.stop()


# --------------------------------------------- destinations completed later
class _RecordingSender(_Sender):
  def __init__(self):
    super().__init__()
    self.destinations = []

  def send(self, kv, dest, *, timeout_s):
    self.destinations.append(dest)
    return super().send(kv, dest, timeout_s=timeout_s)


class _Prefills(_Engine):
  def prefill(self, reqs, kv_ready=None, on_result=None):
    out = [_result(r, 9) for r in reqs]
    for i, r in enumerate(out):
      kv_ready(i, r.kv)
      on_result(i, r)
    return out


def _pending_job(loop, worker: PrefillWorker, deadline=None) -> _Job:
  """A job whose destination the router completes later (t0)."""
  (job,) = _jobs(loop, 1)
  job.deadline = deadline
  job.completed = worker.destinations.awaited("t0")
  return job


def test_a_pending_destination_holds_the_hand_off_not_the_first_token():
  """Reserved beside the prefill: the first token is answered at once, the
  KV is sent only once ``CompleteDestination`` brings its destination, and
  there (the whole one, not the pending one)."""
  sender = _RecordingSender()

  async def go():
    loop = asyncio.get_running_loop()
    worker = PrefillWorker(_Prefills(), sender)
    worker.start()
    try:
      job = _pending_job(loop, worker)
      worker.submit(job)
      first = await asyncio.wait_for(job.first, 10)
      assert first.first_token == 9
      await asyncio.sleep(0.05)
      assert not sender.sent.is_set() and not job.future.done()
      worker.destinations.complete(kv_pb2.KvDestination(
          transfer_id="t0", decode_address="decode:1", replica=1))
      sent = await asyncio.wait_for(job.future, 10)
      assert sent.kv.transfer_id == "t0"
      await _wait_idle(worker)
      sample = worker.metrics.registry.get_sample_value
      assert sample("pdjax_kv_destination_wait_seconds_count") == 1
      assert sample("pdjax_kv_destination_wait_seconds_sum") >= 0.05
    finally:
      worker.stop()

  asyncio.run(go())
  (dest,) = sender.destinations
  assert (dest.decode_address, dest.replica) == ("decode:1", 1)


@pytest.mark.parametrize("ends_by", ["deadline", "the call ending"])
def test_a_destination_that_never_comes_sends_nothing(ends_by):
  """A hand-off waits for its destination within its time (the deadline
  here): past it the call fails with a TransferTimeout (ABORTED: the
  router recomputes or retries); a call that ends meanwhile (the router
  cancelled: no reservation) stops the wait. Nothing is sent either way,
  and nothing is left counted."""
  sender = _RecordingSender()

  async def go():
    loop = asyncio.get_running_loop()
    worker = PrefillWorker(_Prefills(), sender)
    worker.start()
    try:
      deadline = time.monotonic() + 0.3 if ends_by == "deadline" else None
      job = _pending_job(loop, worker, deadline)
      worker.submit(job)
      await asyncio.wait_for(job.first, 10)
      if ends_by == "deadline":
        with pytest.raises(TransferError, match="no destination"):
          await asyncio.wait_for(job.future, 10)
      else:
        job.future.cancel()              # what the servicer does ...
        worker.destinations.drop("t0")   # ... as the call ends
      await _wait_idle(worker)
    finally:
      worker.stop()

  asyncio.run(go())
  assert sender.destinations == [] and sender.released == []


def test_hand_offs_waiting_for_destinations_hold_up_no_other():
  """More requests than the worker has hand-off threads wait for their
  destinations (their reservations queued on a full decode pool): a
  request whose destination is known still has its KV sent at once. (When
  the waiting hand-offs held the threads, its KV waited for them to give
  up, and the decode pool, which would have freed the room they waited
  for by serving it, waited too.)"""
  sender = _RecordingSender()

  async def go():
    loop = asyncio.get_running_loop()
    worker = PrefillWorker(_Prefills(), sender)
    worker.start()
    threads = worker._pool._max_workers
    try:
      waiting = _jobs(loop, threads + 1)
      for i, job in enumerate(waiting):
        job.completed = worker.destinations.awaited(f"t{i}")
        worker.submit(job)
      for job in waiting:
        await asyncio.wait_for(job.first, 10)
      (whole,) = _jobs(loop, 1)
      whole.destination = kv_pb2.KvDestination(transfer_id="whole")
      whole.request = PrefillRequest("whole", [3, 4, 5], SamplingParams())
      worker.submit(whole)
      sent = await asyncio.wait_for(whole.future, 5)
      assert sent.kv.transfer_id == "whole"
      assert not any(job.future.done() for job in waiting)
      for i, job in enumerate(waiting):   # the router gives up on them
        job.future.cancel()
        worker.destinations.drop(f"t{i}")
      await _wait_idle(worker)
    finally:
      worker.stop()

  asyncio.run(go())
  assert [d.transfer_id for d in sender.destinations] == ["whole"]


def test_pending_destinations_meet_in_either_order():
  """Whichever of the Prefill call and CompleteDestination comes first
  makes the entry; the call's end drops it; one whose call never came is
  reaped; a repeat does not move a completed destination."""
  from pdjax.service.prefill_service import PendingDestinations
  board = PendingDestinations(ttl_s=0.05)
  board.complete(kv_pb2.KvDestination(transfer_id="early", replica=1))
  board.complete(kv_pb2.KvDestination(transfer_id="early", replica=2))
  early = board.awaited("early")
  assert early.done() and early.result().replica == 1
  late = board.awaited("late")
  assert not late.done()
  board.complete(kv_pb2.KvDestination(transfer_id="late", replica=3))
  assert late.result().replica == 3
  board.drop("early")
  board.drop("late")
  assert len(board) == 0
  orphan = board.awaited("orphan")
  time.sleep(0.06)
  assert board.reap() == 1 and len(board) == 0 and orphan.cancelled()


def test_a_landing_region_is_asked_for_once_the_destination_is_complete():
  """Same-host IPC: the decode worker lends only under a transfer id its
  Reserve issued, so a pending destination's region is asked for when the
  destination comes (from the pool), with that destination."""
  asked = []

  class Landing:
    def request(self, dest, prompt_tokens):
      asked.append(dest.decode_address)
      return "answer"

    def apply(self, dest, pending):
      assert pending == "answer"
      return dest

    def close(self):
      pass

  async def go():
    loop = asyncio.get_running_loop()
    worker = PrefillWorker(_Prefills(), _Sender(), landing=Landing())
    worker.start()
    try:
      job = _pending_job(loop, worker)
      worker.submit(job)
      await asyncio.wait_for(job.first, 10)
      await asyncio.sleep(0.05)
      assert asked == []
      worker.destinations.complete(kv_pb2.KvDestination(
          transfer_id="t0", decode_address="decode:1"))
      await asyncio.wait_for(job.future, 10)
    finally:
      worker.stop()

  asyncio.run(go())
  assert asked == ["decode:1"]
