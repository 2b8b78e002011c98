"""Reserve calls that wait on a full decode worker for room to free.

With the router's ``on_full = "queue"`` policy a request that finds every
decode worker full waits. The router's Reserve says how long it may wait
(``ReserveRequest.wait_ms``) and the worker holds the call in a line: first
come, first served, by when each request began to wait. The router asks
again after a while (another worker may have room by then) and says how
long the request has waited so far (``ReserveRequest.waited_ms``): asked
again, here or on another worker, it keeps its place ahead of requests that
began to wait after it. Only the call at the head of the line tries to
reserve, whenever a stream ends or a reservation is given back (``freed``)
and at least every ``POLL_S`` for room freed where no stream saw it
(preempted rows swapped back in, reservations reaped by their TTL); once it
has its room, the next call tries at once (the freed room may hold
several). A call that arrives while earlier requests wait joins the line
behind them, even if its own request would fit: as in vLLM's
first-come-first-served scheduler, a large request at the head is not
overtaken for ever by small ones, and no request waits behind requests
that came after it (the tail of the wait is the line's length, not luck).

Each attempt runs in its own call's task, so a call cancelled while it
waits holds nothing: a reservation is only ever made by the call that
returns it.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from typing import Callable, TypeVar

T = TypeVar("T")

# The longest the head of the line sleeps without a wake-up before it tries
# again (and the longest any waiter goes without looking at ``give_up``).
POLL_S = 0.05


class _Waiter:
  __slots__ = ("since", "turn")

  def __init__(self, since: float):
    self.since = since   # when its request began to wait (monotonic s)
    self.turn = asyncio.Event()


class RoomWaiters:
  """The waiting Reserve calls of one decode worker (its event loop's), in
  the order they came."""

  def __init__(self, poll_s: float = POLL_S):
    self.poll_s = poll_s
    self._line: list[_Waiter] = []   # by ``since``, the head first

  @property
  def waiting(self) -> int:
    """How many calls wait for room now."""
    return len(self._line)

  def freed(self) -> None:
    """Room may have been freed (a stream ended, a reservation went back):
    the head of the line tries again. Called on the worker's event loop."""
    if self._line:
      self._line[0].turn.set()

  async def wait_for(self, attempt: Callable[[], T | None], wait_s: float,
                     *, give_up: Callable[[], bool] = lambda: False,
                     waited_s: float = 0.0) -> T | None:
    """``attempt()`` until it returns something, for up to ``wait_s``
    seconds, in turn with the other waiting calls; None if it never did
    (or ``give_up()`` turned true, e.g. the worker began draining).
    ``waited_s``: how long the request waited before this call; its place
    in the line is by when it began to wait. With nobody waiting ahead of
    it the first attempt is made at once; behind others, a call that may
    not wait (``wait_s`` 0) gets None without an attempt, the room that
    frees being theirs."""
    now = time.monotonic()
    me = _Waiter(now - max(waited_s, 0.0))
    tried = not self._line or me.since < self._line[0].since
    if tried:
      got = attempt()
      if got is not None or wait_s <= 0:
        return got
    deadline = now + wait_s
    bisect.insort(self._line, me, key=lambda w: w.since)
    try:
      while not give_up():
        if self._line[0] is me and not tried:
          got = attempt()
          if got is not None:
            return got
        tried = False
        left = deadline - time.monotonic()
        if left <= 0:
          return None
        try:
          await asyncio.wait_for(me.turn.wait(), min(left, self.poll_s))
        except asyncio.TimeoutError:
          pass
        me.turn.clear()
      return None
    finally:
      head = self._line[0] is me
      self._line.remove(me)
      if head:
        # The next in line tries now: the room this one took may have
        # left some, and a call that gave up or failed took none.
        self.freed()
