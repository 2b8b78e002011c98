"""One decode step's attention over a paged KV pool, read in place on GPU.

Each row of the batch has one new query token per head and attends to the
first ``kv_len`` tokens of its context, which live in pages of the pool
``[num_blocks, page_size, kv_heads, head_dim]`` named by the row's entries of
a block table. The plain way to compute this gathers the row's pages into a
dense copy first and runs ordinary attention on that copy. For a pool stored
in float8 e4m3 the copy is also where the values become bf16, so every
decode step writes (and then reads back) a bf16 image of all the context it
attends to: twice the bytes of the pool itself, plus the pool.

The Pallas (Triton) kernel here reads the pages where they are. One program
handles one row, one KV head and one slice of the row's pages (flash
decoding): it loads a few pages at a time through the block table, turns
float8 values into the query's dtype in registers, and keeps a running
softmax (max, sum and weighted values) over the slice. Every query head that
shares the KV head is computed by the same program, so each page is read
once per KV head. Slices of one row are then merged by a small jnp step from
each slice's output and log-sum-exp. Programs stop at the row's length, so
short rows cost little; pages past the length are never looked at, and the
stale tokens at the end of a row's last page are masked out (keys and
values both, so even NaN there cannot leak into the result).

Float8 pools hold plain e4m3 values (no scales). With bf16 queries over a
bf16 pool, the two matrix products take bf16 operands and accumulate in
float32; the softmax weights are rounded to bf16 for the second product.
Over a float8 pool the products run in float16 instead (``products_dtype``):
e4m3 values widen to float16 exactly and in one conversion on Hopper where
bf16 takes three, and the softmax weights round to float16, three bits
finer than bf16. A bf16 query is float16 exactly between 2**-14 and
65504; one with a component of 2**15 or more is first scaled, per query
head, by a power of two that brings it under (``up`` back on its logits),
so no query overflows float16. ``paged_decode_attention_error_bound``
states what each way costs against the float32 reference.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# H100 SXM. Used only to choose how many slices to cut each row into so that
# rows x KV heads x slices fills the GPU once.
NUM_SMS = 132
# Tokens a program loads per step (keys and values of one KV head): 128 x
# 128 dims of bf16 is 32 KiB each, which two pipeline stages keep in shared
# memory with room to spare.
BLOCK_TOKENS = 128
# Triton's matrix products need every dimension to be at least 16.
MIN_DOT = 16


def _next_pow2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def default_pages_per_block(page_size: int, table_width: int,
                            head_dim: int, itemsize: int = 2) -> int:
  """Pages loaded per step: about ``BLOCK_TOKENS`` tokens (fewer where a
  token's head is more than 128 bf16 values' worth: wider heads, float32
  pools), a power of two, at least 16 tokens, and no more pages than the
  table has (rounded up to a power of two)."""
  shrink = max(1, head_dim * max(2, itemsize) // 256)
  ppb = max(1, BLOCK_TOKENS // shrink // page_size)
  ppb = min(ppb, _next_pow2(table_width))
  return max(ppb, -(-MIN_DOT // page_size))


def default_num_splits(batch: int, kv_heads: int, num_blocks: int) -> int:
  """Slices per row: enough that rows x KV heads x slices reaches
  ``NUM_SMS`` programs, at most one slice per block of pages."""
  return max(1, min(num_blocks, -(-NUM_SMS // (batch * kv_heads))))


def blocking(batch: int, table_width: int, k_pool,
             pages_per_block: int | None = None,
             num_splits: int | None = None) -> tuple[int, int, int]:
  """(pages per step, slices per row, pages per slice) of a call: the
  defaults where not given, slices cut to whole steps, none of them left
  empty by construction."""
  _, P, K, hd = k_pool.shape
  ppb = pages_per_block or default_pages_per_block(
      P, table_width, hd, jnp.dtype(k_pool.dtype).itemsize)
  if ppb & (ppb - 1) or ppb * P < MIN_DOT:
    raise ValueError(f"pages_per_block {ppb} must be a power of two of at "
                     f"least {MIN_DOT} tokens")
  blocks = -(-table_width // ppb)
  splits = min(num_splits or default_num_splits(batch, K, blocks), blocks)
  per_split = -(-blocks // splits)
  return ppb, -(-blocks // per_split), per_split * ppb


# Queries go into float16 (largest value 65504) below 2**15: a query head
# whose largest magnitude reaches that is scaled down first.
_F16_QUERY_EXP = 15
_F32_BIAS = 127


def _pow2(e):
  """2**e as float32, exactly (int32 ``e`` in [-126, 127])."""
  return jax.lax.bitcast_convert_type((e + _F32_BIAS) << 23, jnp.float32)


def _query_in_float16(q):
  """(q / 2**k as float16, 2**k as float32 [G, 1]) with k per query head
  the least that keeps the head's largest |q| under 2**15 (0 for every
  query of ordinary size): a power of two, so the scaling is exact."""
  qf = q.astype(jnp.float32)
  top = jnp.abs(qf).max(axis=1, keepdims=True)                  # [G, 1]
  # floor(log2(top)) from the float32 exponent bits (top >= 0).
  e = (jax.lax.bitcast_convert_type(top, jnp.int32) >> 23) - _F32_BIAS
  k = jnp.maximum(e - (_F16_QUERY_EXP - 1), 0)
  return (qf * _pow2(-k)).astype(jnp.float16), _pow2(k)


def _kernel(q_ref, k_ref, v_ref, table_ref, len_ref, o_ref, *lse_ref,
            pages_per_block: int, pages_per_split: int, scale: float,
            compute_dtype, precision):
  """One (row, KV head, slice) program.

  q_ref [G, hd]: the query heads of this KV head (G padded to >= 16);
  k_ref, v_ref [num_blocks, P, hd]: the whole pool, this KV head only;
  table_ref [pages]: the row's block table; len_ref []: the row's length.
  Writes o_ref [G, hd] (the slice's softmax-weighted values) and, when the
  row is cut into slices, lse_ref [G] (the slice's log-sum-exp)."""
  G, hd = q_ref.shape
  P = k_ref.shape[1]
  T = pages_per_block * P
  length = len_ref[...]
  first = pl.program_id(2) * pages_per_split
  pages = jnp.clip(pl.cdiv(length, P) - first, 0, pages_per_split)
  q = q_ref[...]
  if (jnp.dtype(compute_dtype) == jnp.dtype(jnp.float16)
      and q.dtype != jnp.float16):
    q, up = _query_in_float16(q)
    scale = scale * up                                          # [G, 1]
  else:
    q = q.astype(compute_dtype)

  def body(i, carry):
    acc, m, l = carry
    start = first + i * pages_per_block
    blocks = table_ref[pl.ds(start, pages_per_block)]
    k = k_ref[blocks].reshape(T, hd).astype(compute_dtype)
    v = v_ref[blocks].reshape(T, hd).astype(compute_dtype)
    valid = start * P + jnp.arange(T) < length                  # [T]
    s = plgpu.dot(q, k, trans_b=True, precision=precision) * scale  # [G, T]
    s = jnp.where(valid[None, :], s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    v = jnp.where(valid[:, None], v, jnp.zeros_like(v))
    pv = plgpu.dot(p.astype(compute_dtype), v, precision=precision)
    return alpha[:, None] * acc + pv, m_new, alpha * l + p.sum(axis=1)

  acc = jnp.zeros((G, hd), jnp.float32)
  m = jnp.full((G,), -jnp.inf, jnp.float32)
  l = jnp.zeros((G,), jnp.float32)
  acc, m, l = jax.lax.fori_loop(0, pl.cdiv(pages, pages_per_block), body,
                                (acc, m, l))
  # An empty slice (past the row's length) has l = 0 and m = -inf: it
  # writes zeros and a log-sum-exp of -inf, which the merge weighs by 0.
  l_safe = jnp.where(l > 0, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  if lse_ref:
    lse_ref[0][...] = m + jnp.log(l_safe)


@functools.partial(jax.jit, static_argnames=(
    "pages_per_block", "num_splits", "num_warps", "num_stages",
    "widen_to", "interpret"))
def paged_decode_attention(q, k_pool, v_pool, table, kv_len, *,
                           pages_per_block: int | None = None,
                           num_splits: int | None = None,
                           num_warps: int = 4, num_stages: int = 2,
                           widen_to: str | None = None,
                           interpret: bool = False):
  """Attention of one query token per row over the row's pages, in place.

  q [B, 1, H, hd] (bf16 or float32); k_pool, v_pool [num_blocks, P, K, hd]
  (bf16, float32 or float8_e4m3fn), H a multiple of K; table [B, M] int32
  block ids of each row's pages; kv_len [B] int32, 1 <= kv_len <= M * P
  (more counts as M * P; a row of length 0 gets zeros). Returns
  [B, 1, H, hd] in q's dtype: softmax(q k / sqrt(hd)) v over each row's
  first kv_len tokens, as ``paged_decode_attention_reference``.

  hd and P must be powers of two (hd >= 16). ``pages_per_block`` (a power of
  two: pages loaded per step) and ``num_splits`` (slices per row) default
  to ``default_pages_per_block`` and ``default_num_splits`` (``blocking``
  resolves them); num_warps and num_stages are Triton's. ``widen_to``:
  the dtype the pool's values, the query and the softmax weights take for
  the two products; None: ``products_dtype``'s choice (float16 over a
  float8 pool for bf16 queries, else the query's dtype); "bfloat16" keeps
  a float8 pool's products in bf16 (what the kernel did before float16,
  for comparisons). ``interpret`` runs the kernel on any backend (tests on
  CPU).
  """
  B, one, H, hd = q.shape
  N, P, K, hd_k = k_pool.shape
  M = table.shape[1]
  if one != 1 or hd_k != hd or v_pool.shape != k_pool.shape or H % K:
    raise ValueError(f"shapes q {q.shape}, k_pool {k_pool.shape}, "
                     f"v_pool {v_pool.shape} do not fit")
  if not _shape_supported(P, hd):
    raise ValueError(f"head_dim {hd} and page size {P} must be powers of "
                     f"two, head_dim at least {MIN_DOT}")
  _check_offsets(k_pool)
  ppb, splits, pps = blocking(B, M, k_pool, pages_per_block, num_splits)
  # Padding entries name block 0: they are at or past every row's length,
  # so they are either not read or masked.
  table = jnp.pad(table.astype(jnp.int32), ((0, 0), (0, splits * pps - M)))
  kv_len = jnp.minimum(kv_len.astype(jnp.int32), M * P)

  G = H // K
  Gp = max(MIN_DOT, _next_pow2(G))
  qg = q.reshape(B, K, G, hd)
  if Gp != G:
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, Gp - G), (0, 0)))
  f32 = jnp.dtype(q.dtype) == jnp.dtype(jnp.float32)
  compute = products_dtype(q.dtype, k_pool.dtype, widen_to)
  kernel = functools.partial(
      _kernel, pages_per_block=ppb, pages_per_split=pps,
      scale=1.0 / math.sqrt(hd),
      compute_dtype=compute,
      # Triton's default for float32 products is TF32; the reference's
      # float32 needs full precision.
      precision=jax.lax.Precision.HIGHEST if f32 else None)

  pool_spec = pl.BlockSpec((N, P, None, hd), lambda b, h, s: (0, 0, h, 0))
  in_specs = [
      pl.BlockSpec((None, None, Gp, hd), lambda b, h, s: (b, h, 0, 0)),
      pool_spec, pool_spec,
      pl.BlockSpec((None, splits * pps), lambda b, h, s: (b, 0)),
      pl.BlockSpec((None,), lambda b, h, s: (b,)),
  ]
  if splits == 1:
    out_shape = [jax.ShapeDtypeStruct((B, K, Gp, hd), q.dtype)]
    out_specs = [pl.BlockSpec((None, None, Gp, hd),
                              lambda b, h, s: (b, h, 0, 0))]
  else:
    out_shape = [jax.ShapeDtypeStruct((splits, B, K, Gp, hd), jnp.float32),
                 jax.ShapeDtypeStruct((splits, B, K, Gp), jnp.float32)]
    out_specs = [
        pl.BlockSpec((None, None, None, Gp, hd),
                     lambda b, h, s: (s, b, h, 0, 0)),
        pl.BlockSpec((None, None, None, Gp), lambda b, h, s: (s, b, h, 0))]
  outs = pl.pallas_call(
      kernel, grid=(B, K, splits), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=num_stages),
      name="paged_decode_attention",
  )(qg, k_pool, v_pool, table, kv_len)

  if splits == 1:
    o = outs[0]
  else:
    o, lse = outs
    top = lse.max(axis=0)
    w = jnp.exp(lse - jnp.where(jnp.isfinite(top), top, 0.0))  # [S,B,K,Gp]
    total = w.sum(axis=0)          # 0 only for a row of length 0
    o = (w[..., None] * o).sum(axis=0) / jnp.where(total > 0, total,
                                                   1.0)[..., None]
    o = o.astype(q.dtype)
  return o[:, :, :G].reshape(B, 1, H, hd)


