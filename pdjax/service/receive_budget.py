"""Bounds the device memory a decode worker's KV receives allocate at once.

A receive over ``jax.experimental.transfer`` or the ``grpc`` stream lands in
fresh device memory beside the page pool and the weights; only the CUDA IPC
landing regions (allocated once, at start) and same-process hand-offs
allocate nothing. Unbounded, a burst of long prompts asks the allocator for
more than is left: XLA's allocator then retries each failing allocation for
up to ten seconds, on the thread that asked, so decode steps stall and every
stream on the worker misses its TPOT (8B summarize at 2 req/s on an H100:
TPOT p50 0.8 s, 101 of 120 requests lost at 8 req/s;
docs/notes/2026-11-26-h100x4-transports-steady.md). Here a receive waits
its turn for memory instead, up to its deadline, and is then answered
RESOURCE_EXHAUSTED, the router's cue to hand it elsewhere.

A receive holds its bytes until it returns; the KV it brings is inserted
into the pool at the engine's next iteration and freed there, so what is
held past the receive is bounded by one iteration's arrivals.
"""

from __future__ import annotations

import asyncio
import contextlib
import math

import jax.numpy as jnp

from pdjax.transfer.base import PATH_CUDA_IPC, PATH_LOCAL, TransferExhausted
from pdjax.v1 import kv_pb2

# Paths whose receive allocates no device memory: a view of a landing region
# lent at start, or the sender's own array in this process.
ZERO_COPY_PATHS = frozenset({PATH_CUDA_IPC, PATH_LOCAL})


def receive_bytes(handle: kv_pb2.KvHandle) -> int:
  """Device bytes a receive of ``handle`` allocates (0 for zero-copy paths
  and for a handle too malformed to size: the receiver rejects it)."""
  if handle.transport in ZERO_COPY_PATHS:
    return 0
  try:
    itemsize = jnp.dtype(handle.dtype).itemsize
  except TypeError:
    return 0
  return math.prod(int(s) for s in handle.shape) * itemsize


class ReceiveBudget:
  """At most ``max_bytes`` of KV receives in flight; one larger than the
  whole budget runs alone. Waiters are admitted in arrival order, so a
  large KV is not passed over forever by small ones. ``max_bytes`` 0: no
  bound. Used from the worker's event loop only."""

  def __init__(self, max_bytes: int):
    if max_bytes < 0:
      raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    self.max_bytes = max_bytes
    self.held = 0
    self.waiting = 0
    self._cond: asyncio.Condition | None = None   # made on the loop
    self._next = 0          # the next arrival's ticket
    self._serving = 0       # the ticket whose turn it is
    self._left: set[int] = set()   # tickets that left the line early

  def _admits(self, nbytes: int, ticket: int) -> bool:
    return ticket == self._serving and (
        self.held == 0 or self.held + nbytes <= self.max_bytes)

  def _leave(self, ticket: int) -> None:
    """``ticket`` leaves the line (admitted, or out of time): the turn
    passes to the next ticket still waiting."""
    self._left.add(ticket)
    while self._serving in self._left:
      self._left.discard(self._serving)
      self._serving += 1

  @contextlib.asynccontextmanager
  async def hold(self, nbytes: int, timeout_s: float):
    """Holds ``nbytes`` for the body; TransferExhausted if they are not
    free within ``timeout_s``."""
    if not self.max_bytes or nbytes <= 0:
      yield
      return
    if self._cond is None:
      self._cond = asyncio.Condition()
    cond = self._cond
    async with cond:
      ticket = self._next
      self._next += 1
      self.waiting += 1
      try:
        await asyncio.wait_for(
            cond.wait_for(lambda: self._admits(nbytes, ticket)), timeout_s)
      except asyncio.TimeoutError:
        raise TransferExhausted(
            f"KV receives in flight hold {self.held} of this worker's "
            f"{self.max_bytes}-byte receive budget; a {nbytes}-byte KV "
            f"waited {timeout_s:.1f} s for room (retry later, or on "
            "another decode worker)") from None
      else:
        self.held += nbytes
      finally:
        self.waiting -= 1
        self._leave(ticket)
        cond.notify_all()
    try:
      yield
    finally:
      async with cond:
        self.held -= nbytes
        cond.notify_all()


__all__ = ["ReceiveBudget", "receive_bytes", "ZERO_COPY_PATHS"]
