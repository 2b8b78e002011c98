"""Shared KV: blocks held elsewhere in the deployment, as a prefill worker's
third cache tier (after its device pool and its host tier).

A prefill worker caches prompt blocks (``PrefillKVStore``); without this
module a prefix cached on another worker is recomputed. Here a worker that
misses locally asks, in order:

1. the *peers* the router names in the request (``PrefillRequest
   .kv_sources``: other prefill workers whose published block sets, mirrored
   by the router, hold more of the prompt's leading blocks than this one),
   best first;
2. the *store* of its host, if one is configured (``python -m
   pdjax.launch.kvstore``): a process holding, in host memory and on local
   disk, the blocks the workers of its host write through to it (every
   block a prefill computes, as LMCache and Mooncake Store keep them), so a
   prefix outlives the worker that computed it and its device pool's LRU.

Blocks move host-staged over gRPC (``FetchBlocks``: the source copies them
to its host, streams them, each with its CRC, and they land in this
worker's host tier) on every transport; in a ``device`` transport
deployment a peer's blocks are pulled instead, device to device
(``PullBlocks``, ``pdjax.transfer.block_pulls``; a store's are always
streamed): from a peer on this host, with the CUDA IPC fast path on, by a
copy into a landing region this worker lends (as a KV hand-off's), else
with ``jax.experimental.transfer``, which is also where a fast-path
problem falls back to. Either way they are uploaded into device pages
exactly like blocks promoted from the host tier
(``HostTierLink.promote_block``, which keeps a host copy): the prefill
then starts after them. ``pulled_cuda_ipc_blocks`` and
``pulled_transfer_blocks`` count the pulled blocks by path. Anything that
goes wrong (a source down, a stream cut, a deadline, a block failing its
checks) ends that source's part: the blocks before it are kept, the rest
is computed, as without this module.

Identity, end to end: blocks are named by the same chained hashes as the
local tiers (tokens, the layout fingerprint and the request's
``cache_salt`` all go into a name). A fetch asks for full names and the
layout (fingerprint, block shape and dtype); every block arriving is
checked against what was asked before it is used (``check_block``): its
name must be the next one asked, its layout equal, its size exact and its
CRC right. So a block of another tenant or another model can only arrive
under a name this request did not compute, and is refused.

Whether to fetch is decided per request and per source (``FetchCosts``):
the predicted fetch time, from a least-squares fit of each source's past
fetches (seconds against bytes), against the prefill it saves, from a fit
of this worker's past prefills (seconds against computed tokens; only the
per-token slope counts, since the rest of the prompt is still prefilled),
both for the blocks expected to come: a hint's count, or, for an unhinted
ask of the store, the asked blocks times the share its recent asks
brought (so a store that lately held nothing costs a round trip per
``EXPLORE_S`` at most). Until a prefill has been measured, a fetch is
assumed worth it. The policy ``always`` fetches whenever a source may
have blocks (tests, benchmarks); ``auto`` only where the fits say it pays.

Blocks reach the store written through (``write="through"``, the
default: every block as a prefill computes it, so the store has a prefix
at once and after any restart) or on eviction (``"evict"``: as the LRU of
the worker's host tier drops it, which moves far fewer bytes but leaves
the store without what the worker still holds).

Threads and ownership: a fetch runs on the tier's helper thread while the
calling engine thread waits (``wait`` lets it serve its own peers
meanwhile: two workers fetching from each other would otherwise each wait
for the other's engine thread). The arrays a fetch returns belong to the
caller. Write-through (``publish``) queues device arrays, bounded in bytes
(beyond the bound blocks are dropped and counted), and one publisher
thread copies them to the host and sends them; each queued array has that
one owner until sent or dropped.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import math
import threading
import time
import zlib
from typing import Any, Callable, Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

POLICIES = ("off", "auto", "always")
# When a worker's blocks go to the store: each new block as it is computed
# ("through"), or each block as it leaves the worker's last tier ("evict").
WRITES = ("through", "evict")
# Blocks sent to the store in one PutBlocks call at most.
PUT_BATCH_BLOCKS = 64
HASH_BYTES = 16
# A fetch asks for at most this many blocks (a 128K-token prompt in 32-token
# pages); servers refuse longer requests.
MAX_FETCH_BLOCKS = 4096
# An unhinted source the cost model declines is still asked once in this
# many seconds, to learn how much it holds again.
EXPLORE_S = 1.0
# The counters RemoteTier.stats reports (metric stats).
STATS = ("fetches", "fetched_blocks", "fetched_bytes", "peer_blocks",
         "store_blocks", "pulled_blocks", "pulled_cuda_ipc_blocks",
         "pulled_transfer_blocks", "declined_blocks",
         "refused_blocks", "failures",
         "published_blocks", "published_bytes", "publish_dropped",
         "publish_failures")
# The paths a pulled block may take (``pulled_<path>_blocks`` counts them).
PULL_PATHS = ("cuda_ipc", "transfer")


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """What must match for a block to be usable here: the layout fingerprint
  (model, dtype, page size), one block's shape ``[2, layers, page_size,
  kv_heads, head_dim]`` (K then V) and its dtype's name."""
  fingerprint: bytes
  shape: tuple[int, ...]
  dtype: str

  @property
  def block_bytes(self) -> int:
    return math.prod(self.shape) * _np_dtype(self.dtype).itemsize


