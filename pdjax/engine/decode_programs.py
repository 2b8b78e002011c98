"""The decode pool's device side: its state (the KV pools and per-row
counters), the per-call inputs the host uploads, and the jitted programs
over them, pure functions of their arguments: ``insert`` writes a request's
KV into the pools and arms a row; ``generate`` advances every live row by
``steps_per_call`` tokens (a ``lax.scan`` of ``decode_forward`` and the
sampler), stopping rows on device. The state is donated into each call, so
the pools are updated in place."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from pdjax.engine.decode_config import DecodeConfig
from pdjax.engine.kv_dtype import kv_storage_dtype
from pdjax.engine.sampling import sample, stop_set, token_logprobs
from pdjax.engine.shared_jit import shared_jit
from pdjax.engine.speculative import accept
from pdjax.engine.xla_options import gemm_options
from pdjax.model import pallas_attention
from pdjax.model.config import ModelConfig
from pdjax.model.llama import (cudnn_paged_attention_applies, decode_forward,
                               decode_forward_tokens, decode_tokens_as_steps,
                               kv_to_pool, pseudo_rows_of)
from pdjax.model.pipeline import (STAGE_AXIS, pipelined_decode_forward,
                                  pipelined_decode_forward_tokens,
                                  shard_map_stages, stage_count)


def _pytree_dataclass(cls):
  """A frozen dataclass whose fields are pytree children, with
  ``replace``: what ``flax.struct.dataclass`` makes, without importing
  flax (its import, linen and all, is a quarter of a second of every
  worker's start)."""
  cls = dataclasses.dataclass(frozen=True)(cls)
  cls.replace = lambda self, **updates: dataclasses.replace(self, **updates)
  fields = [f.name for f in dataclasses.fields(cls)]
  return jax.tree_util.register_dataclass(cls, data_fields=fields,
                                         meta_fields=[])


@_pytree_dataclass
class DecodeState:
  k: jax.Array          # [L * N, P, K, hd] (see llama.decode_forward)
  v: jax.Array
  tokens: jax.Array     # [B] next input token
  positions: jax.Array  # [B] where that token's KV goes
  generated: jax.Array  # [B] tokens generated so far (first token included)
  done: jax.Array       # [B] finished on device
  # What a row's penalties read (``sampling.apply_penalties``): its output's
  # count of each token, and its prompt's tokens. Kept only for rows with a
  # penalty on (``_arm_penalties`` at insert; the steps count a row's tokens
  # only while it has one): other rows' are stale and read as no-ops. Every
  # step reads a call's rows of both (5 bytes per vocabulary entry a row:
  # 82 MB a step at 128 rows of Llama-3's 128K vocabulary, about 0.2% of
  # that step's bytes; not yet measured on a card).
  counts: jax.Array     # [B, V] int32 (V: the padded vocabulary)
  seen: jax.Array       # [B, V] bool


@_pytree_dataclass
class SlotInputs:
  """Per-row inputs the host owns; uploaded with each generate call. A call
  advances ``b`` rows of the pool's ``max_seqs`` (its program's row count):
  ``rows`` names them, and every other field is theirs, in that order."""
  rows: jax.Array         # [b] distinct state rows; padding rows inactive
  page_table: jax.Array   # [b, M]
  active: jax.Array       # [b] bool
  temperature: jax.Array
  top_p: jax.Array
  top_k: jax.Array
  min_p: jax.Array
  min_tokens: jax.Array   # [b]
  seed: jax.Array
  max_tokens: jax.Array   # [b]
  stop_ids: jax.Array     # [b, S] (-1 padded)
  use_eos: jax.Array      # [b] bool
  presence: jax.Array     # [b] f32: the penalties (0, 0, 1: off)
  frequency: jax.Array
  repetition: jax.Array


@_pytree_dataclass
class StepOutput:
  """Per step and per row of the call (``SlotInputs.rows`` order)."""
  tokens: jax.Array     # [S, b]
  logprobs: jax.Array   # [S, b]
  valid: jax.Array      # [S, b] the row produced a token at this step
  finished: jax.Array   # [S, b] ... and it was its last
  stopped: jax.Array    # [S, b] ... because of EOS / a stop id


def idle_rows_fresh(live, tokens, positions, page_table):
  """A call's model inputs with every row that is not live (padding, or
  finished within the call) given a fresh pool's: token 0 at position 0 of
  the null page. What a free row last held must not reach the model: after
  a chat load, the stale tokens of a 128-row program's free rows made every
  step 3.1x slower on an H100, and setting them back to 0 alone restored
  the speed (the slowdown after load, in the benchmarks' notes)."""
  return (jnp.where(live, tokens, 0), jnp.where(live, positions, 0),
          jnp.where(live[:, None], page_table, 0))


def _scan_steps(params, state, slots, cfg, num_steps, eos, capacity,
                paged=None, all_greedy=None, forward=decode_forward):
  """``num_steps`` decode steps; ``forward`` is ``decode_forward`` or a
  function with its signature (the pipelined one: each step is then a
  full pass through the pipeline)."""
  # The ids that end a row: what a sampled token is checked against, and
  # what min_tokens holds back until then.
  stops = stop_set(slots.stop_ids, slots.use_eos, eos)

  counting = penalized(slots)

  def step(state: DecodeState, _):
    live = slots.active & ~state.done
    tokens, positions, table = idle_rows_fresh(
        live, state.tokens, state.positions, slots.page_table)
    out = forward(params, tokens, positions, state.k, state.v,
                  table, cfg=cfg, paged_attention=paged)
    tok, lp = sample(out.logits, slots.temperature, slots.top_p, slots.top_k,
                     slots.min_p, slots.seed, state.generated,
                     held_back=(slots.min_tokens, stops),
                     penalties=penalties(state, slots),
                     all_greedy=all_greedy)
    generated = state.generated + live.astype(jnp.int32)
    is_stop = jnp.any(tok[:, None] == stops, axis=1)
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
        done=state.done | finished,
        counts=count_tokens(state.counts, slots.rows, tok, live & counting),
        seen=state.seen)
    return new, StepOutput(tok, lp, live, finished, live & is_stop)

  return jax.lax.scan(step, state, None, length=num_steps)


