"""Reserve calls that wait on a full decode worker for room to free.

With the router's ``on_full = "queue"`` policy a request that finds every
decode worker full waits. It used to wait in the router, asking again
after a growing back-off (5 ms to 200 ms): each ask an RPC and an engine
reservation attempt, and a request could sit up to 200 ms after its room
freed. Instead the router's Reserve says how long it may wait
(``ReserveRequest.wait_ms``) and the worker holds the call, trying again
whenever a stream ends or a reservation is given back (``freed``), and at
least every ``POLL_S`` for room freed where no stream saw it (preempted
rows swapped back in, reservations reaped by their TTL). Waiters are woken
in the order they came.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, TypeVar

T = TypeVar("T")

# The longest a waiter sleeps without a wake-up before it tries again.
POLL_S = 0.05


class RoomWaiters:
  """The waiting Reserve calls of one decode worker (its event loop's)."""

  def __init__(self, poll_s: float = POLL_S):
    self.poll_s = poll_s
    self._event: asyncio.Event | None = None
    self.waiting = 0

  def freed(self) -> None:
    """Room may have been freed (a stream ended, a reservation went back):
    every waiter tries again. Called on the worker's event loop."""
    if self._event is not None:
      self._event.set()
      self._event = None

  async def wait_for(self, attempt: Callable[[], T | None], wait_s: float,
                     *, give_up: Callable[[], bool] = lambda: False
                     ) -> T | None:
    """``attempt()`` until it returns something, for up to ``wait_s``
    seconds; None if it never did (or ``give_up()`` turned true, e.g. the
    worker began draining)."""
    got = attempt()
    deadline = time.monotonic() + wait_s
    self.waiting += 1
    try:
      while got is None and not give_up():
        left = deadline - time.monotonic()
        if left <= 0:
          return None
        if self._event is None:
          self._event = asyncio.Event()
        try:
          await asyncio.wait_for(self._event.wait(),
                                 min(left, self.poll_s))
        except asyncio.TimeoutError:
          pass
        got = attempt()
      return got
    finally:
      self.waiting -= 1
