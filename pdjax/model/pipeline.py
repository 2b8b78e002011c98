"""Pipeline-parallel decode: the model's layers split into stages over a
``pp`` mesh axis, one decode step run as a pipeline inside one program.

Under the ``decode_dp_pp`` rule sets the stacked layer weights are split on
their leading (layers) axis and the KV pools ``[L * N, P, K, hd]`` on their
layer-major row axis, so stage ``s`` of ``S`` holds layers
``s * L / S .. (s + 1) * L / S - 1`` and exactly those layers' pages (rows
``l * N + p`` of its layers). Nothing is gathered: each stage reads and
writes only its own weights and pages.

``pipelined_decode_forward`` is ``llama.decode_forward`` with the layer loop
replaced by the classic (GPipe) schedule, in a ``shard_map`` over the stage
axis: the call's rows are cut into ``m`` microbatches; at tick ``t`` stage
``s`` runs its layers on microbatch ``t - s`` and hands its activations to
stage ``s + 1`` with ``lax.ppermute``. A step is ``m + S - 1`` ticks, all
stages busy except the ``S - 1`` fill and drain ticks, so the idle share of
the stages' time (the bubble) is ``(S - 1) / (m + S - 1)``. The last
stage's hidden states go to the final norm and LM head, which run, like the
embedding, outside the pipeline (their weights are whole on every stage).

Each microbatch runs ``llama.decode_layer``, the body of the unpipelined
layer loop, over the stage's layers, so the per-row arithmetic is the same;
only the matmuls' row count (the microbatch's, not the call's) differs.
Ticks where a stage has no microbatch (fill and drain) compute on
placeholder input and write their K/V to the null page, which no row reads
as data.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from pdjax.model.config import ModelConfig
from pdjax.model.llama import (DecodeOut, Params, _embed, _logits,
                               decode_layer, decode_tokens_layer)

STAGE_AXIS = "pp"


def stage_count(mesh, axis: str = STAGE_AXIS) -> int:
  """Pipeline stages of a mesh (1 when it has no ``axis``)."""
  return int(dict(mesh.shape).get(axis, 1))


def microbatch_rows(rows: int, num_microbatches: int) -> int:
  """Rows per microbatch of a call of ``rows`` rows: the call is padded
  with inactive rows to ``num_microbatches`` times this."""
  return -(-int(rows) // int(num_microbatches))


def bubble_fraction(stages: int, num_microbatches: int) -> float:
  """The idle share of the stages' time in one pipelined step:
  ``(S - 1) / (m + S - 1)``."""
  return (stages - 1) / (num_microbatches + stages - 1)


def shard_map_stages(f, mesh, in_specs, out_specs, axis: str = STAGE_AXIS):
  """``f`` mapped over the ``axis`` of ``mesh`` (a Mesh or its
  ``abstract_mesh``: one program then serves every replica of that shape),
  manual over ``axis`` only: the other mesh axes (``tp``) stay with the
  compiler's partitioner inside, as they are outside."""
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs,
                         out_specs=out_specs, axis_names={axis},
                         check_vma=False)
  from jax.experimental.shard_map import shard_map  # older jax
  auto = frozenset(a for a in mesh.axis_names if a != axis)
  return shard_map(f, mesh, in_specs, out_specs, check_rep=False, auto=auto)


def pipelined_decode_forward(params: Params, tokens, positions, k_pool,
                             v_pool, page_table, *, cfg: ModelConfig, mesh,
                             num_microbatches: int, axis: str = STAGE_AXIS,
                             paged_attention: str | None = None,
                             xla_attention: bool = False) -> DecodeOut:
  """``llama.decode_forward`` (same arguments and result) over the stages
  of ``mesh``'s ``axis``, the rows in ``num_microbatches`` microbatches.

  The pools and ``params["layers"]`` must be split over ``axis`` on their
  leading axis (``pdjax/shardings/decode_dp_pp.toml``); tokens, positions and the
  page table are whole on every stage. A row count that ``num_microbatches``
  does not divide is padded with inactive rows (position 0, null pages).
  """
  if paged_attention:
    raise ValueError("the pipelined decode gathers pages (cuDNN's paged "
                     "attention has no partitioning rule)")
  N = k_pool.shape[0] // cfg.num_layers
  x = _embed(params, tokens[:, None])

  def layer(pos, table):
    return decode_layer(cfg, pos, table, num_pages=N,
                        page_size=k_pool.shape[1], dtype=x.dtype,
                        xla_attention=xla_attention)

  h, k_pool, v_pool = _pipeline(
      params, x, (positions, page_table),
      layer, k_pool, v_pool, cfg=cfg, mesh=mesh,
      num_microbatches=num_microbatches, axis=axis)
  return DecodeOut(_logits(cfg, params, h[:, 0]), k_pool, v_pool)