def _np_dtype(name: str) -> np.dtype:
  import ml_dtypes  # noqa: F401 - names bfloat16 & co. for numpy
  return np.dtype(name)


def layout_of(cfg, page_size: int) -> BlockLayout:
  """The block layout of a pool of ``cfg``'s KV in pages of ``page_size``."""
  from pdjax.engine.prefix_cache import layout_fingerprint
  return BlockLayout(layout_fingerprint(cfg, page_size),
                     (2, cfg.num_layers, page_size, cfg.num_kv_heads,
                      cfg.head_dim), str(np.dtype(cfg.jnp_dtype)))


class BlockRefused(ValueError):
  """A block that failed the checks on arrival (not used)."""


def check_block(layout: BlockLayout, want_hash: bytes, got_hash: bytes,
                got_layout: BlockLayout, data: bytes, crc: int) -> np.ndarray:
  """The block as an array of ``layout``, or BlockRefused: it must be the
  block asked for (``want_hash``), of this layout, whole and intact."""
  if got_hash != want_hash:
    raise BlockRefused(f"block {got_hash.hex()[:16]} arrived where "
                       f"{want_hash.hex()[:16]} was asked for")
  if got_layout.fingerprint != layout.fingerprint:
    raise BlockRefused("block of another model or layout (fingerprint "
                       f"{got_layout.fingerprint.hex()[:16]}, this worker's "
                       f"{layout.fingerprint.hex()[:16]})")
  if (tuple(got_layout.shape) != tuple(layout.shape)
      or got_layout.dtype != layout.dtype):
    raise BlockRefused(f"block of shape {tuple(got_layout.shape)} "
                       f"{got_layout.dtype}, expected {layout.shape} "
                       f"{layout.dtype}")
  if len(data) != layout.block_bytes:
    raise BlockRefused(f"block has {len(data)} bytes, expected "
                       f"{layout.block_bytes}")
  if zlib.crc32(data) != crc:
    raise BlockRefused(f"CRC mismatch in block {got_hash.hex()[:16]}")
  return np.frombuffer(data, _np_dtype(layout.dtype)).reshape(layout.shape)


def check_pulled(layout: BlockLayout, want: Sequence[bytes],
                 names: Sequence[bytes], got_layout: BlockLayout, array
                 ) -> None:
  """BlockRefused unless a pulled run is a leading run of the names asked
  for, of this layout, one block ``[2, L, P, K, hd]`` per name. (Device
  data carries no CRC: it moves device to device, by a CUDA IPC copy or
  the transfer's own checked transport.)"""
  if list(names) != list(want[:len(names)]):
    raise BlockRefused("the pulled blocks are not the ones asked for")
  if got_layout != layout:
    raise BlockRefused("pulled blocks of another model or layout")
  if (tuple(array.shape) != (len(names), *layout.shape)
      or str(np.dtype(array.dtype)) != layout.dtype):
    raise BlockRefused(f"pulled array {tuple(array.shape)} {array.dtype}, "
                       f"expected {(len(names), *layout.shape)} "
                       f"{layout.dtype}")


