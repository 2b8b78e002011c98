"""The prefill worker: the ``Prefill`` gRPC service around a PrefillEngine.

Lifecycle of a request here:

  1. ``Prefill`` validates and queues it (bounded: RESOURCE_EXHAUSTED past
     ``max_queue``) and waits, within the caller's deadline.
  2. The batcher thread takes up to ``max_batch`` queued requests, skipping
     those whose caller has gone, and runs one prefill.
  3. Each result's KV goes to a sender thread that hands it to the chosen
     decode worker through the deployment's transport, so the next batch's
     prefill overlaps this batch's transfer.
  4. The call streams the first token as soon as it is known (its KV may
     still be moving: the first token's wait does not include the hand-off),
     then the KV handle once it is sent; the KV stays owned by the transport
     until the decode side confirms (``ReleaseKv``) or its TTL expires.

Where to send the KV: the router usually reserves the decode worker's room
beside the prefill rather than before it (``pdjax.service.router``), so a
request may come with its destination pending (``destination_pending``:
only the transport and the transfer id). The rest comes by
``CompleteDestination``, keyed by that transfer id (``PendingDestinations``:
whichever of the two calls arrives first makes the entry). Only the
hand-off waits for it, within the hand-off's time (``transfer_timeout_s``
and the caller's deadline), and so does a same-host landing region's ask
(``LendLanding`` redeems only a transfer id the decode worker issued at
Reserve). The router, when it cannot reserve, cancels the Prefill call
instead: the KV is dropped unsent. A destination whose call never came is
forgotten after ``PendingDestinations.ttl_s``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import random
import threading
import time

import grpc

from pdjax.engine import host_tier  # host KV tier metrics
from pdjax.engine.api import PrefillBackend
from pdjax.engine.requests import PrefillRequest, RequestKV
from pdjax.engine.sampling import InvalidRequest
from pdjax.service import common, kv_router
from pdjax.service.call_sessions import CallSessions, SessionMessages
from pdjax.service.landing import LandingRequests
from pdjax.service.loop_handover import hand_over
from pdjax.service.metrics import Metrics
from pdjax.service.validation import check_prompt_ids, sampling_from_proto
from pdjax.transfer.base import (KvSender, TransferError, TransferTimeout,
                                 handle_for)
from pdjax.v1 import (common_pb2, kv_pb2, prefill_pb2,
                      prefill_pb2_grpc)

log = logging.getLogger(__name__)

# Put in the queue to wake the batcher without a request: a peer waits for
# blocks only its thread may read (``PrefixStore.serve_peers``).
_WAKE = object()


class PendingDestinations:
  """Destinations completed after their Prefill call started, by transfer
  id: one future each, made by whichever of the Prefill call (``awaited``)
  and ``CompleteDestination`` (``complete``) comes first. The Prefill call
  drops its entry when it ends; an entry whose call never came (it failed
  on the way) is dropped by ``reap`` after ``ttl_s``."""

  def __init__(self, ttl_s: float = 60.0):
    self.ttl_s = ttl_s
    self._entries: dict[str, tuple[concurrent.futures.Future, float]] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._entries)

  def _entry(self, transfer_id: str) -> concurrent.futures.Future:
    with self._lock:
      entry = self._entries.get(transfer_id)
      if entry is None:
        entry = self._entries[transfer_id] = (concurrent.futures.Future(),
                                              time.monotonic())
      return entry[0]

  def awaited(self, transfer_id: str) -> concurrent.futures.Future:
    """The future the Prefill call's hand-off waits on."""
    return self._entry(transfer_id)

  def complete(self, dest: kv_pb2.KvDestination) -> None:
    """The whole destination of ``dest.transfer_id`` (a repeat is
    ignored: the first one is where the KV goes)."""
    try:
      self._entry(dest.transfer_id).set_result(dest)
    except concurrent.futures.InvalidStateError:
      pass   # a repeat, or its call has ended

  def drop(self, transfer_id: str) -> None:
    """The Prefill call ended: a hand-off still waiting stops (cancelled)."""
    with self._lock:
      entry = self._entries.pop(transfer_id, None)
    if entry is not None:
      entry[0].cancel()

  def reap(self) -> int:
    """Drops the entries older than ``ttl_s`` (their call never came)."""
    cutoff = time.monotonic() - self.ttl_s
    with self._lock:
      old = [t for t, (_, made) in self._entries.items() if made < cutoff]
    for t in old:
      self.drop(t)
    return len(old)