def penalized(slots: SlotInputs):
  """[b] bool: the rows with a penalty on."""
  return ((slots.presence != 0) | (slots.frequency != 0)
          | (slots.repetition != 1))


def penalties(state: DecodeState, slots: SlotInputs):
  """``sample``'s ``penalties`` for the call's rows. The penalty state
  stays whole in a call (every row's), read here by row: gathered into the
  sampler's elementwise pass, not copied out and back each call."""
  return (state.counts[slots.rows], state.seen[slots.rows], slots.presence,
          slots.frequency, slots.repetition)


def count_tokens(counts, rows, tokens, where):
  """``counts`` [B, V] with one more of ``tokens`` [b] in its ``rows``
  [b] (distinct) where ``where`` [b]."""
  return counts.at[rows, tokens].add(where.astype(counts.dtype),
                                     unique_indices=True)


def _arm_penalties(state: DecodeState, row, seen_row, counts_row):
  """Sets ``row``'s penalty state: its prompt's tokens ``seen_row`` [V]
  and its output's counts so far ``counts_row`` [V] (the first token; a
  resumed request's earlier tokens too)."""
  return state.replace(counts=state.counts.at[row].set(counts_row),
                       seen=state.seen.at[row].set(seen_row))


def _insert(state: DecodeState, kv, dest_pages, row, first_token, position,
            generated):
  """Writes a request KV ``[L, 2, n, P, K, hd]`` into the pools' rows
  ``l * N + dest_pages`` and arms ``row``: its next input is
  ``first_token`` at ``position``, after ``generated`` tokens of output (1
  for a new request; more for one resumed after preemption, so that its
  seeded sampling and max_tokens continue where they were). Also returns a
  receipt: a scalar that is ready when this program has finished reading
  ``kv`` (``BorrowedKvReturns``)."""
  L, _, n = kv.shape[:3]
  N = state.k.shape[0] // L
  rows = (jnp.arange(L, dtype=jnp.int32)[:, None] * N
          + dest_pages[None, :]).reshape(L * n)
  flat = kv_to_pool(kv, state.k.dtype).reshape(L, 2, n, *kv.shape[3:])
  # Padding pages all land on the null page: unique_indices as the decode
  # step's writes (llama._KV_WRITE).
  k = state.k.at[rows].set(flat[:, 0].reshape(L * n, *kv.shape[3:]),
                           unique_indices=True)
  v = state.v.at[rows].set(flat[:, 1].reshape(L * n, *kv.shape[3:]),
                           unique_indices=True)
  positions = state.positions.at[row].set(position)
  return state.replace(
      k=k, v=v,
      tokens=state.tokens.at[row].set(first_token),
      positions=positions,
      generated=state.generated.at[row].set(generated),
      done=state.done.at[row].set(False)), positions[row]


