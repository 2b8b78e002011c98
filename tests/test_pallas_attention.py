"""The Pallas paged decode attention kernel, run in interpret mode on CPU,
against the gather-then-attend reference.

Every row's table names its own shuffled blocks; the tokens after a row's
length in its last page, and the table entries past it (which point at block
0), hold huge values, so that any of them leaking into a row shows. The
kernel may differ from the reference only by what its arithmetic allows
(``paged_decode_attention_error_bound``: bf16 rounding of the output and of
the softmax weights, float32 summation order), checked elementwise.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdjax.model.pallas_attention import (
    default_num_splits, default_pages_per_block, paged_decode_attention,
    paged_decode_attention_error_bound, paged_decode_attention_reference,
    products_dtype, _check_offsets)

BF16, F32, FP8 = jnp.bfloat16, jnp.float32, jnp.float8_e4m3fn


def _huge(dtype):
  """A finite value far outside the data: the largest e4m3 for FP8 pools."""
  return 448.0 if jnp.dtype(dtype).itemsize == 1 else 1e30


def _case(lengths, *, M, P=16, H=8, K=2, hd=32, q_dtype=BF16,
          pool_dtype=BF16, seed=0):
  rng = np.random.default_rng(seed)
  B = len(lengths)
  N = B * M + 1                          # block 0: the garbage block
  kp = rng.normal(size=(N, P, K, hd)).astype(np.float32)
  vp = rng.normal(size=(N, P, K, hd)).astype(np.float32)
  kp[0] = vp[0] = _huge(pool_dtype)
  table = (1 + rng.permutation(B * M)).reshape(B, M)
  for b, n in enumerate(lengths):
    used = -(-n // P)
    table[b, used:] = 0
    last = table[b, used - 1]
    kp[last, n - (used - 1) * P:] = _huge(pool_dtype)
    vp[last, n - (used - 1) * P:] = -_huge(pool_dtype)
  q = rng.normal(size=(B, 1, H, hd))
  return (jnp.asarray(q, q_dtype), jnp.asarray(kp, pool_dtype),
          jnp.asarray(vp, pool_dtype), jnp.asarray(table, jnp.int32),
          jnp.asarray(lengths, jnp.int32))


def _check(args, out, widen_to=None, ordinary_queries=True):
  """``out`` finite and within its bound of the reference; with queries of
  ordinary size (normal samples), the bound itself small."""
  ref = paged_decode_attention_reference(*args)
  bound = paged_decode_attention_error_bound(*args, widen_to=widen_to)
  q = args[0]
  assert out.shape == q.shape and out.dtype == q.dtype
  assert bool(jnp.isfinite(out).all())
  if ordinary_queries:
    # The bound is itself small: a few ulps of q's dtype (bf16: 2**-8 for
    # the output, as much for the weights) of values that are below 6
    # here, plus the float32 summation terms (about 1e-4 here).
    u = 2.0**-8 if q.dtype == BF16 else 2.0**-24
    assert float(bound.max()) < 3 * u * 6 + 1e-3
  err = jnp.abs(out.astype(F32) - ref.astype(F32))
  worst = float((err - bound).max())
  assert worst <= 0, (f"max error {float(err.max()):.3g} exceeds its bound "
                      f"by {worst:.3g}")


# Lengths 1, P - 1, P, P + 1, a full table (8 pages of 16) and one between.
LENGTHS = [1, 15, 16, 17, 128, 77]


@pytest.mark.parametrize("q_dtype,pool_dtype,H,K", [
    (BF16, BF16, 8, 2), (BF16, F32, 8, 2), (BF16, FP8, 8, 2),
    (F32, BF16, 8, 2), (F32, F32, 8, 2), (F32, FP8, 8, 2),
    (BF16, FP8, 4, 4), (F32, BF16, 4, 4),
])
# One step of all 8 pages, one slice; or steps of 2 pages, two per slice,
# in two slices (the running softmax and the merge of slices both work).
@pytest.mark.parametrize("pages_per_block,num_splits", [(None, 1), (2, 2)])
def test_matches_reference(q_dtype, pool_dtype, H, K, pages_per_block,
                           num_splits):
  args = _case(LENGTHS, M=8, H=H, K=K, q_dtype=q_dtype,
               pool_dtype=pool_dtype)
  out = paged_decode_attention(*args, pages_per_block=pages_per_block,
                               num_splits=num_splits, interpret=True)
  _check(args, out)


def test_logits_far_apart():
  """Logits spread over hundreds (queries 40x larger, keys of each row's
  first page 4x more): exp stays in range only with a running max."""
  q, kp, vp, table, lengths = _case(LENGTHS, M=8)
  kp = kp.at[table[:, 0]].multiply(4)
  args = ((q.astype(F32) * 40).astype(BF16), kp, vp, table, lengths)
  _check(args, paged_decode_attention(*args, pages_per_block=2,
                                      num_splits=2, interpret=True))


@pytest.mark.parametrize("pages_per_block,num_splits", [(None, None), (2, 3)])
def test_page_size_8_and_odd_table_width(pages_per_block, num_splits):
  # 6 pages per row: not a multiple of the pages loaded per step.
  args = _case([1, 7, 8, 9, 48, 30], M=6, P=8, hd=16)
  out = paged_decode_attention(*args, pages_per_block=pages_per_block,
                               num_splits=num_splits, interpret=True)
  _check(args, out)


@pytest.mark.parametrize("pages_per_block", [None, 1])
def test_head_dim_128_fp8(pages_per_block):
  args = _case([1, 33, 64], M=4, hd=128, pool_dtype=FP8)
  _check(args, paged_decode_attention(*args, pages_per_block=pages_per_block,
                                      num_splits=1, interpret=True))


@pytest.mark.parametrize("num_splits", [1, 2])
def test_fp8_pool_products_in_float16(num_splits):
  """Over a float8 pool, bf16 queries' products run in float16
  (``products_dtype``): the result is the one ``widen_to="float16"``
  gives, not the bf16 products' (``widen_to="bfloat16"``), and each stays
  within its own bound."""
  args = _case(LENGTHS, M=8, pool_dtype=FP8)
  assert products_dtype(BF16, FP8) == jnp.float16
  assert products_dtype(BF16, BF16) == BF16
  assert products_dtype(F32, FP8) == F32
  kw = dict(pages_per_block=2, num_splits=num_splits, interpret=True)
  out = paged_decode_attention(*args, **kw)
  _check(args, out)
  np.testing.assert_array_equal(
      np.asarray(out, np.float32),
      np.asarray(paged_decode_attention(*args, widen_to="float16", **kw),
                 np.float32))
  in_bf16 = paged_decode_attention(*args, widen_to="bfloat16", **kw)
  _check(args, in_bf16, widen_to="bfloat16")
  assert not np.array_equal(np.asarray(out, np.float32),
                            np.asarray(in_bf16, np.float32))


@pytest.mark.parametrize("num_splits", [1, 2])
def test_float16_products_take_queries_past_its_range(num_splits):
  """A query head with components past float16's range (65504) is scaled
  by a power of two first (its logits scaled back): finite, within the
  bound; plain rounding would make it inf and the row NaN. Queries below
  float16's normal range (2**-14) round as its subnormals, which the bound
  covers too."""
  q, kp, vp, table, lengths = _case(LENGTHS, M=8, pool_dtype=FP8)
  big = q.astype(F32).at[:, :, 0, 3].set(1e5).at[:, :, 1, :].multiply(3e4)
  args = (big.astype(BF16), kp, vp, table, lengths)
  _check(args, paged_decode_attention(
      *args, pages_per_block=2, num_splits=num_splits, interpret=True),
         ordinary_queries=False)
  small = (q.astype(F32) * 2.0**-18).astype(BF16)
  args = (small, kp, vp, table, lengths)
  out = paged_decode_attention(*args, pages_per_block=2,
                               num_splits=num_splits, interpret=True)
  _check(args, out)


def test_lengths_past_the_table_are_cut_to_it():
  """A length beyond M * P attends to the whole table, as the reference
  does, and never to the padding the kernel adds to the table."""
  q, kp, vp, table, _ = _case([1, 7, 8, 9, 48, 48], M=6, P=8, hd=16)
  args = (q, kp, vp, table, jnp.asarray([1, 7, 8, 9, 48, 53], jnp.int32))
  # Steps of 4 pages: the kernel pads the table to 8 with block 0, which
  # holds huge values.
  _check(args, paged_decode_attention(*args, pages_per_block=4,
                                      num_splits=1, interpret=True))


def test_nan_and_inf_past_the_length_do_not_matter():
  args = _case([1, 17, 40], M=4)
  q, kp, vp, table, lengths = args
  # The same pools with NaN and inf in every place no row may read.
  bad_k, bad_v = np.array(kp.astype(F32)), np.array(vp.astype(F32))
  clean_k, clean_v = bad_k.copy(), bad_v.copy()
  for arr, bad in ((bad_k, np.nan), (bad_v, np.inf), (clean_k, 0.0),
                   (clean_v, 0.0)):
    arr[np.abs(arr) >= _huge(BF16)] = bad
  bad = (q, jnp.asarray(bad_k, BF16), jnp.asarray(bad_v, BF16), table,
         lengths)
  clean = (q, jnp.asarray(clean_k, BF16), jnp.asarray(clean_v, BF16), table,
           lengths)
  for kw in ({}, {"pages_per_block": 1, "num_splits": 2}):
    out = paged_decode_attention(*bad, interpret=True, **kw)
    assert bool(jnp.isfinite(out.astype(F32)).all())
    np.testing.assert_array_equal(
        np.asarray(out.astype(F32)),
        np.asarray(paged_decode_attention(*clean, interpret=True,
                                          **kw).astype(F32)))
    _check(clean, out)


def test_reference_is_decode_layers_gather_path():
  """The reference computes what ``decode_layer`` does after gathering."""
  q, kp, vp, table, lengths = _case([1, 17, 40], M=4, q_dtype=F32,
                                    pool_dtype=F32)
  B, M, P, K, hd = *table.shape, kp.shape[1], kp.shape[2], kp.shape[3]
  kk = kp[table].reshape(B, M * P, K, hd)
  vv = vp[table].reshape(B, M * P, K, hd)
  want = jax.nn.dot_product_attention(
      q, kk, vv, query_seq_lengths=jnp.ones((B,), jnp.int32),
      key_value_seq_lengths=lengths, implementation="xla")
  got = paged_decode_attention_reference(q, kp, vp, table, lengths)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                             rtol=1e-5, atol=1e-5)


def test_defaults_for_an_h100():
  # Llama-3-8B's pages: 8 pages of 16 = 128 tokens per step.
  assert default_pages_per_block(16, 256, 128) == 8
  assert default_pages_per_block(8, 256, 128) == 16
  assert default_pages_per_block(16, 2, 128) == 2     # a short table
  assert default_pages_per_block(8, 1, 16) == 2       # 16 tokens at least
  assert default_pages_per_block(16, 256, 256) == 4
  assert default_pages_per_block(16, 256, 128, 4) == 4  # float32 pools
  assert default_pages_per_block(16, 256, 128, 1) == 8  # FP8 ones
  # 1 row x 8 KV heads: 17 slices reach 132 programs; 32 rows need none.
  assert default_num_splits(1, 8, 32) == 17
  assert default_num_splits(8, 8, 32) == 3
  assert default_num_splits(32, 8, 32) == 1
  assert default_num_splits(1, 8, 2) == 2             # one block each


def test_large_one_byte_pools_are_refused():
  P, K, hd = 16, 8, 128
  blocks = 3 * 2**30 // (P * K * hd)
  with pytest.raises(NotImplementedError):
    _check_offsets(jax.ShapeDtypeStruct((blocks, P, K, hd), FP8))
  _check_offsets(jax.ShapeDtypeStruct((blocks, P, K, hd), BF16))
  _check_offsets(jax.ShapeDtypeStruct((2 * blocks, P, K, hd), FP8))
  assert math.prod((blocks, P, K, hd)) < 2**32


@pytest.mark.parametrize("pages_per_block,num_splits", [(None, 1), (1, 4)])
def test_a_row_of_length_0_gets_zeros(pages_per_block, num_splits):
  q, kp, vp, table, _ = _case([16, 40], M=4)
  out = paged_decode_attention(q, kp, vp, table,
                               jnp.asarray([0, 40], jnp.int32),
                               pages_per_block=pages_per_block,
                               num_splits=num_splits, interpret=True)
  assert not bool(jnp.any(out[0] != 0))
  args = (q[1:], kp, vp, table[1:], jnp.asarray([40], jnp.int32))
  _check(args, out[1:])


@pytest.mark.parametrize("pool_dtype,widen_to", [
    (FP8, None), (FP8, "bfloat16"), (BF16, None)])
def test_the_kernel_lowers_for_gpus(pool_dtype, widen_to):
  """The kernel's JAX-to-Triton lowering for CUDA, without a GPU (what
  interpret mode never exercises: every operation it uses must have a
  Triton lowering), at Llama-3-8B's head layout."""
  import functools
  from jax import export
  B, H, K, hd, P, N, M = 8, 32, 8, 128, 16, 64, 8
  shape = jax.ShapeDtypeStruct
  fn = jax.jit(functools.partial(paged_decode_attention, widen_to=widen_to))
  exported = export.export(
      fn, platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(
          "__gpu$xla.gpu.triton")])(
              shape((B, 1, H, hd), BF16), shape((N, P, K, hd), pool_dtype),
              shape((N, P, K, hd), pool_dtype), shape((B, M), jnp.int32),
              shape((B,), jnp.int32))
  assert "__gpu$xla.gpu.triton" in exported.mlir_module()
