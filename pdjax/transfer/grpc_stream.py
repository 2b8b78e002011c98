"""The ``grpc`` transport: host-staged KV streamed over gRPC.

Works between any two hosts that can reach each other. The prefill side
copies each addressable shard of the request KV to the host (so a pool whose
mesh spans processes sends from every process its own kv-head range) and
streams it to the decode worker's ``KvTransfer.PushKv`` in chunks: one
layer's K or V for a run of pages and a range of heads, at most
``chunk_bytes`` each, CRC-32 checked. Only pages that carry data travel.

The decode side accepts a stream only for a transfer id the router issued to
it (``expect``), places every chunk into a host buffer in the request's
layout as it arrives (layer by layer, while later layers are still on the
wire), and on the last chunk checks that every byte arrived before one
``device_put`` into the replica's layout. Staged KV has one owner, the lease
table, and expires after a TTL if the Decode call never claims it.
"""

from __future__ import annotations

import threading
import time
import zlib
from typing import Iterator

import grpc
import jax
import numpy as np
from jax.sharding import NamedSharding

from pdjax.engine.requests import RequestKV
from pdjax.transfer.base import (IssuedKvReceiver, KvSender, LeaseTable,
                                 StreamIntake, TransferDenied, TransferError,
                                 TransferTimeout, check_kv_handle, handle_for)
from pdjax.v1 import decode_pb2_grpc, kv_pb2

DEFAULT_CHUNK_BYTES = 4 << 20


def _shard_slabs(kv: RequestKV):
  """(head_start, host array [L, 2, pages, P, heads, hd]) per distinct shard
  this process holds, data pages only."""
  n = kv.num_pages
  seen = set()
  for shard in kv.kv.addressable_shards:
    if shard.replica_id != 0:
      continue
    head_slice = shard.index[4]
    start = head_slice.start or 0
    if start in seen:
      continue
    seen.add(start)
    yield start, np.asarray(shard.data)[:, :, :n]


