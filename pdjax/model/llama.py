"""The Llama-family decoder as pure functions over a pytree of weights.

Three entry points share one layer body:

* ``prefill_forward``: whole prompts, many tokens per sequence. It returns
  their K/V densely; the caller decides where they live.
* ``prefill_chunk``: the next part of prompts whose earlier tokens' K/V sit
  in a buffer (chunked prefill, prefix caching): the part's K/V are written
  after them and its queries attend to both.
* ``decode_forward``: one token per sequence at per-sequence positions. K/V
  live in paged pools ``[layers * pages, page_size, kv_heads, head_dim]``;
  each sequence owns the pages its row of ``page_table`` names. The new token's K/V
  is scattered into the pool (donated by the caller, so in place) and
  attention reads the sequence's pages, masked by its length, so stale data in
  a recycled page is never visible.

Layers are stacked on a leading axis and run with ``lax.scan``: compile time
does not grow with depth, and the per-layer weights keep one array per kind,
which is what the sharding rules and orbax checkpoints address. Quantized
(FP8) projections are the exception: one array per layer, and the loops
over layers unrolled where they are (``per_layer`` says why).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from pdjax.model.config import ModelConfig, rope_inv_freq

Params = dict[str, Any]


# ------------------------------------------------------------------ layout
def param_shapes(cfg: ModelConfig) -> dict[str, Any]:
  """Shape and logical axes of every weight, as a pytree of (shape, axes)."""
  L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
  H, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  V = cfg.padded_vocab
  layers = {
      "attn_norm": ((L, D), ("layers", "embed")),
      "wq": ((L, D, H, hd), ("layers", "embed", "heads", "head_dim")),
      "wk": ((L, D, K, hd), ("layers", "embed", "kv_heads", "head_dim")),
      "wv": ((L, D, K, hd), ("layers", "embed", "kv_heads", "head_dim")),
      "wo": ((L, H, hd, D), ("layers", "heads", "head_dim", "embed")),
      "mlp_norm": ((L, D), ("layers", "embed")),
      "w_gate": ((L, D, F), ("layers", "embed", "mlp")),
      "w_up": ((L, D, F), ("layers", "embed", "mlp")),
      "w_down": ((L, F, D), ("layers", "mlp", "embed")),
  }
  if cfg.qkv_bias:
    layers["bq"] = ((L, H, hd), ("layers", "heads", "head_dim"))
    layers["bk"] = ((L, K, hd), ("layers", "kv_heads", "head_dim"))
    layers["bv"] = ((L, K, hd), ("layers", "kv_heads", "head_dim"))
  if cfg.o_bias:
    layers["bo"] = ((L, D), ("layers", "embed"))
  if cfg.mlp_bias:
    layers["b_gate"] = ((L, F), ("layers", "mlp"))
    layers["b_up"] = ((L, F), ("layers", "mlp"))
    layers["b_down"] = ((L, D), ("layers", "embed"))
  if cfg.fused_projections:
    _fused_layout(layers)
  if cfg.weight_dtype is not None:
    _quantized_layout(layers, quantized_projections(cfg))
  out = {
      "embed": ((V, D), ("vocab", "embed")),
      "layers": layers,
      "final_norm": ((D,), ("embed",)),
  }
  if not cfg.tie_word_embeddings:
    out["lm_head"] = ((D, V), ("embed", "vocab"))
  return out


# The layers' projections that ``ModelConfig.weight_dtype`` quantizes, with
# how many of their leading axes (after "layers") the matmul contracts: the
# rest are output channels, each with its own scale.
QUANTIZED = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1,
             "w_down": 1}
SCALE_SUFFIX = "_scale"
# ``ModelConfig.fused_projections``: each fused weight (and bias) and the
# ones it joins, in order, along its last output axis (heads for q/k/v, the
# MLP width for gate/up).
FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up"),
         "bqkv": ("bq", "bk", "bv"), "b_gate_up": ("b_gate", "b_up")}


def quantized_projections(cfg: ModelConfig) -> dict[str, int]:
  """``QUANTIZED`` in ``cfg``'s layout: fused projections in place of
  the ones they join."""
  if not cfg.fused_projections:
    return QUANTIZED
  out = {}
  for name, contracted in QUANTIZED.items():
    fused = next((f for f, parts in FUSED.items() if name in parts), name)
    out[fused] = contracted
  return out


def _fused_layout(layers: dict) -> None:
  """``FUSED``: the joined weights in place of their parts, concatenated
  along the parts' last output axis (the heads of q, k and v; the MLP
  width of gate and up), whose logical axis is the first part's."""
  for fused, parts in FUSED.items():
    if parts[0] not in layers:
      continue
    shapes = [layers.pop(p) for p in parts]
    axis = len(shapes[0][0]) - (2 if fused in ("wqkv", "bqkv") else 1)
    shape = list(shapes[0][0])
    shape[axis] = sum(s[0][axis] for s in shapes)
    layers[fused] = (tuple(shape), shapes[0][1])


def output_major(axes: tuple, contracted: int) -> tuple:
  """A projection's axes ``(layers, *in, *out)`` (``contracted`` of them
  in) as a quantized projection stores them: ``(layers, *out, *in)``.

  The contracted axes are minor because that is how FP8 GEMMs read both
  operands (cuBLASLt's FP8 kernels take only the "TN" layout): stored
  input-major, every FP8 weight would be transposed, in HBM, by every
  step that reads it."""
  return (axes[0],) + tuple(axes[1 + contracted:]) + tuple(
      axes[1:1 + contracted])


