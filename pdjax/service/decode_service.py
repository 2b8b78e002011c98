"""The decode worker: the ``Decode`` (and, for the grpc transport,
``KvTransfer``) gRPC services around a colocated engine.

Lifecycle of a disaggregated request here:

  1. ``Reserve`` (router, usually while the request's prefill already
     runs): decode-side admission. The pages the request holds once its KV
     is in (its prompt's and its first calls'; rows grow their pages as
     they generate) are promised under the router's transfer id, or
     RESOURCE_EXHAUSTED (the router retries until its queue timeout).
     Without the prompt's ids (the prefill runs beside the call, computing
     every page) no cached blocks are pinned.
  2. The prefill worker hands the KV over (pushes it to ``KvTransfer``, or
     registers it for a pull) once the router told it this reservation
     (``Prefill.CompleteDestination``); a hand-off under a transfer id no
     Reserve issued here is refused.
  3. ``Decode`` (router): redeems the handle into the reserved replica's
     layout, confirms to the prefill worker, joins the continuous batch and
     streams tokens. Cancelling the call frees the slot at once.

A request under the local-prefill threshold skips steps 1-2: ``Decode`` with
``local_prefill`` prefills it here (conditional disaggregation); it waits
for capacity in the engine's bounded queue, and one still waiting at the
queue's deadline is answered RESOURCE_EXHAUSTED. A reservation that is
never redeemed expires after ``reservation_ttl_s``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time

import grpc

from pdjax.engine.api import DecodeBackend
from pdjax.engine.requests import (DecodeRequest, FinishReason, RequestKV,
                                   TokenEvent)
from pdjax.engine.sampling import InvalidRequest
from pdjax.service import common, kv_router
from pdjax.service.call_sessions import CallSessions, SessionMessages
from pdjax.service.metrics import Metrics
from pdjax.service.receive_budget import ReceiveBudget, receive_bytes
from pdjax.service.validation import (check_prompt_ids, sampling_from_proto)
from pdjax.service.handoffs import HandoffClosed, Handoffs
from pdjax.service.loop_handover import hand_over
from pdjax.service.room_waiters import RoomWaiters
from pdjax.transfer.base import (KvReceiver, StreamIntake, TransferDenied,
                                 TransferError)
from pdjax.v1 import (common_pb2, decode_pb2, decode_pb2_grpc, kv_pb2,
                      prefill_pb2, prefill_pb2_grpc)

log = logging.getLogger(__name__)

FINISH_TO_PROTO = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}


class EngineLoop:
  """The thread that steps the engine whenever it has work."""

  def __init__(self, engine: DecodeBackend, *, on_tick=None,
               on_iteration=None, step_delay_s: float = 0.0,
               step_delay_per_row_s: float = 0.0):
    """``on_tick()``: about every 0.25 s; ``on_iteration(timing)``: after
    each engine iteration, with its ``IterationTiming``.
    ``step_delay_s`` + ``step_delay_per_row_s`` x live rows: a sleep before
    each step (tests, and the CPU demos that stand in for an accelerator's
    time; never in serving)."""
    self.engine = engine
    self.step_delay_s = step_delay_s
    self.step_delay_per_row_s = step_delay_per_row_s
    self._wake = threading.Event()
    self._stop = threading.Event()
    self._on_tick = on_tick
    self._on_iteration = on_iteration
    self.error: BaseException | None = None
    self._thread = threading.Thread(target=self._run, daemon=True,
                                    name="decode-loop")

  def start(self) -> None:
    self._thread.start()

  def stop(self) -> None:
    self._stop.set()
    self._wake.set()
    self._thread.join(timeout=10)

  def wake(self) -> None:
    self._wake.set()

  def _run(self) -> None:
    last_tick = 0.0
    while not self._stop.is_set():
      try:
        if self.engine.has_work:
          if self.step_delay_s or self.step_delay_per_row_s:
            rows = (self.engine.kv_usage()["rows_live"]
                    if self.step_delay_per_row_s else 0)
            time.sleep(self.step_delay_s + self.step_delay_per_row_s * rows)
          self.engine.step()
          if self._on_iteration:
            self._on_iteration(self.engine.last_iteration())
        else:
          self._wake.wait(0.02)
          self._wake.clear()
        now = time.monotonic()
        if self._on_tick and now - last_tick > 0.25:
          last_tick = now
          self._on_tick()
      except Exception as e:  # noqa: BLE001
        log.exception("decode engine step failed; failing live requests")
        self.error = e
        self.engine.fail_all(f"decode engine failed: {type(e).__name__}: {e}")


class DecodeWorker:
  """Owns the engine, its loop thread and the KV receiver."""

  def __init__(self, engine: DecodeBackend, receiver: KvReceiver, *,
               metrics: Metrics | None = None, security=common.Security(),
               transfer_timeout_s: float = 30.0,
               reservation_ttl_s: float = 60.0,
               fault_step_delay_s: float = 0.0,
               max_streams: int = 1024,
               max_receive_bytes: int = 0,
               step_delay_per_row_s: float = 0.0):
    """``max_receive_bytes``: device memory KV receives in flight may
    allocate at once (``ReceiveBudget``; 0: no bound).
    ``fault_step_delay_s`` + ``step_delay_per_row_s`` x live rows: a sleep
    per engine step (``EngineLoop``; tests and CPU demos only)."""
    self.engine = engine
    self.receiver = receiver
    self.metrics = metrics or Metrics("decode")
    self.security = security
    self.transfer_timeout_s = transfer_timeout_s
    self.reservation_ttl_s = reservation_ttl_s
    self.max_streams = max_streams
    self.receive_budget = ReceiveBudget(max_receive_bytes)
    # The hand-offs reserved here and not yet in the engine: one owner each.
    self.handoffs = Handoffs(engine, receiver, self.receive_budget)
    # Reserve calls waiting for room in a full pool (router's queue policy).
    self.room = RoomWaiters()
    self.streams = 0
    self.draining = False
    self._prefill_channels: dict[str, grpc.aio.Channel] = {}
    self.loop = EngineLoop(engine, on_tick=self._tick,
                           on_iteration=self.metrics.observe_iteration,
                           step_delay_s=fault_step_delay_s,
                           step_delay_per_row_s=step_delay_per_row_s)
    # The memory gauges' devices: this process's part of the pool's mesh.
    self._devices = engine.devices
    self._seen_cached = 0
    self._seen_computed = 0

  def start(self) -> None:
    self.loop.start()

  def stop(self) -> None:
    """Stops stepping, then gives back every borrowed KV the engine holds
    (landing regions) and ends its waiter thread."""
    self.loop.stop()
    self.engine.close()

  def _tick(self) -> None:
    self.handoffs.reap(self.reservation_ttl_s)
    self.receiver.reap()
    usage = self.engine.kv_usage()
    m = self.metrics
    m.kv_pages.labels("used").set(usage["pages_used"])
    m.kv_pages.labels("reserved").set(usage["pages_reserved"])
    m.kv_pages.labels("cached").set(usage["pages_cached"])
    m.kv_pages.labels("available").set(usage["pages_available"])
    # Preempted rows' KV in host memory (swapped out, to come back).
    m.kv_pages.labels("swapped").set(usage.get("pages_swapped", 0))
    m.kv_live.labels("decode_rows").set(usage["rows_live"])
    m.kv_live.labels("reservations").set(usage["reservations"])
    m.kv_live.labels("staged_transfers").set(self.receiver.live())
    m.running.set(usage["rows_live"])
    m.queue_length.set(self.queued)
    m.observe_device_memory(self._devices)
    for event, n in self.engine.preemption_stats().items():
      m.kv_admission.labels(event).set(n)
    # Prefix-cache blocks: the device pools' and the host tier's, if any.
    for pool, stats in self.engine.block_stats().items():
      for stat, n in stats.items():
        m.cache_blocks.labels(pool, stat).set(n)
    # Local prefill (colocated / short prompts): counters advance by the
    # engine's totals since the last tick.
    cached, computed = self.engine.prefill_tokens()
    m.prefill_tokens.labels("cache").inc(cached - self._seen_cached)
    m.prefill_tokens.labels("computed").inc(computed - self._seen_computed)
    self._seen_cached, self._seen_computed = cached, computed

  def active(self) -> int:
    """Requests still being served (drain waits for zero): streams, those
    waiting to join the batch, and reservations not redeemed yet (a
    request whose prompt a prefill worker is computing now)."""
    return (self.streams + self.engine.num_waiting
            + self.engine.kv_usage().get("reservations", 0))

  @property
  def queued(self) -> int:
    """Prompts waiting for this worker's own prefill and pages, and
    Reserve calls waiting for room (the router's queue policy)."""
    return self.engine.num_waiting + self.room.waiting

  def load(self) -> common_pb2.WorkerLoad:
    u = self.engine.kv_usage()
    return common_pb2.WorkerLoad(
        queued=self.queued,
        running=u["rows_live"],
        kv_pages_total=u["pages_total"],
        kv_pages_available=max(u["pages_available"], 0),
        rows_free=u["rows_total"] - u["rows_live"])

  def prefill_stub(self, address: str):
    ch = self._prefill_channels.get(address)
    if ch is None:
      ch = self._prefill_channels[address] = common.make_channel(
          address, self.security, aio=True)
    return prefill_pb2_grpc.PrefillStub(ch)


class EventRelay:
  """Carries token events from the engine's thread to the streams' event
  loop, coalesced: the events an engine iteration delivers to its streams
  (one per live row) wake the loop once, not once per stream, so the
  streams' Python work contends less with the engine's own."""

  def __init__(self, loop: asyncio.AbstractEventLoop):
    self._loop = loop
    self._lock = threading.Lock()
    self._pending: list[tuple[asyncio.Queue, TokenEvent]] = []

  def callback_for(self, q: asyncio.Queue):
    """The engine callback of one stream: its events go to ``q``. A first
    token this worker's prefill made (its event carries ``prefill_s``),
    where the loop has taken every earlier event, is handed over
    (``loop_handover``): the engine thread waits, briefly, for the loop to
    have sent it on. Where events still wait for the loop (it is behind,
    under load), the token joins them and the engine goes on."""
    def callback(ev: TokenEvent) -> None:
      with self._lock:
        wake = not self._pending
        self._pending.append((q, ev))
      if wake and ev.prefill_s:
        hand_over(self._loop, self._flush)
      elif wake:
        self._loop.call_soon_threadsafe(self._flush)
    return callback

  def _flush(self) -> None:
    with self._lock:
      pending, self._pending = self._pending, []
    for q, ev in pending:
      q.put_nowait(ev)


_SESSION_MESSAGES = SessionMessages(decode_pb2.DecodeCallEvent,
                                    decode_pb2.DecodeSessionResponse)


class DecodeServicer(decode_pb2_grpc.DecodeServicer):

  def __init__(self, worker: DecodeWorker, info: common_pb2.WorkerInfo,
               sessions: CallSessions | None = None):
    """``sessions``: the process's open sessions (``DecodeSession``),
    which its drain ends; a servicer of its own by default."""
    self.worker = worker
    self.info = info
    self.sessions = sessions or CallSessions()
    self._relay: EventRelay | None = None

  async def Reserve(self, request: decode_pb2.ReserveRequest, context):
    w = self.worker
    if w.draining:
      await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is draining")
    if not request.transfer_id:
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "transfer_id: is required")
    try:
      ids = list(request.prompt_token_ids) or None
      if ids is not None and len(ids) != request.prompt_tokens:
        raise InvalidRequest("prompt_token_ids", "length differs from "
                             "prompt_tokens")

      def attempt():
        return w.handoffs.reserve(
            request.request_id, request.prompt_tokens, request.max_tokens,
            transfer_id=request.transfer_id, prompt_ids=ids,
            cache_salt=request.cache_salt)

      # A full pool: wait here for room as long as the caller allows
      # (within its deadline), woken as streams end.
      wait_s = request.wait_ms / 1000
      remaining = context.time_remaining() if wait_s else None
      if remaining is not None:
        wait_s = min(wait_s, max(remaining - 0.05, 0.0))
      h = await w.room.wait_for(attempt, wait_s,
                                give_up=lambda: w.draining,
                                waited_s=request.waited_ms / 1000)
    except InvalidRequest as e:
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    if h is None:
      if w.draining:
        await context.abort(grpc.StatusCode.UNAVAILABLE,
                            "worker is draining")
      await common.abort_exhausted(
          context, "decode KV capacity is full; retry later or on another "
          "worker")
    res = h.reservation
    resp = decode_pb2.ReserveResponse(replica=res.replica, pages=res.pages,
                                      cached_blocks=res.cached_blocks)
    # CUDA IPC landing regions are lent later, when the prefill starts
    # (LendLanding below), not here.
    return resp

  async def LendLanding(self, request: decode_pb2.LendLandingRequest,
                        context):
    """A CUDA IPC landing region for a reserved transfer (same-host fast
    path). receiver.forget (Unreserve, expiry, failure) returns it."""
    w = self.worker
    resp = decode_pb2.LendLandingResponse()
    try:
      slot = w.receiver.lend_landing(request.transfer_id,
                                     request.prompt_tokens)
    except TransferError as e:   # not issued here, or already forgotten
      await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
    if slot is not None:
      resp.ipc_handle = slot.handle
      resp.ipc_offset = slot.offset
      resp.ipc_bytes = slot.nbytes
      resp.ipc_device = slot.device
      resp.ipc_deadline_ms = slot.deadline_ms
    return resp

  async def Unreserve(self, request: decode_pb2.UnreserveRequest, context):
    self.worker.handoffs.close(request.request_id)
    self.worker.room.freed()
    return common_pb2.Empty()

  async def GetWorkerInfo(self, request, context):
    info = common_pb2.WorkerInfo()
    info.CopyFrom(self.info)
    info.draining = self.worker.draining
    info.load.CopyFrom(self.worker.load())
    # --- KV-aware routing: the block-set changes since the caller's seq ---
    kv_router.fill_cache_info(
        info, self.worker.engine.cache_events,
        request.cache_events_since)
    # --- end KV-aware routing ---
    return info

  async def Decode(self, request: decode_pb2.DecodeRequest, context):
    async for msg in self._decode(request, context):
      yield msg

  async def DecodeSession(self, request_iterator, context):
    """Decode calls as messages on one long-lived stream
    (``pdjax.service.call_sessions``): each runs ``_decode`` as its own
    call would."""
    await self.sessions.serve(request_iterator, context, self._decode,
                              _SESSION_MESSAGES)

  async def _decode(self, request: decode_pb2.DecodeRequest, context):
    """One Decode call's body; ``context`` is gRPC's, or a session's
    stand-in for it."""
    w = self.worker
    engine = w.engine
    cfg = engine.cfg
    rid = request.request_id
    if w.draining and request.local_prefill:
      await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is draining")
    if w.streams >= w.max_streams:
      await common.abort_exhausted(context, f"{w.streams} streams open")
    try:
      sampling = sampling_from_proto(request.sampling,
                                     vocab_size=cfg.vocab_size)
      ids = check_prompt_ids(request.prompt_token_ids,
                             vocab_size=cfg.vocab_size,
                             max_prompt_len=engine.max_seq_len - 1)
      if not rid:
        raise InvalidRequest("request_id", "is required")
    except InvalidRequest as e:
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    q: asyncio.Queue = asyncio.Queue()
    if self._relay is None:   # the server's loop, known once it serves
      self._relay = EventRelay(asyncio.get_running_loop())
    callback = self._relay.callback_for(q)
    finished = False
    submitted = False   # the engine holds the request (cancel frees it)
    handoff = None      # a remote prefill's, until the engine takes it
    transfer_s = 0.0
    w.streams += 1
    try:
      if request.local_prefill:
        try:
          forced = (request.forced_first_token
                    if request.HasField("forced_first_token") else None)
          if forced is not None and not 0 <= forced < cfg.vocab_size:
            raise InvalidRequest("forced_first_token", "outside the "
                                 "vocabulary")
          engine.submit(rid, ids, sampling, callback, request.seed,
                        forced_first_token=forced,
                        cache_salt=request.cache_salt)
          submitted = True
        except InvalidRequest as e:
          await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except OverflowError as e:
          await common.abort_exhausted(context, str(e))
        w.loop.wake()
      else:
        try:
          # Only the id the router issued for *this* request redeems it.
          handoff = w.handoffs.redeem(rid, request.kv.transfer_id)
        except KeyError:
          await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"no reservation for request {rid!r} (Reserve "
                              "first, or it expired)")
        except TransferDenied as e:
          await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        res = handoff.reservation
        t0 = time.perf_counter()
        timeout_s = _timeout(context, w.transfer_timeout_s)
        try:
          # Memory first (a receive that allocates waits for room), then
          # the KV, both within the one transfer deadline.
          async with handoff.receiving(receive_bytes(request.kv), timeout_s):
            kv = await _receive(
                w.receiver, request.kv,
                engine.payload_sharding(res.replica, request.kv.shape[2]),
                timeout_s=max(0.001,
                              timeout_s - (time.perf_counter() - t0)))
        except Exception as e:  # noqa: BLE001 - answered with its status
          # Whatever failed (a transfer error, or one no transport foresaw),
          # the request was never submitted: the ``finally`` below closes
          # its hand-off before the status goes out.
          if isinstance(e, HandoffClosed):   # given back just before
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
          w.metrics.transfer_failures.labels(w.receiver.name,
                                             type(e).__name__).inc()
          if not isinstance(e, TransferError):
            log.exception("receiving the KV of %s failed", rid)
          await context.abort(common.status_for(e),
                              str(e) or type(e).__name__)
        transfer_s = time.perf_counter() - t0
        w.metrics.transfer_bytes.labels(w.receiver.name, "received").inc(
            kv.nbytes)
        w.metrics.transfer_time.labels(w.receiver.name, "received").observe(
            transfer_s)
        if request.kv.prefill_address:
          asyncio.ensure_future(self._confirm(request.kv))
        engine.submit_decode(DecodeRequest(
            rid, ids, request.first_token, request.first_logprob, kv,
            sampling, request.seed, callback, reservation=res,
            cache_salt=request.cache_salt))
        handoff.submitted()
        submitted = True
        w.loop.wake()
      first = True
      last = time.perf_counter()
      while True:
        ev: TokenEvent = await q.get()
        if ev.exhausted:   # not admitted before the queue's deadline
          finished = True
          await common.abort_exhausted(context, ev.error or "decode pool "
                                       "is full", retry_after_ms=1000)
        if ev.error:
          finished = True
          await context.abort(grpc.StatusCode.INTERNAL, ev.error)
        if not ev.token_ids and ev.finish_reason is None:
          continue
        now = time.perf_counter()
        if not first:
          w.metrics.itl.observe(now - last)
        last = now
        w.metrics.tokens.inc(len(ev.token_ids))
        msg = decode_pb2.DecodeResponse(
            token_ids=ev.token_ids, logprobs=ev.logprobs,
            finish_reason=FINISH_TO_PROTO[ev.finish_reason])
        if first:
          if request.local_prefill:
            msg.queue_s, msg.prefill_s = ev.queue_s, ev.prefill_s
            w.metrics.ttft_stage.labels("queue").observe(ev.queue_s)
            w.metrics.ttft_stage.labels("prefill").observe(ev.prefill_s)
          msg.kv_transfer_s = transfer_s
          msg.cached_tokens = ev.cached_tokens
          first = False
        if ev.finish_reason is not None and ev.spec_drafted:
          msg.spec_draft_tokens = ev.spec_drafted
          msg.spec_accepted_tokens = ev.spec_accepted
          w.metrics.spec_draft_tokens.inc(ev.spec_drafted)
          w.metrics.spec_accepted_tokens.inc(ev.spec_accepted)
        yield msg
        if ev.finish_reason is not None:
          finished = True
          w.metrics.requests.labels(ev.finish_reason.value).inc()
          return
    finally:
      w.streams -= 1
      if handoff is not None and not submitted:
        # Gone before joining the batch (e.g. cancelled while the KV was
        # arriving): give back what it holds now rather than at its TTL.
        handoff.close()
      if submitted and not finished:
        # Cancelled by the caller (or failed): free the slot now.
        engine.cancel(rid)
        w.metrics.requests.labels("cancelled").inc()
        w.loop.wake()
      # Its row and pages are free (or will be once the engine takes the
      # cancel): waiting reservations try again.
      w.room.freed()

  async def _confirm(self, handle: kv_pb2.KvHandle) -> None:
    try:
      await self.worker.prefill_stub(handle.prefill_address).ReleaseKv(
          prefill_pb2.ReleaseKvRequest(transfer_id=handle.transfer_id),
          timeout=5)
    except grpc.RpcError as e:
      log.warning("ReleaseKv to %s failed (the TTL will free it): %s",
                  handle.prefill_address, e.code().name)


