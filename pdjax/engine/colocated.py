"""Colocated serving: prefill and decode interleaved on the same devices.

This is the baseline disaggregation is measured against (vLLM's and
JetStream's interleaved mode) and also what a decode worker does for prompts
under the local-prefill threshold. Each loop iteration admits waiting
requests that fit (reserving their KV pages, ``DecodeEngine.reserve``),
prefills up to ``max_prefill_batch`` of them per replica on that replica's
own devices, and then runs one decode call: a long prompt therefore delays
the running sequences' next tokens, which is exactly the interference
disaggregation removes.

The waiting queue is admission's queue: first come, first admitted (a
request that does not fit holds back the later ones), bounded
(``max_waiting``: ``submit`` raises ``OverflowError`` past it) and with a
deadline (``queue_timeout_s``: a request not admitted by then ends with an
``exhausted`` event, which the decode service answers as
RESOURCE_EXHAUSTED). Rows the decode pool preempts without room to swap
their KV come back to the head of this queue, their prompt and generated
tokens to be prefilled again, and continue from their last token
(``forced_first_token``): they never expire.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Sequence

from jax.sharding import Mesh

from pdjax.engine.decode import DecodeConfig, DecodeEngine
from pdjax.engine.decode_replica import ReplicaPrefixStore
from pdjax.engine.prefill import (BufferedPrefill, PrefillConfig,
                                  PrefillEngine)
from pdjax.engine.requests import (DecodeRequest, FinishReason, Lifecycle,
                                   PrefillRequest, RequestStatus,
                                   TokenCallback, TokenEvent)
from pdjax.engine.sampling import SamplingParams
from pdjax.model.config import ModelConfig
from pdjax.model.llama import Params
from pdjax.sharding import ShardingRules


@dataclasses.dataclass
class _Waiting:
  request_id: str
  prompt_ids: Sequence[int]
  sampling: SamplingParams
  seed_u32: int
  callback: TokenCallback
  forced_first_token: int | None = None
  cache_salt: str = ""
  submitted: float = dataclasses.field(default_factory=time.perf_counter)
  # Output tokens already generated (``DecodeRequest.tokens_generated``):
  # above 1 for a preempted request to be recomputed.
  tokens_generated: int = 1
  # perf_counter() by which it must be admitted (None: no deadline).
  deadline: float | None = None
  # WAITING here; WAITING_FOR_KV once reserved and prefilling; the decode
  # engine moves it on (a recomputed request brings its own back).
  lifecycle: Lifecycle = dataclasses.field(default_factory=Lifecycle)

  @property
  def remaining_tokens(self) -> int:
    """Output tokens still to come, the (forced) first token included."""
    return self.sampling.max_tokens - self.tokens_generated + 1


class ColocatedEngine:
  """A decode pool whose replicas also prefill their own requests."""

  def __init__(self, params: Params, cfg: ModelConfig, mesh: Mesh,
               rules: ShardingRules, pcfg: PrefillConfig = PrefillConfig(),
               dcfg: DecodeConfig = DecodeConfig(), *,
               eos_ids: Sequence[int] | None = None,
               max_waiting: int | None = None,
               queue_timeout_s: float | None = None,
               draft=None):
    """``max_waiting``: requests the queue holds (None: no bound);
    ``queue_timeout_s``: how long one may wait to be admitted (None: no
    deadline); ``draft``: the draft model's (params, config) for
    ``speculative = "draft"`` (``DecodeEngine``)."""
    if pcfg.kv_dtype != dcfg.kv_dtype:
      raise ValueError(f"the prefill hands on KV as {pcfg.kv_dtype!r} but "
                       f"the decode pool stores {dcfg.kv_dtype!r}: give both "
                       "the same kv_dtype")
    self.cfg = cfg
    self.decode = DecodeEngine(params, cfg, mesh, rules, dcfg,
                               eos_ids=eos_ids, draft=draft)
    self.decode.on_recompute = self._requeue
    sub_rules = rules.without("dp")
    self.prefill = [PrefillEngine(
        rep.params, cfg, rep.mesh, sub_rules, pcfg,
        prefix_store=(ReplicaPrefixStore(rep) if dcfg.prefix_caching
                      else None))
                    for rep in self.decode.replicas]
    budget = dcfg.prefill_token_budget
    if budget:   # a prompt whose bucket passes the budget runs chunked
      fits = [b for b in pcfg.buckets if b <= budget]
      for p in self.prefill:
        p.buffered_from = min(p.buffered_from, fits[-1] + 1 if fits else 1)
    self.pcfg = pcfg
    self.max_waiting = max_waiting
    self.queue_timeout_s = queue_timeout_s
    self.stats = collections.Counter()
    self._waiting: collections.deque[_Waiting] = collections.deque()
    # Per replica, the prompt being prefilled a chunk budget at a time.
    self._partial: dict[int, _Partial] = {}
    self._cancelled: set[str] = set()
    self._lock = threading.Lock()

  def warmup(self, remote_payload_page_counts: Sequence[int] = ()) -> None:
    """Compiles every prefill and decode program serving can run (each
    replica's prefill buckets, batch sizes and chunk counts; generate and
    insert for every KV size the local prefill, or a remote prefill pool
    with ``remote_payload_page_counts``, produces), leaving the engine
    clean: nothing waiting, no rows, pages or reservations used."""
    if self.has_work:
      raise RuntimeError("warm up the colocated engine before it serves")
    for p in self.prefill:   # pages to skip: the pool's own cached blocks
      p.warmup(skip_pages=self.decode.dcfg.prefix_caching)
    self.decode.warmup(sorted(set(self.prefill[0].payload_page_counts())
                              | set(remote_payload_page_counts)))

  def validate(self, prompt_ids: Sequence[int], sampling: SamplingParams):
    sampling.validate(self.cfg.vocab_size)
    self.prefill[0].validate(prompt_ids)
    self.decode.validate(len(prompt_ids), sampling.max_tokens)

  def submit(self, request_id: str, prompt_ids: Sequence[int],
             sampling: SamplingParams, callback: TokenCallback,
             seed_u32: int = 0, *, forced_first_token: int | None = None,
             cache_salt: str = "") -> None:
    """Queues a request; tokens arrive through ``callback`` (first token
    included), the last event carrying the finish reason.

    ``forced_first_token``: the first token is already known (a remote
    prefill produced and sent it, then its KV was lost): recompute the KV
    here and continue from that token instead of sampling a new one; no
    event is sent for it."""
    self.validate(prompt_ids, sampling)
    w = _Waiting(request_id, list(prompt_ids), sampling, seed_u32, callback,
                 forced_first_token, cache_salt)
    if self.queue_timeout_s is not None:
      w.deadline = w.submitted + self.queue_timeout_s
    with self._lock:
      if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
        self.stats["refused_full"] += 1
        raise OverflowError(f"{len(self._waiting)} requests already waiting")
      self._waiting.append(w)

  def _requeue(self, req: DecodeRequest) -> None:
    """``DecodeEngine.on_recompute``: a preempted request whose KV was
    dropped goes to the head of the queue, to be prefilled again (its
    prompt now ends with the tokens it generated) and to continue from
    its last token, unless a cancel of it is pending."""
    w = _Waiting(req.request_id, list(req.prompt_ids), req.sampling,
                 req.seed_u32, req.callback,
                 forced_first_token=req.first_token,
                 cache_salt=req.cache_salt,
                 tokens_generated=req.tokens_generated,
                 lifecycle=req.lifecycle)
    with self._lock:
      # Under the lock that ``cancel`` holds while it looks for a request
      # and, not finding it here, cancels it in the decode pool: either
      # that cancel is pending there now, or it will find it queued.
      cancelled = self.decode.take_cancel(req.request_id)
      if not cancelled:
        w.lifecycle.advance(RequestStatus.WAITING)
        self._waiting.appendleft(w)
    if cancelled:
      req.callback(TokenEvent(req.request_id, [], [],
                              req.lifecycle.finish(FinishReason.ABORT)))

  # ------------------------------------------------ the DecodeBackend seam
  @property
  def max_seq_len(self) -> int:
    return self.decode.dcfg.max_seq_len

  @property
  def devices(self) -> list:
    """This process's devices of the pool's mesh."""
    return list(self.decode.mesh.local_devices)

  @property
  def cache_events(self):
    return self.decode.cache_events

  def reserve(self, request_id: str, prompt_len: int, max_tokens: int, *,
              transfer_id: str = "", prompt_ids: Sequence[int] | None = None,
              cache_salt: str = ""):
    """Decode-side admission of a request prefilled elsewhere
    (``DecodeEngine.reserve``)."""
    return self.decode.reserve(request_id, prompt_len, max_tokens,
                               transfer_id=transfer_id,
                               prompt_ids=prompt_ids, cache_salt=cache_salt)

  def unreserve(self, request_id: str):
    return self.decode.unreserve(request_id)

  def reservation(self, request_id: str):
    return self.decode.reservation(request_id)

  def payload_sharding(self, replica: int, num_pages: int):
    """Where a request KV of ``num_pages`` pages for ``replica`` lands."""
    return self.decode.replicas[replica].payload_sharding(num_pages)

  def submit_decode(self, request: DecodeRequest) -> None:
    """A request whose KV is here: it joins the continuous batch."""
    self.decode.submit(request)

  def last_iteration(self):
    return self.decode.last_iteration

  def kv_usage(self) -> dict[str, int]:
    return self.decode.kv_usage()

  def block_stats(self) -> dict[str, dict[str, int]]:
    """Prefix-cache lookups and evictions, summed over replicas: the
    device pools' ("decode") and, where there is one, the host tier's
    ("decode_host")."""
    out = {"decode": collections.Counter()}
    for rep in self.decode.replicas:
      for stat in ("hits", "misses", "evictions"):
        out["decode"][stat] += rep.pool.stats[stat]
      if rep.host_tier is not None:
        host = out.setdefault("decode_host", collections.Counter())
        for stat, n in rep.host_tier.tier.stats.items():
          host[stat] += n
    return {k: dict(v) for k, v in out.items()}

  def preemption_stats(self) -> dict[str, int]:
    """Rows preempted so far (``DecodeEngine.preemption_stats``) and
    requests the queue refused: full (``refused_full``) or past its
    deadline (``refused_timeout``)."""
    return {**self.decode.preemption_stats(),
            "refused_full": self.stats["refused_full"],
            "refused_timeout": self.stats["refused_timeout"]}

  def prefill_tokens(self) -> tuple[int, int]:
    """Prompt tokens prefilled here so far: (from a cache, computed)."""
    cached = sum(p.stats["cached_tokens"] for p in self.prefill)
    total = sum(p.stats["prompt_tokens"] for p in self.prefill)
    return cached, total - cached

  def close(self, timeout_s: float = 10.0) -> bool:
    """Shutdown once nothing steps: requests still waiting or part-way
    through a prefill are aborted, and the decode pool gives back every
    KV it borrowed (``DecodeEngine.close``)."""
    self._end_not_decoding(FinishReason.ABORT)
    return self.decode.close(timeout_s)

  def _end_not_decoding(self, reason: FinishReason,
                        error: str | None = None) -> None:
    """Ends every request that is not decoding yet (queued, or part-way
    through a prefill, its reservation given back) with ``reason``."""
    with self._lock:
      waiting, self._waiting = list(self._waiting), collections.deque()
      partial, self._partial = list(self._partial.values()), {}
    for p in partial:
      p.run.abort()
      self.decode.unreserve(p.waiting.request_id)
      waiting.append(p.waiting)
    for w in waiting:
      w.callback(TokenEvent(w.request_id, [], [], w.lifecycle.finish(reason),
                            error=error))

  def cancel(self, request_id: str) -> None:
    with self._lock:
      if any(w.request_id == request_id for w in self._waiting) or any(
          p.waiting.request_id == request_id
          for p in self._partial.values()):
        self._cancelled.add(request_id)
        return
      # Still under the lock: a request moving back here from the decode
      # pool (``_requeue``) sees this cancel.
      self.decode.cancel(request_id)

  def fail_all(self, message: str) -> None:
    self._end_not_decoding(FinishReason.ERROR, message)
    self.decode.fail_all(message)

  @property
  def num_waiting(self) -> int:
    """Requests not decoding yet: queued, or part-way through a prefill."""
    return len(self._waiting) + len(self._partial)

  @property
  def has_work(self) -> bool:
    return bool(self._waiting or self._partial) or self.decode.has_work

  def step(self) -> int:
    self._prefill_admitted()
    return self.decode.step()

  def drain(self, max_iters: int = 100000) -> None:
    for _ in range(max_iters):
      if not self.has_work:
        return
      self.step()
    raise RuntimeError("colocated engine did not drain")

  # ---------------------------------------------------------------- prefill
  def _cost(self, w: _Waiting) -> int | None:
    """Prompt tokens of compute a batched prefill of ``w`` takes (its
    bucket), or None when it runs chunked (longer than every bucket, or
    longer than the per-iteration budget)."""
    bucket = self.pcfg.bucket_for(len(w.prompt_ids))
    budget = self.decode.dcfg.prefill_token_budget
    if bucket is None or (budget and bucket > budget):
      return None
    return bucket

  def _prefill_admitted(self) -> None:
    """One iteration's prefill work, per replica at most
    ``prefill_token_budget`` prompt tokens (0: no bound) and ``max_batch``
    new requests: first the next chunks of a prompt already part-way
    through, then waiting requests in arrival order, batched when they fit
    whole, or started as a chunked prefill of their own. Capacity (the
    KV budget) is reserved before any prefill starts."""
    budget = self.decode.dcfg.prefill_token_budget or None
    spent: dict[int, int] = collections.Counter()
    finished: list[tuple[_Waiting, object, _Partial]] = []
    aborted: list[_Waiting] = []
    self._expire_waiting()
    # 1. Prompts part-way through: their next chunks.
    for replica, p in list(self._partial.items()):
      if self._take_cancelled(p.waiting.request_id):
        del self._partial[replica]
        p.run.abort()
        self.decode.unreserve(p.waiting.request_id)
        aborted.append(p.waiting)
        continue
      before = p.run.position
      if p.run.advance(budget):
        del self._partial[replica]
        finished.append((p.waiting, p.reservation, p))
      spent[replica] += p.run.position - before
    # 2. Waiting requests, in arrival order.
    per_replica: dict[int, list[tuple[_Waiting, object]]] = (
        collections.defaultdict(list))
    chunked: dict[int, tuple[_Waiting, object]] = {}
    with self._lock:
      keep: collections.deque[_Waiting] = collections.deque()
      while self._waiting:
        w = self._waiting.popleft()
        if w.request_id in self._cancelled:
          self._cancelled.discard(w.request_id)
          aborted.append(w)
          continue
        res = self.decode.reserve(w.request_id, len(w.prompt_ids),
                                  w.remaining_tokens,
                                  prompt_ids=w.prompt_ids,
                                  cache_salt=w.cache_salt)
        taken = res is not None and self._place(
            w, res, per_replica, chunked, spent, budget)
        if taken:
          w.lifecycle.advance(RequestStatus.WAITING_FOR_KV)
        else:
          if res is not None:
            self.decode.unreserve(w.request_id)
          keep.append(w)
          # Arrival order: do not let later requests overtake.
          keep.extend(self._waiting)
          self._waiting.clear()
          break
      self._waiting = keep
    for w in aborted:
      w.callback(TokenEvent(w.request_id, [], [],
                            w.lifecycle.finish(FinishReason.ABORT)))
    for w, res, p in finished:
      self._to_decode(w, res, p.run.result(), p.started)
    for replica, items in per_replica.items():
      self._prefill_batch(replica, items)
    # 3. Chunked prefills that start now take what their replica's budget
    # has left.
    for replica, (w, res) in chunked.items():
      p = _Partial(w, res, self.prefill[replica].start_chunked(
          self._prefill_request(w, res)), time.perf_counter())
      left = None if budget is None else max(budget - spent[replica], 1)
      if p.run.advance(left):
        self._to_decode(w, res, p.run.result(), p.started)
      else:
        self._partial[replica] = p

  def _expire_waiting(self) -> None:
    """Ends the requests that waited past their deadline without being
    admitted (cancelled ones with ABORT, as admission would)."""
    now = time.perf_counter()
    with self._lock:
      if not any(w.deadline is not None and now > w.deadline
                 for w in self._waiting):
        return
      expired = [w for w in self._waiting
                 if w.deadline is not None and now > w.deadline]
      self._waiting = collections.deque(
          w for w in self._waiting
          if w.deadline is None or now <= w.deadline)
      cancelled = {w.request_id for w in expired} & self._cancelled
      self._cancelled -= cancelled
    for w in expired:
      if w.request_id in cancelled:
        w.callback(TokenEvent(w.request_id, [], [],
                              w.lifecycle.finish(FinishReason.ABORT)))
        continue
      self.stats["refused_timeout"] += 1
      w.callback(TokenEvent(
          w.request_id, [], [], w.lifecycle.finish(FinishReason.ABORT),
          exhausted=True,
          error=f"not admitted within {self.queue_timeout_s:g} s: the "
          "decode pool's KV pages and rows are taken; retry later"))

  def _place(self, w: _Waiting, res, per_replica, chunked, spent,
             budget) -> bool:
    """Puts a reserved request into this iteration's batch of its replica,
    or marks it to start a chunked prefill there (then the replica takes
    nothing more this iteration); False if neither fits now."""
    replica = res.replica
    if replica in chunked:
      return False
    cost = self._cost(w)
    if cost is not None:
      if len(per_replica[replica]) >= self.pcfg.max_batch:
        return False
      if budget and spent[replica] and spent[replica] + cost > budget:
        return False
      per_replica[replica].append((w, res))
      spent[replica] += cost
      return True
    if replica in self._partial or (budget and spent[replica] >= budget):
      return False
    chunked[replica] = (w, res)
    return True

  def _take_cancelled(self, request_id: str) -> bool:
    with self._lock:
      if request_id in self._cancelled:
        self._cancelled.discard(request_id)
        return True
      return False

  @staticmethod
  def _prefill_request(w: _Waiting, res) -> PrefillRequest:
    return PrefillRequest(w.request_id, w.prompt_ids, w.sampling, w.seed_u32,
                          cache_salt=w.cache_salt,
                          skip_pages=res.cached_blocks,
                          prefix_pages=res.cached_pages)

  def _prefill_batch(self, replica: int, items) -> None:
    started = time.perf_counter()

    def first_token(i, r, items=items, started=started):
      """Each request's first token goes out as soon as it is known (a
      call may prefill several, one after another)."""
      self._first_token(items[i][0], r, started)

    results = self.prefill[replica].prefill(
        [self._prefill_request(w, res) for w, res in items],
        on_result=first_token)
    for (w, res), r in zip(items, results):
      self._submit_decode(w, res, r)

  def _first_token(self, w: _Waiting, r, started: float) -> None:
    if w.forced_first_token is None:
      w.callback(TokenEvent(
          w.request_id, [r.first_token], [r.first_logprob],
          cached_tokens=r.cached_tokens, queue_s=started - w.submitted,
          prefill_s=time.perf_counter() - started))

  def _to_decode(self, w: _Waiting, res, r, started: float) -> None:
    self._first_token(w, r, started)
    self._submit_decode(w, res, r)

  def _submit_decode(self, w: _Waiting, res, r) -> None:
    first, logprob = r.first_token, r.first_logprob
    if w.forced_first_token is not None:
      first, logprob = w.forced_first_token, 0.0
    self.decode.submit(DecodeRequest(
        w.request_id, w.prompt_ids, first, logprob, r.kv,
        w.sampling, w.seed_u32, w.callback, reservation=res,
        cache_salt=w.cache_salt, tokens_generated=w.tokens_generated,
        lifecycle=w.lifecycle))


@dataclasses.dataclass
class _Partial:
  """A prompt part-way through its chunked prefill on one replica."""
  waiting: _Waiting
  reservation: object
  run: BufferedPrefill
  started: float          # perf_counter() of its first chunk


__all__ = ["ColocatedEngine"]
