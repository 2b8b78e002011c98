"""The decode worker's side of KV hand-offs: one owner each.

A disaggregated request holds three things on the decode worker before it
joins the batch: its reservation in the engine, the transfer id the router
issued for it (the receiver redeems only issued ids, and may have lent a
landing region or staged bytes under it), and, while its KV lands, a share
of the receive budget. A ``Handoff`` owns them together and moves through
``HandoffState``:

  RESERVED --receive--> RECEIVING --submit--> SUBMITTED (the engine owns
     |                      |                            the request now)
     +----------+-----------+
                v
             CLOSED  (Unreserve, a wrong transfer id, a failed or cancelled
                      receive, the reservation's TTL): the reservation and
                      the id go back, once.

Once a Decode call receives the KV, the hand-off is that call's: only the
call closes it (if it ends without submitting). Unreserve and the reaper
close a hand-off that is still RESERVED, or leave it: closing one under a
receive would free the reservation that the call then submits with.

``Handoffs`` is the table of them by request id: the servicer's RPCs and
the worker's reaper go through it, never to the engine's reservations and
the receiver's ids separately.
"""

from __future__ import annotations

import contextlib
import enum
import threading
import time
from typing import Any

from pdjax.engine.api import DecodeBackend
from pdjax.service.receive_budget import ReceiveBudget
from pdjax.transfer.base import KvReceiver, TransferDenied


class HandoffState(enum.Enum):
  RESERVED = "reserved"       # capacity promised; the KV has not come
  RECEIVING = "receiving"     # Decode is redeeming the KV
  SUBMITTED = "submitted"     # the engine has the request and its KV
  CLOSED = "closed"           # everything it held was given back


class HandoffClosed(Exception):
  """The hand-off was closed (Unreserve, its TTL) before its KV came."""


class Handoff:
  """One request's reservation and transfer id on this worker."""

  def __init__(self, owner: "Handoffs", request_id: str, transfer_id: str,
               reservation: Any):
    self._owner = owner
    self.request_id = request_id
    self.transfer_id = transfer_id
    self.reservation = reservation
    self.state = HandoffState.RESERVED
    self.created = time.monotonic()

  def _move(self, to: HandoffState, *allowed: HandoffState) -> None:
    with self._owner._lock:
      if self.state not in allowed:
        raise RuntimeError(f"hand-off of {self.request_id}: {self.state.name}"
                           f" -> {to.name}")
      self.state = to

  @contextlib.asynccontextmanager
  async def receiving(self, nbytes: int, timeout_s: float):
    """The receive: RESERVED -> RECEIVING, holding ``nbytes`` of the
    receive budget until it ends (TimeoutError if the budget has no room
    in time; ``HandoffClosed`` if the hand-off was closed first)."""
    with self._owner._lock:   # one look: the reaper runs on another thread
      if self.state is HandoffState.CLOSED:
        raise HandoffClosed(f"the reservation of request "
                            f"{self.request_id!r} was given back (Unreserve "
                            "or its TTL) before its KV came")
      self._move(HandoffState.RECEIVING, HandoffState.RESERVED)
    async with self._owner.budget.hold(nbytes, timeout_s):
      yield

  def submitted(self) -> None:
    """The engine took the request (and its KV): nothing is left to give
    back here; the receiver already redeemed the id."""
    self._move(HandoffState.SUBMITTED, HandoffState.RECEIVING)
    self._owner._drop(self)

  def close(self) -> bool:
    """Gives back what the hand-off still holds: the engine's reservation
    and the receiver's id (and whatever it staged or lent under it). Once;
    a no-op after ``submitted``. For the Decode call that redeemed it (or
    before any did). False when the engine is admitting the request right
    now (it frees or uses the reservation itself)."""
    return self._close(HandoffState.RESERVED, HandoffState.RECEIVING)

  def abandon(self) -> bool:
    """``close`` from outside the Decode call (Unreserve, the reaper): only
    while no call receives the KV; False, leaving it open, once one does
    (the call closes it if it ends without submitting)."""
    return self._close(HandoffState.RESERVED)

  def _close(self, *closable: HandoffState) -> bool:
    with self._owner._lock:
      if self.state in (HandoffState.SUBMITTED, HandoffState.CLOSED):
        return True
      if self.state not in closable:
        return False
      # Closed from here on: a receive that starts now finds it closed.
      was, self.state = self.state, HandoffState.CLOSED
    if self._owner.engine.unreserve(self.request_id) is None and (
        self._owner.engine.reservation(self.request_id) is not None):
      with self._owner._lock:
        self.state = was
      return False
    self._owner.receiver.forget(self.transfer_id)
    self._owner._drop(self)
    return True


class Handoffs:
  """The hand-offs open on one decode worker, by request id."""

  def __init__(self, engine: DecodeBackend, receiver: KvReceiver,
               budget: ReceiveBudget):
    self.engine = engine
    self.receiver = receiver
    self.budget = budget
    self._open: dict[str, Handoff] = {}
    self._lock = threading.RLock()

  def __len__(self) -> int:
    return len(self._open)

  def reserve(self, request_id: str, prompt_tokens: int, max_tokens: int, *,
              transfer_id: str, prompt_ids=None, cache_salt: str = ""
              ) -> Handoff | None:
    """Reserves capacity under the router's transfer id and registers the
    id with the receiver; None when the pool is full. A retried Reserve of
    an open hand-off returns it."""
    res = self.engine.reserve(request_id, prompt_tokens, max_tokens,
                              transfer_id=transfer_id, prompt_ids=prompt_ids,
                              cache_salt=cache_salt)
    if res is None:
      return None
    with self._lock:
      h = self._open.get(request_id)
      if h is None:
        h = self._open[request_id] = Handoff(self, request_id, transfer_id,
                                             res)
    self.receiver.expect(transfer_id, request_id, max_pages=res.pages)
    return h

  def redeem(self, request_id: str, transfer_id: str) -> Handoff:
    """The hand-off a Decode call redeems. ``KeyError``: none is open for
    the request (never reserved, expired, or closed); ``TransferDenied``:
    the id is not the one issued for it (the hand-off is closed: a forged
    or crossed id must not leave the reservation behind)."""
    with self._lock:
      h = self._open.get(request_id)
    if h is None:
      raise KeyError(request_id)
    if transfer_id != h.transfer_id:
      h.close()
      raise TransferDenied(f"kv.transfer_id is not the one reserved for "
                           f"request {request_id!r}")
    return h

  def close(self, request_id: str) -> None:
    """Unreserve: the router gave up on the request. A hand-off whose KV
    a Decode call is receiving stays that call's to close (the router
    cancels the call too)."""
    with self._lock:
      h = self._open.get(request_id)
    if h is not None:
      h.abandon()

  def reap(self, ttl_s: float) -> list[Handoff]:
    """Closes the hand-offs reserved more than ``ttl_s`` ago whose KV never
    came (the router or the prefill worker died in between): those still
    RESERVED when their turn comes."""
    now = time.monotonic()
    with self._lock:
      old = [h for h in self._open.values()
             if h.state == HandoffState.RESERVED and now - h.created > ttl_s]
    return [h for h in old if h.abandon()]

  def _drop(self, h: Handoff) -> None:
    with self._lock:
      if self._open.get(h.request_id) is h:
        del self._open[h.request_id]


__all__ = ["Handoff", "HandoffClosed", "HandoffState", "Handoffs"]