def _init_state(cfg: ModelConfig, dcfg: DecodeConfig):
  L, K, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
  B = dcfg.max_seqs
  pool = (L * dcfg.num_pages, dcfg.page_size, K, hd)
  dtype = dcfg.kv_storage_dtype(cfg.jnp_dtype)
  return DecodeState(
      k=jnp.zeros(pool, dtype), v=jnp.zeros(pool, dtype),
      tokens=jnp.zeros((B,), jnp.int32),
      positions=jnp.zeros((B,), jnp.int32),
      generated=jnp.zeros((B,), jnp.int32),
      done=jnp.ones((B,), bool),
      counts=jnp.zeros((B, cfg.padded_vocab), jnp.int32),
      seen=jnp.zeros((B, cfg.padded_vocab), bool))


# The pools' row axis is layer-major (layer l's page p at row l * N + p):
# its own logical axis, so that a rule set can split it by layer
# (``layer_pages = "pp"``: each pipeline stage holds its layers' pages).
POOL_AXES = ("layer_pages", "page_slot", "kv_heads", "head_dim")


def staged_insert(mesh, axis: str = STAGE_AXIS):
  """``_insert`` for a pool split into pipeline stages over ``axis``: each
  stage writes its own layers of the payload (split over ``axis`` on its
  layers axis, as ``DecodeReplica.payload_sharding`` places it) into its
  own pages; no payload page crosses stages. Row state is whole on every
  stage and updated alike."""
  split, whole = PartitionSpec(axis), PartitionSpec()
  state_specs = DecodeState(k=split, v=split, tokens=whole, positions=whole,
                            generated=whole, done=whole, counts=whole,
                            seen=whole)
  return shard_map_stages(
      _insert, mesh, (state_specs, split, whole, whole, whole, whole, whole),
      (state_specs, whole), axis)


CUBLAS_MIN_ROWS = 2


def generate_compiler_options(dcfg: DecodeConfig, platform: str,
                              rows: int | None = None, *,
                              fp8_weights_only: bool = False
                              ) -> dict[str, bool | int] | None:
  """XLA options of the generate program of ``rows`` rows (default
  max_seqs; None: XLA's defaults). Only GPU compilers know the GEMM
  options. ``auto`` takes XLA's Triton GEMMs below ``CUBLAS_MIN_ROWS``
  rows, and at every row count for FP8 projections read by bf16
  activations (``fp8_weights_only``, W8A16): cuBLAS widens such weights
  in a pass of their own before its GEMM, Triton's GEMM reads them as
  they are (Llama-3-8B shapes on an H100: 1.2-1.7x faster steps at 1 to
  128 rows). A batch-invariant pool's programs keep XLA's autotuning:
  within a process it keeps one kernel per GEMM shape, and with it off
  (``xla_gpu_autotune_level=0``) an 8B decode step's row did depend on
  its neighbours on an H100 (``tools/gpu/probe_batch_invariance.py``)."""
  if platform not in ("gpu", "cuda"):
    return None
  rows = dcfg.max_seqs if rows is None else rows
  triton = dcfg.triton_gemm == "on" or (
      dcfg.triton_gemm == "auto"
      and (rows < CUBLAS_MIN_ROWS or fp8_weights_only))
  return gemm_options(triton=triton, merge_dots=dcfg.merge_dots == "on")


