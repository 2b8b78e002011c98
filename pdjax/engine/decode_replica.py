"""One data-parallel replica of a decode pool: its KV pool's pages
(``BlockPool``), its rows and what the host keeps per row (page table,
sampling settings, budgets), and the calls it launches. The engine
(``pdjax.engine.decode``) owns the replicas, the admission queue and the
loop; a replica owns everything about one slice of devices.

Pages as rows grow (``DecodeConfig.kv_admission == "on_demand"``): before
each call, ``_grow`` gives every row it advances the pages that call
writes, oldest row first. When the pool cannot, the newest rows are
preempted (vLLM's policy: latest arrival first) until it can:

* swapped (``PREEMPTED_SWAPPED``): the row's pages are copied to the
  replica's ``SwapSpace`` and freed; the row keeps its slot and its device
  state (next token, position, counters), is in no call, and resumes, its
  KV written back into fresh pages, once the pool has room for it and the
  running rows' headroom (oldest swapped row first). The call in flight
  still advances it, and its tokens are delivered as usual.
* evicted (``PREEMPTED_RECOMPUTE``): when the swap space has no room, the
  row is freed and the engine hands its request on to be recomputed (its
  prompt and the tokens delivered so far prefilled again,
  ``DecodeEngine.on_recompute``); the tokens the call in flight makes for
  it are dropped at delivery (the row is gone) and made again after the
  recompute, identical.

Pages are freed at once, though the call in flight may still be writing
them: every program that reads or writes the pools (the next generate
call, an insert, a swap copy, a prefix gather, a host tier copy) takes the
state that call returns, so it runs after the call has written them.

A row that gets no pages and has no newer row to preempt waits (is in no
call) until pages free up: the rows older than it keep advancing, and
reservations and finishing rows give their pages back.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import time
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from pdjax.engine import host_tier  # host KV tier
from pdjax.engine.api import PrefixStore
from pdjax.engine.block_pool import BlockPool
from pdjax.engine.decode_config import DecodeConfig
from pdjax.engine.decode_programs import (POOL_AXES, DecodeState, SlotInputs,
                                          _init_state, _Programs)
from pdjax.engine.kv import (kv_sharding, pages_for, request_kv_shape,
                             reshard_kv)
from pdjax.engine.prefix_cache import (_gather_blocks, block_hashes,
                                      layout_fingerprint)
from pdjax.engine.requests import DecodeRequest, RequestKV, RequestStatus
from pdjax.engine.sampling import SamplingArrays, seen_rows
from pdjax.engine.shared_jit import shared_jit
from pdjax.engine.draft_model import DraftModel
from pdjax.engine.speculative import PromptLookup, propose_ngram, token_bits
from pdjax.model.config import ModelConfig
from pdjax.model.llama import Params
from pdjax.sharding import ShardingRules


@dataclasses.dataclass
class Reservation:
  """Pages promised to one request on one replica."""
  request_id: str
  replica: int
  pages: int
  used: bool = False
  cancelled: bool = False
  admitting: bool = False   # the engine thread is inserting it now
  transfer_id: str = ""
  created: float = dataclasses.field(default_factory=time.monotonic)
  # Leading prompt blocks already in this replica's pool (pinned: one
  # reference each, held by the reservation, then by the row).
  cached_pages: list[int] = dataclasses.field(default_factory=list)

  @property
  def cached_blocks(self) -> int:
    return len(self.cached_pages)


@dataclasses.dataclass
class _Row:
  request: DecodeRequest
  pages: list[int]
  reserved_left: int      # pages still promised to this row
  # Steps the row can take before a length limit ends it on device
  # (max_tokens or the context), and steps already dispatched for it: a
  # row whose dispatched steps cover its limit is in no later call, so a
  # call is never launched only to find its rows finished.
  steps_needed: int
  # Insert order on the replica: preemption takes the newest rows first.
  arrival: int = 0
  # The replica's number of the last call that verified drafts of the row
  # (0: none yet): where a call's drafts do not all fit (a batch-invariant
  # pool), the rows that waited longest draft first (``_fit``).
  last_drafted: int = 0
  steps_dispatched: int = 0
  tokens_out: int = 1
  generated: list[int] = dataclasses.field(default_factory=list)
  # Speculative decoding: tokens drafted for the row, and drafts kept;
  # prompt lookup's index of the row's tokens, once it drafts.
  spec_drafted: int = 0
  spec_accepted: int = 0
  lookup: PromptLookup | None = None

  @property
  def status(self) -> RequestStatus:
    """The request's lifecycle: RUNNING (holds pages, takes part in calls,
    may be preempted) or PREEMPTED_SWAPPED (its KV in the swap space, no
    pages) while the row is held; a released row's request has moved on
    (finished, or to be recomputed)."""
    return self.request.lifecycle.status

  @property
  def swapped(self) -> bool:
    return self.status is RequestStatus.PREEMPTED_SWAPPED

  @property
  def running(self) -> bool:
    return self.status is RequestStatus.RUNNING

  @property
  def wants_steps(self) -> bool:
    return self.running and self.steps_dispatched < self.steps_needed


class DecodeReplica:
  """One DP replica: a KV pool, ``max_seqs`` rows and its jitted programs."""

  def __init__(self, index: int, params: Params, cfg: ModelConfig,
               mesh: Mesh, rules: ShardingRules, dcfg: DecodeConfig,
               eos_ids: Sequence[int], programs: _Programs,
               on_cache_event=None, draft=None):
    """``draft``: (params, config) of the draft model (its weights on this
    replica's devices), with ``speculative = "draft"``."""
    self.index = index
    self.params = params
    self.cfg = cfg
    self.mesh = mesh
    self.dcfg = dcfg
    self.eos_ids = tuple(eos_ids)
    self.programs = programs
    self.pool = BlockPool(dcfg.num_pages, on_event=on_cache_event)
    # Prefix caching: blocks are named by content (None: off).
    self.fingerprint = (layout_fingerprint(cfg, dcfg.page_size)
                        if dcfg.prefix_caching else None)
    B, M = dcfg.max_seqs, dcfg.pages_per_seq
    # Request KVs arrive in the request layout; the pools keep every layer's
    # pages on one axis. Both split kv_heads the same way (the rule set's).
    self.kv_sharding = kv_sharding(
        rules, mesh, request_kv_shape(cfg, 1, dcfg.page_size))
    pool_sharding = rules.sharding(
        mesh, POOL_AXES, (cfg.num_layers * dcfg.num_pages, dcfg.page_size,
                          cfg.num_kv_heads, cfg.head_dim), what="kv pool")
    self.replicated = NamedSharding(mesh, PartitionSpec())
    state_sharding = DecodeState(
        k=pool_sharding, v=pool_sharding, tokens=self.replicated,
        positions=self.replicated, generated=self.replicated,
        done=self.replicated, counts=self.replicated, seen=self.replicated)
    self.state = shared_jit(functools.partial(_init_state, cfg, dcfg),
                            out_shardings=state_sharding)()
    self.draft = None
    if dcfg.speculative == "draft":
      if draft is None:
        raise ValueError("speculative='draft' needs the draft model's "
                         "weights")
      if mesh.size != 1:
        raise ValueError("a draft model runs on replicas of one device "
                         f"(this one has {mesh.size})")
      self.draft = DraftModel(draft[0], draft[1], cfg, dcfg, self.replicated)
    # Prompt lookup's rows keep an index where their n-grams pack into an
    # int64 (the bits of one token id; None: they do not, rows scan).
    bits = token_bits(cfg.padded_vocab)
    self._lookup_bits = (bits if PromptLookup.packs(dcfg.spec_ngram, bits)
                         else None)
    # --- host KV tier: evicted cached blocks go to host memory ---
    self.host_tier = host_tier.make_link(
        dcfg.host_cache_blocks if dcfg.prefix_caching else 0, self.pool,
        cfg, dcfg.page_size, lambda: (self.state.k, self.state.v),
        lambda k, v: setattr(self, "state", self.state.replace(k=k, v=v)),
        dtype=self.state.k.dtype)
    # --- preempted rows' KV: host memory (on_demand admission) ---
    self.swap = host_tier.make_swap(
        dcfg.swap_capacity, cfg, dcfg.page_size,
        lambda: (self.state.k, self.state.v),
        lambda k, v: setattr(self, "state", self.state.replace(k=k, v=v)),
        dtype=self.state.k.dtype)
    self._arrivals = itertools.count()
    self._calls = itertools.count(1)
    # Rows evicted for recompute, for the engine to hand on (``evicted``).
    self._evicted: list[_Row] = []
    self.stats: collections.Counter[str] = collections.Counter()
    self.rows: list[_Row | None] = [None] * B
    self.page_table = np.zeros((B, M), np.int32)
    self.active = np.zeros((B,), bool)
    self.samp = SamplingArrays.empty(B)
    self.max_tokens = np.ones((B,), np.int32)
    # The last upload of slot inputs, reused while nothing changed.
    self._slots_dirty = True
    self._slots_dev: SlotInputs | None = None
    self._slots_key: tuple | None = None

  # ---------------------------------------------------------------- counts
  @property
  def free_rows(self) -> int:
    return sum(r is None for r in self.rows)

  @property
  def live_rows(self) -> int:
    return self.dcfg.max_seqs - self.free_rows

  @property
  def num_swapped(self) -> int:
    """Rows whose KV is in the swap space."""
    return sum(r is not None and r.swapped for r in self.rows)

  @property
  def pages_swapped(self) -> int:
    return self.swap.used if self.swap is not None else 0

  def budget_pages(self, prompt_len: int, max_tokens: int) -> int:
    n = min(prompt_len + max_tokens, self.dcfg.max_seq_len)
    return pages_for(n, self.dcfg.page_size)

  def initial_pages(self, prompt_len: int, max_tokens: int) -> int:
    """Pages an insert allocates: the prompt's, and those its first
    generate calls write (``DecodeConfig.first_calls_tokens``)."""
    return min(self.budget_pages(prompt_len, max_tokens),
               pages_for(prompt_len + self.dcfg.first_calls_tokens,
                         self.dcfg.page_size))

  def admission_pages(self, prompt_len: int, max_tokens: int) -> int:
    """Pages admission promises a request: on_demand, its insert's; full,
    its whole budget."""
    if self.dcfg.on_demand:
      return self.initial_pages(prompt_len, max_tokens)
    return self.budget_pages(prompt_len, max_tokens)

  def headroom(self) -> int:
    """Free pages admission (and a swapped row's return) must leave for the
    running rows' growth: the larger of the watermark and the pages every
    running row's next two calls may write; none when no row runs (full
    admission: none, its reservations cover growth)."""
    if not self.dcfg.on_demand:
      return 0
    running = sum(r is not None and r.running for r in self.rows)
    if not running:
      return 0
    per_row = pages_for(2 * self.dcfg.tokens_per_call, self.dcfg.page_size)
    return max(self.dcfg.watermark_pages, running * per_row)

  def payload_sharding(self, num_pages: int) -> NamedSharding:
    """Where an incoming request KV of ``num_pages`` pages must be placed."""
    return NamedSharding(self.mesh, self.kv_sharding.spec)

  # ---------------------------------------------------------------- admit
  def insert(self, req: DecodeRequest,
             reservation: Reservation) -> tuple[int, jax.Array]:
    """Takes a row and dispatches the program that writes the request's KV
    into the pools. Returns the row and the program's receipt (ready when
    the KV has been read). Raises ValueError before dispatching anything."""
    row = self.rows.index(None)
    P = self.dcfg.page_size
    prompt_len = len(req.prompt_ids)
    # Output tokens still to come, the first token included (a resumed
    # request has produced tokens_generated of its max_tokens already).
    remaining = req.sampling.max_tokens - req.tokens_generated + 1
    n_prompt = pages_for(prompt_len, P)
    # The first generate calls write at positions prompt_len..: have those
    # pages too.
    n_now = self.initial_pages(prompt_len, remaining)
    cached = list(reservation.cached_pages)
    first = req.kv.first_page
    if first > len(cached):
      raise ValueError(f"the KV starts at page {first} but only "
                       f"{len(cached)} leading pages are cached here")
    pages = cached + self.pool.allocate(max(n_now - len(cached), 0),
                                        reserved=True)
    kv = reshard_kv(req.kv, self.payload_sharding(req.kv.kv.shape[2]))
    n_payload = kv.kv.shape[2]
    # Payload page i is block first + i. Blocks already cached here may be
    # shared with other sequences: never write them (null page instead).
    dest = np.zeros((n_payload,), np.int32)
    for i in range(min(n_payload, n_prompt - first)):
      if first + i >= len(cached):
        dest[i] = pages[first + i]
    host_tier.flush(self.host_tier)   # queued tier copies go first
    self.state, receipt = self.programs.insert(
        self.state, kv.kv, jax.device_put(dest, self.replicated),
        np.int32(row), np.int32(req.first_token), np.int32(prompt_len),
        np.int32(req.tokens_generated))
    if req.sampling.penalized:
      self._arm_penalties(row, req)
    # The row keeps the request, not its KV: the payload is in the pools now.
    # The first token came with the KV; each step adds one, and the device
    # ends the row at max_tokens or when the sequence fills max_seq_len.
    steps_needed = min(remaining - 1, self.dcfg.max_seq_len - prompt_len - 1)
    req.lifecycle.advance(RequestStatus.RUNNING)
    self.rows[row] = _Row(dataclasses.replace(req, kv=None), pages,
                          reserved_left=reservation.pages - (len(pages)
                                                             - len(cached)),
                          steps_needed=steps_needed,
                          arrival=next(self._arrivals),
                          generated=[req.first_token])
    # Only now: until the row is taken, the reservation must still count as
    # pending, or a concurrent reserve() sees a free row twice.
    reservation.used = True
    self.page_table[row] = 0
    self.page_table[row, :len(pages)] = pages
    if self.draft is not None:
      self.draft.forget(row)
    self.active[row] = True
    self.samp.set_row(row, req.sampling, req.seed_u32)
    self.max_tokens[row] = req.sampling.max_tokens
    self._slots_dirty = True
    return row, receipt

  def _arm_penalties(self, row: int, req: DecodeRequest) -> None:
    """Uploads ``row``'s penalty state: its prompt's tokens, and its
    output's so far. A request resumed after preemption carries its earlier
    output at the end of its prompt (``evicted``): its last
    ``tokens_generated - 1`` ids, counted as output."""
    V = self.cfg.padded_vocab
    ids = np.asarray(req.prompt_ids, np.int64)
    earlier = req.tokens_generated - 1
    prompt, output = ids[:len(ids) - earlier], ids[len(ids) - earlier:]
    seen = seen_rows([prompt], 1, V)[0]
    counts = np.bincount(np.append(output, req.first_token),
                         minlength=V).astype(np.int32)
    self.state = self.programs.arm_penalties(
        self.state, np.int32(row), jax.device_put(seen, self.replicated),
        jax.device_put(counts, self.replicated))

  def release(self, row: int, status: RequestStatus, *,
              cache: bool = True) -> None:
    """Frees a row, its request moving to ``status`` (a finished one, or
    PREEMPTED_RECOMPUTE): a swapped row's KV is dropped from the swap
    space, a running row's pages go back. With prefix caching, its full
    blocks (prompt and generated tokens whose KV was written) stay in the
    pool, named, for later requests; pages beyond them are free at once."""
    r = self.rows[row]
    if r is None:
      return
    held = r.status
    r.request.lifecycle.advance(status)   # raises if it ended already
    if held is RequestStatus.PREEMPTED_SWAPPED:
      self.swap.drop(row)   # its KV; it holds no pages
    if cache and self.fingerprint is not None:
      written = (list(r.request.prompt_ids) + r.generated)[
          :len(r.request.prompt_ids) + r.tokens_out - 1]
      hashes = block_hashes(written, self.dcfg.page_size, self.fingerprint,
                            r.request.cache_salt)
      for page, h in zip(r.pages, hashes):
        self.pool.register(page, h)
    self.pool.free(r.pages)
    if r.reserved_left:
      self.pool.unreserve(r.reserved_left)
    self.rows[row] = None
    self.active[row] = False
    self.page_table[row] = 0
    # A free row's settings are a fresh pool's: a call that pads with it
    # never sees the last occupant's sampling, budget or stops.
    self.samp.clear_row(row)
    self.max_tokens[row] = 1
    self._slots_dirty = True

  # ---------------------------------------------------------------- step
  def _rows_to_advance(self) -> list[int]:
    """The rows the next call advances: live, and not already at their
    length limit once the calls in flight have run."""
    return [row for row, r in enumerate(self.rows)
            if r is not None and r.wants_steps]

  def _grow(self, rows: Sequence[int]) -> list[int]:
    """Allocates the pages the next call writes for ``rows``, oldest row
    first, and counts its steps as dispatched. Pages come from the row's
    reservation, then from the pool; when the pool has too few, newer rows
    are preempted (newest first) until it has enough. Returns the rows
    that got their pages (the call's rows), in ``rows`` order."""
    P, S = self.dcfg.page_size, self.dcfg.tokens_per_call
    order = sorted(rows, key=lambda i: self.rows[i].arrival)
    granted = set()

    def running(row: int) -> bool:   # not preempted for an older row
      return self.rows[row] is not None and self.rows[row].running

    for row in order:
      if not running(row):
        continue
      r = self.rows[row]
      steps = min(r.steps_dispatched + S, r.steps_needed)
      # The last step dispatched writes the KV of position
      # prompt_len + steps - 1.
      need = max(pages_for(len(r.request.prompt_ids) + steps, P)
                 - len(r.pages), 0)
      own = min(need, r.reserved_left)
      extra = need - own
      while extra > self.pool.available:
        victim = next((v for v in reversed(order) if running(v)
                       and self.rows[v].arrival > r.arrival), None)
        if victim is None:
          break
        self._preempt(victim)
      if extra > self.pool.available:
        self.stats["stalled"] += 1
        continue
      new = (self.pool.allocate(own, reserved=True)
             + self.pool.allocate(extra))
      r.reserved_left -= own
      if new:
        self.page_table[row, len(r.pages):len(r.pages) + len(new)] = new
        r.pages.extend(new)
        self._slots_dirty = True
      r.steps_dispatched = steps
      granted.add(row)
    return [row for row in rows if row in granted]

  def _preempt(self, row: int) -> None:
    """Preempts ``row`` for an older one, freeing its pages: swapped out
    when the swap space has room for them, else evicted for recompute."""
    r = self.rows[row]
    if self.swap is not None and self.swap.fits(len(r.pages)):
      host_tier.flush(self.host_tier)   # queued tier copies go first
      self.swap.swap_out(row, r.pages)
      self.pool.free(r.pages)
      r.pages = []
      r.request.lifecycle.advance(RequestStatus.PREEMPTED_SWAPPED)
      self.page_table[row] = 0
      self._slots_dirty = True
      self.stats["preempted_swap"] += 1
      return
    # Its full blocks stay cached where prefix caching is on, so the
    # recompute may find them (the call in flight writes only past them).
    self.release(row, RequestStatus.PREEMPTED_RECOMPUTE)
    self._evicted.append(r)
    self.stats["preempted_recompute"] += 1

  def evicted(self) -> list[DecodeRequest]:
    """The requests of rows evicted since the last call, each as it must
    be resumed: its prompt followed by the tokens it generated before its
    last one, which is its first token now (the engine hands them on)."""
    out, self._evicted = self._evicted, []
    return [dataclasses.replace(
        r.request, prompt_ids=list(r.request.prompt_ids) + r.generated[:-1],
        first_token=r.generated[-1], first_logprob=0.0, reservation=None,
        tokens_generated=r.request.tokens_generated - 1 + len(r.generated))
            for r in out]

  def _resume_swapped(self) -> None:
    """Writes swapped rows back, oldest first, while the pool has room for
    one and the running rows' headroom."""
    swapped = sorted((r.arrival, row) for row, r in enumerate(self.rows)
                     if r is not None and r.swapped)
    for _, row in swapped:
      n = self.swap.held(row)
      if self.pool.available - n < self.headroom():
        return
      pages = self.pool.allocate(n)
      host_tier.flush(self.host_tier)   # reads of pages it evicted first
      self.swap.swap_in(row, pages)
      r = self.rows[row]
      r.pages = pages
      r.request.lifecycle.advance(RequestStatus.RUNNING)
      self.page_table[row, :n] = pages
      if self.draft is not None:   # its draft KV stayed in the old pages
        self.draft.forget(row)
      self._slots_dirty = True
      self.stats["resumed_swap"] += 1

  def _call_rows(self, rows: Sequence[int]) -> list[int]:
    """``rows`` padded with other (distinct) rows to the program's row
    count; the padding is inactive in the call."""
    b = self.dcfg.rows_for(len(rows))
    taken = set(rows)
    pad = [i for i in range(self.dcfg.max_seqs) if i not in taken]
    return list(rows) + pad[:b - len(rows)]

  def _slot_inputs(self, rows: Sequence[int], call_rows: Sequence[int],
                   width: int) -> SlotInputs:
    """The call's slot inputs (uploaded only when they changed)."""
    key = (tuple(rows), tuple(call_rows), width)
    if self._slots_dirty or self._slots_dev is None or key != self._slots_key:
      idx = np.asarray(call_rows, np.int32)
      active = self.active[idx].copy()
      active[len(rows):] = False
      host = SlotInputs(
          rows=idx,
          page_table=np.ascontiguousarray(self.page_table[idx, :width]),
          active=active,
          temperature=self.samp.temperature[idx], top_p=self.samp.top_p[idx],
          top_k=self.samp.top_k[idx], min_p=self.samp.min_p[idx],
          min_tokens=self.samp.min_tokens[idx],
          seed=self.samp.seed[idx],
          max_tokens=self.max_tokens[idx], stop_ids=self.samp.stop_ids[idx],
          use_eos=self.samp.use_eos[idx], presence=self.samp.presence[idx],
          frequency=self.samp.frequency[idx],
          repetition=self.samp.repetition[idx])
      self._slots_dev = jax.device_put(host, self.replicated)
      self._slots_dirty = False
      self._slots_key = key
    return self._slots_dev

  def _width(self, rows: Sequence[int]) -> int:
    """Page-table width of a call: covers its rows' pages."""
    need = max((len(self.rows[row].pages) for row in rows), default=1)
    return self.dcfg.width_for(need)

  def warmup(self, payload_page_counts: Sequence[int],
             source_sharding: Callable[[int], Sharding] | None = None
             ) -> None:
    """Compiles insert (once per payload size) and both generate programs
    (greedy and sampled) on this
    replica's devices with dummy data.

    The dummy KV is written to the null page and the dummy row is never made
    active on the host, so no page, row or reservation is touched: the
    replica is as clean afterwards as before. Each program is called twice in
    a row as well as after the other, so every state layout serving can feed
    it (fresh, after insert, after generate) has been seen. With
    ``source_sharding`` the dummy KV starts in that layout and goes through
    ``reshard_kv``, which compiles a slicing program when the source splits
    the KV heads less than this replica does.
    """
    if self.live_rows:
      raise RuntimeError("warm up a replica before it serves requests")
    zero = np.int32(0)
    for n in payload_page_counts:
      shape = request_kv_shape(self.cfg, n, self.dcfg.page_size)
      host = np.zeros(shape, self.state.k.dtype)   # as handed on
      if source_sharding is None:
        kv = jax.device_put(host, self.payload_sharding(n))
      else:
        kv = reshard_kv(RequestKV(jax.device_put(host, source_sharding(n)), 1),
                        self.payload_sharding(n)).kv
      dest = jax.device_put(np.zeros((n,), np.int32), self.replicated)
      for _ in range(2):
        self.state, _ = self.programs.insert(self.state, kv, dest, zero,
                                             zero, zero, zero)
    # Row 0's penalty state, as a penalized request's insert sets it (no
    # row is live: nothing reads it).
    V = self.cfg.padded_vocab
    for _ in range(2):
      self.state = self.programs.arm_penalties(
          self.state, zero,
          jax.device_put(np.zeros((V,), bool), self.replicated),
          jax.device_put(np.zeros((V,), np.int32), self.replicated))
    if self.host_tier is not None:   # host KV tier programs
      self.host_tier.warmup()
    if self.draft is not None:       # the draft model's programs
      self.draft.warmup(self.dcfg.row_counts, self.dcfg.widths)
    if self.swap is not None:        # preempted rows' swap programs
      self.swap.warmup()
    for rows in self.dcfg.row_counts:
      call_rows = list(range(rows))   # none active: nothing changes
      extra = ()
      if self.programs.speculative:   # no drafts
        extra = tuple(jax.device_put(a, self.replicated) for a in (
            np.zeros((rows, self.dcfg.spec_tokens), np.int32),
            np.zeros((rows,), np.int32)))
      for width in self.dcfg.widths:
        slots = self._slot_inputs([], call_rows, width)
        for all_greedy in (True, True, False, False):
          self.state, out = self.programs.generate(all_greedy, rows)(
              self.params, self.state, slots, *extra)
          for steps in {1, self.dcfg.steps_without_room}:
            plain = self.programs.plain(all_greedy, rows, steps)
            if plain is not None:
              self.state, out = plain(self.params, self.state, slots)
    jax.block_until_ready((self.state, out))

  def all_greedy(self, rows: Sequence[int] | None = None) -> bool:
    """Whether every one of ``rows`` (default: the active ones) samples
    greedily (picks the program)."""
    idx = self.active if rows is None else np.asarray(rows, np.int32)
    return not bool(np.any(self.samp.temperature[idx] != 0.0))

  def dispatch(self) -> Call | None:
    """Launches one generate call for the rows that still want steps (None
    when no row does: the calls in flight finish every live row, or the
    rows wait for pages). First writes swapped rows back where they
    fit."""
    if self.swap is not None:
      self.swap.land()
      self._resume_swapped()
    wanting = self._rows_to_advance()
    # What each row may still take (speculation drafts within it).
    left = {row: self.rows[row].steps_needed - self.rows[row].steps_dispatched
            for row in wanting}
    lookups = self._lookups(wanting, left)
    rows = self._grow(wanting)
    if not rows:
      return None
    host_tier.flush(self.host_tier)   # queued tier copies go first
    call_rows = self._call_rows(rows)
    slots = self._slot_inputs(rows, call_rows, self._width(rows))
    all_greedy = self.all_greedy(rows)
    owners = [(self.rows[row].request.request_id, row) for row in rows]
    call = next(self._calls)
    if not self.programs.speculative:
      program = self.programs.generate(all_greedy, len(call_rows))
      self.state, out = program(self.params, self.state, slots)
      return Call(out, owners)
    drafts, num = self._drafts(rows, len(call_rows), left, slots, lookups)
    if not num.any():
      # Nothing to verify: plain steps, one where nothing was drafted (the
      # rows look up drafts again after it), more where no draft fits.
      steps = (self.dcfg.steps_without_room
               if self.dcfg.draft_room(len(rows)) == 0 else 1)
      plain = self.programs.plain(all_greedy, len(call_rows), steps)
      if plain is not None:
        self.state, out = plain(self.params, self.state, slots)
        return Call(out, owners, drafted=[0] * len(rows))
    for row, n in zip(rows, num):
      if n:
        self.rows[row].last_drafted = call
    program = self.programs.generate(all_greedy, len(call_rows))
    self.state, out = program(self.params, self.state, slots,
                              jax.device_put(drafts, self.replicated),
                              jax.device_put(num, self.replicated))
    return Call(out, owners, drafted=num[:len(rows)].tolist())

  def _lookups(self, rows: Sequence[int], left: dict[int, int]
               ) -> dict[int, list[int]] | None:
    """Prompt lookup's drafts for ``rows``, each within what the row may
    still generate (it emits at most one token more than it drafts; none
    for rows that opted out); None in a pool that does not draft by prompt
    lookup. They come from the rows' tokens on the host (a speculating
    pool reads each call's tokens before the next), so they are known
    before the call's rows are chosen."""
    if self.dcfg.speculative != "ngram":
      return None
    k = self.dcfg.spec_tokens
    return {row: (self._prompt_lookup(row, min(k, left[row] - 1))
                  if self.rows[row].request.sampling.drafted else [])
            for row in rows}

  def _drafts(self, rows: Sequence[int], width: int, left: dict[int, int],
              slots: SlotInputs, lookups: dict[int, list[int]] | None):
    """Drafts for a verify call of ``width`` rows, its first ``rows``:
    per row up to ``spec_tokens`` tokens (prompt lookup's ``lookups``, or
    the draft model's, on device), of which the verify program checks
    ``num`` per row: within what the row may still generate, none for
    rows that opted out, and within what the call holds (``_fit``)."""
    k = self.dcfg.spec_tokens
    if self.draft is not None:   # every row drafts: the draft's KV follows
      num = self._fit(rows, width, [
          max(min(k, left[row] - 1), 0)
          if self.rows[row].request.sampling.drafted else 0
          for row in rows])
      lengths = [len(self.rows[row].request.prompt_ids)
                 + len(self.rows[row].generated) for row in rows]
      return self.draft.propose(rows, width, slots.page_table, lengths,
                                self._tokens), num
    num = self._fit(rows, width, [len(lookups[row]) for row in rows])
    drafts = np.zeros((width, k), np.int32)
    for i, row in enumerate(rows):
      drafts[i, :num[i]] = lookups[row][:num[i]]
    return drafts, num

  def _fit(self, rows: Sequence[int], width: int,
           wanted: Sequence[int]) -> np.ndarray:
    """How many of the ``wanted`` drafts of each of ``rows`` a verify call
    of ``width`` rows checks: all of them, unless they exceed the call's
    room (``DecodeConfig.draft_room``: a batch-invariant pool's), where
    the rows that waited longest for a verified draft go first."""
    num = np.zeros((width,), np.int32)
    room = self.dcfg.draft_room(len(rows))
    if sum(wanted) <= room:   # every pool but a full batch-invariant one
      num[:len(rows)] = wanted
      return num
    for i in sorted(range(len(rows)),
                    key=lambda i: (self.rows[rows[i]].last_drafted,
                                   self.rows[rows[i]].arrival)):
      num[i] = min(wanted[i], room)
      room -= num[i]
    return num

  def _prompt_lookup(self, row: int, k: int) -> list[int]:
    """Prompt lookup's draft of up to ``k`` tokens for ``row``: from the
    row's index (``PromptLookup``, brought up to the tokens it generated
    since), or, where its n-grams do not pack into an int64 (a long
    ``spec_ngram`` over a large vocabulary), from its whole sequence."""
    r = self.rows[row]
    prompt = r.request.prompt_ids
    if self._lookup_bits is None:
      return propose_ngram(list(prompt) + r.generated, k,
                           max_n=self.dcfg.spec_ngram)
    if r.lookup is None:
      r.lookup = PromptLookup(prompt, len(prompt) + 64,
                              max_n=self.dcfg.spec_ngram,
                              bits=self._lookup_bits)
    r.lookup.update(r.generated)
    return r.lookup.propose(k)

  def _tokens(self, row: int, a: int, b: int) -> list[int]:
    """Tokens ``a .. b - 1`` of a row's prompt and output so far."""
    r = self.rows[row]
    n = len(r.request.prompt_ids)
    return (list(r.request.prompt_ids[a:min(b, n)])
            + r.generated[max(a - n, 0):max(b - n, 0)])

  def delivered(self, row: int, drafted: int, emitted: int) -> int:
    """After a speculating call's tokens are read: the row advanced by what
    it emitted (not by the most it could), and its acceptance counts.
    Returns the drafts it kept."""
    r = self.rows[row]
    r.steps_dispatched = r.tokens_out - 1
    accepted = min(max(emitted - 1, 0), drafted)
    if self.draft is not None:   # the call started at the token before these
      pos = len(r.request.prompt_ids) + len(r.generated) - emitted - 1
      self.draft.advance(row, pos, accepted)
    r.spec_drafted += drafted
    r.spec_accepted += accepted
    return accepted


@dataclasses.dataclass
class Call:
  """A generate call in flight: its outputs (``pack_step_output``'s array;
  column ``i`` is row ``owners[i][1]``'s) and who owned each advanced row
  when it launched; for a speculating call, how many tokens each row
  drafted."""
  out: jax.Array
  owners: list[tuple[str, int]]
  drafted: list[int] | None = None


class ReplicaPrefixStore(PrefixStore):
  """A decode replica's cached blocks, as its colocated prefill engine sees
  them: a request's cached prefix is pinned at reservation
  (``Reservation.cached_pages``) and gathered from the replica's pools into
  the prefill buffer; the prefill computes only the rest. The replica's
  finished rows fill it (``DecodeReplica.release``), not the prefills."""

  def __init__(self, replica: "DecodeReplica"):
    self.replica = replica
    self.page_size = replica.dcfg.page_size
    self._gather = shared_jit(
        functools.partial(_gather_blocks, num_layers=replica.cfg.num_layers),
        donate_argnums=(3, 4))

  def hashes(self, token_ids, salt: str = "") -> list[bytes]:
    return block_hashes(token_ids, self.page_size, self.replica.fingerprint,
                        salt)

  def match(self, hashes, sources=()) -> list[int]:
    return host_tier.match_with_tier(self.replica.pool, hashes,
                                     self.replica.host_tier)

  def release(self, pages) -> None:
    self.replica.pool.free(pages)

  def block_stats(self) -> dict[str, int]:
    return {k: self.replica.pool.stats[k]
            for k in ("hits", "misses", "evictions")}

  def gather_into(self, pages, k_buf, v_buf):
    table = np.zeros((k_buf.shape[2] // self.page_size,), np.int32)
    table[:len(pages)] = pages
    host_tier.flush(self.replica.host_tier)   # promoted pages land first
    st = self.replica.state
    return self._gather(st.k, st.v, jax.device_put(
        table, self.replica.replicated), k_buf, v_buf)

  def warmup(self, engine) -> None:
    for length in engine.chunk_buffer_lens:
      jax.block_until_ready(self.gather_into([], *engine.empty_buffers(
          length)))


__all__ = ["Call", "DecodeReplica", "ReplicaPrefixStore", "Reservation"]