def _quantized_layout(layers: dict, quantized: dict[str, int]) -> None:
  """Quantized projections: one array per layer (a list: ``per_layer``),
  each output-major (``output_major``), with a stacked ``<name>_scale``
  leaf beside it, float32, one per layer and output channel."""
  for name, contracted in quantized.items():
    shape, axes = layers[name]
    one = (output_major(shape, contracted)[1:],
           output_major(axes, contracted)[1:])
    layers[name] = [one] * shape[0]
    layers[name + SCALE_SUFFIX] = (
        (shape[0],) + shape[1 + contracted:],
        (axes[0],) + axes[1 + contracted:])


# Weights stored one array per layer (lists in ``params["layers"]``; today
# the FP8 projections), not stacked on a leading layer axis. A layer's slice
# of a stacked array is read in place only by the GEMMs XLA can point into
# a slice (cuBLAS's bf16/f32 ones): every other consumer, cuBLASLt's FP8
# GEMMs and the Triton GEMMs that widen FP8 weights included, gets a copy
# of it first, so a stacked FP8 model copied its weights on every step
# (an 8B decode step on an H100: 5.1 of its 11 ms in those copies). Loops
# over layers run unrolled where such lists are (``scan_layers``).
def per_layer(layers: dict) -> bool:
  """Whether any of ``layers``' leaves is stored one array per layer."""
  return any(isinstance(v, list) for v in layers.values())


def scan_layers(layer, carry, layers: dict, xs=None):
  """``jax.lax.scan(layer, carry, (layers, xs))`` over the model's layers
  (``xs``: per-layer inputs stacked on axis 0, or None), unrolled into one
  call per layer where weights are stored per layer (``per_layer``).
  Returns (carry, stacked outputs) as scan does."""
  if not per_layer(layers):
    return jax.lax.scan(layer, carry, layers if xs is None else (layers, xs))
  num = len(next(v for v in layers.values() if isinstance(v, list)))
  outs = []
  for i in range(num):
    lp = {k: v[i] for k, v in layers.items()}   # arrays, or stacked slices
    x_i = lp if xs is None else (lp, jax.tree.map(lambda a: a[i], xs))
    carry, y = layer(carry, x_i)
    outs.append(y)
  if outs[0] is None:
    return carry, None
  return carry, jax.tree.map(lambda *ys: jnp.stack(ys), *outs)


def _is_leaf(x):
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple)


def param_logical_axes(cfg: ModelConfig):
  return jax.tree.map(lambda s: s[1], param_shapes(cfg), is_leaf=_is_leaf)


def param_dtypes(cfg: ModelConfig):
  """The storage dtype of every weight: ``cfg.dtype``, except quantized
  projections (``cfg.weight_dtype``) and their float32 scales."""
  def dtype(path, _):
    name = next(k.key for k in reversed(path)
                if isinstance(k, jax.tree_util.DictKey))
    if cfg.weight_dtype is not None and name in quantized_projections(cfg):
      return jnp.dtype(cfg.weight_dtype)
    if name.endswith(SCALE_SUFFIX):
      return jnp.dtype(jnp.float32)
    return jnp.dtype(cfg.jnp_dtype)
  return jax.tree_util.tree_map_with_path(dtype, param_shapes(cfg),
                                          is_leaf=_is_leaf)


def abstract_params(cfg: ModelConfig, shardings=None):
  """ShapeDtypeStructs of the weights (optionally carrying shardings)."""
  shapes = jax.tree.map(lambda s: s[0], param_shapes(cfg), is_leaf=_is_leaf)
  dtypes = param_dtypes(cfg)
  if shardings is None:
    return jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s, d),
                        shapes, dtypes,
                        is_leaf=lambda x: isinstance(x, tuple))
  return jax.tree.map(
      lambda s, d, sh: jax.ShapeDtypeStruct(s, d, sharding=sh),
      shapes, dtypes, shardings, is_leaf=lambda x: isinstance(x, tuple))


def init_params(cfg: ModelConfig, seed: int = 0, *, std: float = 0.02,
                shardings=None) -> Params:
  """Random weights, born sharded when ``shardings`` is given.

  Norm weights are ones plus a little noise so a bug that drops a norm shows.
  Used for benchmarks (Llama-3-8B shapes) and tests; real models are loaded.
  Each leaf is made on its devices by a cached jitted program, so repeated
  calls (and leaves of equal shape) do not recompile.
  """
  abstract = abstract_params(cfg)
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  shard_leaves = (jax.tree.leaves(shardings) if shardings is not None
                  else [None] * len(flat))
  out = []
  for i, ((path, leaf), sharding) in enumerate(zip(flat, shard_leaves)):
    norm = "norm" in jax.tree_util.keystr(path)
    make = _random_leaf_fn(leaf.shape, jnp.dtype(leaf.dtype).name, norm,
                           float(std), sharding)
    out.append(make(jax.random.fold_in(jax.random.PRNGKey(seed), i)))
  return jax.tree.unflatten(treedef, out)


@functools.lru_cache(maxsize=None)
def _random_leaf_fn(shape, dtype, norm, std, sharding):
  def make(key):
    x = jax.random.normal(key, shape, jnp.float32)
    x = 1.0 + 0.1 * x if norm else std * x
    return x.astype(dtype)
  return jax.jit(make, out_shardings=sharding)


# ------------------------------------------------------------------ pieces
def rms_norm(x, weight, eps):
  dtype = x.dtype
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight * x32.astype(dtype)