class BlockSource:
  """A place blocks can be fetched from (and, for a store, kept in), as the
  remote tier reaches it (``pdjax.service.kvstore.GrpcBlockSource``)."""

  address: str = ""
  # Whether ``pull`` may work: the blocks move device to device (CUDA IPC
  # or ``jax.experimental.transfer``) instead of through both hosts.
  can_pull: bool = False

  def pull(self, layout: BlockLayout, hashes: Sequence[bytes], *,
           timeout_s: float):
    """(names, layout, device array ``[n, 2, L, P, K, hd]``, path) of the
    leading run held there, pulled onto this worker's device by ``path``
    (one of ``PULL_PATHS``; the array None and the path "" when none is
    held); raises NotImplementedError where the source cannot offer device
    pulls."""
    raise NotImplementedError

  def fetch(self, layout: BlockLayout, hashes: Sequence[bytes], *,
            timeout_s: float
            ) -> Iterator[tuple[bytes, BlockLayout, bytes, int]]:
    """(name, layout, bytes, crc32) of the leading run of ``hashes`` held
    there, in order, as they arrive; raises on failure."""
    raise NotImplementedError

  def put(self, layout: BlockLayout, blocks: Sequence[tuple[bytes, bytes]],
          *, timeout_s: float) -> None:
    """Keeps (name, bytes) blocks there; raises on failure."""
    raise NotImplementedError

  def close(self) -> None:
    pass


# ------------------------------------------------------------------ costs
class LinearFit:
  """An exponentially weighted least-squares fit of ``y = a + b * x``.

  ``decay`` < 1 forgets old observations (a rate that changes with load is
  followed). With too little spread in ``x`` (or a slope that comes out
  negative, noise) the slope is the mean ratio ``y / x``, which counts a
  fixed cost as per-unit cost; with ``x`` all 0, ``y`` is the constant.
  """

  def __init__(self, decay: float = 0.95):
    self.decay = decay
    self.n = 0
    self._w = self._x = self._y = self._xx = self._xy = 0.0

  def add(self, x: float, y: float) -> None:
    d = self.decay
    self._w = d * self._w + 1.0
    self._x = d * self._x + x
    self._y = d * self._y + y
    self._xx = d * self._xx + x * x
    self._xy = d * self._xy + x * y
    self.n += 1

  def coefficients(self) -> tuple[float, float] | None:
    """(a, b), or None before any observation."""
    if not self.n:
      return None
    mx, my = self._x / self._w, self._y / self._w
    var = self._xx / self._w - mx * mx
    if var > 1e-9 * max(mx * mx, 1.0):
      b = (self._xy / self._w - mx * my) / var
      if b > 0:
        return max(my - b * mx, 0.0), b
    # One x only: all of y per unit of x, or (x = 0) a constant.
    return (0.0, my / mx) if mx > 0 else (my, 0.0)


class FetchCosts:
  """Predicts a fetch's time per source and the prefill time it saves.

  Sources start from a prior (``prior_latency_s`` + bytes at
  ``prior_bytes_per_s``) until they have been measured twice.
  """

  def __init__(self, block_bytes: int, page_size: int, *,
               prior_latency_s: float = 2e-3,
               prior_bytes_per_s: float = 1e9):
    self.block_bytes = block_bytes
    self.page_size = page_size
    self.prior = (prior_latency_s, 1.0 / prior_bytes_per_s)
    self.prefill = LinearFit()
    self._fetch: dict[str, LinearFit] = {}
    self._lock = threading.Lock()

  def observe_prefill(self, tokens: int, seconds: float) -> None:
    if tokens > 0 and seconds > 0:
      with self._lock:
        self.prefill.add(float(tokens), seconds)

  def observe_fetch(self, source: str, nbytes: int, seconds: float) -> None:
    with self._lock:
      self._fetch.setdefault(source, LinearFit()).add(float(nbytes), seconds)

  def fetch_s(self, source: str, blocks: float) -> float:
    with self._lock:
      fit = self._fetch.get(source)
      coef = fit.coefficients() if fit is not None and fit.n >= 2 else None
    a, b = coef or self.prior
    return a + b * blocks * self.block_bytes

  def saved_s(self, blocks: float) -> float | None:
    """Prefill seconds ``blocks`` cached blocks save (None: unmeasured)."""
    with self._lock:
      coef = self.prefill.coefficients()
    if coef is None:
      return None
    return coef[1] * blocks * self.page_size

  def worth(self, source: str, blocks: float) -> bool:
    """Whether fetching ``blocks`` (the number expected to come) from
    ``source`` is predicted faster than computing them."""
    saved = self.saved_s(blocks)
    return saved is None or self.fetch_s(source, blocks) < saved


