"""The ``local`` transport: both pools in one process.

The KV never leaves the devices: the sender parks the array under the
transfer id in an exchange object the two pools share, and the receiver takes
it and ``device_put``s it from the prefill mesh onto the decode replica's
(``reshard_kv``). Used by single-host deployments that run both pools in one
process, and by tests.
"""

from __future__ import annotations

import time

from jax.sharding import NamedSharding

from pdjax.engine.kv import reshard_kv
from pdjax.engine.requests import RequestKV
from pdjax.transfer.base import (IssuedKvReceiver, KvSender, LeaseTable,
                                 TransferTimeout, handle_for)
from pdjax.v1 import kv_pb2


class LocalKvExchange:
  """What the two pools of one process share: parked KV by transfer id."""

  def __init__(self, ttl_s: float = 60.0):
    self.leases = LeaseTable(ttl_s)


class LocalSender(KvSender):
  name = "local"

  def __init__(self, exchange: LocalKvExchange):
    self.exchange = exchange

  def send(self, kv: RequestKV, dest: kv_pb2.KvDestination, *,
           timeout_s: float) -> kv_pb2.KvHandle:
    self.exchange.leases.put(dest.transfer_id, kv, kv.nbytes)
    return handle_for(kv, self.name, dest.transfer_id)

  def release(self, transfer_id: str) -> None:
    self.exchange.leases.pop(transfer_id)

  def reap(self) -> int:
    return self.exchange.leases.reap()

  def live(self) -> int:
    return len(self.exchange.leases)


class LocalReceiver(IssuedKvReceiver):
  name = "local"

  def __init__(self, exchange: LocalKvExchange):
    self.exchange = exchange
    super().__init__()

  def receive(self, handle: kv_pb2.KvHandle, sharding: NamedSharding, *,
              timeout_s: float) -> RequestKV:
    self._issued.check(handle.transfer_id)
    deadline = time.monotonic() + timeout_s
    while True:
      kv = self.exchange.leases.pop(handle.transfer_id)
      if kv is not None:
        break
      if time.monotonic() > deadline:
        raise TransferTimeout(f"KV for transfer {handle.transfer_id} did not "
                              f"arrive within {timeout_s:.1f} s")
      time.sleep(0.001)
    self._issued.discard(handle.transfer_id)
    out = reshard_kv(kv, sharding)
    out.kv.block_until_ready()
    return out


__all__ = ["LocalKvExchange", "LocalSender", "LocalReceiver"]