def pipelined_decode_forward_tokens(params: Params, tokens, start, k_pool,
                                    v_pool, page_table, *, cfg: ModelConfig,
                                    mesh, num_microbatches: int,
                                    axis: str = STAGE_AXIS,
                                    num_kept=None) -> DecodeOut:
  """``llama.decode_forward_tokens`` (speculative decoding's verify pass:
  T tokens per row) over the stages of ``mesh``'s ``axis``, as
  ``pipelined_decode_forward`` runs one token per row."""
  B, T = tokens.shape
  if num_kept is None:
    num_kept = jnp.full((B,), T, jnp.int32)
  N = k_pool.shape[0] // cfg.num_layers

  def layer(st, table, kept):
    return decode_tokens_layer(cfg, st, table, kept, num_tokens=T,
                               num_pages=N, page_size=k_pool.shape[1])

  h, k_pool, v_pool = _pipeline(
      params, _embed(params, tokens), (start, page_table, num_kept), layer,
      k_pool, v_pool, cfg=cfg, mesh=mesh, num_microbatches=num_microbatches,
      axis=axis)
  return DecodeOut(_logits(cfg, params, h), k_pool, v_pool)


def _pipeline(params: Params, x, row_inputs, make_layer, k_pool, v_pool, *,
              cfg: ModelConfig, mesh, num_microbatches: int, axis: str):
  """Runs the layers on the residual stream ``x`` [B, T, D] as a pipeline
  over the stages of ``mesh``'s ``axis``: the rows in ``num_microbatches``
  microbatches (padded with rows whose ``row_inputs`` are all zeros:
  position 0, null pages, nothing kept), stage ``s`` running its own
  layers on microbatch ``t - s`` at tick ``t``, the activations passed on
  by a collective permute. ``make_layer(*inputs)`` is the layer body
  (``llama.decode_layer`` or ``decode_tokens_layer``) for one
  microbatch's slices of ``row_inputs`` (per-row arrays, leading axis B).
  Returns x after the last layer, [B, T, D], and the pools."""
  S = stage_count(mesh, axis)
  m = int(num_microbatches)
  L = cfg.num_layers
  if L % S:
    raise ValueError(f"{L} layers do not split into {S} pipeline stages")
  B, T, D = x.shape
  mb = microbatch_rows(B, m)
  pad = mb * m - B
  if pad:
    x = jnp.pad(x, ((0, pad), (0, 0), (0, 0)))
    row_inputs = tuple(jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1))
                       for a in row_inputs)
  xs = x.reshape(m, mb, T, D)
  ins = tuple(a.reshape((m, mb) + a.shape[1:]) for a in row_inputs)
  perm = [(i, i + 1) for i in range(S - 1)]

  def stage(layers, kp, vp, xs, ins):
    s = jax.lax.axis_index(axis)
    layer_ids = jnp.arange(L // S, dtype=jnp.int32)   # the stage's own

    def tick(carry, t):
      act, kp, vp, out = carry
      j = t - s                                        # its microbatch
      valid = (j >= 0) & (j < m)
      jc = jnp.clip(j, 0, m - 1)
      inp = jnp.where(s == 0, xs[jnp.clip(t, 0, m - 1)], act)
      # Fill and drain ticks: null pages, position 0 (nothing real moves).
      layer = make_layer(*(jnp.where(valid, a[jc], 0) for a in ins))
      (y, kp, vp), _ = jax.lax.scan(layer, (inp, kp, vp),
                                    (layers, layer_ids))
      keep = valid & (s == S - 1)
      out = jax.lax.dynamic_update_index_in_dim(
          out, jnp.where(keep, y, out[jc]), jc, 0)
      act = jax.lax.ppermute(y, axis, perm)
      return (act, kp, vp, out), None

    init = (jnp.zeros_like(xs[0]), kp, vp, jnp.zeros_like(xs))
    (_, kp, vp, out), _ = jax.lax.scan(
        tick, init, jnp.arange(m + S - 1, dtype=jnp.int32))
    # Only the last stage holds outputs (the others' are zeros): the sum
    # is that stage's, exactly, on every stage.
    out = jax.lax.psum(jnp.where(s == S - 1, out, jnp.zeros_like(out)),
                       axis)
    return out, kp, vp

  split = PartitionSpec(axis)
  whole = PartitionSpec()
  layer_specs = jax.tree.map(lambda _: split, params["layers"])
  in_specs = jax.tree.map(lambda _: whole, ins)
  out, k_pool, v_pool = shard_map_stages(
      stage, mesh, (layer_specs, split, split, whole, in_specs),
      (whole, split, split), axis)(params["layers"], k_pool, v_pool, xs, ins)
  return out.reshape(m * mb, T, D)[:B], k_pool, v_pool


__all__ = ["STAGE_AXIS", "bubble_fraction", "microbatch_rows",
           "pipelined_decode_forward", "pipelined_decode_forward_tokens",
           "shard_map_stages", "stage_count"]