def rope_tables(cfg: ModelConfig, positions):
  """cos/sin of shape positions.shape + (head_dim,), HF rotate-half layout."""
  inv = jnp.asarray(rope_inv_freq(cfg.rope, cfg.head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
  """x: [..., T, N, hd]; cos/sin: [..., T, hd]."""
  dtype = x.dtype
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  out = x32 * cos[..., None, :] + rotated * sin[..., None, :]
  return out.astype(dtype)


def _dot(x, w, subscripts):
  """A projection of unquantized weights: the products summed in float32
  (what XLA's GEMMs of bf16 operands do) and the sum rounded to x's dtype
  once, by the GEMM itself. Asked for a float32 result and rounded after,
  XLA's GPU GEMMs wrote the float32 result to memory and the next kernel
  read it back: twice the bytes of every projection's output, written and
  read (Llama-3-8B, a 2048-token prefill: 174 MB more of each per
  layer)."""
  return jnp.einsum(subscripts, x, w, preferred_element_type=x.dtype)


def _proj(x, lp, name: str, subscripts: str, act_dtype=None):
  """``x`` through a layer's projection ``name``. A quantized one (a
  ``<name>_scale`` beside it) is read in its storage dtype and layout
  (output-major: ``output_major``), widened to the activations' inside the
  program, and its output channels scaled: x @ (w_q * s) == (x @ w_q) * s
  for a scale per output channel. With ``act_dtype`` (FP8) the activations
  are quantized too, each token by its own scale (``quantize_tokens``),
  and the GEMM reads both operands in FP8, accumulating in float32; both
  scales are applied to its output. ``subscripts`` name the weight's axes
  as the unquantized model lays them out (input-major)."""
  w = lp[name]
  scale = lp.get(name + SCALE_SUFFIX)
  if scale is None:
    return _dot(x, w, subscripts)
  stored = _output_major_subscripts(subscripts)
  if act_dtype is not None:
    xq, xs = quantize_tokens(x, subscripts, act_dtype)
    y = jnp.einsum(stored, xq, w, preferred_element_type=jnp.float32)
    return (y * xs * scale).astype(x.dtype)
  y = jnp.einsum(stored, x, w.astype(x.dtype),
                 preferred_element_type=jnp.float32)
  return (y * scale).astype(x.dtype)


def _output_major_subscripts(subscripts: str) -> str:
  """``subscripts`` of a projection with its weight's contracted axes
  moved last, as a quantized weight is stored ("btd,dnh->btnh" ->
  "btd,nhd->btnh")."""
  inputs, out = subscripts.split("->")
  x_axes, w_axes = inputs.split(",")
  contracted = "".join(c for c in w_axes if c not in out)
  kept = "".join(c for c in w_axes if c in out)
  assert w_axes == contracted + kept, subscripts
  return f"{x_axes},{kept + contracted}->{out}"


def quantize_tokens(x, subscripts: str, dtype):
  """(x_q, s): ``x`` in FP8 ``dtype``, each token (the axes ``subscripts``
  keeps, which lead its output) scaled by its own max over the contracted
  axes to e4m3's range, and that scale laid out to broadcast against the
  projection's output. x ~= x_q * s, per token."""
  inputs, out = subscripts.split("->")
  xs = inputs.split(",")[0]
  contracted = tuple(i for i, c in enumerate(xs) if c not in out)
  kept = "".join(c for c in xs if c in out)
  assert out.startswith(kept), subscripts
  x32 = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x32), axis=contracted, keepdims=True)
  # Never 0 (nor flushed to 0): a token of zeros (a padding row) stays 0.
  s = jnp.maximum(amax / FP8_MAX, jnp.finfo(jnp.float32).tiny)
  xq = jnp.clip(x32 / s, -FP8_MAX, FP8_MAX).astype(dtype)
  s_out = jnp.squeeze(s, axis=contracted)
  s_out = s_out.reshape(s_out.shape + (1,) * (len(out) - len(kept)))
  return xq, s_out


def attention_impl(dtype, head_dim: int) -> str | None:
  """cuDNN on GPU where it applies, XLA elsewhere (CPU, fp32, odd head dims)."""
  if jax.default_backend() != "gpu":
    return "xla"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return "xla"
  if head_dim % 8 or head_dim > 256:
    return "xla"
  return "cudnn"


def _qkv(cfg: ModelConfig, lp, h, cos, sin):
  a = cfg.activation_dtype
  if "wqkv" in lp:
    qkv = _proj(h, lp, "wqkv", "btd,dnh->btnh", a)
    if cfg.qkv_bias:
      qkv = qkv + lp["bqkv"]
    H, K = cfg.num_heads, cfg.num_kv_heads
    q, k, v = qkv[:, :, :H], qkv[:, :, H:H + K], qkv[:, :, H + K:]
  else:
    q = _proj(h, lp, "wq", "btd,dnh->btnh", a)
    k = _proj(h, lp, "wk", "btd,dkh->btkh", a)
    v = _proj(h, lp, "wv", "btd,dkh->btkh", a)
    if cfg.qkv_bias:
      q = q + lp["bq"]
      k = k + lp["bk"]
      v = v + lp["bv"]
  return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _attn_out_and_mlp(cfg: ModelConfig, lp, x, attn):
  a = cfg.activation_dtype
  o = _proj(attn, lp, "wo", "btnh,nhd->btd", a)
  if cfg.o_bias:
    o = o + lp["bo"]
  x = x + o
  h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
  if "w_gate_up" in lp:
    gate_up = _proj(h, lp, "w_gate_up", "btd,df->btf", a)
    if cfg.mlp_bias:
      gate_up = gate_up + lp["b_gate_up"]
    gate, up = jnp.split(gate_up, 2, axis=-1)
  else:
    gate = _proj(h, lp, "w_gate", "btd,df->btf", a)
    up = _proj(h, lp, "w_up", "btd,df->btf", a)
    if cfg.mlp_bias:
      gate = gate + lp["b_gate"]
      up = up + lp["b_up"]
  down = _proj(jax.nn.silu(gate) * up, lp, "w_down", "btf,fd->btd", a)
  if cfg.mlp_bias:
    down = down + lp["b_down"]
  return x + down