def use_paged_attention(cfg: ModelConfig, dcfg: DecodeConfig, platform: str,
                        devices_per_replica: int,
                        rows: int | None = None) -> str | None:
  """Resolves ``DecodeConfig.attention`` for the program of ``rows`` rows
  (default max_seqs): the kernel that reads the pages in place ("cudnn"
  or "pallas", ``llama.decode_layer``), or None to gather them. Neither
  kernel has a partitioning rule, so a replica spanning devices gathers.
  "auto": cuDNN's where it applies (a pool of the model's dtype whose
  block count it takes), else the Pallas kernel (an FP8 pool: cuDNN reads
  no FP8, and gathering widens every page to bf16 on every step), else
  the gather."""
  if dcfg.attention == "gather" or dcfg.batch_invariant:
    # Batch-invariant pools attend with XLA's attention (cuDNN's decode
    # kernels are not deterministic run to run: _Programs).
    return None
  rows = dcfg.max_seqs if rows is None else rows
  blocks = cfg.num_layers * dcfg.num_pages
  one_gpu = platform in ("gpu", "cuda") and devices_per_replica == 1
  cudnn = one_gpu and dcfg.kv_dtype == "auto" and (
      cudnn_paged_attention_applies(cfg, blocks, rows, dcfg.pages_per_seq))
  pool = (blocks, dcfg.page_size, cfg.num_kv_heads, cfg.head_dim)
  pallas = one_gpu and cfg.sliding_window is None and (
      pallas_attention.supports(pool, kv_storage_dtype(dcfg.kv_dtype,
                                                    cfg.jnp_dtype)))
  if dcfg.attention == "paged":
    if not cudnn:
      raise ValueError(
          "attention='paged' needs a GPU with cuDNN attention for this "
          "model (bf16/fp16, head_dim a multiple of 8 up to 256, no sliding "
          "window; a pool of the model's dtype, not kv_dtype='fp8'), one "
          "device per decode replica, and layers x num_pages a multiple of "
          f"every program's rows ({rows} here); use 'auto', 'pallas' or "
          "'gather'")
    return "cudnn"
  if dcfg.attention == "pallas":
    if not pallas:
      raise ValueError(
          "attention='pallas' needs a GPU, one device per decode replica, "
          "no sliding window, head_dim and page_size powers of two "
          "(head_dim at least 16), and not an FP8 pool of 2-4 GiB; use "
          "'auto' or 'gather'")
    return "pallas"
  if cudnn:
    return "cudnn"
  if pallas:
    return "pallas"
  return None


