"""The router: the client-facing ``Generation`` service.

The data path of one request, top to bottom:

  1. validate and tokenize (INVALID_ARGUMENT naming the field otherwise);
  2. short prompts (under ``local_prefill_threshold``) or a deployment
     without prefill workers: ``Decode(local_prefill)`` on the decode worker
     with the most free KV capacity, and stream;
  3. otherwise, under a fresh transfer id, ``Reserve`` KV capacity on that
     decode worker and ``Prefill`` on the prefill worker with the shortest
     queue, side by side (the KV goes straight to the reserved decode
     worker), send the first token, then ``Decode`` with the KV handle and
     stream the rest.

A client may send its ``Generate`` calls as messages on one long-lived
``GenerateSession`` stream instead (``pdjax.client.AsyncClient``'s
``sessions``): each runs exactly as a call of its own would, and a request
pays a message each way rather than a new call's set-up.

The reservation beside the prefill: the prefill needs its destination only
when it hands the KV over, after its programs ran, so the router sends both
calls at once and the Reserve round trip hides behind the prefill's
compute. The Prefill call says its destination is pending (it carries the
transport and the transfer id); once Reserve answers, the router completes
it with ``CompleteDestination`` on the prefill worker, which sends the KV
only then. The router is the one that learns the reservation's outcome, and
it may end on another decode worker than the first picked (the queue policy
picks again), so it is the router, not the decode worker, that tells the
prefill worker. The first token goes out once the reservation is made, so
that a reservation's failure (no room, the worker gone) still comes before
any token and the request may be retried; a failed one cancels the Prefill
call, and the prefill worker drops the KV. Where the answer could change the
prefill (a decode worker keeping a prefix cache names the prompt blocks it
holds, which the prefill then skips), or where the router's view says the
decode worker has no room (its Reserve would wait, and the prefill would hold
its KV that long), the Reserve goes first, as one round trip before the
prefill (``_reserve_beside_prefill``).

Before the first token reaches the client, an unreachable worker is routed
around (another prefill worker; another decode worker). After it, a dying
decode worker ends only its own streams, with UNAVAILABLE. A client that
cancels cancels the downstream calls, which frees the decode slot at once.

Health (``grpc.health.v1``): "" and ``pdjax.v1.Generation`` are SERVING
while a request could be served (``ready``: a decode worker is ready, and
it prefills by itself where no prefill worker is), NOT_SERVING otherwise
and while draining; ``liveness`` is SERVING while the process runs. On
shutdown the router drains (``drain``): new requests get UNAVAILABLE, the
running ones finish up to a deadline, whatever is left then ends with
UNAVAILABLE, and the clients' sessions end.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from typing import Awaitable, Callable, Literal

import grpc

from pdjax.engine.sampling_params import InvalidRequest, SamplingParams
from pdjax.mesh_spec import axis_size
from pdjax.service import common, discovery, kv_router, validation
from pdjax.service.call_sessions import CallSessions, SessionMessages
from pdjax.service.metrics import Metrics
from pdjax.service.registry import (DEFAULT_POLL_INTERVAL_S, Worker,
                                    WorkerRegistry)
from pdjax.tokenizer import IncrementalDetokenizer, Tokenizer
from pdjax.transfer.ids import new_transfer_id
from pdjax.v1 import (common_pb2, decode_pb2, generate_pb2,
                      generate_pb2_grpc, kv_pb2, prefill_pb2)

log = logging.getLogger(__name__)

GENERATION_SERVICE = "pdjax.v1.Generation"

_SESSION_MESSAGES = SessionMessages(generate_pb2.GenerateCallEvent,
                                    generate_pb2.GenerateSessionResponse)

# Codes after which another worker may well succeed. Only UNAVAILABLE
# takes the worker out of rotation (until its next successful poll).
# CANCELLED is one the router did not ask for (its own cancellation of a
# call reaches it as asyncio.CancelledError, never as a status): the worker
# or the stream between gave the call up, as a worker leaving the pool
# may.
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED,
              grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED)

# Queueing on a full pool: how long one Reserve may wait at the chosen
# worker for room before the router picks again (another worker may have
# freed room meanwhile).
_RESERVE_WAIT_S = 0.25


@dataclasses.dataclass(frozen=True)
class RouterConfig:
  """The router's settings: a deployment file's ``[router]`` table (its
  ``kv_transport`` is the deployment's), overridden by the router's flags
  (``pdjax.config``, ``pdjax.launch.config_flags``)."""
  local_prefill_threshold: int = 0   # prompts shorter than this skip P
  max_attempts: int = 3              # workers tried before the first token
  kv_transport: Literal["grpc", "device", "local"] = "grpc"
  transfer_timeout_s: float = 30.0
  max_inflight: int = 4096           # admission bound of the router
  # How often the router asks each worker for its load, its cached blocks
  # and whether it serves (GetWorkerInfo): what routing decides on is at
  # most this old.
  poll_interval_s: float = DEFAULT_POLL_INTERVAL_S
  # When decode KV capacity is full: wait for it (up to queue_timeout_s) or
  # refuse at once.
  on_full: Literal["queue", "reject"] = "queue"
  queue_timeout_s: float = 30.0
  # After a failed KV hand-off: "recompute" the prompt on a decode worker
  # (continuing from the first token already sent) or "fail" the request
  # (vLLM's kv_load_failure_policy).
  kv_failure_policy: Literal["recompute", "fail"] = "recompute"
  # KV-aware routing (the worker registry, pdjax.service.kv_router): a
  # worker's score is this times the request's prompt blocks it holds,
  # minus its load (0: load only) ...
  kv_overlap_weight: float = 0.0
  # ... judged on load alone when its cache was last polled longer ago.
  kv_stale_after_s: float = kv_router.DEFAULT_STALE_AFTER_S
  # Shared KV: a prompt block a prefill worker can fetch from a peer or a
  # store counts this much (0..1) of a block it holds.
  kv_fetch_weight: float = kv_router.DEFAULT_FETCH_WEIGHT
  # Elastic pools (pdjax.v1.Registry): the lease a worker registers for
  # (workers started with --router ask for it); one that has not renewed
  # for this long is dropped.
  lease_s: float = discovery.DEFAULT_LEASE_S
  # Decode and Prefill calls as messages on one long-lived stream to each
  # worker (``DecodeSession``, ``PrefillSession``), not a new call each: on
  # a request's way to its first token, a message each way costs less than
  # a call's set-up.
  worker_sessions: bool = True

  def __post_init__(self):
    for name in ("max_attempts", "max_inflight"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    for name in ("local_prefill_threshold", "transfer_timeout_s",
                 "queue_timeout_s", "kv_overlap_weight", "kv_stale_after_s"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    for name in ("lease_s", "poll_interval_s"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
    if self.kv_overlap_weight > 0 and (self.poll_interval_s
                                       >= self.kv_stale_after_s):
      raise ValueError(
          f"poll_interval_s ({self.poll_interval_s:g}) must be shorter than "
          f"kv_stale_after_s ({self.kv_stale_after_s:g}) for KV-aware "
          "routing: every worker's cached blocks would be stale before its "
          "next poll, and routing would weigh load alone")
    if not 0 <= self.kv_fetch_weight <= 1:
      raise ValueError(f"kv_fetch_weight must be in [0, 1], got "
                       f"{self.kv_fetch_weight}")


class _Failed(Exception):
  """A downstream failure with the status to return to the client."""

  def __init__(self, code: grpc.StatusCode, details: str,
               retry: bool = False, worker: Worker | None = None):
    super().__init__(details)
    self.code = code
    self.details = details
    self.retry = retry
    self.worker = worker


class _KvLost(_Failed):
  """The decode worker could not redeem the KV handle (timeout, peer gone,
  refused) before producing any token: the prompt can be recomputed."""


# Failures of a Decode call, before any token, that mean "the KV never
# arrived" rather than "the request is bad".
# RESOURCE_EXHAUSTED here: the decode worker had no device memory to land
# the KV (it released the request's reservation), so its prompt is
# recomputed or the request fails, by the KV failure policy.
_KV_LOST_CODES = (grpc.StatusCode.DEADLINE_EXCEEDED,
                  grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN,
                  grpc.StatusCode.CANCELLED,
                  grpc.StatusCode.PERMISSION_DENIED,
                  grpc.StatusCode.FAILED_PRECONDITION,
                  grpc.StatusCode.RESOURCE_EXHAUSTED)


class _Reservation:
  """A request's Reserve: a task beside its prefill (or awaited before it).
  The router gives back what it reserved on every way out, unless the
  decode worker took it over (``settled``: a Decode call redeemed it). Its
  decode worker's channel stays open (``WorkerRegistry.hold``) until
  ``close``, even if the worker leaves its pool meanwhile: the request may
  still call it (Decode, Unreserve)."""

  def __init__(self, registry: WorkerRegistry,
               reserve: Callable[[], Awaitable]):
    self._registry = registry
    self._reserve = reserve
    self._held = contextlib.ExitStack()
    self.task: asyncio.Task | None = None
    self.settled = False
    # Where the reservation (or its delivery to the prefill worker) failed,
    # the Prefill call was cancelled: this is what the request answers.
    self.failure: BaseException | None = None

  def start(self) -> asyncio.Task:
    """Starts the Reserve call (once)."""
    if self.task is None:
      self.task = asyncio.ensure_future(self._made())
    return self.task

  async def _made(self):
    d, res = await self._reserve()
    # In the step that left the call's own hold: no moment without one.
    self._held.enter_context(self._registry.hold(d))
    return d, res

  def close(self) -> None:
    """The request is done with the reservation's worker."""
    self._held.close()

  def made(self) -> tuple[Worker, decode_pb2.ReserveResponse] | None:
    """(worker, answer) once made; None while running, or if it failed."""
    t = self.task
    if (t is None or not t.done() or t.cancelled()
        or t.exception() is not None):
      return None
    return t.result()


class RouterServicer(generate_pb2_grpc.GenerationServicer):

  def __init__(self, registry: WorkerRegistry, tokenizer: Tokenizer | None,
               config: RouterConfig = RouterConfig(),
               metrics: Metrics | None = None):
    self.registry = registry
    self.tokenizer = tokenizer
    self.config = config
    self.metrics = metrics or Metrics("router")
    self.inflight = 0
    self.draining = False
    # The handlers of admitted requests, so that a drain past its deadline
    # can end them (with UNAVAILABLE, not gRPC's bare cancellation).
    self._handlers: set[asyncio.Task] = set()
    self._cutting = False
    self._published: bool | None = None
    # Clients' GenerateSession streams; a drain ends them at its end.
    self.sessions = CallSessions()
    self.metrics.sessions.set_function(lambda: self.sessions.open)

  # ------------------------------------------------------- health, drain
  def ready(self) -> bool:
    """Whether a request could be served now: not draining, and a decode
    worker ready (without a ready prefill worker it prefills itself)."""
    return not self.draining and bool(self.registry.usable("decode"))

  async def publish_health(self, health) -> bool:
    """Sets readiness ("" and the Generation service) from ``ready``."""
    serving = self.ready()
    if serving != self._published:
      why = "draining" if self.draining else "no decode worker is ready"
      if serving:
        log.info("ready: a decode worker is")
      elif self._published is None:       # starting up
        log.info("not ready yet: %s", why)
      elif not self.draining:             # drain() says it itself
        log.warning("not ready: %s", why)
      self._published = serving
    await common.set_serving(health, [GENERATION_SERVICE], serving)
    return serving

  async def watch_health(self, health, interval_s: float) -> None:
    """Keeps readiness current (the registry's polls change it)."""
    while True:
      try:
        await self.publish_health(health)
      except Exception:  # noqa: BLE001 - never let the watch die
        log.exception("updating health failed")
      await asyncio.sleep(interval_s)

  async def drain(self, timeout_s: float, health=None) -> int:
    """Stops admitting requests (UNAVAILABLE; readiness NOT_SERVING) and
    waits up to ``timeout_s`` for the running ones; ends those still
    running then with UNAVAILABLE. Returns how many it ended."""
    self.draining = True
    if health is not None:
      await self.publish_health(health)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    log.info("draining: no new requests; waiting up to %.0f s for %d "
             "running", timeout_s, self.inflight)
    while self.inflight and loop.time() < deadline:
      await asyncio.sleep(0.05)
    left = [t for t in self._handlers if not t.done()]
    if left:
      log.warning("drain timeout: ending %d requests with UNAVAILABLE",
                  len(left))
      self._cutting = True
      for t in left:
        t.cancel()
      await asyncio.wait(left, timeout=5.0)
    # An open session would hold the server's graceful stop.
    await self.sessions.end()
    return len(left)

  # ---------------------------------------------------------------- info
  def model_info(self) -> common_pb2.ModelInfo:
    return self.registry.expected or common_pb2.ModelInfo()

  async def GetModelInfo(self, request, context):
    if self.registry.expected is None:
      await context.abort(grpc.StatusCode.UNAVAILABLE,
                          "no worker has joined yet")
    return self.model_info()

  # ---------------------------------------------------------------- generate
  def _prepare(self, request: generate_pb2.GenerateRequest):
    info = self.registry.expected
    if info is None:
      raise _Failed(grpc.StatusCode.UNAVAILABLE, "no worker has joined yet")
    rid = validation.check_request_id(request.request_id)
    validation.check_cache_salt(request.cache_salt)
    sampling = validation.sampling_from_proto(request.sampling,
                                              vocab_size=info.vocab_size)
    which = request.WhichOneof("prompt")
    if which is None:
      raise InvalidRequest("prompt", "send either text or token_ids")
    if which == "text":
      text = validation.check_text(request.text)
      if self.tokenizer is None:
        raise InvalidRequest("text", "this deployment has no tokenizer; send "
                             "token_ids")
      add = (request.add_special_tokens
             if request.HasField("add_special_tokens") else True)
      ids = self.tokenizer.encode(text, add_bos=add)
      field = "text"
    else:
      # Kept as the request's repeated field: the messages to the workers
      # take it whole.
      ids = request.token_ids.ids
      field = "token_ids"
    ids = validation.check_prompt_ids(ids, vocab_size=info.vocab_size,
                                      max_prompt_len=info.max_seq_len - 1,
                                      field=field, as_list=False)
    sampling = validation.fit_context(
        sampling, len(ids), info.max_seq_len,
        explicit=request.sampling.HasField("max_tokens"))
    return rid, ids, sampling

  async def Generate(self, request: generate_pb2.GenerateRequest, context):
    async for msg in self.generate_body(request, context):
      yield msg

  async def GenerateSession(self, request_iterator, context):
    """Generate calls as messages on one long-lived stream
    (``pdjax.service.call_sessions``): each runs ``generate_body`` as its
    own call would."""
    await self.sessions.serve(request_iterator, context, self.generate_body,
                              _SESSION_MESSAGES)

  # Also what a caller in this process runs (``pdjax.service.
  # router_in_process``: the gateway's HTTP served by the router's process).
  async def generate_body(self, request: generate_pb2.GenerateRequest,
                          context):
    """One Generate call's body; ``context`` is gRPC's, or a session's
    stand-in for it."""
    arrival = time.perf_counter()
    self.metrics.arrivals.inc()
    if self.draining:
      self.metrics.requests.labels("rejected").inc()
      await context.abort(grpc.StatusCode.UNAVAILABLE,
                          "the router is shutting down (draining): retry on "
                          "another router")
    try:
      rid, ids, sampling = self._prepare(request)
    except InvalidRequest as e:
      self.metrics.requests.labels("invalid").inc()
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except _Failed as e:
      await context.abort(e.code, e.details)
    if self.inflight >= self.config.max_inflight:
      self.metrics.requests.labels("rejected").inc()
      await common.abort_exhausted(
          context, f"router has {self.inflight} requests in flight")
    seed = validation.resolve_seed(sampling)
    detok = (IncrementalDetokenizer(self.tokenizer, prompt_ids=ids,
                                    skip_special_tokens=
                                    request.skip_special_tokens)
             if self.tokenizer else None)
    usage = common_pb2.Usage(prompt_tokens=len(ids))
    usage.ttft_stages.prepare_s = time.perf_counter() - arrival
    self.inflight += 1
    self.metrics.running.set(self.inflight)
    handler = asyncio.current_task()
    self._handlers.add(handler)
    first_at = None
    last_at = None
    outcome = "error"
    route = self._route(rid, ids, sampling, seed, context, usage,
                        request.cache_salt)
    try:
      async for msg in route:
        now = time.perf_counter()
        first = False
        if msg.token_ids:
          if first_at is None:
            first = True
            first_at = now
            usage.ttft_s = now - arrival
            self.metrics.ttft.observe(usage.ttft_s)
            self._close_stages(usage)
          elif last_at is not None:
            self.metrics.itl.observe(now - last_at)
          last_at = now
        usage.completion_tokens += len(msg.token_ids)
        out = generate_pb2.GenerateResponse(
            request_id=rid, token_ids=msg.token_ids, logprobs=msg.logprobs,
            finish_reason=msg.finish_reason)
        if first:
          # The prompt's accounting is final once its first token is out:
          # a client that stops reading early (a stop string) has it.
          out.usage.CopyFrom(usage)
        if detok is not None:
          out.text = detok.push(list(msg.token_ids))
          if msg.finish_reason:
            out.text += detok.flush()
        if msg.finish_reason:
          usage.total_time_s = now - arrival
          out.usage.CopyFrom(usage)
          outcome = common_pb2.FinishReason.Name(msg.finish_reason).split(
              "_")[-1].lower()
          self.metrics.e2e.observe(usage.total_time_s)
          self.metrics.request_prompt_tokens.observe(usage.prompt_tokens)
          self.metrics.request_generation_tokens.observe(
              usage.completion_tokens)
        yield out
        if msg.finish_reason:
          break
    except _Failed as e:
      outcome = e.code.name.lower()
      if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        await common.abort_exhausted(context, e.details, 500)
      await context.abort(e.code, e.details)
    except asyncio.CancelledError:
      if not self._cutting:
        outcome = "cancelled"
        raise
      # Ended by a drain past its deadline: the client may retry elsewhere.
      outcome = "unavailable"
      await context.abort(grpc.StatusCode.UNAVAILABLE,
                          "the router shut down before the request finished "
                          "(its drain deadline passed): retry on another "
                          "router")
    finally:
      self._handlers.discard(handler)
      # Close the downstream calls now (their generators' finally blocks),
      # not whenever the event loop finalizes them: a half-read stream keeps
      # the worker's RPC open and would stall its drain.
      await route.aclose()
      self.inflight -= 1
      self.metrics.running.set(self.inflight)
      self.metrics.requests.labels(outcome).inc()

  def _close_stages(self, usage: common_pb2.Usage) -> None:
    """At the first token: what no stage measured is the first token's way
    back (and RPC overheads); every stage goes to the histogram."""
    st = usage.ttft_stages
    measured = (st.prepare_s + st.reserve_s + st.queue_s + st.prefill_s
                + st.kv_handoff_s)
    st.return_s = max(0.0, usage.ttft_s - measured)
    for field, value in st.ListFields():
      self.metrics.ttft_stage.labels(field.name[:-2]).observe(value)

  # ---------------------------------------------------------------- routing
  def _timeout(self, context, default: float | None = None):
    remaining = context.time_remaining()
    if remaining is None:
      return default
    if remaining <= 0:
      raise _Failed(grpc.StatusCode.DEADLINE_EXCEEDED,
                    "deadline exceeded in the router")
    return remaining if default is None else min(default, remaining)

  async def _route(self, rid, ids, sampling: SamplingParams, seed: int,
                   context, usage: common_pb2.Usage, salt: str = ""):
    """Yields DecodeResponse-like messages (token_ids, logprobs,
    finish_reason) for the request, choosing and retrying workers."""
    reg = self.registry
    # KV-aware routing: the prompt's block keys, named once per request
    # where some worker or store holds blocks (hashing 2,048 ids costs
    # 0.1-0.2 ms).
    keys = (kv_router.request_keys(ids, salt, reg.expected)
            if reg.caches_prefixes() else [])
    local = (len(ids) < self.config.local_prefill_threshold
             or not reg.usable("prefill"))
    tried_p: set[str] = set()
    tried_d: set[str] = set()
    last_error: _Failed | None = None
    for _ in range(self.config.max_attempts):
      started = False
      try:
        if local:
          d = await self._pick_decode(tried_d, context, keys)
          tried_d.add(d.address)
          stream = self._local(d, rid, ids, sampling, seed, context, usage,
                               salt)
        else:
          stream = self._disaggregated(rid, ids, sampling, seed, context,
                                       usage, tried_p, tried_d, salt, keys)
        # Closed with the request, not whenever the collector finds it (a
        # retry's error holds this frame in a cycle): its calls end and its
        # workers' counts and holds go back at once.
        async with contextlib.aclosing(stream):
          async for msg in stream:
            started = True
            yield msg
        return
      except _Failed as e:
        last_error = e
        if not e.retry or started:
          raise
        if e.worker is not None and e.code == grpc.StatusCode.UNAVAILABLE:
          reg.mark_down(e.worker, e.details)
        log.info("request %s: retrying after %s", rid, e.details)
        if not reg.usable("prefill"):
          local = True
    raise last_error or _Failed(grpc.StatusCode.UNAVAILABLE,
                                "no worker could serve the request")

  async def _pick_decode(self, exclude, context, keys=()) -> Worker:
    d = self.registry.pick_decode(exclude, keys)
    if d is None:
      d = self.registry.pick_decode(keys=keys)
    if d is None:
      raise _Failed(grpc.StatusCode.UNAVAILABLE, "no decode worker is ready")
    return d

  def _page_estimate(self, d: Worker, prompt_len: int, sampling) -> int:
    """KV pages admission on decode worker ``d`` will promise a request:
    its prompt's and, where the worker allocates pages on demand, those of
    the first tokens it generates; else its whole budget."""
    model = self.registry.expected
    past = sampling.max_tokens
    if d.info is not None and d.info.admission_tokens_past_prompt:
      past = min(past, d.info.admission_tokens_past_prompt)
    tokens = min(prompt_len + past, model.max_seq_len)
    return -(-tokens // max(model.page_size, 1))

  async def _local(self, d: Worker, rid, ids, sampling, seed, context, usage,
                   salt=""):
    usage.decode_worker = d.address
    # Seen by the next pick before the worker's own accounting is polled.
    d.reserved_pages += self._page_estimate(d, len(ids), sampling)
    req = decode_pb2.DecodeRequest(
        request_id=rid, prompt_token_ids=ids,
        sampling=validation.sampling_to_proto(sampling), seed=seed,
        local_prefill=True, cache_salt=salt)
    async for msg in self._stream_decode(d, req, context, usage,
                                         first_token_sent=False):
      yield msg

  def _pick_prefill(self, tried_p: set[str], keys=()) -> Worker:
    # Prefer a prefill worker not tried yet; after a failed hand-off (not a
    # dead worker) the same one may well succeed.
    p = (self.registry.pick_prefill(tried_p, keys)
         or self.registry.pick_prefill(keys=keys))
    if p is None:
      raise _Failed(grpc.StatusCode.UNAVAILABLE, "no prefill worker is ready",
                    retry=True)
    tried_p.add(p.address)
    return p

  def _reserve_beside_prefill(self, d: Worker, prompt_len: int,
                              sampling) -> bool:
    """Whether to reserve on ``d`` beside the prefill rather than before
    it. Before it where the answer could change the prefill: a decode
    worker keeping a prefix cache names the prompt's leading blocks it
    holds, and the prefill then neither sends them nor runs them in the
    plain batched program (``skip_pages``). Before it, too, where the
    router's view says ``d`` has no room: its Reserve would wait for some
    (the queue policy), and a prefill run meanwhile would hold its KV on
    the prefill worker for as long."""
    info = d.info
    if info is None or info.prefix_caching:
      return False
    return (info.load.rows_free > 0 and d.free_pages()
            >= self._page_estimate(d, prompt_len, sampling))

  async def _reserve(self, rid, ids, sampling, context, tried_d, salt="",
                     keys=(), *, first: Worker | None = None,
                     transfer_id: str = "", beside_prefill: bool = False):
    """Reserves under ``transfer_id`` on ``first`` (else the decode worker
    with most room); waits for room when the policy is to queue, picking
    again between waits. Returns (worker, answer). Beside the prefill the
    prompt is not sent: the worker pins no cached blocks for a prefill that
    computes and sends them all. Cancelled, it gives back what its call
    may have reserved before the cancel reached the worker."""
    transfer_id = transfer_id or new_transfer_id()
    started_wait = time.monotonic()   # its place in the workers' lines
    deadline = started_wait + self.config.queue_timeout_s
    queue = self.config.on_full == "queue"
    backoff = 0.005
    started = time.perf_counter()
    d = first
    while True:
      if d is None:
        d = await self._pick_decode(tried_d, context, keys)
      # A busy worker may answer slowly; the request's own deadline is what
      # bounds the call.
      timeout = self._timeout(context, self.config.queue_timeout_s)
      # Queueing: the worker holds the call until room frees, for a while
      # (then another worker may have room: the pick is made again).
      wait_s = (min(_RESERVE_WAIT_S, max(deadline - time.monotonic(), 0.0))
                if queue else 0.0)
      # Count the pages before the call: requests arriving together must
      # see each other's reservations, or they all pick the same worker.
      estimate = self._page_estimate(d, len(ids), sampling)
      d.reserved_pages += estimate
      asked = time.monotonic()
      try:
        with self.registry.hold(d):
          try:
            res = await d.stub.Reserve(decode_pb2.ReserveRequest(
                request_id=rid, prompt_tokens=len(ids),
                max_tokens=sampling.max_tokens, transfer_id=transfer_id,
                prompt_token_ids=[] if beside_prefill else ids,
                cache_salt=salt, wait_ms=int(wait_s * 1000),
                waited_ms=int((asked - started_wait) * 1000)),
                timeout=timeout)
          except asyncio.CancelledError:
            d.reserved_pages -= estimate
            await self._unreserve(d, rid)
            raise
        self.metrics.reserve_time.labels(
            "beside" if beside_prefill else "before").observe(
                time.perf_counter() - started)
        return d, res
      except grpc.aio.AioRpcError as e:
        d.reserved_pages -= estimate
        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
          if not queue or time.monotonic() > deadline:
            raise _Failed(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          "decode capacity is full; retry later") from e
          if time.monotonic() - asked < wait_s / 2:
            # Answered at once (a worker that does not wait): back off.
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 0.2)
          d = None
          continue
        if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
          raise _Failed(e.code(), e.details()) from e
        tried_d.add(d.address)
        raise _Failed(e.code(), f"decode worker {d.address}: {e.details()}",
                      retry=e.code() in _RETRYABLE, worker=d) from e

  async def _disaggregated(self, rid, ids, sampling, seed, context, usage,
                           tried_p, tried_d, salt="", keys=()):
    """Reserve on a decode worker and Prefill on a prefill worker, side by
    side where the reservation's answer cannot change the prefill
    (``_reserve_beside_prefill``), else one after the other; then Decode
    with the KV handle."""
    t0 = time.perf_counter()
    d = await self._pick_decode(tried_d, context, keys)
    beside = self._reserve_beside_prefill(d, len(ids), sampling)
    transfer_id = new_transfer_id()
    # Beside the prefill, the Reserve call starts once the Prefill call
    # has (``_handed_off``): the prefill's start is the one that matters.
    reservation = _Reservation(self.registry, functools.partial(
        self._reserve, rid, ids, sampling, context, tried_d, salt, keys,
        first=d, transfer_id=transfer_id, beside_prefill=beside))
    # ``d``'s channel stays open until its Reserve call holds it.
    with self.registry.hold(d):
      try:
        if not beside:
          await reservation.start()     # its answer shapes the prefill
        stream = self._handed_off(rid, ids, sampling, seed, context, usage,
                                  tried_p, reservation, transfer_id, t0,
                                  salt, keys)
        async with contextlib.aclosing(stream):
          async for msg in stream:
            yield msg
      finally:
        await self._give_back(reservation, rid)
        reservation.close()

  def _destination(self, d: Worker, res: decode_pb2.ReserveResponse,
                   transfer_id: str) -> kv_pb2.KvDestination:
    """Where the prefill worker sends the KV reserved on ``d``."""
    info = d.info
    dest = kv_pb2.KvDestination(
        transport=self.config.kv_transport, transfer_id=transfer_id,
        decode_address=d.address, replica=res.replica,
        decode_process_id=info.process_id if info else "",
        decode_tp=axis_size(info.mesh if info else "", "tp"),
        decode_pp=axis_size(info.mesh if info else "", "pp"))
    # --- same-host fast path (pdjax.transfer.cuda_ipc) ---------------------
    # Only where the decode worker runs: the prefill worker asks it for a
    # landing region (LendLanding) when the prefill starts, not the router.
    dest.decode_hostname = info.hostname if info else ""
    # --- end fast path -----------------------------------------------------
    dest.skip_pages = res.cached_blocks
    return dest

  async def _handed_off(self, rid, ids, sampling, seed, context, usage,
                        tried_p, reservation, transfer_id, t0, salt, keys):
    p = self._pick_prefill(tried_p, keys)
    usage.prefill_worker = p.address
    made = reservation.made()   # made already where the prefill waited
    dest = (self._destination(*made, transfer_id) if made else
            kv_pb2.KvDestination(transport=self.config.kv_transport,
                                 transfer_id=transfer_id))
    # Shared KV: where the chosen worker may fetch the blocks it lacks.
    sources = [prefill_pb2.KvSource(address=a, blocks=n)
               for a, n in self.registry.kv_sources(p, keys)]
    # The first token goes out as soon as the prefill worker has it, while
    # its KV may still be moving, where a failed hand-off can be recovered
    # (by recomputing the prompt, continuing from that token); otherwise it
    # waits for the hand-off, so that a failure can still retry the request.
    early = self.config.kv_failure_policy == "recompute"
    lost: _Failed | None = None
    with self.registry.busy(p):
      usage.ttft_stages.reserve_s = time.perf_counter() - t0
      prefill_req = prefill_pb2.PrefillRequest(
          request_id=rid, prompt_token_ids=ids,
          sampling=validation.sampling_to_proto(sampling), seed=seed,
          destination=dest, destination_pending=made is None,
          cache_salt=salt, kv_sources=sources)
      timeout = self._timeout(context)
      call = p.call(prefill_req, timeout,
                    on_session=self.config.worker_sessions)
      reservation.start()
      completing = None if made else asyncio.ensure_future(
          self._complete_destination(
              p, call, reservation, transfer_id,
              self._timeout(context, self.config.transfer_timeout_s)))
      try:
        pre = await self._prefill_reply(call, p, reservation)
        usage.prefill_s = pre.prefill_s
        usage.cached_prompt_tokens = pre.cached_tokens
        usage.ttft_stages.queue_s = pre.queue_s
        usage.ttft_stages.prefill_s = pre.prefill_s
        d, _ = await self._reserved(reservation, usage)
        usage.decode_worker = d.address
        first = decode_pb2.DecodeResponse(
            token_ids=[pre.first_token], logprobs=[pre.first_logprob])
        if early:
          yield first
        try:
          sent = await self._prefill_reply(call, p, reservation)
        except _Failed as e:
          if not early:
            raise
          lost = e
          await self._give_back(reservation, rid)
          if e.code == grpc.StatusCode.UNAVAILABLE:
            self.registry.mark_down(p, e.details)
      finally:
        call.cancel()
        if completing is not None:
          completing.cancel()
    exclude: set[str] = set()
    if lost is None:
      usage.kv_transfer_s = sent.transfer_s
      usage.kv_send_s = sent.transfer_s
      usage.kv_path = sent.kv.transport
      if not early:
        usage.ttft_stages.kv_handoff_s = sent.transfer_s
        yield first
      handle = sent.kv
      handle.prefill_address = p.address
      req = decode_pb2.DecodeRequest(
          request_id=rid, prompt_token_ids=ids,
          sampling=validation.sampling_to_proto(sampling), seed=seed,
          first_token=pre.first_token, first_logprob=pre.first_logprob,
          kv=handle, cache_salt=salt)
      redeemed = False
      try:
        async for msg in self._stream_decode(d, req, context, usage,
                                             first_token_sent=True,
                                             kv_pending=True):
          # The decode worker redeemed the KV and the reservation. Until it
          # answers, a request that ends (cancelled, or its call failed)
          # gives both back itself: the call may never have reached it.
          redeemed = reservation.settled = True
          yield msg
        return
      except _KvLost as e:
        await self._give_back(reservation, rid)   # now, not after recompute
        if self.config.kv_failure_policy != "recompute":
          raise _Failed(e.code, e.details) from e
        lost = e
        exclude.add(d.address)
        if e.code == grpc.StatusCode.UNAVAILABLE:
          self.registry.mark_down(d, e.details)
      finally:
        if not redeemed:
          await self._release_kv(p, handle.transfer_id)
    self.metrics.requests.labels("kv_recomputed").inc()
    log.warning("request %s: KV hand-off failed (%s); recomputing the "
                "prompt on a decode worker", rid, lost.details)
    # Fallback: prefill locally on a decode worker, forced to continue from
    # the first token the client already has.
    d2 = await self._pick_decode(exclude, context, keys)
    usage.decode_worker = d2.address
    req = decode_pb2.DecodeRequest(
        request_id=rid, prompt_token_ids=ids,
        sampling=validation.sampling_to_proto(sampling), seed=seed,
        local_prefill=True, forced_first_token=pre.first_token,
        cache_salt=salt)
    async for msg in self._stream_decode(d2, req, context, usage,
                                         first_token_sent=True):
      yield msg

  async def _reserved(self, reservation: _Reservation,
                      usage: common_pb2.Usage):
    """(worker, answer) of the reservation, once made. Where the prefill
    answered first, its first token waits for it (the wait counts in
    ``reserve_s``): a reservation that then fails fails a request that has
    sent nothing yet, which may still be retried."""
    if not reservation.task.done():
      waited = time.perf_counter()
      await asyncio.wait([reservation.task])
      usage.ttft_stages.reserve_s += time.perf_counter() - waited
    return reservation.task.result()

  async def _complete_destination(self, p: Worker, call,
                                  reservation: _Reservation,
                                  transfer_id: str, timeout) -> None:
    """Sends the prefill worker the whole destination once the reservation
    beside its prefill is made. Where it is not made (or cannot be sent),
    the Prefill call is cancelled, so that the worker drops the KV; that
    failure is what the request answers (``_prefill_reply``)."""
    await asyncio.wait([reservation.task])
    made = reservation.made()
    if made is None:
      task = reservation.task
      reservation.failure = None if task.cancelled() else task.exception()
      call.cancel()
      return
    try:
      await p.stub.CompleteDestination(prefill_pb2.CompleteDestinationRequest(
          destination=self._destination(*made, transfer_id)), timeout=timeout)
    except grpc.aio.AioRpcError as e:
      retry = e.code() in _RETRYABLE
      reservation.failure = _Failed(
          e.code(), f"prefill worker {p.address}: {e.details()}",
          retry=retry, worker=p if retry else None)
      call.cancel()

  async def _give_back(self, reservation: _Reservation, rid: str) -> None:
    """Ends what the router still owns of a reservation, once: a Reserve
    still running is cancelled (it gives back what it may have reserved),
    one made is given back unless the decode worker took it over."""
    if reservation.settled:
      return
    reservation.settled = True
    task = reservation.task
    if task is not None and not task.done():
      task.cancel()
      await asyncio.wait([task])
    made = reservation.made()
    if made is not None:
      await self._unreserve(made[0], rid)

  async def _prefill_reply(self, call, p: Worker,
                           reservation: _Reservation | None = None
                           ) -> prefill_pb2.PrefillResponse:
    """The Prefill call's next message; its failures as ``_Failed``, or as
    the reservation's failure where that is why the call was cancelled."""
    try:
      msg = await call.read()
    except asyncio.CancelledError:
      # The call was cancelled for the reservation's failure
      # (``_complete_destination``), not the request: that failure is what
      # the request answers, and it may be retried.
      if (reservation is not None and reservation.failure is not None
          and not asyncio.current_task().cancelling()):
        raise reservation.failure from None
      raise
    except grpc.aio.AioRpcError as e:
      if reservation is not None and reservation.failure is not None:
        raise reservation.failure from e
      retry = e.code() in _RETRYABLE
      raise _Failed(e.code(), f"prefill worker {p.address}: {e.details()}",
                    retry=retry, worker=p if retry else None) from e
    if msg is grpc.aio.EOF:
      raise _Failed(grpc.StatusCode.UNAVAILABLE,
                    f"prefill worker {p.address} ended the call early",
                    retry=True, worker=p)
    return msg

  async def _release_kv(self, p: Worker, transfer_id: str) -> None:
    """Frees a sent KV that no one will redeem now, not at its TTL."""
    try:
      await p.stub.ReleaseKv(prefill_pb2.ReleaseKvRequest(
          transfer_id=transfer_id), timeout=self.registry.rpc_timeout_s)
    except (grpc.RpcError, grpc.aio.UsageError):
      pass   # its TTL frees it (the worker gone, or its channel closed)

  async def _unreserve(self, d: Worker, rid: str) -> None:
    try:
      await d.stub.Unreserve(decode_pb2.UnreserveRequest(request_id=rid),
                             timeout=self.registry.rpc_timeout_s)
    except grpc.aio.AioRpcError:
      pass   # the reservation's TTL frees it

  async def _stream_decode(self, d: Worker, req, context, usage, *,
                           first_token_sent: bool, kv_pending: bool = False):
    """Streams one Decode call. Failures become ``_Failed``: retryable while
    the client has seen nothing; ``_KvLost`` when a KV handle was being
    redeemed and no token came back; UNAVAILABLE mid-stream otherwise."""
    with self.registry.busy(d):
      timeout = self._timeout(context)
      call = d.call(req, timeout, on_session=self.config.worker_sessions)
      received = False
      try:
        async for msg in call:
          received = True
          if msg.kv_transfer_s:
            usage.kv_transfer_s += msg.kv_transfer_s
            usage.kv_receive_s = msg.kv_transfer_s
          if msg.prefill_s:
            usage.prefill_s = msg.prefill_s
            usage.cached_prompt_tokens = msg.cached_tokens
            if not first_token_sent:   # this prefill made the first token
              usage.ttft_stages.queue_s = msg.queue_s
              usage.ttft_stages.prefill_s = msg.prefill_s
          if msg.finish_reason:
            # Speculative decoding's counts, on the final message (local
            # and remote prefill alike: this is the decode worker's stream).
            usage.spec_draft_tokens = msg.spec_draft_tokens
            usage.spec_accepted_tokens = msg.spec_accepted_tokens
          yield msg
          if msg.finish_reason:
            return
        raise _Failed(grpc.StatusCode.UNAVAILABLE,
                      f"decode worker {d.address} ended the stream early")
      except grpc.aio.AioRpcError as e:
        code = e.code()
        where = f"decode worker {d.address}"
        if kv_pending and not received and code in _KV_LOST_CODES:
          raise _KvLost(code, f"{where}: {e.details()}") from e
        if received or first_token_sent:
          if code in _RETRYABLE:
            if code == grpc.StatusCode.UNAVAILABLE:
              self.registry.mark_down(d, e.details() or code.name)
            raise _Failed(grpc.StatusCode.UNAVAILABLE,
                          f"{where} failed mid-stream: {e.details()}") from e
          raise _Failed(code, e.details()) from e
        raise _Failed(code, f"{where}: {e.details()}",
                      retry=code in _RETRYABLE, worker=d) from e
      finally:
        call.cancel()


__all__ = ["GENERATION_SERVICE", "RouterServicer", "RouterConfig"]
