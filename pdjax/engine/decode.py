"""The decode engine: continuous batching over a paged KV cache.

Lifecycle of a sequence in a replica (the host side of it):

  1. ``reserve``: decode-side admission promises the pages of the request's
     whole budget (prompt + max_tokens, capped by max_seq_len) before its KV
     exists, so a sequence never stalls for memory mid-generation.
  2. ``insert``: the prompt's pages are allocated from the reservation and a
     jitted, donating scatter writes the request KV into them; the row's
     first token, position and counters are set on device.
  3. ``generate``: a jitted, donating program advances every live row by
     ``steps_per_call`` tokens (``lax.scan``), sampling per row and applying
     the stop conditions (EOS, stop ids, max_tokens, capacity) on device, so
     a finished row stops writing at once. The host dispatches call i+1
     before reading call i's tokens: Python never stalls the device.
  4. release: when the host reads a finished (or cancelled) row, its pages
     go back to the pool and the unused rest of its reservation is returned.

Data parallelism: a pool of ``dp`` replicas, each with its own sub-mesh,
weights view, KV pool and rows (JetStream's one engine per slice). Requests go
to the replica with the most free KV capacity.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import math
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from pdjax.engine.block_pool import BlockPool
from pdjax.engine import host_tier  # host KV tier
from pdjax.engine.cache_events import CacheEventLog
from pdjax.engine.prefix_cache import (_gather_blocks, block_hashes,
                                      layout_fingerprint)
from pdjax.engine.kv import (kv_sharding, pages_for, payload_pages,
                             request_kv_shape, reshard_kv)
from pdjax.engine.borrowed_kv import BorrowedKvReturns
from pdjax.engine.requests import (DecodeRequest, FinishReason, RequestKV,
                                   RequestStatus, TokenEvent)
from pdjax.engine.xla_options import check_on_off, gemm_options
from pdjax.engine.sampling import (MAX_STOP_TOKEN_IDS, InvalidRequest,
                                   SamplingArrays, sample)
from pdjax.model.config import ModelConfig
from pdjax.model.llama import (Params, cudnn_paged_attention_applies,
                               decode_forward)
from pdjax.sharding import (ShardingRules, replica_meshes, replica_view)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  max_seqs: int = 8          # rows per replica
  page_size: int = 16
  num_pages: int = 256       # per replica, the null page included
  max_seq_len: int = 1024    # prompt + generated, per sequence
  steps_per_call: int = 4
  # Widths (in pages) of the page table a generate program reads. Each call
  # uses the smallest that covers its longest row, so attention gathers
  # what the batch needs, not max_seq_len for everyone. One program per
  # width; () = powers of two up to max_seq_len / page_size.
  table_buckets: tuple[int, ...] = ()
  # Keep finished sequences' full blocks, named by content, for requests
  # that share a prefix (they are evicted, least recently used first, only
  # when pages are needed).
  prefix_caching: bool = False
  # Host KV tier (pdjax.engine.host_tier): blocks evicted from the pool are
  # kept in host memory, up to this many, and uploaded back on a later hit
  # instead of recomputed. 0 = off; needs prefix_caching.
  host_cache_blocks: int = 0
  # GEMM kernels of the generate program on GPUs: XLA's Triton GEMMs ("on"),
  # the vendor library's ("off": cuBLAS), or "auto": cuBLAS from
  # CUBLAS_MIN_ROWS rows on, Triton below. At decode shapes (a few rows
  # times a whole weight matrix) cuBLAS steps 1.6-1.9x faster from 4 rows
  # on and 1.5x slower at 1 (H200, BENCHMARKS.md "XLA flags against the
  # decode gap").
  triton_gemm: str = "auto"
  # XLA's DotMerger ("on", XLA's default) turns dots that share an input
  # (q/k/v of a layer) into one dot against the concatenation of their
  # weights. The layer loop's weights are slices of stacked arrays, so that
  # concatenation is a copy of those weights on every step: 1.3 ms of a
  # 9.5 ms step at 32 rows (8B, H100, tools/profile_decode.py). "off" keeps
  # the dots apart; "auto": off (8.5 vs 9.4 ms at 32 rows, 13.8 vs 14.6 at
  # 128, BENCHMARKS.md "DotMerger").
  merge_dots: str = "auto"
  # How attention reads a row's pages: "gather" them into a dense buffer
  # per layer (every backend), "paged": cuDNN's paged attention reads them
  # in place (GPUs, one device per replica), "auto": paged where it applies.
  attention: str = "auto"

  def __post_init__(self):
    if self.attention not in ("auto", "paged", "gather"):
      raise ValueError(f"attention must be auto, paged or gather, got "
                       f"{self.attention!r}")
    check_on_off("triton_gemm", self.triton_gemm)
    check_on_off("merge_dots", self.merge_dots)
    if self.host_cache_blocks < 0:
      raise ValueError(f"host_cache_blocks {self.host_cache_blocks} < 0")
    if self.max_seq_len % self.page_size:
      raise ValueError(f"max_seq_len {self.max_seq_len} is not a multiple of "
                       f"page_size {self.page_size}")
    for b in self.table_buckets:
      if not 0 < b <= self.pages_per_seq:
        raise ValueError(f"table bucket {b} outside (0, {self.pages_per_seq}]")

  @property
  def pages_per_seq(self) -> int:
    return self.max_seq_len // self.page_size

  @property
  def widths(self) -> tuple[int, ...]:
    """Page-table widths, increasing, the last always pages_per_seq."""
    if self.table_buckets:
      out = sorted(set(self.table_buckets))
    else:
      out, w = [], 1
      while w < self.pages_per_seq:
        out.append(w)
        w *= 2
    if not out or out[-1] != self.pages_per_seq:
      out.append(self.pages_per_seq)
    return tuple(out)

  def width_for(self, pages: int) -> int:
    return next(w for w in self.widths if w >= pages)

  def kv_bytes(self, cfg: ModelConfig) -> int:
    """Device bytes of one replica's KV pool (the explicit accounting)."""
    return self.num_pages * self.page_size * cfg.kv_bytes_per_token()