class _Programs:
  """The jitted programs of a pool, shared by its replicas (jit keeps one
  executable per device set and argument shapes)."""

  def __init__(self, cfg: ModelConfig, dcfg: DecodeConfig,
               eos_ids: tuple[int, ...], platform: str,
               devices_per_replica: int, replica_mesh=None):
    """``replica_mesh``: one replica's mesh (any of them: the programs
    use its shape only). With a ``pp`` axis of more than one stage, the
    generate programs run the pipelined decode
    (``pdjax.model.pipeline``) in ``dcfg.num_microbatches`` microbatches
    (0: one per stage), and insert writes each stage's layers on that
    stage."""
    self.cfg = cfg
    self.dcfg = dcfg
    self.platform = platform
    self.devices_per_replica = devices_per_replica
    self.eos_ids = eos_ids
    self.stages = 1 if replica_mesh is None else stage_count(replica_mesh)
    self.num_microbatches = dcfg.num_microbatches or self.stages
    self._forward = decode_forward
    self._forward_tokens = decode_forward_tokens
    if self.stages > 1:
      if cfg.weight_dtype is not None:
        # Quantized projections are stored one array per layer
        # (llama.per_layer), which pipeline stages cannot split by layer.
        raise ValueError(f"weight_dtype {cfg.weight_dtype!r} with "
                         f"{self.stages} pipeline stages: FP8 weights are "
                         "served by pools without a pp axis")
      if cfg.num_layers % self.stages:
        raise ValueError(f"{cfg.num_layers} layers do not split into "
                         f"{self.stages} pipeline stages")
      staged = dict(mesh=replica_mesh.abstract_mesh,
                    num_microbatches=self.num_microbatches)
      self._forward = functools.partial(pipelined_decode_forward, **staged)
      self._forward_tokens = functools.partial(
          pipelined_decode_forward_tokens, **staged)
    if dcfg.batch_invariant:
      # A fixed-shape step computes each row apart from the others, but
      # cuDNN's decode attention does not give the same bits run to run
      # (an H100: the same inputs, 20 calls, 12-14 equal to the first;
      # with XLA's attention, 20): a stream's tokens would depend on the
      # run, alone or not. XLA's attention over the gathered pages is.
      self._forward = functools.partial(self._forward, xla_attention=True)
    # Per row count: the GEMM kernels and the attention path.
    w8a16 = cfg.weight_dtype is not None and cfg.activation_dtype is None
    self.compiler_options = {
        rows: generate_compiler_options(dcfg, platform, rows,
                                        fp8_weights_only=w8a16)
        for rows in dcfg.row_counts}
    self.paged_attention = {
        rows: use_paged_attention(cfg, dcfg, platform, devices_per_replica,
                                  rows)
        for rows in dcfg.row_counts}
    # Two generate programs per row count, the sampling path chosen on the
    # host per call (``DecodeReplica.dispatch``): one deciding on device
    # would be a lax.cond, which XLA's GPU runtime resolves on the host, so
    # each call would block until it had run and nothing could be
    # dispatched ahead (the next call, the other replicas' calls, the
    # host's delivery).
    # A speculating pool runs verify programs (``_verify_entry``) instead,
    # one per row count and sampling path too.
    self.speculative = dcfg.speculative != "off"
    make = (self.verify_program if self.speculative
            else self.generate_program)
    self._generate = {(all_greedy, rows): make(all_greedy, rows)
                      for rows in dcfg.row_counts
                      for all_greedy in (True, False)}
    # A pool drafting by prompt lookup runs a call in which no row found a
    # draft as one plain step (``plain``): it emits the same token a
    # verify call of no drafts would, without running k + 1 positions per
    # row (a verify call costs up to 1.5x a step at 16 rows, 8B, H100),
    # and the rows look up drafts again after it, as after any call. A
    # batch-invariant pool whose live rows leave no room for drafts
    # (``DecodeConfig.draft_room``) runs plain steps too, whatever drafts
    # for it: ``steps_without_room`` of them a call, since none will fit
    # until a row ends.
    plain_steps = set()
    if self.speculative and dcfg.speculative == "ngram":
      plain_steps.add(1)
    if self.speculative and dcfg.batch_invariant:
      plain_steps.add(dcfg.steps_without_room)
    self._plain = {
        (all_greedy, rows, steps): self.generate_program(
            all_greedy, rows, num_steps=steps)
        for rows in dcfg.row_counts for all_greedy in (True, False)
        for steps in plain_steps}
    self.insert = shared_jit(
        _insert if self.stages == 1
        else staged_insert(replica_mesh.abstract_mesh), donate_argnums=(0,))
    self.arm_penalties = shared_jit(_arm_penalties, donate_argnums=(0,))

  def generate_program(self, all_greedy: bool | None, rows: int, *,
                       num_steps: int | None = None):
    """A new jitted generate program for calls of ``rows`` rows and
    ``num_steps`` steps (default: the pool's ``steps_per_call``);
    ``all_greedy`` None decides on device (``sample``'s ``lax.cond``: the
    benchmarks' baseline, not served)."""
    entry = functools.partial(
        _generate_entry, cfg=self.cfg,
        num_steps=num_steps or self.dcfg.steps_per_call,
        eos_ids=self.eos_ids, capacity=self.dcfg.max_seq_len,
        paged=self.paged_attention[rows], all_greedy=all_greedy,
        forward=self._forward)
    return shared_jit(entry, donate_argnums=(1,),
                      compiler_options=self.compiler_options[rows])

  def verify_program(self, all_greedy: bool, rows: int):
    """A new jitted verify program (speculative decoding) for calls of
    ``rows`` rows: (params, state, slots, drafts, num_drafts). A
    batch-invariant pool's runs the live rows' tokens as the rows of one
    decode step of ``rows`` rows, the generate program's."""
    forward_tokens, step_rows = self._forward_tokens, None
    if self.dcfg.batch_invariant:
      forward_tokens = functools.partial(
          decode_tokens_as_steps, rows=rows, forward=self._forward,
          paged_attention=self.paged_attention[rows])
      step_rows = rows
    entry = functools.partial(
        _verify_entry, cfg=self.cfg, eos_ids=self.eos_ids,
        capacity=self.dcfg.max_seq_len, all_greedy=all_greedy,
        forward_tokens=forward_tokens, step_rows=step_rows)
    return shared_jit(entry, donate_argnums=(1,),
                      compiler_options=self.compiler_options[rows])

  def generate(self, all_greedy: bool, rows: int):
    """The program for a call of ``rows`` rows (a row count of the pool)
    that are (or are not) all greedy: generate, or verify in a
    speculating pool."""
    return self._generate[(all_greedy, rows)]

  def plain(self, all_greedy: bool, rows: int, steps: int = 1):
    """A speculating pool's generate program of ``steps`` steps, for a
    call with no drafts to verify (one step in a prompt-lookup pool,
    ``steps_without_room`` in a batch-invariant one); None where the pool
    has none."""
    return self._plain.get((all_greedy, rows, steps))


