r"""Chunked / cached-prefix prefill: one chunk program, two ways of attending.

The buffered prefill path (a prompt after a cached prefix, or longer than
the largest bucket) runs one chunk of T tokens whose earlier tokens' K/V
sit in a buffer of S positions (S covers the longest prompt). This times
one chunk's whole forward pass (all layers, Llama-3-8B shapes, random
weights) for several (prefix length, T), in two formulations:

* ``concat`` (pdjax until 2026-11-26): each layer concatenates the whole
  buffer with the chunk's K/V and attends with a [T, S + T] mask, so every
  chunk attends over S + T keys whatever its prefix holds; the chunk's K/V
  are written into the buffer afterwards;
* ``in_buffer`` (``llama.prefill_chunk``): each layer writes the chunk's K/V
  into the buffer at the prefix's end, then attends over the buffer with a
  shifted causal mask and ``key_value_seq_lengths = start + T``.

Both use the attention implementation the model picks (cuDNN on GPUs, the
mask as a bias). Beside them, as the engine runs the second (its buffers
donated, so updated in place): ``donated`` attends over the whole buffer,
``span`` over its first ``span`` positions only (the next power of two that
holds prefix + T); and ``bucketed``, the plain prefill of T tokens with no
prefix (``llama.prefill_forward``), the cost a chunk would have without its
buffer. Logits of the buffered ones are compared with ``concat``'s (they
must agree), and each row reports ms and model TFLOP/s (matmuls + causal
attention over the real prefix).

  python tools/gpu/probe_chunk_prefill.py --out /tmp/chunk.json
  python tools/gpu/probe_chunk_prefill.py --model tiny --cases 0:32,32:32 \
      --buffer 128      # CPU smoke
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for _p in (ROOT, ROOT / "tools"):
  if str(_p) not in sys.path:
    sys.path.insert(0, str(_p))


def concat_chunk(params, tokens, true_len, k_buf, v_buf, start, *, cfg):
  """The formulation before 2026-11-26, for comparison: attends over the
  whole buffer concatenated with the chunk, then writes the chunk."""
  import jax
  import jax.numpy as jnp
  from pdjax.model import llama
  B, T = tokens.shape
  S = k_buf.shape[2]
  positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
  cos, sin = llama.rope_tables(cfg, positions)
  x = llama._embed(params, tokens)  # pylint: disable=protected-access
  impl = llama.attention_impl(x.dtype, cfg.head_dim)
  qi = jnp.arange(T)[None, :, None]
  kj = jnp.arange(S + T)[None, None, :]
  mask = (((kj < S) & (kj < start[:, None, None]))
          | ((kj >= S) & (kj - S <= qi)))[:, None]

  def layer(x, xs):
    lp, pk, pv = xs
    h = llama.rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    q, k, v = llama._qkv(cfg, lp, h, cos, sin)  # pylint: disable=protected-access
    kk = jnp.concatenate([pk.astype(k.dtype), k], axis=1)
    vv = jnp.concatenate([pv.astype(v.dtype), v], axis=1)
    attn = jax.nn.dot_product_attention(q, kk, vv, mask=mask,
                                        implementation=impl)
    return llama._attn_out_and_mlp(cfg, lp, x, attn), (k, v)  # pylint: disable=protected-access

  x, (k, v) = jax.lax.scan(layer, x, (params["layers"], k_buf, v_buf))
  logits = llama.prefill_last_logits(params, x, true_len, cfg=cfg)
  at = (0, 0, start[0], 0, 0)
  k_buf = jax.lax.dynamic_update_slice(k_buf, k.astype(k_buf.dtype), at)
  v_buf = jax.lax.dynamic_update_slice(v_buf, v.astype(v_buf.dtype), at)
  return logits, k_buf, v_buf


def in_buffer_chunk(params, tokens, true_len, k_buf, v_buf, start, *, cfg,
                    span=None):
  from pdjax.model import llama
  out = llama.prefill_chunk(params, tokens, true_len, k_buf, v_buf, start,
                            cfg=cfg, span=span)
  return out.logits, out.k, out.v


def chunk_with_span(cfg, span):
  """``in_buffer_chunk`` attending over ``span`` positions (a constant of
  the program, not an argument)."""
  def chunk(params, tokens, true_len, k_buf, v_buf, start):
    return in_buffer_chunk(params, tokens, true_len, k_buf, v_buf, start,
                           cfg=cfg, span=span)
  return chunk


def span_for(prefix: int, T: int, S: int) -> int:
  """The attention span of a chunk: the next power of two that holds its
  prefix and itself, within the buffer."""
  return min(S, max(T, 1 << (prefix + T - 1).bit_length()))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="llama3-8b")
  ap.add_argument("--cases", default="0:512,512:512,2048:512,4096:512,"
                  "7168:512,1024:128,4096:128",
                  help="prefix:chunk pairs (tokens)")
  ap.add_argument("--buffer", type=int, default=8192 + 512,
                  help="buffer positions S (the engine's chunk_buffer_len)")
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--out", default="")
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np

  import bench_common as bc
  from pdjax.model import llama
  from pdjax.sharding import ShardingRules, make_mesh

  cfg = bc.preset_config(args.model)
  rules = ShardingRules.load("prefill_tp")
  mesh = make_mesh({"tp": 1}, jax.devices()[:1])
  params = bc.random_params(cfg, rules, mesh)
  S = args.buffer
  shape = (cfg.num_layers, 1, S, cfg.num_kv_heads, cfg.head_dim)
  rng = np.random.default_rng(0)
  k0 = jnp.asarray(rng.standard_normal(shape, np.float32), cfg.jnp_dtype)
  v0 = jnp.asarray(rng.standard_normal(shape, np.float32), cfg.jnp_dtype)
  progs = {name: jax.jit(functools.partial(fn, cfg=cfg))
           for name, fn in (("concat", concat_chunk),
                            ("in_buffer", in_buffer_chunk))}
  donated = {}
  plain = jax.jit(lambda p, t, n: llama.prefill_forward(p, t, n,
                                                         cfg=cfg).logits)
  matmul = bc.matmul_params_per_token(cfg)
  rows = []
  for case in args.cases.split(","):
    prefix, T = (int(x) for x in case.split(":"))
    if prefix + T > S:
      print(f"skip {case}: needs {prefix + T} > buffer {S}")
      continue
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (1, T)), jnp.int32)
    true_len = jnp.asarray([T], jnp.int32)
    start = jnp.asarray([prefix], jnp.int32)
    row = {"prefix": prefix, "chunk": T, "buffer": S}
    # Causal attention over the real prefix: each query i sees prefix + i + 1.
    attn_flops = (4 * cfg.num_layers * cfg.num_heads * cfg.head_dim
                  * (T * prefix + T * (T + 1) / 2))
    flops = 2 * matmul * T + attn_flops
    logits = {}
    for name, prog in progs.items():
      def call(prog=prog):
        return prog(params, tokens, true_len, k0, v0, start)
      out = call()
      jax.block_until_ready(out)
      logits[name] = np.asarray(out[0], np.float32)
      t = bc.time_calls(call, warmup=1, repeat=args.reps)
      row[f"{name}_ms"] = t.median * 1e3
      row[f"{name}_tflops"] = flops / t.median / 1e12
      del out
    # As the engine calls it: buffers donated, each call's output the next
    # one's input (the prefix positions never change).
    span = span_for(prefix, T, S)
    row["span"] = span
    for name, sp in (("donated", None), ("span", span)):
      if sp not in donated:
        donated[sp] = jax.jit(chunk_with_span(cfg, sp),
                              donate_argnums=(3, 4))
      prog = donated[sp]
      state = [k0 + 0, v0 + 0]

      def call(prog=prog, state=state):
        out = prog(params, tokens, true_len, state[0], state[1], start)
        state[0], state[1] = out[1], out[2]
        return out[0]
      logits[name] = np.asarray(call(), np.float32)
      t = bc.time_calls(call, warmup=1, repeat=args.reps)
      row[f"{name}_ms"] = t.median * 1e3
      row[f"{name}_tflops"] = flops / t.median / 1e12
      del state[:]
    t = bc.time_calls(lambda: plain(params, tokens, true_len), warmup=1,
                      repeat=args.reps)
    row["bucketed_ms"] = t.median * 1e3
    ref = logits["concat"]
    for name in ("in_buffer", "donated", "span"):
      row[f"max_abs_logit_diff_{name}"] = float(np.max(np.abs(
          logits[name] - ref)))
    row["max_abs_logit_diff"] = row["max_abs_logit_diff_in_buffer"]
    row["logit_scale"] = float(np.max(np.abs(ref)))
    row["speedup"] = row["concat_ms"] / row["in_buffer_ms"]
    row["span_speedup"] = row["donated_ms"] / row["span_ms"]
    rows.append(row)
    print(json.dumps(row), flush=True)
  cols = ("prefix", "chunk", "span", "concat_ms", "in_buffer_ms",
          "donated_ms", "span_ms", "bucketed_ms", "span_speedup",
          "span_tflops", "max_abs_logit_diff_span")
  print(" | ".join(cols))
  for r in rows:
    print(" | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c])
                     for c in cols))
  if args.out:
    Path(args.out).write_text(json.dumps(
        {"model": cfg.name, "device": str(jax.devices()[0]),
         "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
