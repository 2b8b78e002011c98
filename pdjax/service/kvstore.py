"""The deployment's shared KV: the ``BlockStore`` service, its store process
and the peer side of prefill workers.

Two kinds of server speak ``BlockStore`` (``protos/pdjax/v1/
blockstore.proto``), both behind the deployment's service token:

* a prefill worker that shares its cache (``PeerServicer``): ``FetchBlocks``
  answers from its prefix cache (device pool and host tier), read by the
  engine's own thread (``PrefixStore.export``);
* the store process (``StoreServicer`` around ``BlockStoreCore``; ``python
  -m pdjax.launch.kvstore``), one per host or per deployment: the workers
  of its host write every block they compute through to it
  (``PutBlocks``), and any worker fetches from it what it lacks. It polls
  like a worker (``GetWorkerInfo``, role ``kvstore``) so the router can
  count its blocks as fetchable.

``BlockStoreCore`` keeps blocks by their full names (the chained hash of
tokens, layout fingerprint and ``cache_salt``, ``pdjax.engine.prefix_cache
.block_hashes``) with their layout: a fetch gets only blocks of its own
layout, so two models sharing a store never see each other's blocks even
under a colliding name. Two tiers, exclusive: host memory (LRU, bounded in
bytes) and, optionally, a directory on local disk (LRU, bounded in bytes):
a block evicted from memory is written there, one file per block with its
name, layout and CRC in a header; a disk hit moves it back to memory. A
restarted store indexes the files it finds (their headers; the data is
checked when read). Everything is bounded: blocks per fetch
(``MAX_FETCH_BLOCKS``), bytes per block (``max_block_bytes``), bytes per
tier.

The worker side, ``GrpcBlockSource``, is the ``remote_tier.BlockSource``
that reaches either kind of server; the engine side (what to fetch, from
whom, checked how) is ``pdjax.engine.remote_tier``.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import socket
import threading
import time
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import grpc

from pdjax.engine.cache_events import CacheEventLog
from pdjax.engine.remote_tier import (HASH_BYTES, MAX_FETCH_BLOCKS,
                                      BlockLayout, BlockRefused, BlockSource)
from pdjax.service import common, kv_router
from pdjax.v1 import blockstore_pb2, blockstore_pb2_grpc, common_pb2

log = logging.getLogger(__name__)

DEFAULT_MAX_BLOCK_BYTES = 64 << 20
_MAGIC = b"PDJAXKV1"


# ------------------------------------------------------------------ wire
def layout_to_proto(layout: BlockLayout) -> blockstore_pb2.BlockLayout:
  return blockstore_pb2.BlockLayout(fingerprint=layout.fingerprint,
                                    shape=list(layout.shape),
                                    dtype=layout.dtype)


def layout_from_proto(msg: blockstore_pb2.BlockLayout) -> BlockLayout:
  return BlockLayout(bytes(msg.fingerprint), tuple(int(d) for d in msg.shape),
                     msg.dtype)


def check_layout(layout: BlockLayout, max_block_bytes: int) -> str | None:
  """Why a layout cannot be kept (None: it can)."""
  if not layout.fingerprint or len(layout.shape) != 5 or layout.shape[0] != 2:
    return "a block layout needs a fingerprint and a shape [2, L, P, K, hd]"
  if min(layout.shape) <= 0:
    return f"block shape {layout.shape} has an empty axis"
  try:
    size = layout.block_bytes
  except TypeError:
    return f"unknown dtype {layout.dtype!r}"
  if size > max_block_bytes:
    return f"blocks of {size} bytes exceed the bound of {max_block_bytes}"
  return None


def check_hashes(hashes: Sequence[bytes]) -> str | None:
  if len(hashes) > MAX_FETCH_BLOCKS:
    return (f"{len(hashes)} blocks asked for; at most {MAX_FETCH_BLOCKS} "
            "per fetch")
  if any(len(h) != HASH_BYTES for h in hashes):
    return f"block names are {HASH_BYTES} bytes"
  return None


# ------------------------------------------------------------------ store
class _Entry:
  __slots__ = ("layout", "data", "crc")

  def __init__(self, layout: BlockLayout, data: bytes, crc: int):
    self.layout = layout
    self.data = data
    self.crc = crc


class BlockStoreCore:
  """Blocks by name and layout in host memory, then on disk (module doc).

  Thread-safe (one lock; disk reads and writes run under it, which bounds
  the store's throughput by its disk, not its correctness).
  """

  def __init__(self, capacity_bytes: int, *, disk_dir: str | None = None,
               disk_capacity_bytes: int = 0,
               max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES):
    if capacity_bytes <= 0:
      raise ValueError(f"a block store needs capacity > 0 bytes, got "
                       f"{capacity_bytes}")
    if disk_dir and disk_capacity_bytes <= 0:
      raise ValueError("a disk tier needs a capacity > 0 bytes")
    self.capacity_bytes = capacity_bytes
    self.max_block_bytes = max_block_bytes
    self.disk_dir = Path(disk_dir) if disk_dir else None
    self.disk_capacity_bytes = disk_capacity_bytes if disk_dir else 0
    self._mem: collections.OrderedDict[bytes, _Entry] = (
        collections.OrderedDict())
    self._mem_bytes = 0
    # name -> (layout, file size): the disk tier's index, LRU first.
    self._disk: collections.OrderedDict[bytes, tuple[BlockLayout, int]] = (
        collections.OrderedDict())
    self._disk_bytes = 0
    self._lock = threading.RLock()
    self.counts = collections.Counter()
    # Routing: the names held (either tier), as a worker publishes its own.
    self.events = CacheEventLog()
    if self.disk_dir is not None:
      self.disk_dir.mkdir(parents=True, exist_ok=True)
      self._scan()

  # ---------------------------------------------------------------- api
  def put(self, name: bytes, layout: BlockLayout, data: bytes,
          crc: int | None = None) -> str:
    """Keeps a block: "stored", "present" (already held, refreshed) or
    "refused" (malformed: wrong size, CRC, name length, over a bound)."""
    problem = check_layout(layout, self.max_block_bytes)
    if (problem or len(name) != HASH_BYTES or len(data) != layout.block_bytes
        or (crc is not None and zlib.crc32(data) != crc)):
      self.counts["refused"] += 1
      return "refused"
    crc = zlib.crc32(data) if crc is None else crc
    with self._lock:
      if name in self._mem:
        self._mem.move_to_end(name)
        self.counts["present"] += 1
        return "present"
      if name in self._disk:
        self._drop_file(name)
      else:
        self.events.record_stored(name)
      self._mem[name] = _Entry(layout, bytes(data), crc)
      self._mem_bytes += len(data)
      self.counts["stored"] += 1
      self.counts["bytes_in"] += len(data)
      self._spill()
      return "stored"

  def fetch(self, names: Sequence[bytes], layout: BlockLayout
            ) -> list[tuple[bytes, bytes, int]]:
    """(name, data, crc32) of the leading run of ``names`` held in
    ``layout``; a block held in another layout ends the run."""
    out = []
    with self._lock:
      for name in names:
        entry = self._get(name)
        if entry is None:
          self.counts["misses"] += 1
          break
        if entry.layout != layout:
          self.counts["layout_misses"] += 1
          break
        out.append((name, entry.data, entry.crc))
      self.counts["bytes_out"] += sum(len(d) for _, d, _ in out)
    return out

  def __len__(self) -> int:
    return len(self._mem) + len(self._disk)

  @property
  def stats(self) -> dict[str, int]:
    with self._lock:
      out = dict(self.counts)
      out.update(memory_blocks=len(self._mem), memory_bytes=self._mem_bytes,
                 disk_blocks=len(self._disk), disk_bytes=self._disk_bytes)
      return out

  # ---------------------------------------------------------------- tiers
  def _get(self, name: bytes) -> _Entry | None:
    entry = self._mem.get(name)
    if entry is not None:
      self._mem.move_to_end(name)
      self.counts["memory_hits"] += 1
      return entry
    if name not in self._disk:
      return None
    entry = self._read_file(name)
    self._drop_file(name)
    if entry is None:        # unreadable: gone
      self.events.record_evicted(name)
      return None
    self.counts["disk_hits"] += 1
    self._mem[name] = entry
    self._mem_bytes += len(entry.data)
    self._spill(keep=name)
    return entry

  def _spill(self, keep: bytes | None = None) -> None:
    """Memory over capacity: LRU blocks go to disk (or are dropped)."""
    while self._mem_bytes > self.capacity_bytes and self._mem:
      name, entry = next(iter(self._mem.items()))
      if name == keep and len(self._mem) == 1:
        break
      del self._mem[name]
      self._mem_bytes -= len(entry.data)
      self.counts["memory_evictions"] += 1
      if not self._write_file(name, entry):
        self.events.record_evicted(name)
        self.counts["evictions"] += 1

  def _path(self, name: bytes) -> Path:
    hexname = name.hex()
    return self.disk_dir / hexname[:2] / f"{hexname}.blk"

  def _write_file(self, name: bytes, entry: _Entry) -> bool:
    if self.disk_dir is None or len(entry.data) > self.disk_capacity_bytes:
      return False
    while self._disk_bytes + len(entry.data) > self.disk_capacity_bytes:
      old, _ = next(iter(self._disk.items()))
      self._drop_file(old)
      self.events.record_evicted(old)
      self.counts["evictions"] += 1
    header = json.dumps({
        "name": name.hex(), "fingerprint": entry.layout.fingerprint.hex(),
        "shape": list(entry.layout.shape), "dtype": entry.layout.dtype,
        "crc32": entry.crc}).encode()
    path = self._path(name)
    tmp = path.with_suffix(".tmp")
    try:
      path.parent.mkdir(exist_ok=True)
      with open(tmp, "wb") as f:
        f.write(_MAGIC + len(header).to_bytes(4, "little") + header)
        f.write(entry.data)
      os.replace(tmp, path)
    except OSError as e:
      log.warning("KV store: writing %s failed: %s", path, e)
      tmp.unlink(missing_ok=True)
      return False
    self._disk[name] = (entry.layout, len(entry.data))
    self._disk_bytes += len(entry.data)
    self.counts["disk_writes"] += 1
    return True

  def _read_file(self, name: bytes) -> _Entry | None:
    layout, size = self._disk[name]
    try:
      raw = self._path(name).read_bytes()
      head = _parse_header(raw)
      data = raw[len(_MAGIC) + 4 + head["size"]:]
      if (head["name"] != name.hex() or head["layout"] != layout
          or len(data) != size or zlib.crc32(data) != head["crc32"]):
        raise ValueError("header or data do not match the index")
    except (OSError, ValueError, KeyError) as e:
      log.warning("KV store: block file of %s unreadable (%s); dropped",
                  name.hex()[:16], e)
      self.counts["disk_errors"] += 1
      return None
    self.counts["disk_reads"] += 1
    return _Entry(layout, data, head["crc32"])

  def _drop_file(self, name: bytes) -> None:
    _, size = self._disk.pop(name)
    self._disk_bytes -= size
    try:
      self._path(name).unlink()
    except OSError:
      pass

  def _scan(self) -> None:
    """Indexes the block files a previous life of the store left, oldest
    first; past the disk capacity the oldest are removed."""
    found = []
    for path in self.disk_dir.glob("*/*.blk"):
      try:
        with open(path, "rb") as f:
          raw = f.read(len(_MAGIC) + 4 + 4096)
        head = _parse_header(raw)
        name = bytes.fromhex(head["name"])
        size = path.stat().st_size - len(_MAGIC) - 4 - head["size"]
        found.append((path.stat().st_mtime, name, head["layout"], size))
      except (OSError, ValueError, KeyError):
        path.unlink(missing_ok=True)
    for _, name, layout, size in sorted(found, key=lambda f: f[0]):
      self._disk[name] = (layout, size)
      self._disk_bytes += size
      self.events.record_stored(name)
    while self._disk_bytes > self.disk_capacity_bytes and self._disk:
      old, _ = next(iter(self._disk.items()))
      self._drop_file(old)
      self.events.record_evicted(old)
    if self._disk:
      log.info("KV store: %d blocks (%d bytes) found on disk",
               len(self._disk), self._disk_bytes)


def _parse_header(raw: bytes) -> dict:
  if raw[:len(_MAGIC)] != _MAGIC:
    raise ValueError("not a pdjax KV block file")
  n = int.from_bytes(raw[len(_MAGIC):len(_MAGIC) + 4], "little")
  if n > 4096:
    raise ValueError("header too long")
  head = json.loads(raw[len(_MAGIC) + 4:len(_MAGIC) + 4 + n])
  head["size"] = n
  head["layout"] = BlockLayout(bytes.fromhex(head["fingerprint"]),
                               tuple(int(d) for d in head["shape"]),
                               str(head["dtype"]))
  return head


# ------------------------------------------------------------------ metrics
class StoreMetrics:
  """The store process's Prometheus metrics (on ``Metrics("kvstore")``'s
  registry, which also serves them)."""

  def __init__(self, metrics):
    from prometheus_client import Counter, Gauge, Histogram
    from pdjax.service.metrics import LATENCY_BUCKETS
    r = metrics.registry
    self.metrics = metrics
    self.blocks = Counter(
        "pdjax_kvstore_blocks_total", "Blocks by event: fetched (memory or "
        "disk hit), missed, stored, present (put again), refused.",
        ["event"], registry=r)
    self.bytes = Counter(
        "pdjax_kvstore_bytes_total", "Block bytes in (puts) and out "
        "(fetches).", ["direction"], registry=r)
    self.fetch_time = Histogram(
        "pdjax_kvstore_fetch_seconds", "Time to answer one fetch.",
        buckets=LATENCY_BUCKETS, registry=r)
    self.held = Gauge("pdjax_kvstore_held", "Blocks and bytes held by tier.",
                      ["tier", "unit"], registry=r)
    self.core_counts = Gauge(
        "pdjax_kvstore_core", "The store's own counters (hits and misses "
        "per tier, evictions, disk reads and writes).", ["stat"], registry=r)

  def observe(self, core: BlockStoreCore) -> None:
    stats = core.stats
    for tier in ("memory", "disk"):
      self.held.labels(tier, "blocks").set(stats[f"{tier}_blocks"])
      self.held.labels(tier, "bytes").set(stats[f"{tier}_bytes"])
    for k, v in stats.items():
      if not k.endswith(("_blocks", "_bytes")):
        self.core_counts.labels(k).set(v)


# ------------------------------------------------------------------ servers
class StoreServicer(blockstore_pb2_grpc.BlockStoreServicer):
  """The store process's ``BlockStore``."""

  def __init__(self, core: BlockStoreCore, info: common_pb2.WorkerInfo,
               metrics: StoreMetrics | None = None):
    self.core = core
    self.info = info
    self.metrics = metrics

  async def FetchBlocks(self, request, context):
    t0 = time.perf_counter()
    layout = layout_from_proto(request.layout)
    problem = (check_layout(layout, self.core.max_block_bytes)
               or check_hashes(request.hashes))
    if problem:
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
    found = await asyncio.to_thread(self.core.fetch, list(request.hashes),
                                    layout)
    m = self.metrics
    if m is not None:
      m.blocks.labels("fetched").inc(len(found))
      m.blocks.labels("missed").inc(len(found) < len(request.hashes))
      m.bytes.labels("out").inc(sum(len(d) for _, d, _ in found))
    wire = layout_to_proto(layout)
    for name, data, crc in found:
      yield blockstore_pb2.KvBlock(hash=name, layout=wire, data=data,
                                   crc32=crc)
    if m is not None:
      m.fetch_time.observe(time.perf_counter() - t0)

  async def PutBlocks(self, request_iterator, context):
    ack = blockstore_pb2.PutBlocksAck()
    async for block in request_iterator:
      outcome = await asyncio.to_thread(
          self.core.put, bytes(block.hash), layout_from_proto(block.layout),
          block.data, block.crc32)
      if outcome == "stored":
        ack.stored += 1
        ack.bytes += len(block.data)
      elif outcome == "present":
        ack.present += 1
      else:
        ack.refused += 1
    m = self.metrics
    if m is not None:
      m.blocks.labels("stored").inc(ack.stored)
      m.blocks.labels("present").inc(ack.present)
      m.blocks.labels("refused").inc(ack.refused)
      m.bytes.labels("in").inc(ack.bytes)
    return ack

  async def GetWorkerInfo(self, request, context):
    info = common_pb2.WorkerInfo()
    info.CopyFrom(self.info)
    kv_router.fill_cache_info(info, self.core.events,
                              request.cache_events_since)
    info.serves_blocks = True
    return info


