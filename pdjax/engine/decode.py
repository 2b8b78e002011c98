"""The decode engine: continuous batching over a paged KV cache.

Lifecycle of a sequence in a replica (the host side of it):

  1. ``reserve``: decode-side admission promises pages before the request's
     KV exists (it may still be on its way from a prefill worker). With
     ``kv_admission="on_demand"`` (the default) it promises what the
     request holds once inserted, its prompt's pages and those of its first
     two generate calls, and only while the pool keeps a headroom free for
     the running rows' growth (the larger of ``admission_watermark`` and
     their next two calls' pages) and no preempted row waits to come back;
     a chat request without max_tokens no longer holds a whole context of
     pages. With ``"full"`` it promises the whole budget (prompt +
     max_tokens, capped by max_seq_len), so a sequence never needs more.
     A request that can never fit (prompt or budget beyond the pool) is
     refused (``InvalidRequest``); one that does not fit now gets None,
     and its caller queues it (``ColocatedEngine``'s bounded queue with a
     deadline, the router's retries) or refuses it.
  2. ``insert``: the reserved pages are allocated and a jitted, donating
     scatter writes the request KV into them; the row's first token,
     position and counters are set on device.
  3. ``generate``: a jitted, donating program advances every live row by
     ``steps_per_call`` tokens (``lax.scan``), sampling per row and applying
     the stop conditions (EOS, stop ids, max_tokens, capacity) on device, so
     a finished row stops writing at once. The host dispatches call i+1
     before reading call i's tokens: Python never stalls the device. Before
     each call a row gets the pages it will write (``DecodeReplica._grow``);
     when the pool runs out, the newest rows are preempted: their KV goes to
     host memory and comes back bit for bit (swap), or, when the swap space
     is full, is dropped and the request is handed to ``on_recompute``
     (a colocated engine prefills its prompt and generated tokens again and
     continues from its last token). Either way the stream only pauses: it
     keeps the tokens it has, and greedy or seeded sampling continues as if
     nothing happened (the sampler's randomness is per request and token
     index).
  4. release: when the host reads a finished (or cancelled) row, its pages
     go back to the pool (and its swapped KV, if any, is dropped) and the
     unused rest of its reservation is returned.

A request's state through these steps is its ``Lifecycle``
(``pdjax.engine.requests``): WAITING_FOR_KV from reservation to insert,
then RUNNING or PREEMPTED_SWAPPED while it holds a row, PREEMPTED_RECOMPUTE
once evicted, and a finished status, reached once, whose reason its last
event carries.

Data parallelism: a pool of ``dp`` replicas, each with its own sub-mesh,
weights view, KV pool and rows (JetStream's one engine per slice). Requests go
to the replica with the most free KV capacity.

Where each part lives: this module, the engine (admission, the queue, the
loop that launches calls and delivers tokens); ``decode_replica``, one
replica's rows, pages and host-side row state (steps 2 and 4);
``decode_programs``, the device state and the jitted programs (steps 2 and
3); ``decode_config``, the pool's settings.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, Sharding

from pdjax.engine import host_tier  # host KV tier
from pdjax.engine.borrowed_kv import BorrowedKvReturns
from pdjax.engine.cache_events import CacheEventLog
from pdjax.engine.decode_config import DecodeConfig
from pdjax.engine.decode_programs import (DecodeState, _Programs,
                                          unpack_step_output)
from pdjax.engine.decode_replica import Call, DecodeReplica, Reservation
from pdjax.engine.kv import pages_for, payload_pages
from pdjax.engine.prefix_cache import block_hashes
from pdjax.engine.requests import (DecodeRequest, FinishReason,
                                   IllegalTransition, RequestKV,
                                   RequestStatus, TokenEvent)
from pdjax.engine.sampling import InvalidRequest
from pdjax.model.config import ModelConfig
from pdjax.model.llama import Params
from pdjax.sharding import ShardingRules, replica_meshes, replica_view

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Pending:
  request: DecodeRequest
  reservation: Reservation


@dataclasses.dataclass(frozen=True)
class IterationTiming:
  """Host wall time of one ``DecodeEngine.step``, in its two halves.

  ``launch_s``: cancellations, admissions (inserts) and dispatching every
  busy replica's generate call: host work, which XLA's runtime also does
  here (argument handling, CUDA graph updates). ``deliver_s``: reading the
  previous call's tokens, which waits for the device to finish it, and
  handing them to their streams. In steady decoding the iteration's time is
  the device's, in ``deliver_s``; a ``launch_s`` that grows means the host
  (or the runtime on it) is what the tokens wait for."""
  launch_s: float
  deliver_s: float
  live_rows: int
  calls: int


class DecodeEngine:
  """The decode pool of one worker: ``dp`` replicas, one host loop.

  Thread-safety: ``reserve``, ``submit`` and ``cancel`` may be called from any
  thread; ``step`` runs on the engine's own loop thread (``start``) or, in
  tests, on the caller's.
  """

  def __init__(self, params: Params, cfg: ModelConfig, mesh: Mesh,
               rules: ShardingRules, dcfg: DecodeConfig = DecodeConfig(),
               *, eos_ids: Sequence[int] | None = None,
               draft: tuple[Params, ModelConfig] | None = None):
    """``draft``: the draft model's (params, config), laid out by ``rules``
    on ``mesh`` as the target's are (``speculative = "draft"``)."""
    self.cfg = cfg
    self.dcfg = dcfg
    self.mesh = mesh
    self.rules = rules
    self.eos_ids = tuple(cfg.eos_token_ids if eos_ids is None else eos_ids)
    self.programs = _Programs(
        cfg, dcfg, self.eos_ids, mesh.devices.flat[0].platform,
        mesh.size // mesh.shape.get("dp", 1),
        replica_mesh=replica_meshes(mesh, "dp")[0])
    if self.programs.stages > 1:
      log.info("pipeline-parallel decode: %d stages of %d layers, %d "
               "microbatches per call", self.programs.stages,
               cfg.num_layers // self.programs.stages,
               self.programs.num_microbatches)
    log.info("generate programs of %s rows%s; decode attention (paged "
             "in place by cuDNN or Pallas, or gather) by rows: %s; compiler "
             "options by rows: %s",
             "/".join(map(str, dcfg.row_counts)),
             (f" and {dcfg.pages_per_seq} pages, batch-invariant"
              if dcfg.batch_invariant else ""),
             {r: p or "gather"
              for r, p in self.programs.paged_attention.items()},
             self.programs.compiler_options)
    sub_rules = rules.without("dp")
    # KV-aware routing: every replica's block-set changes, for the router.
    self.cache_events = (CacheEventLog() if dcfg.prefix_caching else None)
    self.replicas: list[DecodeReplica] = []
    from pdjax.model.llama import param_shapes

    def views(tree, model: ModelConfig):
      """A weights tree as each replica's devices hold it."""
      specs = jax.tree.map(
          lambda s: sub_rules.partition_spec(s[1]), param_shapes(model),
          is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2
          and isinstance(x[1], tuple))
      return [jax.tree.map(lambda x, s, sub=sub: replica_view(x, sub, s),
                           tree, specs)
              for sub in replica_meshes(mesh, "dp")]
    draft_views = (None if draft is None
                   else [(v, draft[1]) for v in views(draft[0], draft[1])])
    for i, (sub, view) in enumerate(zip(replica_meshes(mesh, "dp"),
                                        views(params, cfg))):
      draft_view = None if draft_views is None else draft_views[i]
      self.replicas.append(DecodeReplica(
          i, view, cfg, sub, sub_rules, dcfg, self.eos_ids, self.programs,
          on_cache_event=(self.cache_events.on_event
                          if self.cache_events else None),
          draft=draft_view))
    self._lock = threading.Lock()
    self._inbox: collections.deque[_Pending] = collections.deque()
    self._cancelled: set[str] = set()
    self._where: dict[str, tuple[int, int]] = {}   # request -> (replica, row)
    self._inflight: list[tuple[int, Call]] = []
    self._reservations: dict[str, Reservation] = {}
    self.stats = collections.Counter()
    # Rows evicted for recompute go here (``ColocatedEngine`` prefills them
    # again); None: they end with an error.
    self.on_recompute: Callable[[DecodeRequest], None] | None = None
    self.last_iteration: IterationTiming | None = None
    # Request KVs that are views of a transport's memory go back to it once
    # their insert has completed.
    self.borrowed = BorrowedKvReturns()

  # ---------------------------------------------------------------- admit
  def validate(self, prompt_len: int, max_tokens: int) -> None:
    if prompt_len >= self.dcfg.max_seq_len:
      raise InvalidRequest("prompt", f"has {prompt_len} tokens; the decode "
                           f"pool holds at most {self.dcfg.max_seq_len - 1} "
                           "prompt tokens")
    need = pages_for(min(prompt_len + max_tokens, self.dcfg.max_seq_len),
                     self.dcfg.page_size)
    if need > self.dcfg.num_pages - 1:
      raise InvalidRequest("max_tokens", f"prompt + max_tokens needs {need} "
                           f"KV pages, more than a replica has "
                           f"({self.dcfg.num_pages - 1})")

  def reserve(self, request_id: str, prompt_len: int, max_tokens: int, *,
              transfer_id: str = "", prompt_ids: Sequence[int] | None = None,
              cache_salt: str = "") -> Reservation | None:
    """Promises capacity for a request, or None when the pool is full (the
    caller queues or refuses, by its policy). ``max_tokens``: the output
    tokens still to come, the first token included.

    With prefix caching and ``prompt_ids``, the replica holding the longest
    cached prefix of the prompt is preferred, and those blocks are pinned
    for the request (``Reservation.cached_pages``): the prefill need not
    send them. At least the prompt's last block always comes from prefill.
    """
    self.validate(prompt_len, max_tokens)
    with self._lock:
      if request_id in self._reservations:
        return self._reservations[request_id]
      pending_rows = collections.Counter(
          r.replica for r in self._reservations.values() if not r.used)
      hashes = self.block_hashes(prompt_ids, cache_salt)
      limit = max(prompt_len - 1, 0) // self.dcfg.page_size
      hashes = hashes[:limit]

      def cached(i):
        n = 0
        for h in hashes:
          if not self.replicas[i].pool.contains(h):
            break
          n += 1
        return n

      order = sorted(range(len(self.replicas)),
                     key=lambda i: (-cached(i),
                                    -self.replicas[i].pool.available))
      for i in order:
        rep = self.replicas[i]
        if rep.free_rows - pending_rows[i] <= 0:
          continue
        if rep.num_swapped:
          continue   # its preempted rows come back first
        pages = host_tier.match_with_tier(rep.pool, hashes, rep.host_tier)
        n = rep.admission_pages(prompt_len, max_tokens) - len(pages)
        if (rep.pool.available - n >= rep.headroom()
            and rep.pool.reserve(n)):
          res = Reservation(request_id, i, n, transfer_id=transfer_id,
                            cached_pages=pages)
          self._reservations[request_id] = res
          self.stats["prefix_hit_blocks"] += len(pages)
          self.stats["prefix_query_blocks"] += len(hashes)
          return res
        rep.pool.free(pages)
      return None

  def block_hashes(self, prompt_ids, cache_salt: str = "") -> list[bytes]:
    fp = self.replicas[0].fingerprint
    if fp is None or prompt_ids is None:
      return []
    return block_hashes(prompt_ids, self.dcfg.page_size, fp, cache_salt)

  def unreserve(self, request_id: str) -> Reservation | None:
    """Returns an unused reservation (transfer failed, request cancelled).
    One being admitted is left alone: admission frees or uses it, and a
    cancel reaches it through ``cancel``."""
    with self._lock:
      res = self._reservations.get(request_id)
      if res is None or res.admitting:
        return None
      del self._reservations[request_id]
      if not res.used:
        pool = self.replicas[res.replica].pool
        pool.unreserve(res.pages)
        pool.free(res.cached_pages)
      return res

  def reservation(self, request_id: str) -> Reservation | None:
    with self._lock:
      return self._reservations.get(request_id)

  def reap_reservations(self, ttl_s: float) -> list[Reservation]:
    """Returns reservations never redeemed within ``ttl_s`` (the router or
    the prefill worker died between Reserve and Decode)."""
    now = time.monotonic()
    with self._lock:
      queued = {p.request.request_id for p in self._inbox}
      dead = [r for r in self._reservations.values()
              if not r.used and now - r.created > ttl_s
              and r.request_id not in queued]
    for r in dead:
      self.unreserve(r.request_id)
    return dead

  def fail_all(self, message: str) -> None:
    """Ends every request this engine holds with an error (the engine is
    broken); frees their rows and reservations."""
    self._drop_queued(FinishReason.ERROR, message)
    for rep in self.replicas:
      for req in rep.evicted():
        self._where.pop(req.request_id, None)
        req.callback(TokenEvent(req.request_id, [], [],
                                req.lifecycle.finish(FinishReason.ERROR),
                                error=message))
    for rid, (ri, row) in list(self._where.items()):
      req = self._end_row(ri, row, RequestStatus.FINISHED_ERROR, cache=False)
      req.callback(TokenEvent(rid, [], [], req.lifecycle.reason,
                              error=message))
    self._inflight = []

  def close(self, timeout_s: float = 10.0) -> bool:
    """Shutdown, once the loop no longer steps: every borrowed KV goes back
    to its transport, so a landing region is not held by an engine that
    will never read it. Queued requests are aborted (their KV was never
    read); inserted ones are given back once their insert has finished, and
    the waiter thread ends. False when that wait passed ``timeout_s``."""
    self._drop_queued(FinishReason.ABORT)
    return self.borrowed.close(timeout_s)

  def _drop_queued(self, reason: FinishReason,
                   error: str | None = None) -> None:
    """Ends every request still queued for admission (its KV never read,
    its reservation returned) with ``reason``."""
    with self._lock:
      queued = list(self._inbox)
      self._inbox.clear()
    for p in queued:
      self.borrowed.after(None, p.request.kv)   # dropped unread
      self.unreserve(p.request.request_id)
      p.request.callback(TokenEvent(p.request.request_id, [], [],
                                    p.request.lifecycle.finish(reason),
                                    error=error))

  def submit(self, req: DecodeRequest) -> None:
    """Queues a request whose KV is ready; it joins the batch at the next
    step. Reserves on the spot if the caller did not. From here on the
    engine owns ``req.kv``: a borrowed one is given back on every path.
    The request is WAITING_FOR_KV (``IllegalTransition`` otherwise: it ran
    or ended already)."""
    if req.lifecycle.status is not RequestStatus.WAITING_FOR_KV:
      if req.kv is not None:
        self.borrowed.after(None, req.kv)
      raise IllegalTransition(f"{req.request_id} submitted to the decode "
                              f"engine while {req.lifecycle.status.name}")
    first_done = self._first_token_finishes(req)
    if first_done is not None:
      self.borrowed.after(None, req.kv)
      self.unreserve(req.request_id)
      req.callback(TokenEvent(req.request_id, [], [],
                              req.lifecycle.finish(first_done)))
      return
    res = req.reservation or self._reservations.get(req.request_id)
    if res is not None and res.cancelled:
      self.borrowed.after(None, req.kv)
      self.unreserve(req.request_id)
      req.callback(TokenEvent(req.request_id, [], [],
                              req.lifecycle.finish(FinishReason.ABORT)))
      return
    if res is None:
      try:
        res = self.reserve(req.request_id, len(req.prompt_ids),
                           req.sampling.max_tokens - req.tokens_generated + 1)
        if res is None:
          raise RuntimeError("decode pool is full")
      except BaseException:
        self.borrowed.after(None, req.kv)
        raise
    with self._lock:
      self._inbox.append(_Pending(req, res))

  def _first_token_finishes(self, req: DecodeRequest):
    s = req.sampling
    if (not s.ignore_eos and req.first_token in self.eos_ids) or (
        req.first_token in s.stop_token_ids):
      return FinishReason.STOP
    if (s.max_tokens <= req.tokens_generated
        or len(req.prompt_ids) + 1 >= self.dcfg.max_seq_len):
      return FinishReason.LENGTH
    return None

  def cancel(self, request_id: str) -> None:
    with self._lock:
      self._cancelled.add(request_id)

  def take_cancel(self, request_id: str) -> bool:
    """Whether a cancel of ``request_id`` is pending (and consumes it): a
    request leaving this engine (evicted for recompute) is aborted rather
    than handed on."""
    with self._lock:
      if request_id in self._cancelled:
        self._cancelled.discard(request_id)
        return True
      return False

  # ---------------------------------------------------------------- loop
  @property
  def has_work(self) -> bool:
    return bool(self._inbox or self._where or self._inflight)

  def default_payload_page_counts(self) -> list[int]:
    """Page counts of the request KVs a prefill pool with this page size and
    max_seq_len can send: powers of two up to the padded page budget of the
    longest sequence (``payload_pages``)."""
    top = payload_pages(self.dcfg.pages_per_seq)
    return [1 << i for i in range(top.bit_length())]

  def warmup(self, payload_page_counts: Sequence[int] | None = None, *,
             source_sharding: Callable[[int], Sharding] | None = None
             ) -> None:
    """Compiles every program serving runs, on every replica, so that no
    request ever waits for XLA (a compile of a large model's generate
    program stalls every running sequence for seconds).

    ``payload_page_counts``: the page counts of incoming request KVs
    (``RequestKV.kv.shape[2]``); defaults to every power of two up to
    ``max_seq_len / page_size``. ``source_sharding``: page count -> the
    layout those KVs arrive in, when they arrive as device arrays of this
    process (an in-process prefill engine's ``kv_sharding``): moving them
    onto a replica that splits KV heads more finely compiles a program per
    size, which this then does now. Leaves the engine clean: no rows, pages
    or reservations are used afterwards.
    """
    if self.has_work:
      raise RuntimeError("warm up the decode engine before it serves")
    counts = sorted(set(payload_page_counts if payload_page_counts is not None
                        else self.default_payload_page_counts()))
    for rep in self.replicas:
      rep.warmup(counts, source_sharding)

  def step(self) -> int:
    """One iteration: admit, dispatch a call per busy replica, then deliver
    the previous iteration's tokens. Returns the number of live rows; its
    timing is in ``last_iteration``."""
    t0 = time.perf_counter()
    self._apply_cancellations()
    if self.programs.speculative:
      # Drafts come from the rows' tokens so far: the last call's tokens
      # are read before the next call is launched.
      previous, self._inflight = self._inflight, []
      for item in previous:
        self._deliver(*item)
    self._admit()
    launched = []
    for rep in self.replicas:
      call = rep.dispatch() if rep.live_rows else None
      if call is not None:
        launched.append((rep.index, call))
      for req in rep.evicted():
        self._hand_on(req)
    previous, self._inflight = self._inflight, launched
    t1 = time.perf_counter()
    for item in previous:
      self._deliver(*item)
    live = sum(rep.live_rows for rep in self.replicas)
    self.last_iteration = IterationTiming(t1 - t0, time.perf_counter() - t1,
                                          live, len(launched))
    return live

  def drain(self, max_iters: int = 100000) -> None:
    """Runs steps until every submitted request has finished (tests)."""
    for _ in range(max_iters):
      if not self.has_work:
        return
      self.step()
    raise RuntimeError("decode engine did not drain")

  def _admit(self) -> None:
    while True:
      with self._lock:
        if not self._inbox:
          return
        p = self._inbox.popleft()
        p.reservation.admitting = True
      try:
        self._admit_one(p)
      finally:
        # Dropped only once the request holds its row (or gave it back):
        # reserve() counts pending reservations against free rows.
        with self._lock:
          if self._reservations.get(p.request.request_id) is p.reservation:
            del self._reservations[p.request.request_id]

  def _admit_one(self, p) -> None:
    rid = p.request.request_id
    rep = self.replicas[p.reservation.replica]

    def refuse(reason: FinishReason, error: str | None = None) -> None:
      """Nothing was dispatched: the KV goes back unread, and so do the
      reserved and the pinned cached pages."""
      self.borrowed.after(None, p.request.kv)
      rep.pool.unreserve(p.reservation.pages)
      rep.pool.free(p.reservation.cached_pages)
      p.request.callback(TokenEvent(rid, [], [],
                                    p.request.lifecycle.finish(reason),
                                    error=error))

    if rid in self._cancelled:
      self._cancelled.discard(rid)
      refuse(FinishReason.ABORT)
      return
    try:
      row, receipt = rep.insert(p.request, p.reservation)
    except ValueError as e:
      refuse(FinishReason.ERROR, str(e))
      return
    self.borrowed.after(receipt, p.request.kv)
    self._where[rid] = (rep.index, row)
    self.stats["inserted"] += 1

  def _apply_cancellations(self) -> None:
    """Cancels wherever the request is: running (slot freed now), queued
    (aborted at admission), or still on its way (its reservation is marked,
    so the KV is dropped on arrival). Unknown ids are ignored."""
    with self._lock:
      cancelled, self._cancelled = self._cancelled, set()
      inbox_ids = {p.request.request_id for p in self._inbox}
      for rid in cancelled:
        res = self._reservations.get(rid)
        if rid not in self._where and rid not in inbox_ids and res:
          res.cancelled = True
      self._cancelled = {rid for rid in cancelled if rid in inbox_ids}
    for rid in cancelled:
      where = self._where.get(rid)
      if where is None:
        continue   # not in a row: queued, on its way, or not here (ended)
      req = self._end_row(*where, RequestStatus.FINISHED_ABORTED)
      self.stats["cancelled"] += 1
      req.callback(TokenEvent(rid, [], [], req.lifecycle.reason))

  def _end_row(self, replica: int, row: int, status: RequestStatus, *,
               cache: bool = True) -> DecodeRequest:
    """Ends the request in ``row`` with the finished ``status`` (raises if
    it ended already): its row, its pages or swapped KV and the rest of its
    reservation go back. Returns the request, for its last event."""
    rep = self.replicas[replica]
    req = rep.rows[row].request
    rep.release(row, status, cache=cache)
    del self._where[req.request_id]
    return req

  def _hand_on(self, req: DecodeRequest) -> None:
    """A request whose row was evicted (its KV dropped) for recompute: to
    ``on_recompute``, or ended with an error where nothing recomputes."""
    rid = req.request_id
    del self._where[rid]
    self.stats["recomputed"] += 1
    if self.on_recompute is not None:
      self.on_recompute(req)
      return
    req.callback(TokenEvent(
        rid, [], [], req.lifecycle.finish(FinishReason.ERROR),
        error="preempted: the KV pool ran "
        "out of pages, the swap space had no room for this request's KV "
        "and nothing here can recompute it"))

  def _deliver(self, replica: int, call: Call) -> None:
    rep = self.replicas[replica]
    out = unpack_step_output(call.out)   # waits for the call to finish
    tokens, logprobs, valid = out.tokens, out.logprobs, out.valid
    finished, stopped = out.finished, out.stopped
    for col, (owner, row) in enumerate(call.owners):
      if self._where.get(owner) != (replica, row):
        continue   # cancelled (or failed) since the call was launched
      sel = valid[:, col]
      if not sel.any():
        continue
      toks = tokens[sel, col].tolist()
      lps = logprobs[sel, col].tolist()
      r = rep.rows[row]
      r.tokens_out += len(toks)
      r.generated.extend(toks)
      if call.drafted is not None:   # a speculating call
        drafted = call.drafted[col]
        self.stats["spec_drafted"] += drafted
        self.stats["spec_accepted"] += rep.delivered(row, drafted, len(toks))
      if finished[:, col].any():
        self._end_row(replica, row, RequestStatus.FINISHED_STOPPED
                      if stopped[:, col].any()
                      else RequestStatus.FINISHED_LENGTH)
        self.stats["finished"] += 1
      reason = r.request.lifecycle.reason   # the last event: None till then
      r.request.callback(TokenEvent(
          owner, toks, lps, reason,
          spec_drafted=r.spec_drafted if reason else 0,
          spec_accepted=r.spec_accepted if reason else 0))

  # ---------------------------------------------------------------- metrics
  def kv_usage(self) -> dict[str, int]:
    """Live KV accounting (pages) summed over replicas."""
    out = collections.Counter()
    for rep in self.replicas:
      out["pages_total"] += rep.pool.capacity
      out["pages_used"] += rep.pool.num_used
      out["pages_reserved"] += rep.pool.reserved
      out["pages_cached"] += rep.pool.num_cached
      out["pages_available"] += rep.pool.available
      out["rows_live"] += rep.live_rows
      out["rows_total"] += self.dcfg.max_seqs
      out["rows_swapped"] += rep.num_swapped
      out["pages_swapped"] += rep.pages_swapped
    out["reservations"] = len(self._reservations)
    return dict(out)

  def preemption_stats(self) -> dict[str, int]:
    """Preemptions so far, summed over replicas: rows swapped out
    (``preempted_swap``) and back (``resumed_swap``), rows evicted for
    recompute (``preempted_recompute``), and calls a row sat out for want
    of pages with no newer row to preempt (``stalled``)."""
    out = collections.Counter()
    for rep in self.replicas:
      out.update(rep.stats)
    return {k: out[k] for k in ("preempted_swap", "resumed_swap",
                                "preempted_recompute", "stalled")}

  def free_capacity(self) -> float:
    """Share of KV pages still promisable (the router's load signal)."""
    u = self.kv_usage()
    return u["pages_available"] / max(u["pages_total"], 1)


__all__ = ["DecodeConfig", "DecodeEngine", "DecodeReplica", "DecodeState",
           "IterationTiming", "Reservation", "RequestKV"]