def _logits(cfg: ModelConfig, params, x):
  """Float32 logits over the stored vocabulary; padded ids
  (``cfg.vocab_padding``) are -inf, so sampling never picks them and they
  take no probability mass."""
  x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
  w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
  if math.prod(x.shape[:-1]) == 1:
    # One row (a prefill of one prompt) would be a matrix-vector product,
    # which XLA's GPU compiler hands to a float32 GEMV: the whole head
    # widened to float32 first, on every call (Llama-3-8B on an H100: 1.05
    # ms for the copy and 0.68 for the GEMV, where the GEMM of two rows
    # takes 0.34). Two rows keep it a bf16 GEMM; the second is discarded.
    rows = x.reshape(1, x.shape[-1])
    logits = jnp.einsum("rd,dv->rv", jnp.concatenate([rows, rows]), w,
                        preferred_element_type=jnp.float32)[:1]
    logits = logits.reshape(x.shape[:-1] + logits.shape[-1:])
  else:
    logits = jnp.einsum("...d,dv->...v", x, w,
                        preferred_element_type=jnp.float32)
  if cfg.vocab_padding:
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    logits = jnp.where(ids < cfg.vocab_size, logits, -jnp.inf)
  return logits


def _embed(params, tokens):
  return jnp.take(params["embed"], tokens, axis=0)


# ------------------------------------------------------------------ prefill
class PrefillOut(NamedTuple):
  logits: jax.Array  # [B, V] at the last real token, or [B, T, V]
  k: jax.Array       # [L, B, T, K, hd] K of the new tokens (prefill_chunk:
  v: jax.Array       # the whole updated buffers, [L, B, S, K, hd])


@functools.partial(jax.jit, static_argnames=("cfg", "all_logits"))
def prefill_forward(params: Params, tokens, true_len, *, cfg: ModelConfig,
                    all_logits: bool = False) -> PrefillOut:
  """Runs whole prompts through the model.

  tokens: [B, T] right-padded; true_len: [B] real tokens per row. Padding
  never leaks into real tokens: it sits after them (causal mask).
  """
  B, T = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  cos, sin = rope_tables(cfg, positions)
  x = _embed(params, tokens)
  impl = attention_impl(x.dtype, cfg.head_dim)

  def layer(x, lp):
    return _causal_layer(cfg, lp, x, cos, sin, impl)

  x, (k_all, v_all) = scan_layers(layer, x, params["layers"])
  return PrefillOut(_prefill_logits(params, x, true_len, cfg, all_logits),
                    k_all, v_all)


@functools.partial(jax.jit, static_argnames=("cfg", "all_logits", "span"))
def prefill_chunk(params: Params, tokens, true_len, k_buf, v_buf, start, *,
                  cfg: ModelConfig, all_logits: bool = False,
                  span: int | None = None) -> PrefillOut:
  """The next part of prompts whose earlier tokens' K/V are in buffers.

  tokens: [B, T] right-padded, true_len: [B] real tokens of the part;
  k_buf/v_buf: [L, B, S, K, hd], each row's first ``start[b]`` positions
  holding its earlier tokens' K/V, or tuples of B arrays [L, 1, S, K, hd],
  one per row (prompts each with a buffer of its own, run together: the
  projections take every row at once, the attention reads each row's
  buffer, and no buffer is copied into a batch). The part's K/V are written at
  ``[start, start + T)`` (the caller leaves that much room: a write that
  does not fit would be moved back over the prefix) and each query attends
  to the keys up to its own position: the causal diagonal shifted by
  ``start``. Keys from ``start + T`` on are padding, which cuDNN skips
  (``key_value_seq_lengths``), so a part costs what its prefix holds, not
  what the buffer could. ``span`` (static; None: the whole buffer): the
  attention reads only the buffers' first ``span`` positions, which must
  hold every row's ``start + T`` (the caller's to ensure). Returns the
  logits and the updated buffers as ``PrefillOut.k`` / ``.v``.
  """
  B, T = tokens.shape
  per_row = isinstance(k_buf, tuple)
  S = (k_buf[0] if per_row else k_buf).shape[2]
  if span is not None:
    if not T <= span <= S:
      raise ValueError(f"span {span} outside [{T}, {S}]")
    S = span
  positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
  cos, sin = rope_tables(cfg, positions)
  x = _embed(params, tokens)
  impl = attention_impl(x.dtype, cfg.head_dim)
  kpos = jnp.arange(S, dtype=jnp.int32)[None, None, :]
  qpos = positions[:, :, None]
  mask = kpos <= qpos
  if cfg.sliding_window is not None:
    mask = mask & (kpos > qpos - cfg.sliding_window)
  mask = mask[:, None]                         # [B, 1, T, S]
  kv_len = jnp.minimum(start + T, S).astype(jnp.int32)
  write = jax.vmap(lambda buf, new, at: jax.lax.dynamic_update_slice(
      buf, new.astype(buf.dtype), (at, 0, 0)))

  def attend(q, k, v, kb, vb, rows):
    """The part's K/V written into buffers ``kb, vb`` ([n, S, K, hd]) of
    ``rows``, then its queries' attention over them."""
    kb, vb = write(kb, k, start[rows]), write(vb, v, start[rows])
    # cuDNN takes the mask as an additive bias: still its fused kernel,
    # about ten times XLA's masked attention on an H100.
    attn = jax.nn.dot_product_attention(
        q, kb[:, :S].astype(q.dtype), vb[:, :S].astype(q.dtype),
        mask=mask[rows], key_value_seq_lengths=kv_len[rows],
        implementation=impl)
    return attn, kb, vb

  def layer(x, xs):
    lp, (kb, vb) = xs                          # kb, vb: [B, S, K, hd]
    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    q, k, v = _qkv(cfg, lp, h, cos, sin)
    if not per_row:
      attn, kb, vb = attend(q, k, v, kb, vb, slice(None))
      return _attn_out_and_mlp(cfg, lp, x, attn), (kb, vb)
    parts = [attend(q[b:b + 1], k[b:b + 1], v[b:b + 1], kb[b], vb[b],
                    slice(b, b + 1)) for b in range(B)]
    attn = jnp.concatenate([a for a, _, _ in parts], axis=0)
    return (_attn_out_and_mlp(cfg, lp, x, attn),
            (tuple(p[1] for p in parts), tuple(p[2] for p in parts)))

  x, (k_buf, v_buf) = scan_layers(layer, x, params["layers"],
                                  (k_buf, v_buf))
  return PrefillOut(_prefill_logits(params, x, true_len, cfg, all_logits),
                    k_buf, v_buf)