class PeerServicer(blockstore_pb2_grpc.BlockStoreServicer):
  """A prefill worker's ``BlockStore``: fetches (and, with ``pulls``,
  device pulls) from its prefix cache."""

  def __init__(self, store, *, timeout_s: float = 2.0, pulls=None):
    """``store``: the engine's ``PrefixStore`` (its ``export`` reads).
    ``pulls``: the worker's ``pdjax.transfer.block_pulls.AutoBlockPulls``
    (``PullBlocks``: by CUDA IPC into the region a worker of this host
    lent, else by jax.experimental.transfer; None: UNIMPLEMENTED)."""
    self.store = store
    self.layout = store.block_layout
    self.timeout_s = timeout_s
    self.pulls = pulls

  async def _export(self, request, context):
    """The blocks held of a request's leading run (empty: another layout,
    which this worker holds none of, as a store would answer)."""
    layout = layout_from_proto(request.layout)
    problem = check_hashes(request.hashes)
    if problem:
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
    if layout != self.layout:
      return []
    remaining = context.time_remaining()
    timeout = self.timeout_s if remaining is None else min(
        self.timeout_s, max(remaining, 0.001))
    try:
      return await asyncio.to_thread(self.store.export,
                                     list(request.hashes), timeout)
    except TimeoutError as e:
      await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))

  async def PullBlocks(self, request, context):
    if self.pulls is None:
      await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                          "this worker offers no device pulls (its "
                          "deployment's transport is not 'device')")
    blocks = await self._export(request, context)
    if not blocks:
      return blockstore_pb2.BlockPull(layout=layout_to_proto(self.layout))
    landing = request.landing if request.HasField("landing") else None
    try:
      out = await asyncio.to_thread(
          self.pulls.offer, [array for _, array in blocks], landing)
    except OverflowError as e:
      await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    out.layout.CopyFrom(layout_to_proto(self.layout))
    out.hashes.extend(name for name, _ in blocks)
    return out

  async def FetchBlocks(self, request, context):
    blocks = await self._export(request, context)
    wire = layout_to_proto(self.layout)
    for name, array in blocks:
      data = await asyncio.to_thread(_host_bytes, array)
      yield blockstore_pb2.KvBlock(hash=name, layout=wire, data=data,
                                   crc32=zlib.crc32(data))