def kv_chunks(kv: RequestKV, handle: kv_pb2.KvHandle,
              chunk_bytes: int = DEFAULT_CHUNK_BYTES
              ) -> Iterator[kv_pb2.KvChunk]:
  """The chunk stream for one request KV, in layer order."""
  slabs = list(_shard_slabs(kv))
  first = True
  L = kv.kv.shape[0]
  for layer in range(L):
    for which in (0, 1):
      for head_start, slab in slabs:
        block = slab[layer, which]            # [pages, P, heads, hd]
        per_page = block[0].nbytes if len(block) else 0
        step = max(1, chunk_bytes // max(per_page, 1))
        for p0 in range(0, block.shape[0], step):
          data = np.ascontiguousarray(block[p0:p0 + step]).tobytes()
          chunk = kv_pb2.KvChunk(
              layer=layer, kv=which, page_start=p0,
              num_pages=min(step, block.shape[0] - p0),
              head_start=head_start, num_heads=block.shape[2], data=data,
              crc32=zlib.crc32(data))
          if first:
            chunk.handle.CopyFrom(handle)
            first = False
          yield chunk
  yield kv_pb2.KvChunk(last=True, handle=handle if first else None)


class GrpcStreamSender(KvSender):
  name = "grpc"

  def __init__(self, channel_factory, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
    """``channel_factory(address) -> grpc.Channel`` (TLS, options: the
    caller's; channels are cached per address)."""
    self._channel_factory = channel_factory
    self._channels: dict[str, grpc.Channel] = {}
    self._lock = threading.Lock()
    self.chunk_bytes = chunk_bytes

  def _stub(self, address: str):
    with self._lock:
      ch = self._channels.get(address)
      if ch is None:
        ch = self._channels[address] = self._channel_factory(address)
    return decode_pb2_grpc.KvTransferStub(ch)

  def send(self, kv: RequestKV, dest: kv_pb2.KvDestination, *,
           timeout_s: float) -> kv_pb2.KvHandle:
    handle = handle_for(kv, self.name, dest.transfer_id)
    try:
      ack = self._stub(dest.decode_address).PushKv(
          kv_chunks(kv, handle, self.chunk_bytes), timeout=timeout_s)
    except grpc.RpcError as e:
      if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        raise TransferTimeout(f"KV stream to {dest.decode_address} timed out "
                              f"after {timeout_s:.1f} s") from e
      if e.code() == grpc.StatusCode.PERMISSION_DENIED:
        raise TransferDenied(e.details()) from e
      raise TransferError(f"KV stream to {dest.decode_address} failed: "
                          f"{e.code().name}: {e.details()}") from e
    if ack.bytes != kv.nbytes:
      raise TransferError(f"decode worker acknowledged {ack.bytes} bytes, "
                          f"sent {kv.nbytes}")
    return handle

  def close(self) -> None:
    with self._lock:
      for ch in self._channels.values():
        ch.close()
      self._channels.clear()


class _Staging:
  """One incoming request KV being assembled on the host."""

  def __init__(self, handle: kv_pb2.KvHandle):
    self.handle = handle
    shape = tuple(handle.shape)
    self.dtype = jax.numpy.dtype(handle.dtype)
    self.buffer = np.zeros(shape, self.dtype)
    page_size = shape[3]
    self.data_pages = -(-handle.num_tokens // page_size) - handle.first_page
    self.expected = (shape[0] * 2 * self.data_pages
                     * int(np.prod(shape[3:])) * self.dtype.itemsize)
    self.received = 0
    self.chunks = 0
    self.complete = threading.Event()

  def place(self, c: kv_pb2.KvChunk) -> None:
    L, _, n, P, K, hd = self.buffer.shape
    if not (c.layer < L and c.kv < 2 and c.page_start + c.num_pages
            <= self.data_pages and c.head_start + c.num_heads <= K):
      raise ValueError(f"chunk out of range: layer {c.layer} kv {c.kv} pages "
                       f"{c.page_start}+{c.num_pages} heads "
                       f"{c.head_start}+{c.num_heads}")
    if zlib.crc32(c.data) != c.crc32:
      raise ValueError(f"CRC mismatch in layer {c.layer} kv {c.kv} pages "
                       f"{c.page_start}+{c.num_pages}")
    block = np.frombuffer(c.data, self.dtype)
    want = c.num_pages * P * c.num_heads * hd
    if block.size != want:
      raise ValueError(f"chunk has {block.size} values, expected {want}")
    self.buffer[c.layer, c.kv, c.page_start:c.page_start + c.num_pages, :,
                c.head_start:c.head_start + c.num_heads] = block.reshape(
                    c.num_pages, P, c.num_heads, hd)
    self.received += len(c.data)
    self.chunks += 1


class GrpcStreamReceiver(IssuedKvReceiver, StreamIntake):
  """Decode side: its own ``StreamIntake``, served by the decode worker as
  the ``KvTransfer`` service."""

  name = "grpc"

  def __init__(self, *, ttl_s: float = 60.0,
               geometry: tuple[int, int, int, int, str, int] | None = None):
    """``geometry``: (layers, page_size, kv_heads, head_dim, dtype,
    max_payload_pages) of this worker's KV; a stream whose handle disagrees
    is refused before any buffer is allocated for it."""
    self.staged = LeaseTable(ttl_s)
    self.geometry = geometry
    super().__init__()

  def forget(self, transfer_id: str) -> None:
    super().forget(transfer_id)
    self.staged.pop(transfer_id)

  def reap(self) -> int:
    return self.staged.reap()

  def live(self) -> int:
    return len(self.staged)

  @property
  def intake(self) -> StreamIntake:
    return self

  # -------------------------------------------------- the stream intake
  def begin(self, first: kv_pb2.KvChunk) -> _Staging:
    """Opens staging for a stream's first chunk, or refuses it
    (TransferDenied for an id not issued to us, ValueError if malformed)."""
    if not first.HasField("handle"):
      raise ValueError("the first chunk must carry the KV handle")
    tid = first.handle.transfer_id
    max_pages = self._issued.check(tid)
    # A malformed handle is the caller's error: INVALID_ARGUMENT.
    check_kv_handle(first.handle, self.geometry, max_pages, error=ValueError)
    staging = _Staging(first.handle)
    self.staged.put(tid, staging, staging.expected)
    return staging

  def place(self, staging: _Staging, chunk: kv_pb2.KvChunk) -> None:
    staging.place(chunk)

  def finish(self, staging: _Staging | None) -> kv_pb2.KvAck:
    if staging is None:
      raise ValueError("empty KV stream")
    if staging.received != staging.expected:
      self.staged.pop(staging.handle.transfer_id)
      raise ValueError(f"KV stream ended after {staging.received} of "
                       f"{staging.expected} bytes")
    staging.complete.set()
    return kv_pb2.KvAck(bytes=staging.received, chunks=staging.chunks)

  def abandon(self, staging: _Staging | None) -> None:
    """A stream that broke off: drop its partial KV now."""
    if staging is not None and not staging.complete.is_set():
      self.staged.pop(staging.handle.transfer_id)

  def push(self, chunks: Iterator[kv_pb2.KvChunk]) -> kv_pb2.KvAck:
    """Consumes one stream (synchronous form; the aio service uses
    begin/place/finish directly)."""
    staging = None
    try:
      for c in chunks:
        if staging is None:
          staging = self.begin(c)
        if c.last:
          break
        self.place(staging, c)
      return self.finish(staging)
    except BaseException:
      self.abandon(staging)
      raise

  def receive(self, handle: kv_pb2.KvHandle, sharding: NamedSharding, *,
              timeout_s: float) -> RequestKV:
    tid = handle.transfer_id
    self._issued.check(tid)
    deadline = time.monotonic() + timeout_s
    while True:
      staging = self.staged.get(tid)
      if staging is not None and staging.complete.wait(
          max(0.0, min(0.05, deadline - time.monotonic()))):
        break
      if staging is None:
        time.sleep(0.005)
      if time.monotonic() > deadline:
        raise TransferTimeout(f"KV stream {tid} did not complete within "
                              f"{timeout_s:.1f} s")
    self.staged.pop(tid)
    self.forget(tid)
    arr = jax.device_put(staging.buffer, sharding)
    arr.block_until_ready()
    return RequestKV(arr, handle.num_tokens, handle.first_page)


__all__ = ["GrpcStreamSender", "GrpcStreamReceiver", "kv_chunks",
           "DEFAULT_CHUNK_BYTES"]
