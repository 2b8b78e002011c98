"""A request's first token handed from an engine's thread to the event loop
that streams it, before the engine thread goes on.

An engine thread gives its results to the service's event loop with
``call_soon_threadsafe``. The loop wakes, but it runs only once it holds the
GIL, and right after a prefill the engine thread keeps the GIL busy: it
goes on to the next program's dispatch (the new row's first decode call,
the KV's hand-off), and the loop waits for it to block or for the switch
interval. The first token then sits in the loop's queue for that long, and
its gRPC write competes with the dispatch too: one stream's first token on
the development CPU took 0.30-0.35 ms (p50) from the engine's callback to
the loop, against 0.06 ms once the engine thread waited for the loop.

``hand_over`` makes that wait explicit and bounded: it schedules the
callback on the loop, then blocks the calling thread (the GIL released)
until the loop has run it and two rounds of the callbacks it made ready
(the handler the token wakes, and what that handler wakes in turn: a
session's writer), or ``HANDOVER_WAIT_S`` has passed. Only first tokens are
handed over this way, and on a decode worker only where the loop has
taken every earlier event (it is not behind): a decode step's tokens go
out as before, coalesced, without stalling the engine.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Callable

# Longest an engine thread waits for the loop to take a first token: a
# loop that is busy or gone costs the engine this much, once per first
# token (with 32 streams of 128 tokens, a new one about every fourth decode
# step: at most 0.125 ms a step); an idle loop takes one in 0.06-0.08 ms on
# the development CPU.
HANDOVER_WAIT_S = 0.0005


def hand_over(loop: asyncio.AbstractEventLoop, fn: Callable[[], None],
              wait_s: float | None = None) -> bool:
  """Runs ``fn()`` on ``loop`` and, called from another thread, waits at
  most ``wait_s`` (None: ``HANDOVER_WAIT_S``) for the loop to have run it
  and two rounds of the callbacks it made ready. Returns whether that
  happened in time; on the loop's own thread (nothing to wait for: ``fn``
  runs after the caller returns to the loop) and once ``loop`` is closed,
  False at once."""
  if loop.is_closed():
    return False
  done = threading.Event()

  def run() -> None:
    try:
      fn()
    finally:
      loop.call_soon(loop.call_soon, done.set)

  try:
    loop.call_soon_threadsafe(run)
  except RuntimeError:          # closed since the check
    return False
  if _on_loop_thread(loop):
    return False
  return done.wait(HANDOVER_WAIT_S if wait_s is None else wait_s)


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
  try:
    return asyncio.get_running_loop() is loop
  except RuntimeError:
    return False


__all__ = ["HANDOVER_WAIT_S", "hand_over"]