def _prefill_logits(params, x, true_len, cfg, all_logits):
  """Every position's logits, or each row's last real token's."""
  if all_logits:
    return _logits(cfg, params, x)
  return prefill_last_logits(params, x, true_len, cfg=cfg)


def _causal_layer(cfg: ModelConfig, lp, x, cos, sin, impl):
  """One layer over whole prompts (no cached prefix): causal attention
  among the new tokens. Returns the residual stream and the layer's K/V."""
  h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
  q, k, v = _qkv(cfg, lp, h, cos, sin)
  window = cfg.sliding_window
  attn = jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation=impl,
      local_window_size=None if window is None else (window - 1, 0))
  return _attn_out_and_mlp(cfg, lp, x, attn), (k, v)


# ------------------------------------------------------ prefill in groups
# The same computation as ``prefill_forward``, cut into programs the caller
# runs one after another: embed, a run of layers (as many times as there are
# layer groups), last-token logits. Each layer group's K/V is then an output
# of its own program, ready while later groups still compute, so a hand-off
# can move it under the rest of the prefill (``PrefillEngine``'s
# ``layer_groups``).
def prefill_embed(params: Params, tokens) -> jax.Array:
  """tokens [B, T] -> the residual stream [B, T, D] entering layer 0."""
  return _embed(params, tokens)


def prefill_layer_group(params: Params, x, first_layer, *, cfg: ModelConfig,
                        num_layers: int):
  """Layers ``first_layer .. first_layer + num_layers`` over whole prompts
  (positions from 0; right padding is harmless, as in ``prefill_forward``).

  ``first_layer`` is a traced int32 where the weights are stacked, so one
  compiled program serves every group of the same size: each layer's
  weights are indexed out of the stacked ones inside the loop, as
  ``lax.scan`` over the stack does. Weights stored per layer
  (``per_layer``) need it a Python int: the group's own arrays are picked
  when the program is traced. Returns (x, k, v), k/v: [num_layers, B, T,
  K, hd].
  """
  B, T = x.shape[:2]
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  cos, sin = rope_tables(cfg, positions)
  impl = attention_impl(x.dtype, cfg.head_dim)
  layers = params["layers"]

  def layer(x, lp):
    return _causal_layer(cfg, lp, x, cos, sin, impl)

  if per_layer(layers):
    if not isinstance(first_layer, int):
      raise TypeError("weights stored per layer need the group's "
                      "first_layer as a Python int")
    group = {k: v[first_layer:first_layer + num_layers]
             for k, v in layers.items()}
    x, (k, v) = scan_layers(layer, x, group)
    return x, k, v

  def indexed_layer(x, li):
    lp = jax.tree.map(
        lambda w: jax.lax.dynamic_index_in_dim(w, li, 0, keepdims=False),
        layers)
    return layer(x, lp)

  ids = jnp.asarray(first_layer, jnp.int32) + jnp.arange(num_layers,
                                                         dtype=jnp.int32)
  x, (k, v) = jax.lax.scan(indexed_layer, x, ids)
  return x, k, v


def prefill_last_logits(params: Params, x, true_len, *, cfg: ModelConfig):
  """Logits [B, V] at each row's last real token (``true_len - 1``)."""
  T = x.shape[1]
  last = jnp.clip(true_len - 1, 0, T - 1)
  x_last = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
  return _logits(cfg, params, x_last)


# ------------------------------------------------------------------ decode
class DecodeOut(NamedTuple):
  logits: jax.Array   # [B, V] float32
  k_pool: jax.Array   # [L * N, P, K, hd]
  v_pool: jax.Array


def cudnn_paged_attention_applies(cfg: ModelConfig, num_blocks: int,
                                  batch: int, table_width: int) -> bool:
  """Whether ``decode_forward(paged_attention="cudnn")`` can run here: a GPU
  with cuDNN attention for this dtype and head size, no sliding window, and
  a pool whose block count cuDNN accepts (a multiple of the batch, at least
  the page-table width per row)."""
  if attention_impl(cfg.jnp_dtype, cfg.head_dim) != "cudnn":
    return False
  if cfg.sliding_window is not None or num_blocks % batch:
    return False
  if num_blocks // batch < table_width:
    return False
  try:
    from jax._src.cudnn import fused_attention_stablehlo as fa
  except ImportError:
    return False
  return hasattr(fa, "paged_attention")