# ------------------------------------------------------------------ device
@struct.dataclass
class DecodeState:
  k: jax.Array          # [L * N, P, K, hd] (see llama.decode_forward)
  v: jax.Array
  tokens: jax.Array     # [B] next input token
  positions: jax.Array  # [B] where that token's KV goes
  generated: jax.Array  # [B] tokens generated so far (first token included)
  done: jax.Array       # [B] finished on device


@struct.dataclass
class SlotInputs:
  """Per-row inputs the host owns; uploaded with each generate call."""
  page_table: jax.Array   # [B, M]
  active: jax.Array       # [B] bool
  temperature: jax.Array
  top_p: jax.Array
  top_k: jax.Array
  seed: jax.Array
  max_tokens: jax.Array   # [B]
  stop_ids: jax.Array     # [B, S] (-1 padded)
  use_eos: jax.Array      # [B] bool


class StepOutput(struct.PyTreeNode):
  tokens: jax.Array     # [S, B]
  logprobs: jax.Array   # [S, B]
  valid: jax.Array      # [S, B] the row produced a token at this step
  finished: jax.Array   # [S, B] ... and it was its last
  stopped: jax.Array    # [S, B] ... because of EOS / a stop id


def _scan_steps(params, state, slots, cfg, num_steps, eos, capacity,
                paged=False, all_greedy=None):
  def step(state: DecodeState, _):
    live = slots.active & ~state.done
    table = jnp.where(live[:, None], slots.page_table, 0)
    positions = jnp.where(live, state.positions, 0)
    out = decode_forward(params, state.tokens, positions, state.k, state.v,
                         table, cfg=cfg, paged_attention=paged)
    tok, lp = sample(out.logits, slots.temperature, slots.top_p, slots.top_k,
                     slots.seed, state.generated, all_greedy=all_greedy)
    generated = state.generated + live.astype(jnp.int32)
    is_stop = jnp.any(tok[:, None] == slots.stop_ids, axis=1) | (
        slots.use_eos & jnp.any(tok[:, None] == eos[None, :], axis=1))
    at_len = generated >= slots.max_tokens
    # The token just sampled sits at positions + 1, so the sequence now holds
    # positions + 2 tokens; max_seq_len bounds that (as at prefill, where
    # prompt + first token == max_seq_len finishes).
    at_cap = state.positions + 2 >= capacity
    finished = live & (is_stop | at_len | at_cap)
    new = DecodeState(
        k=out.k_pool, v=out.v_pool,
        tokens=jnp.where(live, tok, state.tokens),
        positions=state.positions + live.astype(jnp.int32),
        generated=generated,
        done=state.done | finished)
    return new, StepOutput(tok, lp, live, finished, live & is_stop)

  return jax.lax.scan(step, state, None, length=num_steps)


