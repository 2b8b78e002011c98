"""The prefill worker's batching, with scripted engines and a fake sender:
hand-offs start while the prefill runs, each request of a batch is answered
once its own result is known (its first token before its hand-off ends),
and a batch that fails part way keeps the results it had and gives back
what it sent for the rest."""

from __future__ import annotations

import asyncio
import threading
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