def _cudnn_paged_attention(q, k_pool, v_pool, table, kv_len):
  """q [B, 1, H, hd] attends to each row's pages of the whole pool
  ``[blocks, P, K, hd]``, read in place by cuDNN through a page table,
  instead of gathering them into a dense [B, M * P, K, hd] copy first.

  cuDNN wants as many blocks as batch x table width, so the table is padded
  to ``blocks // B`` columns; the padding is never read (``kv_len`` bounds
  each row)."""
  from jax._src.cudnn import fused_attention_stablehlo as fa
  B, M = table.shape
  width = k_pool.shape[0] // B
  pt = jnp.pad(table, ((0, 0), (0, width - M)))[:, None, :, None]
  return fa.paged_attention(
      q, k_pool, v_pool, jnp.ones((B,), jnp.int32), kv_len, pt, pt,
      scale=1.0 / float(q.shape[-1]) ** 0.5,
      mask_type=fa.MaskType.PADDING, qkv_layout="BTNH")


# How decode steps write K/V into the pools. Every live row's token goes to
# its own (page, offset); only writes nobody reads share a place: rows that
# are not live, and tokens past what a row keeps, all go to the null page,
# where it does not matter which duplicate wins. Declaring the indices
# unique lets XLA store without atomics; a scatter that may see duplicates
# can update 16-bit values by compare-and-swap on their 32-bit words, where
# many rows writing different values to one slot retry against each other.
# (That is the suspected mechanism of a 3.1x slower 128-row step on an H100
# when free rows were fed their stale tokens; the measured fix is feeding
# them token 0, ``decode_programs.idle_rows_fresh``. This declaration is
# not measured on its own.)
_KV_WRITE = {"unique_indices": True}

# float8 e4m3's largest finite value: FP8 weights are scaled to it
# (``pdjax.model.quant``) and an FP8 pool saturates there (a plain cast
# would make NaN of anything beyond it).
FP8_MAX = 448.0


def kv_to_pool(x, dtype):
  """K or V values as a pool of ``dtype`` stores them: a plain cast, or for
  an FP8 pool one that saturates at +-448."""
  if jnp.dtype(dtype) == jnp.dtype(jnp.float8_e4m3fn):
    x = jnp.clip(x.astype(jnp.float32), -FP8_MAX, FP8_MAX)
  return x.astype(dtype)