def _host_bytes(array) -> bytes:
  import numpy as np
  return np.ascontiguousarray(np.asarray(array)).tobytes()


def store_info(address: str) -> common_pb2.WorkerInfo:
  """The store's ``GetWorkerInfo`` answer (its cache fields are added per
  call)."""
  return common_pb2.WorkerInfo(role="kvstore", address=address,
                               process_id=common.PROCESS_ID,
                               hostname=socket.gethostname(),
                               serves_blocks=True)


# ------------------------------------------------------------------ client
def _left(deadline: float) -> float:
  return max(deadline - time.monotonic(), 0.001)


class GrpcBlockSource(BlockSource):
  """A peer or a store as the remote tier reaches it (sync gRPC)."""

  def __init__(self, address: str,
               security: common.Security = common.Security(), *,
               pulls=None):
    """``pulls``: this worker's ``pdjax.transfer.block_pulls
    .AutoBlockPulls``, to pull peers' blocks device to device (None:
    streams only)."""
    self.address = address
    self._channel = common.make_channel(address, security)
    self._stub = blockstore_pb2_grpc.BlockStoreStub(self._channel)
    self._pulls = pulls
    self.can_pull = pulls is not None

  def pull(self, layout: BlockLayout, hashes: Sequence[bytes], *,
           timeout_s: float):
    from pdjax.transfer.cuda_driver import CudaError
    deadline = time.monotonic() + timeout_s
    try:
      return self._pull(layout, hashes, deadline)
    except CudaError as e:
      # This worker's side of CUDA IPC failed (it lends no more regions):
      # the same blocks once more, by the transfer path.
      log.warning("CUDA IPC pull from %s failed (%s); pulling with "
                  "jax.experimental.transfer", self.address, e)
      return self._pull(layout, hashes, deadline)

  def _pull(self, layout: BlockLayout, hashes: Sequence[bytes],
            deadline: float):
    """One ``PullBlocks`` call, with a landing region where one is lent
    (given back as it returns or raises)."""
    import ml_dtypes  # noqa: F401 - names bfloat16 & co. for numpy
    import numpy as np
    with self._pulls.lend(self.address,
                          len(hashes) * layout.block_bytes) as lent:
      try:
        offer = self._stub.PullBlocks(blockstore_pb2.FetchBlocksRequest(
            layout=layout_to_proto(layout), hashes=list(hashes),
            landing=lent.landing), timeout=_left(deadline))
      except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNIMPLEMENTED:
          lent.unwritten = True     # a peer without pulls writes nothing
          raise NotImplementedError(e.details()) from e
        raise
      names = [bytes(h) for h in offer.hashes]
      got = layout_from_proto(offer.layout)
      if names and got != layout:   # not pulled at all
        raise BlockRefused("offered blocks of another model or layout")
      array, path = self._pulls.pull(
          offer, lent, (len(names), *layout.shape), np.dtype(layout.dtype),
          timeout_s=_left(deadline))
    return names, got, array, path

  def fetch(self, layout: BlockLayout, hashes: Sequence[bytes], *,
            timeout_s: float
            ) -> Iterator[tuple[bytes, BlockLayout, bytes, int]]:
    call = self._stub.FetchBlocks(blockstore_pb2.FetchBlocksRequest(
        layout=layout_to_proto(layout), hashes=list(hashes)),
        timeout=timeout_s)
    try:
      for msg in call:
        yield (bytes(msg.hash), layout_from_proto(msg.layout), msg.data,
               msg.crc32)
    finally:
      call.cancel()

  def put(self, layout: BlockLayout, blocks: Sequence[tuple[bytes, bytes]],
          *, timeout_s: float) -> None:
    wire = layout_to_proto(layout)
    ack = self._stub.PutBlocks(
        (blockstore_pb2.KvBlock(hash=h, layout=wire, data=d,
                                crc32=zlib.crc32(d)) for h, d in blocks),
        timeout=timeout_s)
    if ack.refused:
      raise ValueError(f"the store refused {ack.refused} of {len(blocks)} "
                       "blocks")

  def close(self) -> None:
    self._channel.close()


__all__ = ["BlockStoreCore", "GrpcBlockSource", "PeerServicer",
           "StoreMetrics", "StoreServicer", "check_hashes", "check_layout",
           "layout_from_proto", "layout_to_proto", "store_info"]