def _insert(state: DecodeState, kv, dest_pages, row, first_token, position):
  """Writes a request KV ``[L, 2, n, P, K, hd]`` into the pools' rows
  ``l * N + dest_pages`` and arms ``row``. Also returns a receipt: a scalar
  that is ready when this program has finished reading ``kv``
  (``BorrowedKvReturns``)."""
  L, _, n = kv.shape[:3]
  N = state.k.shape[0] // L
  rows = (jnp.arange(L, dtype=jnp.int32)[:, None] * N
          + dest_pages[None, :]).reshape(L * n)
  flat = kv.astype(state.k.dtype).reshape(L, 2, n, *kv.shape[3:])
  k = state.k.at[rows].set(flat[:, 0].reshape(L * n, *kv.shape[3:]))
  v = state.v.at[rows].set(flat[:, 1].reshape(L * n, *kv.shape[3:]))
  positions = state.positions.at[row].set(position)
  return DecodeState(
      k=k, v=v,
      tokens=state.tokens.at[row].set(first_token),
      positions=positions,
      generated=state.generated.at[row].set(1),
      done=state.done.at[row].set(False)), positions[row]


def _init_state(cfg: ModelConfig, dcfg: DecodeConfig):
  L, K, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
  B = dcfg.max_seqs
  pool = (L * dcfg.num_pages, dcfg.page_size, K, hd)
  return DecodeState(
      k=jnp.zeros(pool, cfg.jnp_dtype), v=jnp.zeros(pool, cfg.jnp_dtype),
      tokens=jnp.zeros((B,), jnp.int32),
      positions=jnp.zeros((B,), jnp.int32),
      generated=jnp.zeros((B,), jnp.int32),
      done=jnp.ones((B,), bool))


POOL_AXES = ("pages", "page_slot", "kv_heads", "head_dim")


# ------------------------------------------------------------------ host
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
  host_pos: int           # upper bound of the device position
  budget_pos: int         # the row never needs a position past this
  tokens_out: int = 1
  status: RequestStatus = RequestStatus.RUNNING
  generated: list[int] = dataclasses.field(default_factory=list)