def decode_layer(cfg: ModelConfig, positions, page_table, *, num_pages: int,
                 page_size: int, dtype, paged_attention: str | None = None,
                 xla_attention: bool = False):
  """The body of ``decode_forward``'s layer loop for one batch of rows:
  ``layer((x, k_pool, v_pool), (layer_weights, layer_index))`` runs one
  layer on the residual stream x [B, 1, D], writing the rows' new K/V into
  the pools at ``layer_index * num_pages + page`` and reading their pages.
  The pipelined decode (``pdjax.model.pipeline``) runs the same body over
  a stage's own layers and pages, so both compute the same thing.
  ``paged_attention``: the kernel that reads the rows' pages in place,
  "cudnn" (``_cudnn_paged_attention``) or "pallas"
  (``pallas_attention.paged_decode_attention``, interpreted off GPUs);
  None gathers them first."""
  B = positions.shape[0]
  N, P = num_pages, page_size
  M = page_table.shape[1]
  K, hd = cfg.num_kv_heads, cfg.head_dim
  cos, sin = rope_tables(cfg, positions[:, None])
  # ``xla_attention``: XLA's own attention, not cuDNN's, whose decode
  # kernels do not give the same bits run to run on an H100 (the same
  # step's inputs, 20 calls: 12-14 equal to the first with cuDNN, 20 with
  # XLA's; tools/gpu/probe_batch_invariance.py).
  impl = "xla" if xla_attention else attention_impl(dtype, cfg.head_dim)
  if paged_attention not in (None, "cudnn", "pallas"):
    raise ValueError(f"paged_attention must be None, 'cudnn' or 'pallas', "
                     f"got {paged_attention!r}")
  if xla_attention and paged_attention:
    raise ValueError("paged attention reads the pages with its own kernel: "
                     "not with xla_attention")
  if paged_attention and cfg.sliding_window is not None:
    raise ValueError("paged attention has no sliding window: gather")
  write_page = jnp.take_along_axis(page_table, (positions // P)[:, None],
                                   axis=1)[:, 0]
  write_off = positions % P
  kv_len = positions + 1
  window = cfg.sliding_window
  mask = None
  if window is not None:
    kpos = jnp.arange(M * P)[None, :]
    mask = ((kpos < kv_len[:, None]) & (kpos > positions[:, None] - window))
    mask = mask[:, None, None, :]  # [B, 1, 1, S]

  def layer(carry, xs):
    x, kp, vp = carry
    lp, li = xs
    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    q, k, v = _qkv(cfg, lp, h, cos, sin)
    rows = li * N + write_page
    # unique_indices: see _KV_WRITE.
    kp = kp.at[rows, write_off].set(kv_to_pool(k[:, 0], kp.dtype),
                                    **_KV_WRITE)
    vp = vp.at[rows, write_off].set(kv_to_pool(v[:, 0], vp.dtype),
                                    **_KV_WRITE)
    table = li * N + page_table
    if paged_attention == "cudnn":
      attn = _cudnn_paged_attention(q, kp, vp, table, kv_len)
    elif paged_attention == "pallas":
      from pdjax.model.pallas_attention import paged_decode_attention
      attn = paged_decode_attention(
          q, kp, vp, table, kv_len,
          interpret=jax.default_backend() not in ("gpu", "cuda"))
    else:
      kk = kp[table].reshape(B, M * P, K, hd).astype(q.dtype)
      vv = vp[table].reshape(B, M * P, K, hd).astype(q.dtype)
      if mask is not None:
        attn = jax.nn.dot_product_attention(q, kk, vv, mask=mask,
                                            implementation="xla")
      else:
        attn = jax.nn.dot_product_attention(
            q, kk, vv, query_seq_lengths=jnp.ones((B,), jnp.int32),
            key_value_seq_lengths=kv_len, implementation=impl)
    return (_attn_out_and_mlp(cfg, lp, x, attn), kp, vp), None

  return layer


def decode_forward(params: Params, tokens, positions, k_pool, v_pool,
                   page_table, *, cfg: ModelConfig,
                   paged_attention: str | None = None,
                   xla_attention: bool = False) -> DecodeOut:
  """One token for each of B sequences; not jitted here (the engine jits it
  with the pools donated).

  The pools hold every layer's pages on one axis: layer ``l``'s page ``p``
  is row ``l * N + p`` of ``[L * N, P, K, hd]``. Writes and reads are then a
  scatter and a gather on the whole pool by computed row ids, never a slice
  of one layer (a slice of a loop-carried buffer is a copy: of the entire
  pool, every step).

  tokens, positions: [B]; page_table: [B, M] page ids of each row's first M
  pages (page 0 is the null page idle rows point at). The token at
  ``positions[b]`` is written to ``page_table[b, pos // P]`` at offset
  ``pos % P``; attention reads the row's M pages, masked by its length, so
  stale data in a recycled page is never visible. ``paged_attention``: read
  them in place instead of gathering them first, with cuDNN's paged
  attention ("cudnn": GPUs, ``cudnn_paged_attention_applies``) or
  pdjax's Pallas kernel ("pallas": ``pallas_attention.supports``).
  ``xla_attention``: attend over the gathered pages with XLA's attention,
  never cuDNN's (deterministic: ``decode_layer``).
  """
  L = cfg.num_layers
  x = _embed(params, tokens[:, None])
  layer = decode_layer(cfg, positions, page_table,
                       num_pages=k_pool.shape[0] // L,
                       page_size=k_pool.shape[1], dtype=x.dtype,
                       paged_attention=paged_attention,
                       xla_attention=xla_attention)
  layer_ids = jnp.arange(L, dtype=jnp.int32)
  (x, k_pool, v_pool), _ = scan_layers(
      layer, (x, k_pool, v_pool), params["layers"], layer_ids)
  logits = _logits(cfg, params, x[:, 0])
  return DecodeOut(logits, k_pool, v_pool)


def decode_forward_tokens(params: Params, tokens, start, k_pool, v_pool,
                          page_table, *, cfg: ModelConfig,
                          num_kept=None) -> DecodeOut:
  """``T`` consecutive tokens for each of B sequences in one pass (the
  verify step of speculative decoding): token ``t`` of a row sits at
  position ``start[b] + t``, its K/V is written to the row's page for that
  position, and it attends to every key up to its own position (the row's
  cached tokens and the part's earlier ones). tokens: [B, T]; start: [B];
  page_table: [B, M] (page 0 for idle rows, as in ``decode_forward``).
  Returns logits [B, T, V] and the updated pools. Reads the pages by
  gathering them (any backend); equals T calls of ``decode_forward``.
  ``num_kept`` [B]: only tokens ``0 .. num_kept[b]`` of a row write their
  K/V to its pages (the rest, whose positions may lie past the pages the
  row holds, write to the null page); None: all of them."""
  L = cfg.num_layers
  x = _embed(params, tokens)
  if num_kept is None:
    num_kept = jnp.full(start.shape, tokens.shape[1], jnp.int32)
  layer = decode_tokens_layer(cfg, start, page_table, num_kept,
                              num_tokens=tokens.shape[1],
                              num_pages=k_pool.shape[0] // L,
                              page_size=k_pool.shape[1])
  layer_ids = jnp.arange(L, dtype=jnp.int32)
  (x, k_pool, v_pool), _ = scan_layers(
      layer, (x, k_pool, v_pool), params["layers"], layer_ids)
  return DecodeOut(_logits(cfg, params, x), k_pool, v_pool)


def decode_tokens_as_steps(params: Params, tokens, start, k_pool, v_pool,
                           page_table, *, cfg: ModelConfig, num_kept=None,
                           rows: int, forward=decode_forward,
                           paged_attention: str | None = None) -> DecodeOut:
  """``decode_forward_tokens`` (same arguments and result) computed by one
  decode step of ``rows`` rows: each kept token (``t <= num_kept[b]``) is a
  row of that step (a "pseudo-row", ``pseudo_rows_of``), a single query at
  its own position attending to the keys up to it through the sequence's
  page table, so a token's arithmetic is that of the decode step that
  would run it in a program of ``rows`` rows (batch-invariant decoding:
  ``DecodeConfig.batch_invariant`` verifies drafts this way, bit for bit
  as plain decoding would compute them). ``forward``: ``decode_forward``
  or a function with its signature (the pipelined decode).

  Within a layer every pseudo-row writes its K/V before any attends, so a
  token sees its row's earlier tokens of the same pass; keys past its own
  position are masked by its length. The step's rows that no kept token
  takes run as idle rows do: token 0 at position 0 of the null page,
  whose K/V nobody reads. A row with ``num_kept`` -1 runs no token. Kept
  tokens past the step's ``rows`` are not run (the caller keeps
  ``sum(num_kept + 1)`` within ``rows``); the logits of tokens not run are
  not theirs."""
  B, T = tokens.shape
  if num_kept is None:
    num_kept = jnp.full((B,), T - 1, jnp.int32)
  index = pseudo_rows_of(num_kept, T, rows)
  positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]

  def pseudo_rows(x):   # [B, T, ...] -> [rows, ...], idle rows zeros
    flat = x.reshape((B * T,) + x.shape[2:])
    return jnp.zeros((rows,) + flat.shape[1:], flat.dtype).at[index].set(
        flat, mode="drop")

  table = jnp.broadcast_to(page_table[:, None, :], (B, T) +
                           page_table.shape[1:])
  out = forward(params, pseudo_rows(tokens), pseudo_rows(positions), k_pool,
                v_pool, pseudo_rows(table), cfg=cfg,
                paged_attention=paged_attention)
  logits = out.logits[jnp.minimum(index, rows - 1)]
  return DecodeOut(logits.reshape((B, T) + logits.shape[1:]), out.k_pool,
                   out.v_pool)


