"""The prefill engine: prompts -> first token + the prompt's KV, on a TP mesh.

Two paths, one model:

* batched: one jitted program per (prompt-length bucket, batch size);
  prompts are right-padded to the smallest bucket that holds them.
* buffered: each request in a KV buffer of its own, of static size
  (max_seq_len), filled in bucket-sized chunks that each attend to
  everything before them. It serves prompts longer than the largest bucket
  (chunked prefill, one request at a time) and prompts whose leading
  blocks are cached: those blocks are gathered into the buffer and only the
  rest is computed, in one chunk program for several such prompts whose
  rest fits one bucket (one row per buffer), in an engine with a prefix
  cache. The same path drops the leading pages the decode worker already
  holds from the KV it hands on (``skip_pages``).

The KV comes out in page layout and sharded by the rule set (kv_heads over
``tp``), one array per request, so handing it on is a matter of moving that
array, never of slicing a batch.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pdjax.engine.kv import (kv_sharding, next_pow2, pages_for, payload_pages,
                             request_kv_shape, zero_kv)
from pdjax.engine.lockstep import spans_processes
from pdjax.engine.prefill_config import PrefillConfig
from pdjax.engine.requests import PrefillRequest, PrefillResult, RequestKV
from pdjax.engine.sampling import (MAX_STOP_TOKEN_IDS, InvalidRequest,
                                   SamplingArrays, SamplingParams, sample,
                                   seen_rows, stop_set)
from pdjax.engine.sampling_params import check_in_vocabulary
from pdjax.engine.shared_jit import shared_jit
from pdjax.engine.xla_options import gemm_options
from pdjax.model.config import ModelConfig
from pdjax.model.llama import (Params, kv_to_pool, per_layer, prefill_chunk,
                               prefill_embed, prefill_forward,
                               prefill_last_logits, prefill_layer_group)
from pdjax.sharding import ShardingRules


def prefill_compiler_options(config: PrefillConfig,
                             platform: str) -> dict[str, bool | int] | None:
  """XLA options of the prefill programs (None: XLA's defaults). Only GPU
  compilers know the GEMM options."""
  if platform not in ("gpu", "cuda"):
    return None
  return gemm_options(triton=config.triton_gemm == "on",
                      merge_dots=config.merge_dots == "on")


def _to_pages(k, v, page_size):
  """[L, B, T, K, hd] x2 -> per-row [L, 2, T/P, P, K, hd]."""
  L, B, T, K, hd = k.shape
  kv = jnp.stack([k, v], axis=1).reshape(L, 2, B, T // page_size, page_size,
                                         K, hd)
  return [kv[:, :, b] for b in range(B)]


# A bucketed prefill's inputs travel to the device as one int32 array and
# its first tokens come back as one: each host<->device copy costs a round
# of runtime work on the first token's path (on an H100 about 0.1 ms a
# buffer, the six inputs apart took 0.55 ms). Columns: the prompt (T), its
# true length, then the sampling settings (temperature, top_p as float32
# bits, top_k, min_p as float32 bits, the seed as uint32 bits), then what
# min_tokens holds back (``hold_back_columns``), then the penalties
# (presence, frequency, repetition as float32 bits). A chunk's sampling goes
# as one array too (``sampling_columns``; five apart before).
_SAMPLING_COLUMNS = 5
_HOLD_BACK_COLUMNS = 2 + MAX_STOP_TOKEN_IDS
_PENALTIES_AT = _SAMPLING_COLUMNS + _HOLD_BACK_COLUMNS
# Columns of ``pack_inputs``' array past the prompt's.
COLUMNS_PAST_PROMPT = 1 + _PENALTIES_AT + 3


def hold_back_columns(samp: SamplingArrays) -> np.ndarray:
  """What a first token's ``min_tokens`` holds back, per row of ``samp``:
  ``[B, 2 + MAX_STOP_TOKEN_IDS]`` int32, the row's min_tokens, whether its
  EOS counts, its stop ids (-1 padded); ``_held_back`` reads it in a
  program, from the sampling columns."""
  return np.concatenate([samp.min_tokens.astype(np.int32)[:, None],
                         samp.use_eos.astype(np.int32)[:, None],
                         samp.stop_ids.astype(np.int32)], axis=1)


def _held_back(cols, eos_ids):
  """In a program: the sampling columns' ``hold_back_columns`` ->
  ``sample``'s ``held_back``."""
  eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
  held = cols[:, _SAMPLING_COLUMNS:_PENALTIES_AT]
  return held[:, 0], stop_set(held[:, 2:], held[:, 1] != 0, eos)


def sampling_columns(samp: SamplingArrays) -> np.ndarray:
  """The rows' sampling as one int32 array ``[B, COLUMNS_PAST_PROMPT -
  1]``: one buffer to upload, which ``_unpack_sampling``, ``_held_back``
  and ``_penalties`` read in a program."""
  def f32_bits(a):
    return a.astype(np.float32).view(np.int32)[:, None]
  return np.concatenate(
      [f32_bits(samp.temperature), f32_bits(samp.top_p),
       samp.top_k.astype(np.int32)[:, None], f32_bits(samp.min_p),
       samp.seed.astype(np.uint32).view(np.int32)[:, None],
       hold_back_columns(samp), f32_bits(samp.presence),
       f32_bits(samp.frequency), f32_bits(samp.repetition)], axis=1)


def _penalties(cols, seen):
  """In a program: ``sample``'s ``penalties`` for a first token, from the
  sampling columns and the prompts' tokens ``seen`` [B, V] (no output
  yet: only the repetition penalty can apply)."""
  pen = jax.lax.bitcast_convert_type(cols[:, _PENALTIES_AT:], jnp.float32)
  return None, seen, pen[:, 0], pen[:, 1], pen[:, 2]


def prompt_seen(tokens, true_len, width: int):
  """``[B, width]`` bool: the tokens of each row's prompt (its first
  ``true_len`` of ``tokens`` [B, T]), what the repetition penalty reads;
  in a program (``sampling.seen_rows`` makes it on the host)."""
  B, T = tokens.shape
  valid = jnp.arange(T)[None, :] < true_len[:, None]
  return jnp.zeros((B, width), bool).at[
      jnp.arange(B)[:, None], jnp.where(valid, tokens, width)].set(
          True, mode="drop")


def pack_inputs(tokens: np.ndarray, true_len: np.ndarray,
                samp: SamplingArrays) -> np.ndarray:
  """``[B, T]`` prompt ids, ``[B]`` lengths, the rows' sampling -> one
  ``[B, T + COLUMNS_PAST_PROMPT]`` int32 array (``_unpack_inputs`` reads
  it in a program)."""
  return np.concatenate([tokens.astype(np.int32),
                         true_len.astype(np.int32)[:, None],
                         sampling_columns(samp)], axis=1)


def _unpack_inputs(packed):
  """In a program: ``pack_inputs``' array -> (tokens, true_len, the
  sampling columns ``[B, COLUMNS_PAST_PROMPT - 1]``)."""
  T = packed.shape[1] - COLUMNS_PAST_PROMPT
  return packed[:, :T], packed[:, T], packed[:, T + 1:]


def _unpack_sampling(cols):
  """In a program: the sampling columns -> the arrays ``sample`` takes
  (its positional ones; ``_held_back`` and ``_penalties`` the rest)."""
  as_f32 = functools.partial(jax.lax.bitcast_convert_type,
                             new_dtype=jnp.float32)
  return (as_f32(cols[:, 0]), as_f32(cols[:, 1]), cols[:, 2],
          as_f32(cols[:, 3]),
          jax.lax.bitcast_convert_type(cols[:, 4], jnp.uint32))


def _pack_outputs(tok, lp):
  """In a program: tokens and logprobs -> one ``[B, 2]`` int32 array."""
  return jnp.stack([tok.astype(jnp.int32),
                    jax.lax.bitcast_convert_type(lp.astype(jnp.float32),
                                                 jnp.int32)], axis=1)


def unpack_outputs(out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``_pack_outputs``' array, on the host -> (tokens, logprobs)."""
  out = np.asarray(out)
  return out[:, 0], np.ascontiguousarray(out[:, 1]).view(np.float32)


def pinned_host_sharding(mesh: Mesh) -> NamedSharding | None:
  """A replicated sharding in the host's pinned memory, where a program can
  write a small result the host reads at once: None where a device of
  ``mesh`` has no such memory, or where the mesh spans processes (one
  host buffer per process: not tried there)."""
  if spans_processes(mesh):
    return None
  for d in mesh.devices.flat:
    try:
      kinds = {m.kind for m in d.addressable_memories()}
    except Exception:  # noqa: BLE001 - a backend without memory kinds
      return None
    if "pinned_host" not in kinds:
      return None
  return NamedSharding(mesh, PartitionSpec(), memory_kind="pinned_host")


def _prefill_program(params, packed, *, cfg, page_size, kv_spec):
  """The fused prefill: the last positions' logits, the sampling columns
  (for ``_first_token_program``) and each row's KV pages. It does not
  sample: sampling that branches on a device value (``sample``'s
  ``lax.cond``) makes XLA's GPU runtime read the branch on the host, so
  the call would return only once the program has run; the host knows
  whether every row is greedy and picks the sampling program instead."""
  tokens, true_len, cols = _unpack_inputs(packed)
  out = prefill_forward(params, tokens, true_len, cfg=cfg)
  rows = _to_pages(out.k, out.v, page_size)
  rows = [jax.lax.with_sharding_constraint(r, kv_spec) for r in rows]
  seen = prompt_seen(tokens, true_len, out.logits.shape[-1])
  return out.logits, (cols, seen), rows


def _first_token_program(logits, sampling, *, all_greedy, eos_ids):
  """A batch's first tokens and logprobs, packed (``_pack_outputs``);
  ``sampling``: the sampling columns and the prompts' tokens, as the
  prefill program returns them."""
  cols, seen = sampling
  index = jnp.zeros(logits.shape[:1], jnp.int32)
  return _pack_outputs(*sample(
      logits, *_unpack_sampling(cols), index,
      held_back=_held_back(cols, eos_ids),
      penalties=_penalties(cols, seen), all_greedy=all_greedy))


def _embed_program(params, packed, *, x_spec):
  tokens, _, _ = _unpack_inputs(packed)
  return jax.lax.with_sharding_constraint(prefill_embed(params, tokens),
                                          x_spec)


def _group_program(params, x, *, first_layer, cfg, num_layers, page_size,
                   kv_spec, x_spec):
  """One layer group of a batch: the residual stream on, and the group's
  KV per request (``[num_layers, 2, T/P, P, K, hd]``)."""
  x, k, v = prefill_layer_group(params, x, first_layer, cfg=cfg,
                                num_layers=num_layers)
  rows = [jax.lax.with_sharding_constraint(r, kv_spec)
          for r in _to_pages(k, v, page_size)]
  return jax.lax.with_sharding_constraint(x, x_spec), rows


def _head_program(params, x, packed, *, cfg):
  """The last layer group's residual stream -> (logits, (sampling
  columns, prompts' tokens)), as ``_prefill_program`` returns them."""
  tokens, true_len, cols = _unpack_inputs(packed)
  logits = prefill_last_logits(params, x, true_len, cfg=cfg)
  return logits, (cols, prompt_seen(tokens, true_len, logits.shape[-1]))


def _chunk_program(params, tokens, true_len, k_bufs, v_bufs, start, cols,
                   seen, *, cfg):
  """One chunk of each of ``B`` prompts (row ``b``: ``tokens[b]``, its
  buffers ``k_bufs[b]``, ``v_bufs[b]``): writes the chunk's K/V into the
  row's buffers after its first ``start[b]`` positions (cached blocks and
  earlier chunks) and attends to them. The buffers ``[L, 1, S, K, hd]``
  have one static size, so a chunk program exists once per chunk length
  and row count; positions past the chunk are never read, whatever they
  hold. The rows' buffers stay apart (no batch is copied together), each
  updated in place. ``cols``: the rows' ``sampling_columns``; ``seen``:
  their whole prompts' tokens (``seen_rows``). Returns the
  sampled tokens, their logprobs and each row's buffers (tuples, as they
  came)."""
  out = prefill_chunk(params, tokens, true_len, tuple(k_bufs),
                      tuple(v_bufs), start, cfg=cfg)
  tok, lp = sample(
      out.logits, *_unpack_sampling(cols),
      jnp.zeros((tokens.shape[0],), jnp.int32),
      held_back=_held_back(cols, cfg.eos_token_ids),
      penalties=_penalties(cols, seen))
  return tok, lp, out.k, out.v


def _buffer_to_pages(k_buf, v_buf, first, *, num_pages, page_size, kv_spec,
                     dtype):
  """Pages ``first .. first + num_pages`` of the buffers in request layout
  and the handed-on KV's ``dtype`` (indices past the buffer are clamped:
  those are padding pages)."""
  L, _, S, K, hd = k_buf.shape
  nb = S // page_size
  idx = jnp.clip(first + jnp.arange(num_pages, dtype=jnp.int32), 0, nb - 1)
  kp = k_buf.reshape(L, nb, page_size, K, hd)[:, idx]
  vp = v_buf.reshape(L, nb, page_size, K, hd)[:, idx]
  return jax.lax.with_sharding_constraint(
      kv_to_pool(jnp.stack([kp, vp], axis=1), dtype), kv_spec)


def _skip_pages(kv, first, *, num_pages, kv_spec, dtype):
  """Pages ``first .. first + num_pages`` of a request's KV ``[L, 2, n, P,
  K, hd]`` in the handed-on KV's ``dtype`` (indices past its pages are
  clamped: those are padding pages)."""
  idx = jnp.clip(first + jnp.arange(num_pages, dtype=jnp.int32), 0,
                 kv.shape[2] - 1)
  return jax.lax.with_sharding_constraint(kv_to_pool(kv[:, :, idx], dtype),
                                          kv_spec)


# Called with (request index, its KV) once the KV's programs are dispatched.
KvReady = Callable[[int, RequestKV], None]
OnResult = Callable[[int, PrefillResult], None]


class BufferedPrefill:
  """One prompt through the prefill engine's KV buffer, a chunk at a time:
  its cached prefix gathered in first, then bucket-sized chunks that each
  attend to everything before them. ``advance`` runs chunks up to a token
  budget, so a caller can interleave other programs between them (a
  prompt's prefill spread over several iterations of a colocated engine);
  ``result`` hands on the KV in page layout."""

  def __init__(self, engine: "PrefillEngine", r: PrefillRequest,
               prefix: list[int], owned: bool, hashes: list[bytes],
               buffer_len: int | None = None):
    """``buffer_len``: the buffers' positions (None: the shortest of the
    engine's lengths that holds this prompt, ``buffer_len_for``)."""
    self.engine = engine
    self.request = r
    self._prefix = prefix
    self._owned = owned
    self._hashes = hashes
    cfg = engine.config
    self._cols = engine._put(sampling_columns(
        SamplingArrays.stack([(r.sampling, r.seed_u32)], 1)))
    self._seen = engine._put(seen_rows([r.prompt_ids], 1,
                                       engine.cfg.padded_vocab))
    if buffer_len is None:
      buffer_len = cfg.buffer_len_for(len(r.prompt_ids),
                                      len(prefix) * cfg.page_size)
    self._k, self._v = engine.empty_buffers(buffer_len)
    if prefix:
      self._k, self._v = engine.prefix_store.gather_into(prefix, self._k,
                                                         self._v)
    self.position = len(prefix) * cfg.page_size
    self._tok = self._lp = None
    self._closed = False

  @property
  def done(self) -> bool:
    return self.position >= len(self.request.prompt_ids)

  @property
  def buffer_len(self) -> int:
    return self._k.shape[2]

  def next_chunk(self, budget: int | None = None) -> int:
    """Tokens of compute the next chunk takes (its bucket's length), the
    chunk kept within ``budget`` where a bucket allows."""
    return self.engine._chunk_len(len(self.request.prompt_ids)
                                  - self.position, budget)

  def advance(self, budget: int | None = None) -> bool:
    """Runs chunks while their bucket lengths fit ``budget`` tokens (None:
    to the end; at least one chunk always runs, the smallest bucket if
    none fits). True once the prompt is done."""
    e = self.engine
    ids = self.request.prompt_ids
    spent = 0
    while not self.done:
      C = self.next_chunk(None if budget is None else
                          max(budget - spent, 1))
      if spent and budget is not None and spent + C > budget:
        break
      part = np.zeros((1, C), np.int32)
      piece = ids[self.position:self.position + C]
      part[0, :len(piece)] = piece
      try:
        self._tok, self._lp, (self._k,), (self._v,) = e._chunk(
            e.params, e._put(part),
            e._put(np.array([len(piece)], np.int32)), (self._k,),
            (self._v,), e._put(np.array([self.position], np.int32)),
            self._cols, self._seen)
      except BaseException:
        self.abort()
        raise
      self.position += C
      spent += C
    return self.done

  @staticmethod
  def finish_together(runs: Sequence["BufferedPrefill"], chunk: int) -> None:
    """Runs the last chunk of every one of ``runs`` (prefills of one engine
    whose remaining tokens fit ``chunk``, a bucket; at most
    ``cached_batch_limit(chunk)`` of them) in one chunk program, one row
    per prompt, padded to the next row count compiled for that bucket with
    rows of nothing. On a failure every run is aborted."""
    e = runs[0].engine
    batch = next(b for b in e.config.cached_batch_sizes(chunk)
                 if b >= len(runs))
    tokens = np.zeros((batch, chunk), np.int32)
    true_len = np.ones((batch,), np.int32)
    start = np.zeros((batch,), np.int32)
    for b, run in enumerate(runs):
      piece = run.request.prompt_ids[run.position:]
      tokens[b, :len(piece)] = piece
      true_len[b] = len(piece)
      start[b] = run.position
    cols = sampling_columns(SamplingArrays.stack(
        [(run.request.sampling, run.request.seed_u32) for run in runs],
        batch))
    seen = seen_rows([run.request.prompt_ids for run in runs], batch,
                     e.cfg.padded_vocab)
    length = runs[0].buffer_len
    if any(run.buffer_len != length for run in runs):
      raise ValueError("runs finished together share one buffer length")
    pads = [e.empty_buffers(length) for _ in range(batch - len(runs))]
    try:
      tokens, true_len, start, cols, seen = e._put(
          (tokens, true_len, start, cols, seen))
      tok, lp, ks, vs = e._chunk(
          e.params, tokens, true_len,
          tuple(r._k for r in runs) + tuple(k for k, _ in pads),
          tuple(r._v for r in runs) + tuple(v for _, v in pads),
          start, cols, seen)
      tok, lp = jax.device_get((tok, lp))
    except BaseException:
      for run in runs:
        run.abort()
      raise
    for b, run in enumerate(runs):
      run._tok, run._lp = tok[b:b + 1], lp[b:b + 1]
      run._k, run._v = ks[b], vs[b]
      run.position = len(run.request.prompt_ids)

  def result(self) -> PrefillResult:
    """The first token and the prompt's KV (the prompt must be done)."""
    if not self.done:
      raise RuntimeError("result() before the prompt's last chunk")
    e = self.engine
    P = e.config.page_size
    n = len(self.request.prompt_ids)
    try:
      if self._owned:
        e.prefix_store.store(self._hashes, len(self._prefix), self._k,
                             self._v)
    finally:
      self._release()
    skip = min(self.request.skip_pages, pages_for(n, P) - 1)
    num = payload_pages(pages_for(n, P) - skip)
    kv = e._pages_fn(num)(self._k, self._v, e._put(np.int32(skip)))
    return e._count(PrefillResult(
        self.request.request_id, int(np.asarray(self._tok)[0]),
        float(np.asarray(self._lp)[0]), RequestKV(kv, n, first_page=skip), n,
        cached_tokens=len(self._prefix) * P))

  def abort(self) -> None:
    """Ends it without a result: the pinned prefix goes back."""
    self._release()

  def _release(self) -> None:
    if not self._closed:
      self._closed = True
      self.engine._unpin(self._prefix, self._owned)


def _announce(kvs: Sequence[RequestKV], kv_ready: KvReady | None) -> None:
  if kv_ready is not None:
    for i, kv in enumerate(kvs):
      kv_ready(i, kv)


# Warm-up's dummy prompts: one token, greedy (the greedy first-token
# programs) or sampled (the sampling ones).
_WARMUP_GREEDY = SamplingParams(max_tokens=1, temperature=0.0)
_WARMUP_SAMPLED = SamplingParams(max_tokens=1, temperature=1.0)


class PrefillEngine:
  """Runs prefill for batches of prompts on one mesh (TP or a replica's)."""

  def __init__(self, params: Params, cfg: ModelConfig, mesh: Mesh,
               rules: ShardingRules, config: PrefillConfig = PrefillConfig(),
               *, prefix_store=None):
    """``prefix_store``: where cached blocks live (``PrefillKVStore`` on a
    prefill worker, the decode replica's pools in a colocated engine), or
    None for no prefix reuse."""
    self.params = params
    self.cfg = cfg
    self.mesh = mesh
    self.rules = rules
    self.config = config
    self.prefix_store = prefix_store
    P = config.page_size
    self._kv_sharding = {}
    self._replicated = NamedSharding(mesh, PartitionSpec())
    kv_spec = self.kv_sharding(payload_pages(config.chunk // P))
    self.compiler_options = prefill_compiler_options(
        config, mesh.devices.flat[0].platform)
    jit = functools.partial(shared_jit,
                            compiler_options=self.compiler_options)
    self._prefill = jit(
        functools.partial(_prefill_program, cfg=cfg, page_size=P,
                          kv_spec=kv_spec))
    self._chunk = jit(functools.partial(_chunk_program, cfg=cfg),
                      donate_argnums=(3, 4))
    self._group_sizes = config.layer_group_sizes(cfg.num_layers)
    # A bucketed prompt's packed inputs go to the one fused program as a
    # NumPy array, which the jitted call uploads itself: a ``device_put``
    # first took 0.4 ms of a first token's way on an H100 (serving, one
    # stream), and the whole call is 0.4 ms shorter without it on the
    # development CPU. Layer groups read the inputs twice, and a mesh over
    # several processes needs the global array ``device_put`` makes.
    self._upload_in_call = (len(self._group_sizes) == 1
                            and not spans_processes(mesh))
    if len(self._group_sizes) > 1:
      x_spec = rules.sharding(mesh, ("batch", "seq", "embed"),
                              (config.max_batch, config.chunk,
                               cfg.hidden_size), what="residual stream")
      self._embed = shared_jit(functools.partial(_embed_program,
                                                 x_spec=x_spec))
      starts = [int(f) for f in np.cumsum([0] + self._group_sizes[:-1])]
      group = functools.partial(_group_program, cfg=cfg, page_size=P,
                                kv_spec=kv_spec, x_spec=x_spec)
      # (params, x) -> (x, rows) of each group, in order.
      if per_layer(params["layers"]):
        # Weights stored per layer: each group's program picks its own
        # layers' arrays, so one program per group (first_layer fixed).
        self._group_calls = [
            jit(functools.partial(group, num_layers=n, first_layer=f))
            for n, f in zip(self._group_sizes, starts)]
      else:
        # One program per group size, the first layer an argument.
        programs = {n: jit(functools.partial(group, num_layers=n))
                    for n in set(self._group_sizes)}
        self._group_calls = [
            functools.partial(programs[n], first_layer=self._put(np.int32(f)))
            for n, f in zip(self._group_sizes, starts)]
      self._head = jit(functools.partial(_head_program, cfg=cfg))
    # The first tokens, by whether every row is greedy (the host knows),
    # written by their program straight to pinned host memory where the
    # devices have it: no copy after the programs (on an H200 the first
    # token reached the host 0.3-0.6 ms sooner than through a
    # ``device_get``, the programs idle).
    host = pinned_host_sharding(mesh)
    self._first_token = {
        greedy: shared_jit(functools.partial(_first_token_program,
                                             all_greedy=greedy,
                                             eos_ids=cfg.eos_token_ids),
                           **({"out_shardings": host} if host else {}))
        for greedy in (True, False)}
    self._first_token_on_host = host is not None
    self._pages_fns = {}
    self._skip_fns = {}
    # The handed-on KV's dtype (PrefillConfig.kv_dtype); the programs
    # compute, and the buffers and prefix cache keep, the model's.
    self.kv_dtype = jnp.dtype(config.kv_storage_dtype(cfg.jnp_dtype))
    self._to_payload = (
        None if self.kv_dtype == jnp.dtype(cfg.jnp_dtype) else
        shared_jit(functools.partial(kv_to_pool, dtype=self.kv_dtype)))
    self._zeros_fns = {}   # buffer length -> its K/V zeros program
    # The shortest prompt that can run buffered: after a cached page, or
    # (no prefix store) longer than every bucket; an engine that cuts
    # prompts by a token budget (``start_chunked``) lowers it.
    self.buffered_from = (P + 1 if prefix_store is not None
                          else config.chunk + 1)
    self.stats = {"prompt_tokens": 0, "cached_tokens": 0}
    self._warming = False   # warm-up prefills (compiling) are not timed

  @property
  def layer_group_sizes(self) -> list[int]:
    """Layers of each program a bucketed prompt runs in (one: fused)."""
    return list(self._group_sizes)

  # ---------------------------------------------------------------- layout
  def kv_sharding(self, num_pages: int) -> NamedSharding:
    """The layout of a request KV this engine hands on: the rules' (KV heads
    split over tp), or replicated when the mesh spans processes, so that one
    process holds all of it to hand off (``pdjax.engine.lockstep``)."""
    if num_pages not in self._kv_sharding:
      shape = request_kv_shape(self.cfg, num_pages, self.config.page_size)
      self._kv_sharding[num_pages] = (
          self._replicated if spans_processes(self.mesh)
          else kv_sharding(self.rules, self.mesh, shape))
    return self._kv_sharding[num_pages]

  def _put(self, x):
    return jax.device_put(x, self._replicated)

  # ---------------------------------------------------------------- checks
  def validate(self, prompt_ids: Sequence[int]) -> None:
    n = len(prompt_ids)
    if n == 0:
      raise InvalidRequest("prompt", "is empty")
    if n >= self.config.max_seq_len:
      raise InvalidRequest(
          "prompt", f"has {n} tokens; this deployment accepts at most "
          f"{self.config.max_seq_len - 1} (max_seq_len {self.config.max_seq_len}"
          " counts the generated tokens too)")
    check_in_vocabulary(np.asarray(prompt_ids), self.cfg.vocab_size)

  # ---------------------------------------------------------------- run
  def prefill(self, requests: Sequence[PrefillRequest], *,
              kv_ready: KvReady | None = None,
              on_result: OnResult | None = None) -> list[PrefillResult]:
    """Prefills every request; results in the order given. Requests with
    nothing cached that share a bucket run together, up to ``max_batch`` at
    a time; so do, in an engine with a prefix cache, requests with a cached
    prefix whose rest fits one bucket (``BufferedPrefill.finish_together``);
    the others (longer than every bucket) run buffered, one by one. Where
    ``PrefillConfig.cached_prefix`` is "shrinking", a cached prefix that
    would not put the rest in a smaller bucket than the whole prompt's is
    not used (``_prefix_for``). Every path hands the KV on from the first
    page the receiver does not hold (``skip_pages``), but a bucketed
    prefill in layer groups, which hands it on whole (the receiver does
    not write the pages it holds).

    ``on_result(i, result)``, if given, is called with request ``i``'s
    result as soon as its first token is on the host, before the call goes
    on to the next request or group: a caller can answer request ``i``
    without waiting for the rest of the call (a batch of cached-prefix
    requests runs one after another, so the last would otherwise set every
    one's time to first token).

    ``kv_ready(i, kv)``, if given, is called with request ``i``'s KV as soon
    as the programs computing it are dispatched, so a hand-off can start
    while the prefill still runs. That pays with ``layer_groups`` > 1:
    each group's KV is done while later ones compute (the fused program's
    is done when the whole prefill is). The bucketed path's calls return
    at once (``_prefill_program``); a chunk program samples on a device
    branch and returns once it has run. The KV is the same object the
    result carries."""
    for r in requests:
      self.validate(r.prompt_ids)
    results: dict[int, PrefillResult] = {}
    by_bucket: dict[int, list[int]] = {}
    by_chunk: dict[int, list[int]] = {}
    # Cached prefixes found (and pinned, where this engine owns them) for
    # requests not started yet: given back if the call fails before then.
    found: dict[int, tuple] = {}
    P = self.config.page_size
    try:
      for i, r in enumerate(requests):
        prefix, owned, hashes = self._prefix_for(
            r, shrinking=self.config.cached_prefix == "shrinking")
        b = self.config.bucket_for(len(r.prompt_ids))
        rest = self.config.bucket_for(len(r.prompt_ids) - len(prefix) * P)
        if prefix and rest is not None and self.batches_cached:
          found[i] = (prefix, owned, hashes)
          by_chunk.setdefault(rest, []).append(i)
        elif b is None or prefix:
          results[i] = self._prefill_buffered(r, prefix, owned, hashes)
          if kv_ready is not None:
            kv_ready(i, results[i].kv)
          if on_result is not None:
            on_result(i, results[i])
        else:
          by_bucket.setdefault(b, []).append(i)
      for chunk, idxs in by_chunk.items():
        step = self.config.cached_batch_limit(chunk)
        for s in range(0, len(idxs), step):
          group = idxs[s:s + step]
          outs = self._prefill_cached(requests, group, found, chunk)
          for i, out in zip(group, outs):
            results[i] = out
            if kv_ready is not None:
              kv_ready(i, out.kv)
            if on_result is not None:
              on_result(i, out)
    except BaseException:
      for prefix, owned, _ in found.values():
        self._unpin(prefix, owned)
      raise
    for bucket, idxs in by_bucket.items():
      step = self.config.batch_limit(bucket)
      for s in range(0, len(idxs), step):
        group = idxs[s:s + step]
        ready = (None if kv_ready is None else
                 lambda j, kv, group=group: kv_ready(group[j], kv))
        answer = (None if on_result is None else
                  lambda j, out, group=group: on_result(group[j], out))
        outs = self._prefill_batch([requests[i] for i in group], bucket,
                                   kv_ready=ready, on_result=answer)
        results.update(zip(group, outs))
    return [results[i] for i in range(len(requests))]

  def _count(self, r: PrefillResult) -> PrefillResult:
    """Adds a finished prefill to the engine's token counts."""
    self.stats["prompt_tokens"] += r.prompt_len
    self.stats["cached_tokens"] += r.cached_tokens
    return r

  def _prefix_for(self, r: PrefillRequest, *, shrinking: bool = False):
    """(cached pages to start from, whether this engine pinned them, block
    names). At least one prompt token is always computed: its logits give
    the first token. ``shrinking``: only a prefix that leaves the rest to a
    smaller bucket than the whole prompt's (none where no prefix could,
    looked up not at all), so that a cached prefix never makes a prompt
    that fits a bucket slower."""
    store = self.prefix_store
    if store is None:
      return [], False, []
    n = len(r.prompt_ids)
    limit = (n - 1) // self.config.page_size
    least = self._least_prefix(n) if shrinking else 1
    if r.prefix_pages is not None:
      pages = list(r.prefix_pages)[:limit]
      return (pages if len(pages) >= least else []), False, []
    hashes = store.hashes(r.prompt_ids, r.cache_salt)
    if least > limit:
      return [], True, hashes
    pages = (store.match(hashes[:limit], r.kv_sources) if r.kv_sources
             else store.match(hashes[:limit]))
    if len(pages) < least:
      if pages:
        store.release(pages)
      pages = []
    return pages, True, hashes

  def _least_prefix(self, n: int) -> int:
    """The fewest cached pages that put the rest of an ``n``-token prompt
    in a smaller bucket than the prompt's own (1 for a prompt longer than
    every bucket: any prefix saves chunks)."""
    b = self.config.bucket_for(n)
    if b is None:
      return 1
    smaller = [x for x in self.config.buckets if x < b]
    if not smaller:
      return n   # more than any prompt may take from a cache
    return -(-(n - smaller[-1]) // self.config.page_size)

  def _prefill_batch(self, reqs: Sequence[PrefillRequest], bucket: int, *,
                     kv_ready: KvReady | None = None,
                     on_result: OnResult | None = None):
    t0 = time.perf_counter()
    batch = next(b for b in self.config.batch_sizes(bucket)
                 if b >= len(reqs))
    tokens = np.zeros((batch, bucket), np.int32)
    true_len = np.ones((batch,), np.int32)
    for i, r in enumerate(reqs):
      tokens[i, :len(r.prompt_ids)] = r.prompt_ids
      true_len[i] = len(r.prompt_ids)
    samp = SamplingArrays.stack([(r.sampling, r.seed_u32) for r in reqs],
                                batch)
    packed = pack_inputs(tokens, true_len, samp)
    if not self._upload_in_call:
      packed = self._put(packed)
    # No program here samples on a device branch, so every call returns
    # at once and kv_ready goes out as soon as the KV's programs are
    # dispatched. ``full``: each request's KV as computed (what the prefix
    # cache keeps); ``kvs``: as handed on (in the KV dtype).
    if len(self._group_sizes) == 1:
      logits, cols, rows = self._prefill(self.params, packed)
      full = [RequestKV(rows[i], len(r.prompt_ids))
              for i, r in enumerate(reqs)]
      kvs = [self._handed_on(kv, r.skip_pages) for kv, r in zip(full, reqs)]
      _announce(kvs, kv_ready)
    else:
      x = self._embed(self.params, packed)
      pieces = [[] for _ in reqs]
      for run_group in self._group_calls:
        x, rows = run_group(self.params, x)
        for i in range(len(reqs)):
          pieces[i].append(rows[i])
      full = [RequestKV(None, len(r.prompt_ids), layer_groups=pieces[i])
              for i, r in enumerate(reqs)]
      kvs = [self._payload(kv) for kv in full]
      _announce(kvs, kv_ready)
      logits, cols = self._head(self.params, x, packed)
    all_greedy = all(r.sampling.greedy for r in reqs)
    out = self._first_token[all_greedy](logits, cols)
    tok, lp = unpack_outputs(out if self._first_token_on_host
                             else jax.device_get(out))
    self._observe(sum(len(r.prompt_ids) for r in reqs),
                  time.perf_counter() - t0)
    results = [self._count(PrefillResult(r.request_id, int(tok[i]),
                                         float(lp[i]), kvs[i],
                                         len(r.prompt_ids)))
               for i, r in enumerate(reqs)]
    # The first tokens go out before the prefix cache takes the pages.
    if on_result is not None:
      for i, result in enumerate(results):
        on_result(i, result)
    store = self.prefix_store
    if store is not None and store.keeps_prefills:
      for r, kv in zip(reqs, full):
        store.store_pages(store.hashes(r.prompt_ids, r.cache_salt), kv.kv)
    return results

  def _payload(self, kv: RequestKV) -> RequestKV:
    """A bucketed prefill's KV as handed on: in the KV dtype (each layer
    group apart, so each can still go as soon as it is done)."""
    if self._to_payload is None:
      return kv
    if kv.layer_groups:
      return RequestKV(None, kv.num_tokens, layer_groups=[
          self._to_payload(g) for g in kv.layer_groups])
    return RequestKV(self._to_payload(kv.kv), kv.num_tokens)

  @property
  def chunk_buffer_lens(self) -> list[int]:
    """The buffer lengths this engine's prompts can take, of
    ``PrefillConfig.chunk_buffer_lens`` (the ones warm-up compiles for):
    none shorter than the shortest buffered prompt (``buffered_from``)
    and a chunk; the longest always."""
    c = self.config
    shortest = self.buffered_from + c.buckets[0]   # a prompt + a chunk
    lens = c.chunk_buffer_lens
    return [n for n in lens[:-1] if n >= shortest] + lens[-1:]

  def empty_buffers(self, length: int):
    """A buffered prefill's K and V buffers of ``length`` positions
    (``[layers, 1, length, kv_heads, head_dim]``, zeros, laid out as the
    chunk programs read them)."""
    if length not in self._zeros_fns:
      cfg = self.cfg
      shape = (cfg.num_layers, 1, length, cfg.num_kv_heads, cfg.head_dim)
      sharding = self.rules.sharding(
          self.mesh, ("layers", "batch", "seq", "kv_heads", "head_dim"),
          shape, what="chunk buffer")
      self._zeros_fns[length] = shared_jit(
          functools.partial(zero_kv, shape=shape, dtype=cfg.dtype),
          out_shardings=(sharding, sharding))
    return self._zeros_fns[length]()

  def _chunk_len(self, remaining: int, max_chunk: int | None = None) -> int:
    """The bucket the next chunk of a buffered prefill runs in: the one that
    holds what remains, else the largest, within ``max_chunk`` tokens where
    given (at least the smallest bucket)."""
    b = self.config.bucket_for(remaining)
    if b is not None and (max_chunk is None or b <= max_chunk):
      return b
    fits = [x for x in self.config.buckets
            if max_chunk is None or x <= max_chunk]
    return fits[-1] if fits else self.config.buckets[0]

  def _prefill_buffered(self, r: PrefillRequest, prefix: list[int],
                        owned: bool, hashes: list[bytes]) -> PrefillResult:
    t0 = time.perf_counter()
    run = BufferedPrefill(self, r, prefix, owned, hashes)
    run.advance()
    out = run.result()
    self._observe(out.prompt_len - out.cached_tokens,
                  time.perf_counter() - t0)
    return out

  @property
  def batches_cached(self) -> bool:
    """Whether prompts with cached prefixes run batched (one chunk program
    for several: ``BufferedPrefill.finish_together``): in an engine with a
    prefix cache, whose warm-up compiles those programs."""
    return self.prefix_store is not None

  def _unpin(self, prefix: list[int], owned: bool) -> None:
    """Gives back a cached prefix this engine pinned (``_prefix_for``)."""
    if owned and prefix:
      self.prefix_store.release(prefix)

  def _prefill_cached(self, requests: Sequence[PrefillRequest],
                      group: Sequence[int], found: dict[int, tuple],
                      chunk: int) -> list[PrefillResult]:
    """Requests ``group`` of ``requests``, with a cached prefix whose rest
    fits ``chunk``: one chunk program for all of them. Each one's prefix
    (whether this engine pinned it, its block names) is taken out of
    ``found`` once its run has started, and is the run's to give back from
    then on; what is left in ``found`` is the caller's."""
    t0 = time.perf_counter()
    runs = []
    P = self.config.page_size
    length = max(self.config.buffer_len_for(len(requests[i].prompt_ids),
                                            len(found[i][0]) * P)
                 for i in group)   # one program: one buffer length
    try:
      for i in group:
        runs.append(BufferedPrefill(self, requests[i], *found[i],
                                    buffer_len=length))
        del found[i]
    except BaseException:
      for run in runs:
        run.abort()
      raise
    BufferedPrefill.finish_together(runs, chunk)
    outs = []
    for i, run in enumerate(runs):
      try:
        outs.append(run.result())
      except BaseException:
        for later in runs[i + 1:]:
          later.abort()
        raise
    self._observe(sum(o.prompt_len - o.cached_tokens for o in outs),
                  time.perf_counter() - t0)
    return outs

  def _observe(self, tokens: int, seconds: float) -> None:
    """Tells the prefix store what computing ``tokens`` prompt tokens took
    (a store that can fetch blocks weighs fetches against it)."""
    if self.prefix_store is not None and not self._warming:
      self.prefix_store.observe_prefill(tokens, seconds)

  def start_chunked(self, r: PrefillRequest) -> "BufferedPrefill":
    """A prefill of ``r`` that runs a chunk budget at a time
    (``BufferedPrefill.advance``), on the buffered path: a caller can put
    other work between its chunks (a colocated engine's decode calls). Its
    cached prefix, if any, is pinned now; ``result`` or ``abort`` ends
    it. A prompt shorter than ``buffered_from`` is refused: warm-up left
    out the buffer it would take."""
    self.validate(r.prompt_ids)
    if len(r.prompt_ids) < self.buffered_from:
      raise ValueError(f"a chunked prefill of {len(r.prompt_ids)} tokens: "
                       f"this engine runs them from {self.buffered_from}")
    prefix, owned, hashes = self._prefix_for(r)
    return BufferedPrefill(self, r, prefix, owned, hashes)

  def _prefill_chunked(self, r: PrefillRequest) -> PrefillResult:
    return self._prefill_buffered(r, [], False, [])

  def _pages_fn(self, num_pages: int):
    if num_pages not in self._pages_fns:
      self._pages_fns[num_pages] = shared_jit(functools.partial(
          _buffer_to_pages, num_pages=num_pages,
          page_size=self.config.page_size,
          kv_spec=self.kv_sharding(num_pages), dtype=self.kv_dtype))
    return self._pages_fns[num_pages]

  def _skip_fn(self, num_pages: int):
    if num_pages not in self._skip_fns:
      self._skip_fns[num_pages] = shared_jit(functools.partial(
          _skip_pages, num_pages=num_pages,
          kv_spec=self.kv_sharding(num_pages), dtype=self.kv_dtype))
    return self._skip_fns[num_pages]

  def _handed_on(self, kv: RequestKV, skip: int) -> RequestKV:
    """A bucketed prompt's KV as handed on: from its first page the
    receiver does not hold (``PrefillRequest.skip_pages``; at least its
    last page goes), in the KV dtype; whole where its layers ran as
    groups."""
    P = self.config.page_size
    skip = min(skip, pages_for(kv.num_tokens, P) - 1)
    if skip <= 0 or kv.layer_groups:
      return self._payload(kv)
    num = payload_pages(pages_for(kv.num_tokens, P) - skip)
    out = self._skip_fn(num)(kv.kv, self._put(np.int32(skip)))
    return RequestKV(out, kv.num_tokens, first_page=skip)

  # ---------------------------------------------------------------- warmup
  def warmup(self, *, skip_pages: bool = True) -> None:
    """Compiles every program serving can need, so serving never does.
    ``skip_pages``: whether prompts may come with pages to skip (their
    decode pool caches prefixes), which a bucketed prompt's hand-off then
    leaves out with programs of their own."""
    self._warming = True
    try:
      self._warmup(skip_pages)
    finally:
      self._warming = False

  def _warmup(self, skip_pages: bool) -> None:
    # Each part in a method of its own: what one part holds (a batch's KV,
    # a buffer pair of the longest length) is freed before the next runs,
    # so warm-up's peak is one program's, not the sum of every part's.
    self._warm_bucketed()
    self._warm_buffered()
    if skip_pages and len(self._group_sizes) == 1:   # see _handed_on
      self._warm_skipped_pages()
    if self.prefix_store is not None:
      self.prefix_store.warmup(self)
    # The warm-up's dummy prompts are not traffic.
    self.stats = {"prompt_tokens": 0, "cached_tokens": 0}

  def _warm_bucketed(self) -> None:
    """Every bucketed program: each bucket at each batch size, greedy, and
    sampled once per batch size (the first-token programs)."""
    greedy, sampled = _WARMUP_GREEDY, _WARMUP_SAMPLED
    sampled_rows: set[int] = set()   # first-token programs by batch size
    for bucket in self.config.buckets:
      for batch in self.config.batch_sizes(bucket):
        reqs = [PrefillRequest(f"warmup-{i}", [1] * bucket, greedy)
                for i in range(batch)]
        out = self._prefill_batch(reqs, bucket)
        if batch not in sampled_rows:
          sampled_rows.add(batch)
          self._prefill_batch([dataclasses.replace(r, sampling=sampled)
                               for r in reqs], bucket)
      # Layer groups joined into one array: a hand-off that falls back
      # from CUDA IPC to a path that moves the whole KV.
      if out[0].kv.layer_groups:
        out[0].kv.kv.block_until_ready()

  def _warm_buffered(self) -> None:
    """The buffered path: one chunk program per chunk length (the buckets)
    and buffer length, at every row count cached prefixes run with, and
    page extraction for every payload size a buffer can hold."""
    greedy = _WARMUP_GREEDY
    rows = (self.config.cached_batch_sizes if self.batches_cached
            else lambda bucket: [1])   # cached prefixes run batched
    first = self._put(np.int32(0))
    for length in self.chunk_buffer_lens:
      for bucket in self.config.buckets:
        if bucket > length:
          continue
        for batch in rows(bucket):
          runs = [BufferedPrefill(self, PrefillRequest(
              f"warmup-{i}", [1] * bucket, greedy), [], False, [],
                                  buffer_len=length)
                  for i in range(batch)]
          if batch == 1:
            runs[0].advance()
          else:
            BufferedPrefill.finish_together(runs, bucket)
          for run in runs:
            run.abort()
      k, v = self.empty_buffers(length)
      for num in self.buffered_payload_page_counts(length):
        self._pages_fn(num)(k, v, first)
      del k, v   # before the next length's pair is made

  def _warm_skipped_pages(self) -> None:
    """The programs that leave out of a bucketed prompt's hand-off the
    pages its receiver holds, for every bucket and page count."""
    first = self._put(np.int32(0))
    for bucket in self.config.buckets:
      n = bucket // self.config.page_size
      kv = jnp.zeros(request_kv_shape(self.cfg, n, self.config.page_size),
                     self.cfg.jnp_dtype, device=self.kv_sharding(n))
      for num in sorted({payload_pages(k) for k in range(1, n)}):
        self._skip_fn(num)(kv, first)

  def close(self) -> None:
    """Nothing to stop: a pool in one process has no followers."""

  def buffered_payload_page_counts(self, buffer_len: int) -> list[int]:
    """The payload page counts a buffer of ``buffer_len`` positions hands
    on (the prompt it holds is shorter than the buffer)."""
    pages = min(self.config.max_seq_len, buffer_len) // self.config.page_size
    top = payload_pages(pages)
    return [1 << i for i in range(top.bit_length())]

  def payload_page_counts(self) -> list[int]:
    """Page counts of the KVs this engine hands on (every size a decode
    pool must compile an insert for)."""
    return self.config.payload_page_counts()


__all__ = ["BufferedPrefill", "PrefillConfig", "PrefillEngine", "KvReady",
           "OnResult", "next_pow2"]