@dataclasses.dataclass
class _Job:
  request: PrefillRequest
  destination: kv_pb2.KvDestination
  deadline: float | None
  first: asyncio.Future    # the first token's message
  future: asyncio.Future   # the KV handle's message, once it is sent
  loop: asyncio.AbstractEventLoop
  enqueued: float = dataclasses.field(default_factory=time.monotonic)
  queue_s: float = 0.0     # enqueued -> its batch started
  # Same-host IPC: the asking of a LendLanding (a future of its pending
  # answer, or of None where the hand-off cannot use a region).
  landing: concurrent.futures.Future | None = None
  # A pending destination (``destination_pending``): the whole one, once
  # the router's reservation is made (PendingDestinations); None where
  # ``destination`` is whole already.
  completed: concurrent.futures.Future | None = None
  # How long its hand-off waits for a pending destination (set when it
  # starts waiting).
  destination_timeout_s: float = 0.0

  def resolve_first(self, message: prefill_pb2.PrefillResponse) -> None:
    """The first token's message, handed over to the loop (the caller, the
    engine's thread, waits briefly for it to be sent on: ``loop_handover``)."""
    def done():
      if not self.first.done():
        self.first.set_result(message)
    hand_over(self.loop, done)

  def resolve(self, value=None, error: BaseException | None = None) -> None:
    """The call's end: the handle's message, or the error (its caller
    waits on the first message until that is out, then on this one)."""
    def done():
      target = self.future if self.first.done() else self.first
      if target.done():
        return
      if error is not None:
        target.set_exception(error)
      else:
        target.set_result(value)
    self.loop.call_soon_threadsafe(done)

  @property
  def abandoned(self) -> bool:
    """The caller went away (cancelled its RPC); resolving is not that."""
    return self.future.cancelled()


