"""``loop_handover.hand_over``: a first token handed from an engine's thread
to the event loop, the engine thread waiting (bounded) until the loop has
run it and what it woke."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from pdjax.service.loop_handover import hand_over


@pytest.fixture
def loop():
  loop = asyncio.new_event_loop()
  thread = threading.Thread(target=loop.run_forever, daemon=True)
  thread.start()
  yield loop
  loop.call_soon_threadsafe(loop.stop)
  thread.join(5)
  loop.close()


def test_returns_after_the_woken_task_and_what_it_woke_have_run(loop):
  """The callback sets a future; the task waiting on it takes its step
  (puts the value on a queue, as a stream's handler yields its message)
  and wakes a writer task, which writes; hand_over returns only after
  both have run."""
  order: list[str] = []

  async def setup():
    fut = loop.create_future()
    queue: asyncio.Queue = asyncio.Queue()

    async def handler():
      order.append(f"handler {await fut}")
      queue.put_nowait("msg")

    async def writer():
      order.append(f"writer {await queue.get()}")

    return fut, asyncio.ensure_future(handler()), asyncio.ensure_future(
        writer())

  fut, handler, writer = asyncio.run_coroutine_threadsafe(setup(),
                                                          loop).result(5)

  def resolve():
    order.append("callback")
    fut.set_result("first token")

  assert hand_over(loop, resolve, wait_s=5.0)
  assert order == ["callback", "handler first token", "writer msg"]


def test_a_busy_loop_holds_the_caller_no_longer_than_the_wait(loop):
  ran = threading.Event()
  loop.call_soon_threadsafe(time.sleep, 0.3)   # the loop busy for 300 ms
  t0 = time.perf_counter()
  assert not hand_over(loop, ran.set, wait_s=0.02)
  assert time.perf_counter() - t0 < 0.25
  assert ran.wait(5)    # it still runs, once the loop gets to it


def test_on_the_loops_own_thread_it_does_not_wait(loop):
  async def from_the_loop():
    ran: list[bool] = []
    t0 = time.perf_counter()
    waited = hand_over(loop, lambda: ran.append(True), wait_s=5.0)
    elapsed = time.perf_counter() - t0
    await asyncio.sleep(0)     # the callback runs once this task yields
    await asyncio.sleep(0)
    return waited, elapsed, ran

  waited, elapsed, ran = asyncio.run_coroutine_threadsafe(
      from_the_loop(), loop).result(10)
  assert not waited and elapsed < 1.0 and ran == [True]


def test_a_closed_loop_is_not_waited_for():
  loop = asyncio.new_event_loop()
  loop.close()
  t0 = time.perf_counter()
  assert not hand_over(loop, lambda: None, wait_s=5.0)
  assert time.perf_counter() - t0 < 1.0


def test_the_relay_hands_over_a_prefill_s_first_token(loop, monkeypatch):
  """A decode worker's first token from its own prefill (an event with
  ``prefill_s``) is in the stream's queue when the engine's callback
  returns; a decode step's event is only scheduled (the engine goes on).
  The wait is stretched so that a loaded machine cannot time it out."""
  from pdjax.engine.requests import TokenEvent
  from pdjax.service import loop_handover
  from pdjax.service.decode_service import EventRelay
  monkeypatch.setattr(loop_handover, "HANDOVER_WAIT_S", 10.0)

  async def make():
    return EventRelay(loop), asyncio.Queue(), asyncio.Queue()

  relay, first_q, step_q = asyncio.run_coroutine_threadsafe(
      make(), loop).result(5)
  relay.callback_for(first_q)(TokenEvent("a", [7], [-0.1], prefill_s=0.01))
  assert first_q.qsize() == 1
  relay.callback_for(step_q)(TokenEvent("b", [8], [-0.2]))
  got = asyncio.run_coroutine_threadsafe(
      asyncio.wait_for(step_q.get(), 5), loop).result(10)
  assert got.token_ids == [8]
