"""The prefill worker's batching, with a scripted engine and sender: each
request of a batch is answered once its own result is known, and a batch
that fails part way keeps the results it had."""

from __future__ import annotations

import asyncio
import threading
import types

import jax.numpy as jnp
import pytest

from pdjax.engine.requests import PrefillRequest, PrefillResult, RequestKV
from pdjax.engine.sampling import SamplingParams
from pdjax.service.prefill_service import PrefillWorker, _Job
from pdjax.transfer.base import KvSender, handle_for
from pdjax.v1 import kv_pb2


def _result(req: PrefillRequest, token: int) -> PrefillResult:
  kv = RequestKV(jnp.zeros((1, 2, 1, 4, 1, 2)), len(req.prompt_ids))
  return PrefillResult(req.request_id, token, -0.5, kv, len(req.prompt_ids))


class _Sender(KvSender):
  name = "fake"

  def __init__(self):
    self.released = []

  def send(self, kv, dest, *, timeout_s):
    return handle_for(kv, self.name, dest.transfer_id)

  def release(self, transfer_id):
    self.released.append(transfer_id)


class _Engine:
  """Computes request 0, then waits for ``gate`` before request 1 (and
  fails there when ``fail``): what the worker answers in between is what it
  answers before the rest of its batch has run."""
  config = types.SimpleNamespace(max_batch=2)
  prefix_store = None
  mesh = None

  def __init__(self, gate: threading.Event, fail: bool):
    self.gate, self.fail, self.calls = gate, fail, 0

  def prefill(self, reqs, kv_ready=None, on_result=None):
    self.calls += 1
    first = _result(reqs[0], 11)
    kv_ready(0, first.kv)
    on_result(0, first)
    assert self.gate.wait(10), "request 0 was not answered"
    if self.fail:
      raise RuntimeError("the second program failed")
    second = _result(reqs[1], 22)
    kv_ready(1, second.kv)
    on_result(1, second)
    return [first, second]


@pytest.mark.parametrize("fail", [False, True])
def test_each_request_is_answered_when_its_result_is_known(fail):
  gate = threading.Event()
  engine, sender = _Engine(gate, fail), _Sender()

  async def go():
    loop = asyncio.get_running_loop()
    worker = PrefillWorker(engine, sender)
    jobs = [_Job(PrefillRequest(f"r{i}", [3, 4, 5], SamplingParams()),
                 kv_pb2.KvDestination(transfer_id=f"t{i}"), None,
                 loop.create_future(), loop) for i in range(2)]
    for j in jobs:             # queued before the batcher runs: one batch
      worker.submit(j)
    worker.start()
    try:
      # Request 0 is answered while the engine still holds request 1 back.
      first = await asyncio.wait_for(jobs[0].future, 10)
      assert not jobs[1].future.done()
      gate.set()
      assert first.first_token == 11 and first.kv.transfer_id == "t0"
      if fail:
        with pytest.raises(RuntimeError, match="second program failed"):
          await asyncio.wait_for(jobs[1].future, 10)
      else:
        second = await asyncio.wait_for(jobs[1].future, 10)
        assert second.first_token == 22
        assert second.prefill_s >= first.prefill_s
      for _ in range(200):
        if worker.running == 0:
          break
        await asyncio.sleep(0.01)
      assert worker.running == 0
    finally:
      gate.set()
      worker.stop()

  asyncio.run(go())
  assert engine.calls == 1
  assert sender.released == []