# ------------------------------------------------------------------ tier
class _Down:
  """Sources that failed lately, skipped until their backoff ends."""

  def __init__(self, clock, first_s: float = 0.5, max_s: float = 30.0):
    self._clock = clock
    self._first, self._max = first_s, max_s
    self._until: dict[str, tuple[float, float]] = {}
    self._lock = threading.Lock()

  def failed(self, source: str) -> None:
    with self._lock:
      _, backoff = self._until.get(source, (0.0, self._first / 2))
      backoff = min(backoff * 2, self._max)
      self._until[source] = (self._clock() + backoff, backoff)

  def ok(self, source: str) -> None:
    with self._lock:
      self._until.pop(source, None)

  def down(self, source: str) -> bool:
    with self._lock:
      entry = self._until.get(source)
    return entry is not None and self._clock() < entry[0]


class RemoteTier:
  """Where a prefill store fetches blocks it lacks, and writes its new
  blocks through to (module doc).

  ``connect(address) -> BlockSource`` reaches a peer or the store (one
  source per address, kept). ``store``: the host's store address, or None.
  """

  def __init__(self, layout: BlockLayout, page_size: int,
               connect: Callable[[str], BlockSource], *,
               store: str | None = None, policy: str = "auto",
               timeout_s: float = 2.0, publish_bytes: int = 256 << 20,
               self_address: str = "", clock=time.monotonic,
               on_fetch: Callable[[str, int, int, float], None] | None = None,
               write: str = "through", pulls=None):
    """``on_fetch(kind, blocks, bytes, seconds)``: told of every fetch that
    brought blocks (kind "peer" or "store"), e.g. for a histogram.
    ``write``: when blocks go to the store (``WRITES``). ``pulls``: the
    device pulls the sources ``connect`` makes share
    (``pdjax.transfer.block_pulls.AutoBlockPulls``), closed with the
    tier."""
    if policy not in POLICIES or policy == "off":
      raise ValueError(f"a remote tier's policy is 'auto' or 'always', got "
                       f"{policy!r}")
    if write not in WRITES:
      raise ValueError(f"store writes are one of {WRITES}, got {write!r}")
    self.write = write
    if timeout_s <= 0:
      raise ValueError(f"fetch timeout must be > 0, got {timeout_s}")
    self.layout = layout
    self.policy = policy
    self.timeout_s = timeout_s
    self.store = store or None
    self.self_address = self_address
    self.costs = FetchCosts(layout.block_bytes, page_size)
    self.stats = collections.Counter({s: 0 for s in STATS})
    self._connect = connect
    self._pulls = pulls
    self._sources: dict[str, BlockSource] = {}
    self._no_pull: set[str] = set()
    self._down = _Down(clock)
    self._clock = clock
    self._yield: dict[str, float] = {}     # unhinted asks: got / asked
    self._asked_at: dict[str, float] = {}
    self._lock = threading.Lock()
    self._on_fetch = on_fetch
    self._pool = concurrent.futures.ThreadPoolExecutor(
        2, thread_name_prefix="kv-fetch")
    # Write-through: (name, device array) batches for the publisher.
    self.publish_bytes = publish_bytes
    self._queue: collections.deque = collections.deque()
    self._queued_bytes = 0
    self._cond = threading.Condition()
    self._closed = False
    self._publisher = None
    if self.store is not None:
      self._publisher = threading.Thread(target=self._publish_loop,
                                         daemon=True, name="kv-publish")
      self._publisher.start()

  @property
  def publishes(self) -> bool:
    """Whether blocks are written to a store (``write`` says when)."""
    return self.store is not None

  def _source(self, address: str) -> BlockSource:
    with self._lock:
      src = self._sources.get(address)
      if src is None:
        src = self._sources[address] = self._connect(address)
      return src

  def count(self, stat: str, n: int = 1) -> None:
    with self._lock:
      self.stats[stat] += n

  # ---------------------------------------------------------------- fetch
  def plan(self, num_hashes: int, first: int,
           sources: Sequence[tuple[str, int]] = ()
           ) -> list[tuple[str, str, int, bool]]:
    """(kind, address, blocks it may hold, hinted) to ask, in order: the
    hinted peers best first (their counts include the ``first`` blocks
    held here), then, unhinted, the store for whatever is left."""
    out = []
    seen = {self.self_address}
    for address, blocks in sorted(sources, key=lambda s: -s[1]):
      if address in seen or min(blocks, num_hashes) <= first:
        continue
      seen.add(address)
      kind = "store" if address == self.store else "peer"
      out.append((kind, address, min(blocks, num_hashes), True))
    if self.store is not None and self.store not in seen:
      out.append(("store", self.store, num_hashes, False))
    return out

  def expected(self, address: str, n: int) -> float:
    """Blocks an unhinted ask for ``n`` is expected to bring: ``n`` times
    the share of what was asked that came, lately."""
    with self._lock:
      return n * self._yield.get(address, 1.0)

  def _learn_yield(self, address: str, asked: int, got: int) -> None:
    with self._lock:
      old = self._yield.get(address, 1.0)
      self._yield[address] = 0.5 * old + 0.5 * (got / max(asked, 1))
      self._asked_at[address] = self._clock()

  def _explore(self, address: str) -> bool:
    """Whether an unhinted source not worth asking is asked anyway, to
    learn its yield again (once per ``EXPLORE_S``)."""
    with self._lock:
      return self._clock() - self._asked_at.get(address, -1e9) > EXPLORE_S

  def fetch(self, hashes: Sequence[bytes], first: int,
            sources: Sequence[tuple[str, int]] = (),
            wait: Callable[[concurrent.futures.Future], Any] | None = None
            ) -> list[tuple[bytes, np.ndarray]]:
    """Blocks ``first ..`` of ``hashes`` (a prompt's names; the first
    ``first`` are held here), as (name, array) of the leading run found
    elsewhere: host arrays, or device arrays where a peer's blocks were
    pulled. Never raises: a source that fails gives what it had checked
    before failing, and the next one is asked."""
    got: list[tuple[bytes, Any]] = []
    for kind, address, blocks, hinted in self.plan(len(hashes), first,
                                                    sources):
      start = first + len(got)
      n = blocks - start
      if n <= 0:
        continue
      if self._down.down(address):
        continue
      # A hint says how many are there; an unhinted ask (the store, for
      # what the router's mirror had not seen) brings what it lately did.
      expect = n if hinted else self.expected(address, n)
      if (self.policy == "auto" and not self.costs.worth(address, expect)
          and (hinted or not self._explore(address))):
        self.count("declined_blocks", n)
        continue
      want = list(hashes[start:start + n])
      fut = self._pool.submit(self._fetch_from, kind, address, want)
      try:
        part = wait(fut) if wait is not None else fut.result()
      except Exception:  # noqa: BLE001 - _fetch_from reports its own
        log.exception("fetching KV blocks from %s failed", address)
        part = []
      if not hinted:
        self._learn_yield(address, n, len(part))
      got.extend(part)
      if first + len(got) >= len(hashes):
        break
    return got

  def _fetch_from(self, kind: str, address: str, want: list[bytes]
                  ) -> list[tuple[bytes, Any]]:
    out: list[tuple[bytes, Any]] = []
    t0 = time.perf_counter()
    nbytes = 0
    failed = False
    pulled = False
    path = ""
    try:
      src = self._source(address)
      if kind == "peer" and src.can_pull and address not in self._no_pull:
        try:
          names, got_layout, array, path = src.pull(
              self.layout, want, timeout_s=self.timeout_s)
          pulled = True
        except NotImplementedError:
          self._no_pull.add(address)   # a peer without a transfer server
      if pulled:
        if names:
          check_pulled(self.layout, want, names, got_layout, array)
          out = [(h, array[i]) for i, h in enumerate(names)]
          nbytes = len(out) * self.layout.block_bytes
      stream = () if pulled else src.fetch(self.layout, want,
                                           timeout_s=self.timeout_s)
      for got_hash, got_layout, data, crc in stream:
        if len(out) >= len(want):
          raise BlockRefused("more blocks arrived than were asked for")
        arr = check_block(self.layout, want[len(out)], got_hash, got_layout,
                          data, crc)
        out.append((got_hash, arr))
        nbytes += len(data)
    except BlockRefused as e:
      log.warning("refused a KV block from %s: %s", address, e)
      self.count("refused_blocks")
      failed = True
    except Exception as e:  # noqa: BLE001 - a source is never trusted
      log.warning("fetching KV blocks from %s failed after %d of %d: %s",
                  address, len(out), len(want), e)
      failed = True
    seconds = time.perf_counter() - t0
    with self._lock:
      self.stats["fetches"] += 1
      if failed:
        self.stats["failures"] += 1
      self.stats["fetched_blocks"] += len(out)
      self.stats["fetched_bytes"] += nbytes
      self.stats[f"{kind}_blocks"] += len(out)
      if pulled:
        self.stats["pulled_blocks"] += len(out)
        if path in PULL_PATHS:
          self.stats[f"pulled_{path}_blocks"] += len(out)
    if failed:
      self._down.failed(address)
    else:
      self._down.ok(address)
      # Only whole fetches teach the cost model (a cut one's time says
      # nothing about its size).
      self.costs.observe_fetch(address, max(nbytes, 0), seconds)
    if out and self._on_fetch is not None:
      self._on_fetch(kind, len(out), nbytes, seconds)
    return out

  # ---------------------------------------------------------------- publish
  def publish(self, blocks: Sequence[tuple[bytes, Any]]) -> None:
    """Queues (name, array) blocks for the store (write-through): arrays
    may still be computing on the device; the publisher copies them to the
    host. Past ``publish_bytes`` queued, blocks are dropped (counted)."""
    if self._publisher is None or not blocks:
      return
    size = len(blocks) * self.layout.block_bytes
    with self._cond:
      full = self._queued_bytes + size > self.publish_bytes
      if not full:
        self._queue.append(list(blocks))
        self._queued_bytes += size
        self._cond.notify()
    if full:
      self.count("publish_dropped", len(blocks))

  def _publish_loop(self) -> None:
    while True:
      with self._cond:
        while not self._queue and not self._closed:
          self._cond.wait()
        if self._closed:
          return
        # One call for what is queued (up to PUT_BATCH_BLOCKS): evictions
        # come one block at a time.
        batch = self._queue.popleft()
        while (self._queue and len(batch) + len(self._queue[0])
               <= PUT_BATCH_BLOCKS):
          batch = batch + self._queue.popleft()
      size = len(batch) * self.layout.block_bytes
      try:
        if self._down.down(self.store):
          self.count("publish_dropped", len(batch))
          continue
        host = [(h, np.ascontiguousarray(np.asarray(a)).tobytes())
                for h, a in batch]
        self._source(self.store).put(self.layout, host,
                                     timeout_s=self.timeout_s)
        self._down.ok(self.store)
        with self._lock:
          self.stats["published_blocks"] += len(batch)
          self.stats["published_bytes"] += size
      except Exception as e:  # noqa: BLE001 - the store is optional
        log.warning("writing %d KV blocks through to the store %s failed: "
                    "%s", len(batch), self.store, e)
        self._down.failed(self.store)
        with self._lock:
          self.stats["publish_failures"] += 1
          self.stats["publish_dropped"] += len(batch)
      finally:
        del batch
        with self._cond:
          self._queued_bytes -= size
          self._cond.notify_all()

  def flush_publish(self, timeout_s: float = 10.0) -> bool:
    """Waits until every queued block was sent or dropped (tests, drain)."""
    deadline = time.monotonic() + timeout_s
    with self._cond:
      while self._queued_bytes and time.monotonic() < deadline:
        self._cond.wait(0.05)
      return not self._queued_bytes

  def snapshot(self) -> dict[str, int]:
    with self._lock:
      return dict(self.stats)

  def close(self) -> None:
    with self._cond:
      self._closed = True
      self._queue.clear()
      self._queued_bytes = 0
      self._cond.notify_all()
    self._pool.shutdown(wait=False, cancel_futures=True)
    with self._lock:
      sources, self._sources = list(self._sources.values()), {}
    for s in sources:
      s.close()
    if self._pulls is not None:
      self._pulls.close()


__all__ = ["BlockLayout", "BlockRefused", "BlockSource", "FetchCosts",
           "LinearFit", "MAX_FETCH_BLOCKS", "POLICIES", "PULL_PATHS",
           "RemoteTier",
           "STATS", "WRITES", "check_block", "check_pulled", "layout_of"]
