"""Engines that stand in for the real ones behind the services' seams
(``pdjax.engine.api``), so a servicer's logic is tested in milliseconds,
without JAX programs."""

from __future__ import annotations

import types


class FakePrefillEngine:
  """A ``PrefillBackend`` whose ``prefill`` each test scripts: nothing
  cached, no devices to report memory of, nothing to close."""
  cfg = types.SimpleNamespace(vocab_size=1000)
  config = types.SimpleNamespace(max_batch=2, max_seq_len=1024)
  prefix_store = None
  mesh = types.SimpleNamespace(local_devices=[])   # no memory gauges

  def prefill(self, requests, *, kv_ready=None, on_result=None):
    raise NotImplementedError("each test scripts its engine's prefill")

  def close(self) -> None:
    pass


class FakeDecodeBackend:
  """A ``DecodeBackend`` with room for ``capacity`` reservations, which
  answers every request at once: a remote-prefilled one (``submit_decode``)
  with ``tokens`` then LENGTH, a local one (``submit``) with its first token
  too. It counts what it was given and what it gave back. ``spec``:
  (drafted, accepted) on each request's last event, as a pool that
  speculates reports them."""
  cfg = types.SimpleNamespace(vocab_size=64)
  max_seq_len = 64
  devices: list = []
  cache_events = None
  has_work = False
  num_waiting = 0

  def __init__(self, capacity: int = 8, tokens=(7, 8, 9),
               page_size: int = 16, spec: tuple[int, int] = (0, 0)):
    self.capacity = capacity
    self.spec = spec
    self.sampling: dict = {}    # request id -> the SamplingParams given
    self.page_size = page_size
    self.tokens = list(tokens)
    self.reservations: dict = {}
    self.reserved = 0        # reservations made
    self.returned = 0        # ... given back by unreserve
    self.taken: list[str] = []     # ... used by a request that ran
    self.local: list[str] = []
    self.cancelled: list[str] = []

  def reserve(self, request_id, prompt_len, max_tokens, *, transfer_id="",
              prompt_ids=None, cache_salt=""):
    from pdjax.engine.decode_replica import Reservation
    if request_id in self.reservations:
      return self.reservations[request_id]
    if len(self.reservations) >= self.capacity:
      return None
    pages = -(-(prompt_len + max_tokens) // self.page_size)
    res = Reservation(request_id, 0, pages, transfer_id=transfer_id)
    self.reservations[request_id] = res
    self.reserved += 1
    return res

  def unreserve(self, request_id):
    res = self.reservations.get(request_id)
    if res is None or res.admitting:
      return None
    del self.reservations[request_id]
    self.returned += 1
    return res

  def reservation(self, request_id):
    return self.reservations.get(request_id)

  def payload_sharding(self, replica, num_pages):
    return None

  def submit(self, request_id, prompt_ids, sampling, callback, seed_u32=0,
             *, forced_first_token=None, cache_salt=""):
    from pdjax.engine.requests import FinishReason, TokenEvent
    self.local.append(request_id)
    self.sampling[request_id] = sampling
    callback(TokenEvent(request_id, self.tokens[:1], [0.0]))
    callback(TokenEvent(request_id, self.tokens[1:], [0.0] *
                        (len(self.tokens) - 1), FinishReason.LENGTH,
                        spec_drafted=self.spec[0],
                        spec_accepted=self.spec[1]))

  def submit_decode(self, request) -> None:
    from pdjax.engine.requests import FinishReason, TokenEvent
    res = self.reservations.pop(request.request_id)
    assert res is request.reservation
    self.taken.append(request.request_id)
    self.sampling[request.request_id] = request.sampling
    if request.kv is not None:
      request.kv.release()     # read (a transport's memory goes back)
    request.callback(TokenEvent(request.request_id, self.tokens,
                                [0.0] * len(self.tokens),
                                FinishReason.LENGTH,
                                spec_drafted=self.spec[0],
                                spec_accepted=self.spec[1]))

  def cancel(self, request_id):
    self.cancelled.append(request_id)

  def step(self) -> int:
    return 0

  def fail_all(self, message):
    pass

  def last_iteration(self):
    return None

  def kv_usage(self):
    return {"pages_total": 2 * self.capacity, "pages_used": 0,
            "pages_reserved": 2 * len(self.reservations), "pages_cached": 0,
            "pages_available": 2 * (self.capacity - len(self.reservations)),
            "rows_live": 0, "rows_total": self.capacity,
            "reservations": len(self.reservations)}

  def block_stats(self):
    return {}

  def prefill_tokens(self):
    return 0, 0

  def preemption_stats(self):
    return {"preempted_swap": 0, "resumed_swap": 0,
            "preempted_recompute": 0, "stalled": 0}

  def close(self, timeout_s: float = 10.0) -> bool:
    return True
