"""One data-parallel replica of a decode pool: its KV pool's pages
(``BlockPool``), its rows and what the host keeps per row (page table,
sampling settings, budgets), and the calls it launches. The engine
(``pdjax.engine.decode``) owns the replicas, the admission queue and the
loop; a replica owns everything about one slice of devices."""

from __future__ import annotations

import dataclasses
import functools
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
from pdjax.engine.sampling import MAX_STOP_TOKEN_IDS, SamplingArrays
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
  steps_dispatched: int = 0
  tokens_out: int = 1
  status: RequestStatus = RequestStatus.RUNNING
  generated: list[int] = dataclasses.field(default_factory=list)

  @property
  def wants_steps(self) -> bool:
    return self.steps_dispatched < self.steps_needed


class DecodeReplica:
  """One DP replica: a KV pool, ``max_seqs`` rows and its jitted programs."""

  def __init__(self, index: int, params: Params, cfg: ModelConfig,
               mesh: Mesh, rules: ShardingRules, dcfg: DecodeConfig,
               eos_ids: Sequence[int], programs: _Programs,
               on_cache_event=None):
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
        done=self.replicated)
    self.state = jax.jit(functools.partial(_init_state, cfg, dcfg),
                         out_shardings=state_sharding)()
    # --- host KV tier: evicted cached blocks go to host memory ---
    self.host_tier = host_tier.make_link(
        dcfg.host_cache_blocks if dcfg.prefix_caching else 0, self.pool,
        cfg, dcfg.page_size, lambda: (self.state.k, self.state.v),
        lambda k, v: setattr(self, "state", self.state.replace(k=k, v=v)))
    self.rows: list[_Row | None] = [None] * B
    self.page_table = np.zeros((B, M), np.int32)
    self.active = np.zeros((B,), bool)
    self.samp = SamplingArrays.empty(B)
    self.max_tokens = np.ones((B,), np.int32)
    self.stop_ids = np.full((B, MAX_STOP_TOKEN_IDS), -1, np.int32)
    self.use_eos = np.ones((B,), bool)
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

  def budget_pages(self, prompt_len: int, max_tokens: int) -> int:
    n = min(prompt_len + max_tokens, self.dcfg.max_seq_len)
    return pages_for(n, self.dcfg.page_size)

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
    budget = self.budget_pages(prompt_len, req.sampling.max_tokens)
    n_prompt = pages_for(prompt_len, P)
    # The first generate call writes at positions prompt_len.. +steps: have
    # those pages too.
    n_now = min(budget, pages_for(prompt_len + 2 * self.dcfg.steps_per_call,
                                  P))
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
        np.int32(row), np.int32(req.first_token), np.int32(prompt_len))
    # The row keeps the request, not its KV: the payload is in the pools now.
    # The first token came with the KV; each step adds one, and the device
    # ends the row at max_tokens or when the sequence fills max_seq_len.
    steps_needed = min(req.sampling.max_tokens - 1,
                       self.dcfg.max_seq_len - prompt_len - 1)
    self.rows[row] = _Row(dataclasses.replace(req, kv=None), pages,
                          reserved_left=reservation.pages - (len(pages)
                                                             - len(cached)),
                          steps_needed=steps_needed,
                          generated=[req.first_token])
    # Only now: until the row is taken, the reservation must still count as
    # pending, or a concurrent reserve() sees a free row twice.
    reservation.used = True
    self.page_table[row] = 0
    self.page_table[row, :len(pages)] = pages
    self.active[row] = True
    self.samp.set_row(row, req.sampling, req.seed_u32)
    self.max_tokens[row] = req.sampling.max_tokens
    self.stop_ids[row] = -1
    stops = list(req.sampling.stop_token_ids)[:MAX_STOP_TOKEN_IDS]
    self.stop_ids[row, :len(stops)] = stops
    self.use_eos[row] = not req.sampling.ignore_eos
    self._slots_dirty = True
    return row, receipt

  def release(self, row: int, *, cache: bool = True) -> None:
    """Frees a row. With prefix caching, its full blocks (prompt and
    generated tokens whose KV was written) stay in the pool, named, for
    later requests; pages beyond them are free at once."""
    r = self.rows[row]
    if r is None:
      return
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
    self.stop_ids[row] = -1
    self.use_eos[row] = True
    self._slots_dirty = True

  # ---------------------------------------------------------------- step
  def _rows_to_advance(self) -> list[int]:
    """The rows the next call advances: live, and not already at their
    length limit once the calls in flight have run."""
    return [row for row, r in enumerate(self.rows)
            if r is not None and r.wants_steps]

  def _grow(self, rows: Sequence[int]) -> None:
    """Allocates the pages the next call writes for ``rows``, and counts
    its steps as dispatched."""
    P, S = self.dcfg.page_size, self.dcfg.steps_per_call
    for row in rows:
      r = self.rows[row]
      r.steps_dispatched = min(r.steps_dispatched + S, r.steps_needed)
      # The last step dispatched writes the KV of position
      # prompt_len + steps_dispatched - 1.
      need = pages_for(len(r.request.prompt_ids) + r.steps_dispatched,
                       P) - len(r.pages)
      need = min(need, r.reserved_left)
      if need > 0:
        new = self.pool.allocate(need, reserved=True)
        r.reserved_left -= need
        self.page_table[row, len(r.pages):len(r.pages) + need] = new
        r.pages.extend(new)
        self._slots_dirty = True

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
          top_k=self.samp.top_k[idx], seed=self.samp.seed[idx],
          max_tokens=self.max_tokens[idx], stop_ids=self.stop_ids[idx],
          use_eos=self.use_eos[idx])
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
      host = np.zeros(shape, self.cfg.jnp_dtype)
      if source_sharding is None:
        kv = jax.device_put(host, self.payload_sharding(n))
      else:
        kv = reshard_kv(RequestKV(jax.device_put(host, source_sharding(n)), 1),
                        self.payload_sharding(n)).kv
      dest = jax.device_put(np.zeros((n,), np.int32), self.replicated)
      for _ in range(2):
        self.state, _ = self.programs.insert(self.state, kv, dest, zero,
                                             zero, zero)
    if self.host_tier is not None:   # host KV tier programs
      self.host_tier.warmup()
    for rows in self.dcfg.row_counts:
      call_rows = list(range(rows))   # none active: nothing changes
      for width in self.dcfg.widths:
        slots = self._slot_inputs([], call_rows, width)
        for all_greedy in (True, True, False, False):
          self.state, out = self.programs.generate(all_greedy, rows)(
              self.params, self.state, slots)
    jax.block_until_ready((self.state, out))

  def all_greedy(self, rows: Sequence[int] | None = None) -> bool:
    """Whether every one of ``rows`` (default: the active ones) samples
    greedily (picks the program)."""
    idx = self.active if rows is None else np.asarray(rows, np.int32)
    return not bool(np.any(self.samp.temperature[idx] != 0.0))

  def dispatch(self) -> Call | None:
    """Launches one generate call for the rows that still want steps (None
    when no row does: the calls in flight finish every live row)."""
    rows = self._rows_to_advance()
    if not rows:
      return None
    self._grow(rows)
    host_tier.flush(self.host_tier)   # queued tier copies go first
    call_rows = self._call_rows(rows)
    slots = self._slot_inputs(rows, call_rows, self._width(rows))
    self.state, out = self.programs.generate(
        self.all_greedy(rows), len(call_rows))(self.params, self.state, slots)
    return Call(out, [(self.rows[row].request.request_id, row)
                      for row in rows])


@dataclasses.dataclass
class Call:
  """A generate call in flight: its outputs (``pack_step_output``'s array;
  column ``i`` is row ``owners[i][1]``'s) and who owned each advanced row
  when it launched."""
  out: jax.Array
  owners: list[tuple[str, int]]


class ReplicaPrefixStore(PrefixStore):
  """A decode replica's cached blocks, as its colocated prefill engine sees
  them: a request's cached prefix is pinned at reservation
  (``Reservation.cached_pages``) and gathered from the replica's pools into
  the prefill buffer; the prefill computes only the rest. The replica's
  finished rows fill it (``DecodeReplica.release``), not the prefills."""

  def __init__(self, replica: "DecodeReplica"):
    self.replica = replica
    self.page_size = replica.dcfg.page_size
    self._gather = jax.jit(
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
    k, v = engine._zeros()  # pylint: disable=protected-access
    jax.block_until_ready(self.gather_into([], k, v))


__all__ = ["Call", "DecodeReplica", "ReplicaPrefixStore", "Reservation"]