class PrefillWorker:
  """Owns the engine, the queue, the batcher and the sender threads."""

  def __init__(self, engine: PrefillBackend, sender: KvSender, *,
               metrics: Metrics | None = None, max_queue: int = 256,
               transfer_timeout_s: float = 30.0, sender_threads: int = 4,
               fault_drop_kv: float = 0.0,
               landing: LandingRequests | None = None,
               batch_delay_s: tuple[float, float] = (0.0, 0.0)):
    """``landing``: asks same-host decode workers for CUDA IPC landing
    regions as each prefill starts (None: the sender cannot use them).
    ``batch_delay_s`` (a, b): a sleep of a + b x prompt tokens before each
    batch's prefill (the CPU demos' stand-in for an accelerator's time;
    never in serving)."""
    self.batch_delay_s = batch_delay_s
    self.engine = engine
    self.sender = sender
    self.landing = landing
    self.metrics = metrics or Metrics("prefill")
    self.max_queue = max_queue
    self.transfer_timeout_s = transfer_timeout_s
    # Fault injection (tests only): this share of hand-offs silently
    # delivers nothing, as a peer that died mid-transfer would.
    self.fault_drop_kv = fault_drop_kv
    self._rng = random.Random()
    self._queue: queue.Queue[_Job | None] = queue.Queue()
    # A hand-off occupies its thread from its destination known (at
    # dispatch, or when a pending one comes: ``_submit_hand_off``) to its
    # answer: two batches' worth, so the next batch's hand-offs never queue
    # behind this one's.
    self._pool = concurrent.futures.ThreadPoolExecutor(
        max(sender_threads, 2 * engine.config.max_batch),
        thread_name_prefix="kv-send")
    self._running = 0
    # Destinations the router completes after the prefill started.
    self.destinations = PendingDestinations()
    # Hand-offs waiting for theirs, by transfer id: (job, KV, its result's
    # future, when it stops waiting); queued on the pool by whichever of the
    # destination and the reaper comes first.
    self._waiting: dict[str, tuple] = {}
    self._waiting_lock = threading.Lock()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._batch_loop, daemon=True,
                                    name="prefill-batcher")
    self._reaper = threading.Thread(target=self._reap_loop, daemon=True,
                                    name="kv-reaper")
    self._count_lock = threading.Lock()
    self.draining = False
    # The memory gauges' devices: this process's part of the pool's mesh.
    self._devices = engine.mesh.local_devices
    # --- shared KV: peers' fetches are read on the batcher's thread ---
    self._wake_pending = threading.Event()
    store = engine.prefix_store
    if store is not None and store.remote is not None:
      store.wake = self._wake

  def _wake(self) -> None:
    if not self._wake_pending.is_set():
      self._wake_pending.set()
      self._queue.put(_WAKE)

  def _serve_peers(self) -> None:
    store = self.engine.prefix_store
    if store is not None:
      try:
        store.serve_peers()
      except Exception:  # noqa: BLE001 - a peer recomputes
        log.exception("serving blocks to peers failed")

  def start(self) -> None:
    self._thread.start()
    self._reaper.start()

  def _reap_loop(self) -> None:
    """Frees KV no decode worker claimed within its TTL, and lets
    hand-offs past their wait for a destination go on (to fail); publishes
    the live count (it must return to zero when idle)."""
    while not self._stop.wait(0.25):
      try:
        self.sender.reap()
        self.destinations.reap()
        self._expire_destination_waits()
        self.metrics.kv_live.labels("prefill_held").set(self.sender.live())
        store = self.engine.prefix_store
        if store is not None:
          for stat, n in store.block_stats().items():
            self.metrics.cache_blocks.labels("prefill", stat).set(n)
          # --- host KV tier: its counters and size ---
          link = store.host_tier
          if link is not None:
            tier_stats = link.tier.stats
            for stat in host_tier.STATS:
              self.metrics.cache_blocks.labels("prefill_host", stat).set(
                  tier_stats[stat])
          # --- end host KV tier ---
          # --- shared KV: fetched, declined, published, served ---
          if store.remote is not None:
            for stat, n in store.remote.snapshot().items():
              self.metrics.cache_blocks.labels("prefill_remote", stat).set(n)
            for stat, n in store.stats.items():
              self.metrics.cache_blocks.labels("prefill_peers", stat).set(n)
        self.metrics.running.set(self._running)
        self.metrics.observe_device_memory(self._devices)
      except Exception:  # noqa: BLE001
        log.exception("KV reaper failed")

  def _add_running(self, n: int) -> None:
    with self._count_lock:
      self._running += n

  def stop(self) -> None:
    self._stop.set()
    self._queue.put(None)
    self._thread.join(timeout=10)
    self._pool.shutdown(wait=False, cancel_futures=True)
    if self.landing is not None:
      self.landing.close()
    store = self.engine.prefix_store
    if store is not None and store.remote is not None:
      store.remote.close()
    self.engine.close()   # a pool spanning processes stops its followers

  def active(self) -> int:
    """Requests queued or being prefilled/handed off (drain waits)."""
    return self.queued + self._running

  @property
  def queued(self) -> int:
    return max(0, self._queue.qsize() - self._wake_pending.is_set())

  @property
  def running(self) -> int:
    return self._running

  def submit(self, job: _Job) -> None:
    if self.queued >= self.max_queue:
      raise OverflowError(f"prefill queue is full ({self.max_queue} waiting);"
                          " retry later or on another worker")
    self._queue.put(job)
    self.metrics.queue_length.set(self.queued)

  # ---------------------------------------------------------------- threads
  def _take_batch(self) -> list[_Job]:
    job = self._queue.get()
    if job is _WAKE:
      self._wake_pending.clear()
      return []
    if job is None:
      return []
    jobs = [job]
    while len(jobs) < self.engine.config.max_batch:
      try:
        nxt = self._queue.get_nowait()
      except queue.Empty:
        break
      if nxt is _WAKE:
        self._wake_pending.clear()
        continue
      if nxt is None:
        self._stop.set()
        break
      jobs.append(nxt)
    return jobs

  def _batch_loop(self) -> None:
    while not self._stop.is_set():
      jobs = self._take_batch()
      self._serve_peers()   # shared KV: blocks peers asked for
      self.metrics.queue_length.set(self.queued)
      now = time.monotonic()
      live = []
      for j in jobs:
        if j.abandoned:
          continue
        if j.deadline is not None and now > j.deadline:
          j.resolve(error=TimeoutError("deadline passed while queued"))
          continue
        live.append(j)
      if not live:
        continue
      self._add_running(len(live))
      if self.landing is not None:
        for j in live:
          self._start_landing(j)
      # Hand-offs start as soon as each request's KV is dispatched: they
      # wait for its programs (layer group by layer group, where the engine
      # runs groups) and move it while the rest of the prefill computes.
      # Each request is answered once its own first token is known, not
      # the batch's last (the engine runs cached-prefix requests one by
      # one): one future per request.
      t0 = time.perf_counter()
      started = time.monotonic()
      for j in live:
        j.queue_s = started - j.enqueued
        self.metrics.ttft_stage.labels("queue").observe(j.queue_s)
      done = [concurrent.futures.Future() for _ in live]
      started: set[int] = set()

      def kv_ready(i, kv, live=live, done=done, started=started):
        started.add(i)
        self._submit_hand_off(live[i], kv, done[i])

      def on_result(i, r, done=done, t0=t0, live=live):
        now = time.perf_counter()
        self._first_token(live[i], r, now - t0)
        done[i].set_result((r, now - t0, now))

      a, b = self.batch_delay_s
      if a or b:
        time.sleep(a + b * sum(len(j.request.prompt_ids) for j in live))
      try:
        results = self.engine.prefill([j.request for j in live],
                                      kv_ready=kv_ready, on_result=on_result)
      except Exception as e:  # noqa: BLE001 - reported to every caller
        log.exception("prefill failed")
        # Requests with a result keep it; the others get the error, through
        # their hand-off where one started.
        for i, j in enumerate(live):
          if not done[i].done():
            done[i].set_exception(e)
          if i not in started:
            j.resolve(error=e)
            self._add_running(-1)
        continue
      now = time.perf_counter()
      self.metrics.prefill_time.observe(now - t0)
      for r in results:
        self.metrics.prefill_tokens.labels("cache").inc(r.cached_tokens)
        self.metrics.prefill_tokens.labels("computed").inc(
            r.prompt_len - r.cached_tokens)
      for i, (j, r) in enumerate(zip(live, results)):
        if not done[i].done():   # an engine that never called on_result
          self._first_token(j, r, now - t0)
          done[i].set_result((r, now - t0, now))
        if i not in started:     # ... or kv_ready
          self._submit_hand_off(j, r.kv, done[i])

  def _first_token(self, job: _Job, result, prefill_s: float) -> None:
    """Answers the first token as soon as it is known: its KV may still be
    on its way to the decode worker."""
    self.metrics.ttft_stage.labels("prefill").observe(prefill_s)
    job.resolve_first(prefill_pb2.PrefillResponse(
        first_token=result.first_token, first_logprob=result.first_logprob,
        prefill_s=prefill_s, cached_tokens=result.cached_tokens,
        queue_s=job.queue_s))

  def _start_landing(self, job: _Job) -> None:
    """Asks for the job's landing region, answered while the prefill runs;
    for a pending destination, once it is complete (the decode worker lends
    only under a transfer id its Reserve issued)."""
    job.landing = concurrent.futures.Future()
    if job.completed is None or job.completed.done():
      # From the pool: starting the calls on the batch thread held the
      # prefill's dispatch up (about 0.4 ms of an H100 worker's time to
      # first token). Queued before the batch's hand-offs, it runs first.
      self._pool.submit(self._ask_landing, job)
    else:
      # On the thread that brings the destination (the event loop's, idle
      # while the prefill computes), not from the pool: its threads may
      # all be hand-offs waiting for these very answers.
      job.completed.add_done_callback(lambda _: self._ask_landing(job))

  def _ask_landing(self, job: _Job) -> None:
    """Resolves ``job.landing`` with the call's pending answer, or None."""
    pending = None
    try:
      if job.completed is None:
        dest = job.destination
      elif job.completed.cancelled():   # the call ended without one
        dest = None
      else:
        dest = job.completed.result()
      if dest is not None:
        pending = self.landing.request(dest, len(job.request.prompt_ids))
    except Exception:  # noqa: BLE001 - costs the fast path, not the request
      log.exception("asking for a landing region failed")
    job.landing.set_result(pending)

  def _handoff_timeout(self, job: _Job) -> float:
    """The hand-off's time: ``transfer_timeout_s``, within the deadline."""
    timeout = self.transfer_timeout_s
    if job.deadline is not None:
      timeout = min(timeout, max(0.001, job.deadline - time.monotonic()))
    return timeout

  def _submit_hand_off(self, job: _Job, kv: RequestKV,
                       done: concurrent.futures.Future) -> None:
    """Queues the job's hand-off on the pool once its destination is known
    (at once where it is), or once the hand-off's time has passed without
    it. A hand-off waiting for a pending destination must not hold a pool
    thread: its reservation may be queued on a full decode pool, and with
    every thread held so, no other request's KV would move, the decode
    pool would admit nothing and free no room, and the reservations would
    wait for that room: a stall until they gave up."""
    completed = job.completed
    if completed is None or completed.done():
      self._pool.submit(self._hand_off, job, kv, done)
      return
    job.destination_timeout_s = self._handoff_timeout(job)
    transfer_id = job.destination.transfer_id
    with self._waiting_lock:
      self._waiting[transfer_id] = (
          job, kv, done, time.monotonic() + job.destination_timeout_s)
    completed.add_done_callback(lambda _: self._queue_waiting(transfer_id))

  def _queue_waiting(self, transfer_id: str) -> None:
    """Queues a waiting hand-off on the pool (once: the destination's
    arrival and the reaper may both ask)."""
    with self._waiting_lock:
      entry = self._waiting.pop(transfer_id, None)
    if entry is None:
      return
    job, kv, done, _ = entry
    try:
      self._pool.submit(self._hand_off, job, kv, done)
    except RuntimeError:   # the worker stopped meanwhile
      pass

  def _expire_destination_waits(self) -> None:
    """The reaper's part: hand-offs whose destination did not come in
    their time go on, to fail with a ``TransferTimeout``."""
    now = time.monotonic()
    with self._waiting_lock:
      late = [t for t, e in self._waiting.items() if e[3] <= now]
    for transfer_id in late:
      self._queue_waiting(transfer_id)

  def _destination(self, job: _Job) -> kv_pb2.KvDestination:
    """Where the job's KV goes: its request's destination, or a pending
    one's completion (``_submit_hand_off`` runs the hand-off once it came,
    or the reaper once its time passed; its caller gone:
    ``concurrent.futures.CancelledError``)."""
    if job.completed is None:
      return job.destination
    try:
      dest = job.completed.result(timeout=0)
    except concurrent.futures.TimeoutError:
      raise TransferTimeout(
          f"no destination for the KV of {job.request.request_id} within "
          f"{job.destination_timeout_s:.1f} s (the router's reservation "
          "never came)") from None
    if dest.skip_pages != job.request.skip_pages:
      # The prefill ran without knowing it: its KV has every page.
      raise InvalidRequest("destination.skip_pages", "differs from the "
                           "pending destination's")
    return dest

  def _hand_off(self, job: _Job, kv: RequestKV,
                done: concurrent.futures.Future):
    """Sends the job's KV (its programs may still be running), then answers
    the caller once its first token is known (``done``: the result, the
    seconds from the batch's start to it, and when it came)."""
    sent = False
    transfer_id = job.destination.transfer_id   # a completion keeps it
    try:
      if job.abandoned:
        return
      t0 = time.perf_counter()   # the hand-off's time includes the lend
      dest = self._destination(job)
      t_destined = time.perf_counter()
      if self.landing is not None and job.landing is not None:
        dest = self.landing.apply(dest, job.landing.result())
      timeout = self._handoff_timeout(job)
      if self.fault_drop_kv and self._rng.random() < self.fault_drop_kv:
        log.warning("fault injection: dropping the KV of %s",
                    job.request.request_id)
        handle = handle_for(kv, self.sender.name, transfer_id)
      else:
        handle = self.sender.send(kv, dest, timeout_s=timeout)
      sent = True
      t_sent = time.perf_counter()
      _, _, t_prefilled = done.result()
      if job.completed is not None:
        # How long the KV waited for its destination once computed (the
        # reservation's time the prefill did not hide).
        self.metrics.destination_wait.observe(
            max(0.0, t_destined - t_prefilled))
      # The hand-off's part after the prefill ended (the first token does
      # not wait for it; the second token does).
      transfer_s = max(0.0, t_sent - max(t0, t_prefilled))
      name = self.sender.name
      self.metrics.transfer_bytes.labels(name, "sent").inc(kv.nbytes)
      if kv.first_page:
        per_page = kv.payload_bytes // kv.shape[2]
        self.metrics.kv_skipped_bytes.labels(name).inc(
            per_page * kv.first_page)
      self.metrics.transfer_time.labels(name, "sent").observe(t_sent - t0)
      job.resolve(prefill_pb2.PrefillResponse(kv=handle,
                                              transfer_s=transfer_s))
      if job.abandoned:
        # The caller left while we were sending: nobody will redeem it.
        self.sender.release(transfer_id)
    except concurrent.futures.CancelledError:
      pass   # the call ended before its destination came: nothing was sent
    except Exception as e:  # noqa: BLE001
      if sent:   # the prefill failed after the KV was sent: nobody redeems it
        self.sender.release(transfer_id)
      else:
        reason = type(e).__name__
        self.metrics.transfer_failures.labels(self.sender.name, reason).inc()
      job.resolve(error=e)
    finally:
      self._add_running(-1)


