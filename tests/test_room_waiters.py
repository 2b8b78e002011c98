"""RoomWaiters: Reserve calls waiting for room on a full decode worker are
served first come, first served, and a call that leaves takes nothing."""

import asyncio

from pdjax.service.room_waiters import RoomWaiters


class _Pool:
  """Room counted in pages; ``take(name, n)`` is an attempt."""

  def __init__(self, free):
    self.free = free
    self.taken = []

  def take(self, name, n):
    def attempt():
      if self.free < n:
        return None
      self.free -= n
      self.taken.append(name)
      return name
    return attempt


async def _settle():
  for _ in range(50):
    await asyncio.sleep(0)


def _waiters():
  # The fallback poll is beyond the tests' patience: only wake-ups count.
  return RoomWaiters(poll_s=3600)


def test_waiters_get_room_in_the_order_they_came():
  async def go():
    room, pool = _waiters(), _Pool(free=0)
    calls = [asyncio.ensure_future(room.wait_for(pool.take(n, 1), 60))
             for n in "abcd"]
    await _settle()
    assert room.waiting == 4 and not pool.taken
    for expected in ["a", "b", "c", "d"]:
      pool.free += 1
      room.freed()
      await _settle()
      assert pool.taken[-1] == expected
    assert await asyncio.gather(*calls) == list("abcd")
    assert room.waiting == 0
  asyncio.run(go())


def test_room_for_several_serves_several_on_one_wake_up():
  async def go():
    room, pool = _waiters(), _Pool(free=0)
    calls = [asyncio.ensure_future(room.wait_for(pool.take(n, 1), 60))
             for n in "abc"]
    await _settle()
    pool.free = 2
    room.freed()
    await _settle()
    assert pool.taken == ["a", "b"] and room.waiting == 1
    pool.free += 1
    room.freed()
    assert await asyncio.gather(*calls) == list("abc")
  asyncio.run(go())


def test_a_newcomer_does_not_overtake_the_line_even_if_it_would_fit():
  """The head needs more room than is free; a small request arriving now
  waits behind it, and a call that may not wait gets nothing at all."""
  async def go():
    room, pool = _waiters(), _Pool(free=1)
    big = asyncio.ensure_future(room.wait_for(pool.take("big", 3), 60))
    await _settle()
    small = asyncio.ensure_future(room.wait_for(pool.take("small", 1), 60))
    await _settle()
    assert room.waiting == 2 and pool.taken == [] and pool.free == 1
    assert await room.wait_for(pool.take("now", 1), 0) is None
    pool.free += 2
    room.freed()
    assert await asyncio.wait_for(big, 5) == "big"
    assert not small.done()
    pool.free += 1
    room.freed()
    assert await asyncio.wait_for(small, 5) == "small"
  asyncio.run(go())


def test_with_nobody_waiting_a_call_is_served_at_once_or_refused_at_once():
  async def go():
    room, pool = _waiters(), _Pool(free=1)
    assert await room.wait_for(pool.take("a", 1), 0) == "a"
    assert await room.wait_for(pool.take("b", 1), 0) is None
    assert room.waiting == 0
  asyncio.run(go())


def test_a_call_that_leaves_takes_nothing_and_the_next_moves_up():
  """The head cancelled (its caller went away), another timed out, a
  third given up (the drain): none holds room, and the one behind them is
  served by the next wake-up."""
  async def go():
    room, pool = _waiters(), _Pool(free=0)
    draining = False
    head = asyncio.ensure_future(room.wait_for(pool.take("head", 1), 60))
    brief = asyncio.ensure_future(room.wait_for(pool.take("brief", 1), 0.05))
    quitter = asyncio.ensure_future(room.wait_for(
        pool.take("quitter", 1), 60, give_up=lambda: draining))
    last = asyncio.ensure_future(room.wait_for(pool.take("last", 1), 60))
    await _settle()
    head.cancel()
    assert await brief is None
    draining = True
    room.freed()          # the head is gone: the quitter is woken first
    assert await asyncio.wait_for(quitter, 5) is None
    assert room.waiting == 1 and pool.taken == []
    pool.free = 1
    room.freed()
    assert await asyncio.wait_for(last, 5) == "last"
    assert pool.taken == ["last"] and room.waiting == 0
    assert head.cancelled()
  asyncio.run(go())


def test_an_attempt_that_raises_ends_only_its_own_wait():
  async def go():
    room, pool = _waiters(), _Pool(free=0)

    def bad():
      if pool.free:
        raise ValueError("bad request")

    first = asyncio.ensure_future(room.wait_for(bad, 60))
    second = asyncio.ensure_future(room.wait_for(pool.take("ok", 1), 60))
    await _settle()
    pool.free = 1
    room.freed()
    await _settle()
    assert isinstance(first.exception(), ValueError)
    assert await asyncio.wait_for(second, 5) == "ok"
  asyncio.run(go())


def test_a_request_asked_again_keeps_its_place_ahead_of_later_ones():
  """The router asks again after a while (``waited_s``: how long the
  request has waited already): it goes ahead of calls whose requests began
  to wait after it, and, ahead of every waiter, tries at once."""
  async def go():
    room, pool = _waiters(), _Pool(free=0)
    fresh = asyncio.ensure_future(room.wait_for(pool.take("fresh", 1), 60))
    await _settle()
    await asyncio.sleep(0.02)
    newer = asyncio.ensure_future(room.wait_for(pool.take("newer", 1), 60,
                                                waited_s=0.01))
    await _settle()
    pool.free = 1   # freed where no stream saw it: no wake-up
    old = asyncio.ensure_future(room.wait_for(pool.take("old", 1), 60,
                                              waited_s=5.0))
    assert await asyncio.wait_for(old, 5) == "old"
    pool.free = 2
    room.freed()
    assert await asyncio.gather(fresh, newer) == ["fresh", "newer"]
    assert pool.taken == ["old", "fresh", "newer"]
  asyncio.run(go())