class DecodeReplica:
  """One DP replica: a KV pool, ``max_seqs`` rows and its jitted programs."""

  def __init__(self, index: int, params: Params, cfg: ModelConfig,
               mesh: Mesh, rules: ShardingRules, dcfg: DecodeConfig,
               eos_ids: Sequence[int], programs: "_Programs",
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
    self._slots_dirty = True
    self._slots_dev: SlotInputs | None = None
    self._slots_width = 0

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
    self.rows[row] = _Row(dataclasses.replace(req, kv=None), pages,
                          reserved_left=reservation.pages - (len(pages)
                                                             - len(cached)),
                          host_pos=prompt_len,
                          budget_pos=min(prompt_len + req.sampling.max_tokens,
                                         self.dcfg.max_seq_len),
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
    self._slots_dirty = True

  # ---------------------------------------------------------------- step
  def _grow(self) -> None:
    """Allocates pages so the next call (and the one in flight) can write."""
    P, S = self.dcfg.page_size, self.dcfg.steps_per_call
    for row, r in enumerate(self.rows):
      if r is None:
        continue
      r.host_pos = min(r.host_pos + S, r.budget_pos)
      need = min(pages_for(r.host_pos + S, P),
                 pages_for(r.budget_pos, P)) - len(r.pages)
      need = min(need, r.reserved_left)
      if need > 0:
        new = self.pool.allocate(need, reserved=True)
        r.reserved_left -= need
        self.page_table[row, len(r.pages):len(r.pages) + need] = new
        r.pages.extend(new)
        self._slots_dirty = True

  def _width(self) -> int:
    """Page-table width of the next call: covers every row's pages."""
    need = max((len(r.pages) for r in self.rows if r is not None), default=1)
    return self.dcfg.width_for(need)

  def _slot_inputs(self, width: int | None = None) -> SlotInputs:
    width = self._width() if width is None else width
    if (self._slots_dirty or self._slots_dev is None
        or width != self._slots_width):
      host = SlotInputs(
          page_table=np.ascontiguousarray(self.page_table[:, :width]),
          active=self.active,
          temperature=self.samp.temperature, top_p=self.samp.top_p,
          top_k=self.samp.top_k, seed=self.samp.seed,
          max_tokens=self.max_tokens, stop_ids=self.stop_ids,
          use_eos=self.use_eos)
      self._slots_dev = jax.device_put(host, self.replicated)
      self._slots_dirty = False
      self._slots_width = width
    return self._slots_dev

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
    for width in self.dcfg.widths:
      slots = self._slot_inputs(width)
      for all_greedy in (True, True, False, False):
        self.state, out = self.programs.generate(all_greedy)(
            self.params, self.state, slots)
    jax.block_until_ready((self.state, out))

  def all_greedy(self) -> bool:
    """Whether every active row samples greedily (picks the program)."""
    return not bool(np.any(self.samp.temperature[self.active] != 0.0))

  def dispatch(self):
    """Launches one generate call; returns (outputs, row owners)."""
    self._grow()
    host_tier.flush(self.host_tier)   # queued tier copies go first
    slots = self._slot_inputs()
    self.state, out = self.programs.generate(self.all_greedy())(
        self.params, self.state, slots)
    owners = [None if r is None else r.request.request_id for r in self.rows]
    return out, owners


class ReplicaPrefixStore:
  """A decode replica's cached blocks, as its colocated prefill engine sees
  them: a request's cached prefix is pinned at reservation
  (``Reservation.cached_pages``) and gathered from the replica's pools into
  the prefill buffer; the prefill computes only the rest."""

  def __init__(self, replica: "DecodeReplica"):
    self.replica = replica
    self.page_size = replica.dcfg.page_size
    self._gather = jax.jit(
        functools.partial(_gather_blocks, num_layers=replica.cfg.num_layers),
        donate_argnums=(3, 4))

  def hashes(self, token_ids, salt: str = "") -> list[bytes]:
    return block_hashes(token_ids, self.page_size, self.replica.fingerprint,
                        salt)

  def match(self, hashes) -> list[int]:
    return host_tier.match_with_tier(self.replica.pool, hashes,
                                     self.replica.host_tier)

  def release(self, pages) -> None:
    self.replica.pool.free(pages)

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


CUBLAS_MIN_ROWS = 4


def generate_compiler_options(dcfg: DecodeConfig,
                              platform: str) -> dict[str, bool | int] | None:
  """XLA options of the generate program (None: XLA's defaults). Only GPU
  compilers know the GEMM options."""
  if platform not in ("gpu", "cuda"):
    return None
  triton = dcfg.triton_gemm == "on" or (
      dcfg.triton_gemm == "auto" and dcfg.max_seqs < CUBLAS_MIN_ROWS)
  return gemm_options(triton=triton, merge_dots=dcfg.merge_dots == "on")


def use_paged_attention(cfg: ModelConfig, dcfg: DecodeConfig, platform: str,
                        devices_per_replica: int) -> bool:
  """Resolves ``DecodeConfig.attention``. cuDNN's paged kernel has no
  partitioning rule, so a replica spanning devices gathers."""
  if dcfg.attention == "gather":
    return False
  blocks = cfg.num_layers * dcfg.num_pages
  one_gpu = platform in ("gpu", "cuda") and devices_per_replica == 1
  applies = one_gpu and cudnn_paged_attention_applies(
      cfg, blocks, dcfg.max_seqs, dcfg.pages_per_seq)
  if (not applies and dcfg.attention == "auto" and one_gpu
      and blocks % dcfg.max_seqs):
    step = dcfg.max_seqs // math.gcd(dcfg.max_seqs, cfg.num_layers)
    log.warning("decode attention gathers pages: cuDNN's paged attention "
                "needs layers x num_pages (%d) to be a multiple of max_seqs "
                "(%d); a num_pages that is a multiple of %d would allow it",
                blocks, dcfg.max_seqs, step)
  if dcfg.attention == "paged" and not applies:
    raise ValueError(
        "attention='paged' needs a GPU with cuDNN attention for this model "
        "(bf16/fp16, head_dim a multiple of 8 up to 256, no sliding window), "
        "one device per decode replica, and layers x num_pages a multiple "
        "of max_seqs; use 'auto' or 'gather'")
  return applies


class _Programs:
  """The jitted programs of a pool, shared by its replicas (jit keeps one
  executable per device set)."""

  def __init__(self, cfg: ModelConfig, dcfg: DecodeConfig,
               eos_ids: tuple[int, ...], platform: str,
               devices_per_replica: int):
    self.compiler_options = generate_compiler_options(dcfg, platform)
    self.paged_attention = use_paged_attention(cfg, dcfg, platform,
                                               devices_per_replica)
    self._entry = functools.partial(
        _generate_entry, cfg=cfg, num_steps=dcfg.steps_per_call,
        eos_ids=eos_ids, capacity=dcfg.max_seq_len,
        paged=self.paged_attention)
    # Two generate programs, the sampling path chosen on the host per call
    # (``DecodeReplica.dispatch``): one deciding on device would be a
    # lax.cond, which XLA's GPU runtime resolves on the host, so each call
    # would block until it had run and nothing could be dispatched ahead
    # (the next call, the other replicas' calls, the host's delivery).
    self.generate_greedy = self.generate_program(True)
    self.generate_sampled = self.generate_program(False)
    self.insert = jax.jit(_insert, donate_argnums=(0,))

  def generate_program(self, all_greedy: bool | None):
    """A new jitted generate program; ``all_greedy`` None decides on device
    (``sample``'s ``lax.cond``: the benchmarks' baseline, not served)."""
    return jax.jit(functools.partial(self._entry, all_greedy=all_greedy),
                   donate_argnums=(1,), compiler_options=self.compiler_options)

  def generate(self, all_greedy: bool):
    """The generate program for a batch that is (or is not) all greedy."""
    return self.generate_greedy if all_greedy else self.generate_sampled


def _generate_entry(params, state, slots, *, cfg, num_steps, eos_ids,
                    capacity, paged=False, all_greedy=None):
  eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
  return _scan_steps(params, state, slots, cfg, num_steps, eos, capacity,
                     paged, all_greedy)


# ------------------------------------------------------------------ engine
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
               *, eos_ids: Sequence[int] | None = None):
    self.cfg = cfg
    self.dcfg = dcfg
    self.mesh = mesh
    self.rules = rules
    self.eos_ids = tuple(cfg.eos_token_ids if eos_ids is None else eos_ids)
    self.programs = _Programs(
        cfg, dcfg, self.eos_ids, mesh.devices.flat[0].platform,
        mesh.size // mesh.shape.get("dp", 1))
    log.info("decode attention: %s; generate compiler options: %s",
             "cuDNN paged" if self.programs.paged_attention else "gather",
             self.programs.compiler_options)
    sub_rules = rules.without("dp")
    # KV-aware routing: every replica's block-set changes, for the router.
    self.cache_events = (CacheEventLog() if dcfg.prefix_caching else None)
    self.replicas: list[DecodeReplica] = []
    from pdjax.model.llama import param_shapes
    specs = jax.tree.map(
        lambda s: sub_rules.partition_spec(s[1]), param_shapes(cfg),
        is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2
        and isinstance(x[1], tuple))
    for i, sub in enumerate(replica_meshes(mesh, "dp")):
      view = jax.tree.map(lambda x, s, sub=sub: replica_view(x, sub, s),
                          params, specs)
      self.replicas.append(DecodeReplica(
          i, view, cfg, sub, sub_rules, dcfg, self.eos_ids, self.programs,
          on_cache_event=(self.cache_events.on_event
                          if self.cache_events else None)))
    self._lock = threading.Lock()
    self._inbox: collections.deque[_Pending] = collections.deque()
    self._cancelled: set[str] = set()
    self._where: dict[str, tuple[int, int]] = {}   # request -> (replica, row)
    self._inflight: list[tuple[int, StepOutput, list]] = []
    self._reservations: dict[str, Reservation] = {}
    self._seq = itertools.count()
    self.stats = collections.Counter()
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
    caller queues or refuses, by its policy).

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
        pages = host_tier.match_with_tier(rep.pool, hashes, rep.host_tier)
        n = rep.budget_pages(prompt_len, max_tokens) - len(pages)
        if rep.pool.reserve(n):
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
    for rid, (ri, row) in list(self._where.items()):
      rep = self.replicas[ri]
      req = rep.rows[row].request
      rep.release(row, cache=False)
      del self._where[rid]
      req.callback(TokenEvent(rid, [], [], FinishReason.ERROR, error=message))
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
      p.request.callback(TokenEvent(p.request.request_id, [], [], reason,
                                    error=error))

  def submit(self, req: DecodeRequest) -> None:
    """Queues a request whose KV is ready; it joins the batch at the next
    step. Reserves on the spot if the caller did not. From here on the
    engine owns ``req.kv``: a borrowed one is given back on every path."""
    first_done = self._first_token_finishes(req)
    if first_done is not None:
      self.borrowed.after(None, req.kv)
      self.unreserve(req.request_id)
      req.callback(TokenEvent(req.request_id, [], [], first_done))
      return
    res = req.reservation or self._reservations.get(req.request_id)
    if res is not None and res.cancelled:
      self.borrowed.after(None, req.kv)
      self.unreserve(req.request_id)
      req.callback(TokenEvent(req.request_id, [], [], FinishReason.ABORT))
      return
    if res is None:
      try:
        res = self.reserve(req.request_id, len(req.prompt_ids),
                           req.sampling.max_tokens)
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
    if s.max_tokens <= 1 or len(req.prompt_ids) + 1 >= self.dcfg.max_seq_len:
      return FinishReason.LENGTH
    return None

  def cancel(self, request_id: str) -> None:
    with self._lock:
      self._cancelled.add(request_id)

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
    self._admit()
    launched = []
    for rep in self.replicas:
      if rep.live_rows:
        out, owners = rep.dispatch()
        launched.append((rep.index, out, owners))
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
      p.request.callback(TokenEvent(rid, [], [], reason, error=error))

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
      where = self._where.pop(rid, None)
      if where is None:
        continue
      rep = self.replicas[where[0]]
      req = rep.rows[where[1]].request
      rep.release(where[1])
      self.stats["cancelled"] += 1
      req.callback(TokenEvent(rid, [], [], FinishReason.ABORT))

  def _deliver(self, replica: int, out: StepOutput, owners: list) -> None:
    rep = self.replicas[replica]
    tokens = np.asarray(out.tokens)
    logprobs = np.asarray(out.logprobs)
    valid = np.asarray(out.valid)
    finished = np.asarray(out.finished)
    stopped = np.asarray(out.stopped)
    for row, owner in enumerate(owners):
      if owner is None or self._where.get(owner) != (replica, row):
        continue
      sel = valid[:, row]
      if not sel.any():
        continue
      toks = tokens[sel, row].tolist()
      lps = logprobs[sel, row].tolist()
      r = rep.rows[row]
      r.tokens_out += len(toks)
      r.generated.extend(toks)
      reason = None
      if finished[:, row].any():
        reason = (FinishReason.STOP if stopped[:, row].any()
                  else FinishReason.LENGTH)
        rep.release(row)
        del self._where[owner]
        self.stats["finished"] += 1
      r.request.callback(TokenEvent(owner, toks, lps, reason))

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
    out["reservations"] = len(self._reservations)
    return dict(out)

  def free_capacity(self) -> float:
    """Share of KV pages still promisable (the router's load signal)."""
    u = self.kv_usage()
    return u["pages_available"] / max(u["pages_total"], 1)


__all__ = ["DecodeConfig", "DecodeEngine", "DecodeReplica", "DecodeState",
           "IterationTiming", "Reservation", "RequestKV"]