def _generate_entry(params, state, slots, *, cfg, num_steps, eos_ids,
                    capacity, paged=None, all_greedy=None,
                    forward=decode_forward):
  """Advances the call's rows (``slots.rows``) by ``num_steps``: their
  per-row state is gathered, stepped, and scattered back; the pools are
  shared by every row and updated in place. ``forward``: the model's
  decode step (``decode_forward``, or the pipelined one in a pool with
  pipeline stages, where each of the ``num_steps`` steps is a full pass
  through the pipeline: fill, steady ticks and drain)."""
  eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
  rows = slots.rows
  sub = DecodeState(k=state.k, v=state.v, tokens=state.tokens[rows],
                    positions=state.positions[rows],
                    generated=state.generated[rows], done=state.done[rows],
                    counts=state.counts, seen=state.seen)
  sub, out = _scan_steps(params, sub, slots, cfg, num_steps, eos, capacity,
                         paged, all_greedy, forward)
  return DecodeState(
      k=sub.k, v=sub.v, tokens=state.tokens.at[rows].set(sub.tokens),
      positions=state.positions.at[rows].set(sub.positions),
      generated=state.generated.at[rows].set(sub.generated),
      done=state.done.at[rows].set(sub.done), counts=sub.counts,
      seen=state.seen), pack_step_output(out)