def products_dtype(q_dtype, pool_dtype, widen_to: str | None = None):
  """The dtype of the kernel's two products: ``widen_to`` where given;
  float16 for bf16 queries over a pool of 1-byte floats (widened exactly,
  in one conversion); else float32 for float32 queries, the query's dtype
  otherwise."""
  if widen_to is not None:
    return jnp.dtype(widen_to)
  q_dtype = jnp.dtype(q_dtype)
  if q_dtype == jnp.dtype(jnp.float32):
    return q_dtype
  if (q_dtype == jnp.dtype(jnp.bfloat16)
      and jnp.dtype(pool_dtype).itemsize == 1):
    return jnp.dtype(jnp.float16)
  return q_dtype


def supports(pool_shape, dtype) -> bool:
  """Whether ``paged_decode_attention`` takes a pool of this shape
  ``[num_blocks, P, K, hd]`` and dtype: hd and P powers of two (hd at least
  16), and not a pool of 1-byte values between 2 and 4 GiB
  (``_check_offsets``)."""
  _, P, _, hd = pool_shape
  return _shape_supported(P, hd) and not _offsets_overflow(pool_shape, dtype)


def _shape_supported(page_size: int, head_dim: int) -> bool:
  """Both powers of two (Triton's blocks), head_dim at least ``MIN_DOT``."""
  return (head_dim >= MIN_DOT and not head_dim & (head_dim - 1)
          and not page_size & (page_size - 1))