_SESSION_MESSAGES = SessionMessages(prefill_pb2.PrefillCallEvent,
                                    prefill_pb2.PrefillSessionResponse)


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):

  def __init__(self, worker: PrefillWorker, info: common_pb2.WorkerInfo,
               sessions: CallSessions | None = None):
    """``sessions``: the process's open sessions (``PrefillSession``),
    which its drain ends; a servicer of its own by default."""
    self.worker = worker
    self.info = info
    self.sessions = sessions or CallSessions()

  async def Prefill(self, request: prefill_pb2.PrefillRequest, context):
    async for msg in self._prefill(request, context):
      yield msg

  async def PrefillSession(self, request_iterator, context):
    """Prefill calls as messages on one long-lived stream
    (``pdjax.service.call_sessions``): each runs ``_prefill`` as its own
    call would."""
    await self.sessions.serve(request_iterator, context, self._prefill,
                              _SESSION_MESSAGES)

  async def _prefill(self, request: prefill_pb2.PrefillRequest, context):
    """One Prefill call's body; ``context`` is gRPC's, or a session's
    stand-in for it."""
    w = self.worker
    if w.draining:
      await context.abort(grpc.StatusCode.UNAVAILABLE,
                          "worker is draining; send to another worker")
    cfg = w.engine.cfg
    try:
      sampling = sampling_from_proto(request.sampling,
                                     vocab_size=cfg.vocab_size)
      ids = check_prompt_ids(request.prompt_token_ids,
                             vocab_size=cfg.vocab_size,
                             max_prompt_len=w.engine.config.max_seq_len - 1)
      if not request.destination.transfer_id:
        raise InvalidRequest("destination.transfer_id", "is required")
      if request.destination_pending and request.destination.skip_pages:
        raise InvalidRequest("destination.skip_pages", "a pending "
                             "destination has nothing to skip yet")
    except InvalidRequest as e:
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    remaining = context.time_remaining()
    loop = asyncio.get_running_loop()
    first = loop.create_future()
    job = _Job(PrefillRequest(request.request_id, ids, sampling,
                              request.seed, cache_salt=request.cache_salt,
                              skip_pages=request.destination.skip_pages,
                              kv_sources=[(s.address, s.blocks)
                                          for s in request.kv_sources[:8]]),
               request.destination,
               None if remaining is None else time.monotonic() + remaining,
               first, loop.create_future(), loop)
    if request.destination_pending:
      job.completed = w.destinations.awaited(request.destination.transfer_id)
    try:
      w.submit(job)
    except OverflowError as e:
      self._drop_destination(job)
      await common.abort_exhausted(context, str(e))
    try:
      yield await job.first
      yield await job.future
    except asyncio.CancelledError:
      job.first.cancel()
      job.future.cancel()
      raise
    except TimeoutError as e:
      await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
    except InvalidRequest as e:
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except TransferError as e:
      # The hand-off failed, not this worker: ABORTED tells the router to
      # retry the request without taking the worker out of rotation.
      await context.abort(grpc.StatusCode.ABORTED,
                          f"KV hand-off failed: {e}")
    except Exception as e:  # noqa: BLE001
      log.exception("prefill of %s failed", request.request_id)
      await context.abort(grpc.StatusCode.INTERNAL,
                          f"prefill failed: {type(e).__name__}: {e}")
    finally:
      self._drop_destination(job)

  def _drop_destination(self, job: _Job) -> None:
    """The call ends: a hand-off still waiting for its destination stops."""
    if job.completed is not None:
      self.worker.destinations.drop(job.destination.transfer_id)

  async def CompleteDestination(
      self, request: prefill_pb2.CompleteDestinationRequest, context):
    if not request.destination.transfer_id:
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "destination.transfer_id: is required")
    self.worker.destinations.complete(request.destination)
    return common_pb2.Empty()

  async def ReleaseKv(self, request: prefill_pb2.ReleaseKvRequest, context):
    self.worker.sender.release(request.transfer_id)
    return common_pb2.Empty()

  async def GetWorkerInfo(self, request, context):
    info = common_pb2.WorkerInfo()
    info.CopyFrom(self.info)
    info.draining = self.worker.draining
    info.load.queued = self.worker.queued
    info.load.running = self.worker.running
    # --- KV-aware routing: the block-set changes since the caller's seq ---
    store = self.worker.engine.prefix_store
    kv_router.fill_cache_info(info, store.cache_events if store else None,
                              request.cache_events_since)
    # --- end KV-aware routing ---
    return info


__all__ = ["PendingDestinations", "PrefillWorker", "PrefillServicer"]