def _verify_entry(params, state, slots, drafts, num_drafts, *, cfg,
                  eos_ids, capacity, all_greedy,
                  forward_tokens=decode_forward_tokens, step_rows=None):
  """Speculative decoding's call: each of the call's rows runs its current
  token and its ``num_drafts`` drafted tokens (``drafts`` [b, k], the rest
  padding) through the model in one pass, keeps the drafts the model
  agrees with and one token of the model's own
  (``pdjax.engine.speculative.accept``), and stops at the first EOS, stop
  id, max_tokens or the context's end among them. Outputs as a generate
  call's of k + 1 steps: step ``i`` holds the row's ``i``-th new token,
  ``valid`` where there is one. ``step_rows``: a batch-invariant pool's
  decode step rows, which ``forward_tokens`` runs the live rows' tokens as
  (one row of the step per token: the host keeps the call's live rows
  plus their drafts within it); their logprobs are then computed as that
  step's sampler computes its rows' (``logprobs_as_steps``)."""
  eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
  stops = stop_set(slots.stop_ids, slots.use_eos, eos)
  rows = slots.rows
  tokens0, pos = state.tokens[rows], state.positions[rows]
  gen, done = state.generated[rows], state.done[rows]
  live = slots.active & ~done
  first, start, table = idle_rows_fresh(live, tokens0, pos, slots.page_table)
  num = jnp.where(live, num_drafts, 0)
  # As steps, a row that is not live takes none of the step's rows.
  kept = num if step_rows is None else jnp.where(live, num, -1)
  T = drafts.shape[1] + 1
  out = forward_tokens(
      params, jnp.concatenate(
          [first[:, None], jnp.where(live[:, None], drafts, 0)], axis=1),
      start, state.k, state.v, table, cfg=cfg, num_kept=kept)
  counts = state.counts
  toks, count, logprobs = accept(
      out.logits, drafts, num, slots.temperature, slots.top_p, slots.top_k,
      slots.min_p, slots.seed, gen, held_back=(slots.min_tokens, stops),
      penalties=penalties(state, slots), all_greedy=all_greedy)
  if step_rows is not None:
    logprobs = logprobs_as_steps(out.logits, toks, kept, step_rows)
  valid, finished, stopped = [], [], []
  ended = ~live
  counting = penalized(slots)
  for i in range(T):
    tok = toks[:, i]
    emitted = ~ended & (i < count)
    counts = count_tokens(counts, rows, tok, emitted & counting)
    is_stop = jnp.any(tok[:, None] == stops, axis=1)
    at_len = gen + i + 1 >= slots.max_tokens
    at_cap = pos + i + 2 >= capacity
    fin = emitted & (is_stop | at_len | at_cap)
    valid.append(emitted)
    finished.append(fin)
    stopped.append(emitted & is_stop)
    ended = ended | fin | ~emitted
  valid = jnp.stack(valid)                             # [T, b]
  n_emit = jnp.sum(valid, axis=0).astype(jnp.int32)
  last = jnp.take_along_axis(toks, jnp.maximum(n_emit - 1, 0)[:, None],
                             axis=1)[:, 0]
  finished = jnp.stack(finished)
  step_out = StepOutput(toks.T, logprobs.T, valid, finished,
                        jnp.stack(stopped))
  return DecodeState(
      k=out.k_pool, v=out.v_pool,
      tokens=state.tokens.at[rows].set(jnp.where(live, last, tokens0)),
      positions=state.positions.at[rows].set(pos + n_emit),
      generated=state.generated.at[rows].set(gen + n_emit),
      done=state.done.at[rows].set(done | jnp.any(finished, axis=0)),
      counts=counts, seen=state.seen), pack_step_output(step_out)


def logprobs_as_steps(logits, tokens, num_kept, rows: int):
  """The log-probabilities of ``tokens`` [B, T] under ``logits`` [B, T, V]
  computed as the sampler of a decode step of ``rows`` rows computes its
  rows' (``sampling.token_logprobs`` over [rows, V]): the kept positions
  laid out as ``llama.decode_tokens_as_steps`` ran them (``num_kept``),
  so that each is that step's, bit for bit (a reduction over another
  shape may round differently); the others' are not theirs."""
  B, T, V = logits.shape
  index = pseudo_rows_of(num_kept, T, rows)
  flat = jnp.zeros((rows, V), logits.dtype).at[index].set(
      logits.reshape(B * T, V), mode="drop")
  flat_tokens = jnp.zeros((rows,), tokens.dtype).at[index].set(
      tokens.reshape(B * T), mode="drop")
  out = token_logprobs(flat, flat_tokens)[jnp.minimum(index, rows - 1)]
  return out.reshape(B, T)


def pack_step_output(out: StepOutput) -> jax.Array:
  """A call's outputs as one int32 array ``[5, S, b]`` (tokens, logprobs'
  bits, valid, finished, stopped): the host reads it with one transfer,
  not five."""
  return jnp.stack([out.tokens.astype(jnp.int32),
                    jax.lax.bitcast_convert_type(
                        out.logprobs.astype(jnp.float32), jnp.int32),
                    out.valid.astype(jnp.int32),
                    out.finished.astype(jnp.int32),
                    out.stopped.astype(jnp.int32)])


def unpack_step_output(packed) -> StepOutput:
  """``pack_step_output``'s array, read on the host, as numpy fields."""
  a = np.asarray(packed)
  return StepOutput(tokens=a[0], logprobs=a[1].view(np.float32),
                    valid=a[2].astype(bool), finished=a[3].astype(bool),
                    stopped=a[4].astype(bool))


__all__ = ["CUBLAS_MIN_ROWS", "DecodeState", "POOL_AXES", "SlotInputs",
           "StepOutput", "generate_compiler_options", "pack_step_output",
           "unpack_step_output", "use_paged_attention"]