def _offsets_overflow(pool_shape, dtype) -> bool:
  size = math.prod(pool_shape)
  return jnp.dtype(dtype).itemsize == 1 and 2**31 <= size <= 2**32


def _check_offsets(pool):
  """The Triton lowering computes element offsets in 32 bits for arrays of
  at most 4 GiB, signed: a pool of 1-byte values between 2 and 4 GiB would
  address past 2**31 elements with them."""
  size = math.prod(pool.shape)
  if _offsets_overflow(pool.shape, pool.dtype):
    raise NotImplementedError(
        f"a {size / 2**30:.1f} GiB pool of 1-byte values: the kernel's "
        "element offsets would overflow 32 bits (pools under 2 GiB or over "
        "4 GiB are fine)")


def paged_decode_attention_reference(q, k_pool, v_pool, table, kv_len):
  """The same attention the plain way: gather the pages into a dense
  [B, M * P, K, hd] copy in q's dtype, then masked softmax in float32."""
  B, _, H, hd = q.shape
  _, P, K, _ = k_pool.shape
  M = table.shape[1]
  G = H // K
  kk = k_pool[table].reshape(B, M * P, K, hd).astype(q.dtype)
  vv = v_pool[table].reshape(B, M * P, K, hd).astype(q.dtype)
  qg = q.reshape(B, K, G, hd).astype(jnp.float32)
  s = jnp.einsum("bkgd,btkd->bkgt", qg, kk.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST) / math.sqrt(hd)
  valid = jnp.arange(M * P)[None, :] < kv_len[:, None]          # [B, T]
  s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("bkgt,btkd->bkgd", p, vv.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)
  return o.reshape(B, 1, H, hd).astype(q.dtype)