def pseudo_rows_of(num_kept, num_tokens: int, rows: int):
  """Which row of a ``rows``-row decode step runs each of B x
  ``num_tokens`` tokens in ``decode_tokens_as_steps``: [B * num_tokens],
  the kept tokens (``t <= num_kept[b]``) packed in order from row 0,
  ``rows`` (out of range: dropped by scatters) for the others and for kept
  ones past the step's rows."""
  kept = (jnp.arange(num_tokens, dtype=jnp.int32)[None, :]
          <= num_kept[:, None]).reshape(-1)
  index = jnp.cumsum(kept, dtype=jnp.int32) - 1
  return jnp.where(kept & (index < rows), index, rows)


def decode_tokens_layer(cfg: ModelConfig, start, page_table, num_kept, *,
                        num_tokens: int, num_pages: int, page_size: int):
  """The body of ``decode_forward_tokens``' layer loop for one batch of
  rows: ``layer((x, k_pool, v_pool), (layer_weights, layer_index))`` runs
  one layer on x [B, T, D] (T = ``num_tokens`` consecutive tokens per row,
  from position ``start[b]``), writing the K/V of tokens ``0 ..
  num_kept[b]`` to the row's pages (the others to the null page) and
  attending causally over the row's pages. The pipelined verify
  (``pdjax.model.pipeline``) runs the same body over a stage's own layers
  and pages."""
  B, T = start.shape[0], num_tokens
  N, P = num_pages, page_size
  M = page_table.shape[1]
  K, hd = cfg.num_kv_heads, cfg.head_dim
  positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
  cos, sin = rope_tables(cfg, positions)
  write_page = jnp.take_along_axis(
      page_table, jnp.minimum(positions // P, M - 1), axis=1)
  kept = jnp.arange(T, dtype=jnp.int32)[None, :] <= num_kept[:, None]
  write_page = jnp.where(kept, write_page, 0)
  write_off = positions % P                          # [B, T]
  kpos = jnp.arange(M * P, dtype=jnp.int32)[None, None, :]
  qpos = positions[:, :, None]
  mask = kpos <= qpos
  if cfg.sliding_window is not None:
    mask = mask & (kpos > qpos - cfg.sliding_window)
  mask = mask[:, None]                               # [B, 1, T, M * P]

  def layer(carry, xs):
    x, kp, vp = carry
    lp, li = xs
    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    q, k, v = _qkv(cfg, lp, h, cos, sin)
    rows = li * N + write_page
    kp = kp.at[rows, write_off].set(kv_to_pool(k, kp.dtype), **_KV_WRITE)
    vp = vp.at[rows, write_off].set(kv_to_pool(v, vp.dtype), **_KV_WRITE)
    table = li * N + page_table
    kk = kp[table].reshape(B, M * P, K, hd).astype(q.dtype)
    vv = vp[table].reshape(B, M * P, K, hd).astype(q.dtype)
    attn = jax.nn.dot_product_attention(q, kk, vv, mask=mask,
                                        implementation="xla")
    return (_attn_out_and_mlp(cfg, lp, x, attn), kp, vp), None

  return layer


def reference_forward(params: Params, tokens, *, cfg: ModelConfig):
  """Full-sequence logits [B, T, V] in one pass, for tests (the padded
  vocabulary cut off)."""
  B, T = tokens.shape
  out = prefill_forward(params, tokens, jnp.full((B,), T, jnp.int32),
                        cfg=cfg, all_logits=True)
  return out.logits[..., :cfg.vocab_size]


def num_pages_for(tokens: int, page_size: int) -> int:
  return -(-tokens // page_size)


__all__ = [
    "Params", "param_shapes", "param_logical_axes", "abstract_params",
    "param_dtypes", "QUANTIZED", "FUSED", "SCALE_SUFFIX", "output_major",
    "quantized_projections",
    "per_layer", "scan_layers",
    "init_params", "prefill_forward", "prefill_chunk", "prefill_embed",
    "prefill_layer_group",
    "prefill_last_logits", "decode_forward", "decode_forward_tokens",
    "decode_tokens_as_steps", "pseudo_rows_of",
    "reference_forward",
    "PrefillOut", "DecodeOut", "decode_layer", "decode_tokens_layer",
    "kv_to_pool", "FP8_MAX",
    "rms_norm", "apply_rope", "rope_tables",
    "num_pages_for",
]
