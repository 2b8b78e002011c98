"""Prefill side of lending: asks a same-host decode worker for a CUDA IPC
landing region when a request's prefill starts.

The decode worker lends regions of a small pool of landing buffers
(``pdjax.transfer.cuda_ipc.LandingPool``). Lending them at Reserve tied each
one up for as long as its request queued for prefill: under load every
region was lent to a queued request, and the hand-offs that were ready fell
back to ``jax.experimental.transfer`` (summarize on two H200s,
docs/notes/2026-11-26-h200x2-goodput.md). So the prefill worker asks when
it takes the request into a batch (a destination still pending, reserved
beside the prefill, once the router completes it: the decode worker lends
only under a transfer id its Reserve issued), with a non-blocking
``LendLanding`` call answered while the prefill runs, and puts
the region into the request's ``KvDestination`` just before the hand-off.
Any failure (no region free, the call failed or timed out) leaves the
destination as it was: the hand-off takes another path, never fails.
"""

from __future__ import annotations

import logging
import threading

import grpc

from pdjax.service import common
from pdjax.v1 import decode_pb2, decode_pb2_grpc, kv_pb2

log = logging.getLogger(__name__)


class LandingRequests:
  """One per prefill worker whose sender can write into landing buffers
  (``AutoDeviceSender.wants_landing``). Channels are made once per decode
  worker and kept."""

  def __init__(self, sender, security=None, *, timeout_s: float = 5.0):
    self.sender = sender
    self.security = security
    self.timeout_s = timeout_s
    self._stubs: dict[str, decode_pb2_grpc.DecodeStub] = {}
    self._channels: list[grpc.Channel] = []
    self._lock = threading.Lock()
    self.asked = 0
    self.lent = 0

  def _stub(self, address: str) -> decode_pb2_grpc.DecodeStub:
    with self._lock:
      stub = self._stubs.get(address)
      if stub is None:
        ch = common.make_channel(address, self.security or common.Security(),
                                 aio=False)
        self._channels.append(ch)
        stub = self._stubs[address] = decode_pb2_grpc.DecodeStub(ch)
      return stub

  def request(self, dest: kv_pb2.KvDestination,
              prompt_tokens: int) -> "grpc.Future | None":
    """Starts asking for a region (None when this hand-off cannot use
    one: another host, this process, a region already lent, no address)."""
    if not dest.decode_address or not self.sender.wants_landing(dest):
      return None
    self.asked += 1
    return self._stub(dest.decode_address).LendLanding.future(
        decode_pb2.LendLandingRequest(transfer_id=dest.transfer_id,
                                      prompt_tokens=prompt_tokens),
        timeout=self.timeout_s)

  def apply(self, dest: kv_pb2.KvDestination,
            pending: "grpc.Future | None") -> kv_pb2.KvDestination:
    """``dest`` with the lent region filled in, or ``dest`` unchanged."""
    if pending is None:
      return dest
    try:
      resp = pending.result()
    except grpc.RpcError as e:
      log.info("no landing region for %s (%s): %s", dest.transfer_id,
               e.code().name, e.details())
      return dest
    if not resp.ipc_handle:
      return dest
    self.lent += 1
    out = kv_pb2.KvDestination()
    out.CopyFrom(dest)
    out.ipc_handle = resp.ipc_handle
    out.ipc_offset = resp.ipc_offset
    out.ipc_bytes = resp.ipc_bytes
    out.ipc_deadline_ms = resp.ipc_deadline_ms
    return out

  def close(self) -> None:
    with self._lock:
      channels, self._channels, self._stubs = self._channels, [], {}
    for ch in channels:
      ch.close()


__all__ = ["LandingRequests"]