def paged_decode_attention_error_bound(q, k_pool, v_pool, table, kv_len,
                                       widen_to: str | None = None):
  """An elementwise bound [B, 1, H, hd] (float32) on how far the kernel's
  output (``widen_to`` as given to it) may be from the reference's, from
  the arithmetic of the two.

  With u the unit roundoff of q's dtype (2**-8 for bf16, 2**-24 for
  float32) and u32 float32's:
  * both round their output to q's dtype: at most u |o| each;
  * with bf16 queries the kernel rounds the softmax weights p to bf16 for
    the second product: at most u * sum(p |v|);
  * both sum hd products per logit in float32, in different orders: each
    logit within d = hd * u32 * sum|q k| / sqrt(hd) of the exact one, so
    the two sets of weights differ by at most a factor exp(4 d), about
    1 + 4d: 4d * sum(p |v|);
  * the weighted sum of up to M * P values, the softmax's sum and a few ulps
    of exp, all float32: (M * P + 8) u32 * sum(p |v|).
  Where the products run in float16 (``products_dtype``: bf16 queries over
  a float8 pool), the weights round to float16 instead: u16 = 2**-11 of
  each, or 2**-25 absolute where float16 is subnormal (below 2**-14), so
  u16 * sum(p |v|) + 2**-25 * sum|v| over the row's tokens (a weight is
  relative to the running maximum, and the later rescaling and division
  only shrink its error). The query is exact in float16 but where a
  component is subnormal there: 2**-25 * 2**k absolute, 2**k the head's
  power-of-two scaling (at most max(1, max|q| * 2**-14)), which moves a
  logit by at most 2**-25 * 2**k * max over tokens of sum|k| / sqrt(hd),
  added to d.
  Keys and values enter both as the pool's values cast to q's dtype (and
  float8 values to float16 exactly).
  Pages past a row's length must hold finite values for this bound (the
  kernel itself ignores them whatever they hold)."""
  B, _, H, hd = q.shape
  _, P, K, _ = k_pool.shape
  T = table.shape[1] * P
  f32 = jnp.float32
  u = float(jnp.finfo(q.dtype).eps) / 2
  u32 = float(jnp.finfo(f32).eps) / 2
  in_f16 = (products_dtype(q.dtype, k_pool.dtype, widen_to)
            == jnp.dtype(jnp.float16))
  if in_f16 and jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16),
                                           jnp.dtype(jnp.float16)):
    raise ValueError(f"no bound for {jnp.dtype(q.dtype).name} queries "
                     "rounded to float16")
  k_q = k_pool.astype(q.dtype)
  o = paged_decode_attention_reference(q, k_q, v_pool, table, kv_len)
  # sum over the row's tokens of p |v|, with the reference's weights.
  wabs = paged_decode_attention_reference(
      q.astype(f32), k_q, jnp.abs(v_pool.astype(q.dtype).astype(f32)),
      table, kv_len)
  kk = jnp.abs(k_q[table].reshape(B, T, K, hd).astype(f32))
  qa = jnp.abs(q.astype(f32)).reshape(B, K, H // K, hd)
  mag = jnp.einsum("bkgd,btkd->bkgt", qa, kk,
                   precision=jax.lax.Precision.HIGHEST)
  valid = jnp.arange(T)[None, :] < kv_len[:, None]
  mag = jnp.where(valid[:, None, None, :], mag, 0.0).max(axis=-1)
  d = (hd * u32 / math.sqrt(hd)) * mag.reshape(B, 1, H, 1)
  absolute = 0.0
  if in_f16:
    tiny = 2.0**-25
    up = jnp.maximum(1.0, qa.max(axis=-1) * 2.0**-14)           # [B, K, G]
    ksum = jnp.where(valid[:, :, None], kk.sum(axis=-1), 0.0).max(axis=1)
    d = d + (tiny / math.sqrt(hd)) * (up * ksum[:, :, None]).reshape(
        B, 1, H, 1)
    p_rounding = 2.0**-11
    vv = jnp.abs(v_pool.astype(f32)[table].reshape(B, T, K, hd))
    vsum = jnp.where(valid[:, :, None, None], vv, 0.0).sum(axis=1)
    absolute = tiny * jnp.repeat(vsum, H // K, axis=1)[:, None]  # [B,1,H,hd]
  else:
    p_rounding = u if u > u32 else 0.0
  per_weight = p_rounding + 4 * d + (T + 8) * u32
  return per_weight * wabs + absolute + 2 * u * jnp.abs(o.astype(f32))