async def _receive(receiver: KvReceiver, handle: kv_pb2.KvHandle, sharding,
                   *, timeout_s: float) -> RequestKV:
  """``receiver.receive`` on a worker thread. A cancelled RPC cannot stop
  that thread: if it still brings a KV that borrows a transport's memory
  (a landing region), the memory is given back rather than stranded."""
  fut = asyncio.get_running_loop().run_in_executor(
      None, functools.partial(receiver.receive, handle, sharding,
                              timeout_s=timeout_s))
  try:
    return await asyncio.shield(fut)
  except asyncio.CancelledError:
    fut.add_done_callback(_release_unclaimed)
    raise


def _release_unclaimed(fut: "asyncio.Future[RequestKV]") -> None:
  if not fut.cancelled() and fut.exception() is None:
    fut.result().release()


class KvTransferServicer(decode_pb2_grpc.KvTransferServicer):
  """Pushed KV streams, into the receiver's ``StreamIntake`` (transports
  whose senders push: grpc)."""

  def __init__(self, intake: StreamIntake):
    self.intake = intake

  async def PushKv(self, request_iterator, context):
    staging = None
    try:
      async for chunk in request_iterator:
        if staging is None:
          staging = self.intake.begin(chunk)
        if chunk.last:
          break
        self.intake.place(staging, chunk)
      return self.intake.finish(staging)
    except (ValueError, TransferError) as e:
      self.intake.abandon(staging)
      code = (grpc.StatusCode.INVALID_ARGUMENT if isinstance(e, ValueError)
              else common.status_for(e))
      await context.abort(code, str(e))
    except BaseException:
      self.intake.abandon(staging)
      raise


def _timeout(context, default: float) -> float:
  remaining = context.time_remaining()
  return default if remaining is None else max(0.001, min(default, remaining))


__all__ = ["DecodeWorker", "DecodeServicer", "EventRelay",
           "KvTransferServicer", "EngineLoop", "FINISH_TO_PROTO"]
