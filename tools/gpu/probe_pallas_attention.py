r"""One decode step's attention over a paged KV pool, three ways, on one GPU:

  pallas  ``pdjax.model.pallas_attention.paged_decode_attention``: reads the
          pages in place through the block table (FP8 pools cast to bf16 in
          the kernel);
  gather  what ``decode_layer`` does without paged attention: the rows'
          pages gathered into a dense bf16 copy, then
          ``jax.nn.dot_product_attention`` (``--gather_impl``: jax's choice
          by default, cuDNN on an H100);
  cudnn   cuDNN's paged attention (``llama._cudnn_paged_attention``), bf16
          pools only, where ``cudnn_paged_attention_applies`` allows.

Llama-3-8B's attention shapes (32 query heads, 8 KV heads, head dim 128,
pages of 16) at each row count and context (every row that long), for bf16
and float8_e4m3fn pools. Each pool holds ``copies`` layers laid out as the
model's are (layer l's page p is block l * N + p, N = rows * (pages per row
+ 1): a spare page per row, so that cuDNN's block count fits); successive
calls read successive layers, so that no call finds the previous one's
pages in L2. Page tables are shuffled.

Each variant is first checked against the float32 reference on the same
inputs: the largest |difference| must stay within
``paged_decode_attention_error_bound`` (bf16 rounding of the output and of
the softmax weights, float32 summation), elementwise; a variant that exceeds
it prints ACCURACY FAILURE and the script exits 1 at the end. Then it is
timed: the median of ``--iters`` calls after ``--warmup``, each waited for
(``ms``), and the mean of ``--iters`` calls queued back to back
(``ms_queued``, without the per-call dispatch gap). ``GB/s`` is the pool's
K and V bytes the rows attend to (rows x context x KV heads x head dim x
2 x bytes per value) over ``ms``; the gather path moves more than that (it
also writes and reads its bf16 copy: ``moved_GB`` in the JSON). A variant
that fails to compile or run prints its error and the others still run.

  python3 tools/gpu/probe_pallas_attention.py --out $OUT/pallas_attn.jsonl
  python3 tools/gpu/probe_pallas_attention.py --rows=32,128 \
      --kernel_configs=default,8:1:4:2,4:0:4:3,16:0:8:2 --out $OUT/sweep.jsonl
  python3 tools/gpu/probe_pallas_attention.py --interpret --rows=2 \
      --contexts=64 --iters=2 --warmup=1 --out $OUT/pa.jsonl   # CPU smoke
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

FLAGS = flags.FLAGS
flags.DEFINE_list("rows", ["1", "8", "32", "128"], "Rows (batch sizes).")
flags.DEFINE_list("contexts", ["1024", "4096"],
                  "Tokens every row attends to (multiples of the page size).")
flags.DEFINE_list("pool_dtypes", ["bfloat16", "float8_e4m3fn"],
                  "KV pool dtypes.")
flags.DEFINE_integer("heads", 32, "Query heads.")
flags.DEFINE_integer("kv_heads", 8, "KV heads.")
flags.DEFINE_integer("head_dim", 128, "Head dim.")
flags.DEFINE_integer("page_size", 16, "Tokens per page.")
flags.DEFINE_list("kernel_configs", ["default"],
                  "Kernel variants: 'default', or pages_per_block:num_splits:"
                  "num_warps:num_stages with 0 for the kernel's default "
                  "(e.g. 8:1:4:2); '+float16' after either widens the "
                  "pool's values to float16 instead of the query's dtype.")
flags.DEFINE_list("variants", ["pallas", "gather", "cudnn"],
                  "Which of pallas, gather, cudnn to run.")
flags.DEFINE_enum("gather_impl", "auto", ["auto", "cudnn", "xla"],
                  "dot_product_attention's implementation on the gather "
                  "path (auto: None, jax's choice).")
flags.DEFINE_integer("iters", 20, "Timed calls.")
flags.DEFINE_integer("warmup", 3, "Untimed calls first (after compiling).")
flags.DEFINE_integer("copies", 0,
                     "Layers in the pool, read in turn (0: enough that they "
                     "hold --l2_spill_bytes of K/V, at most 32).")
flags.DEFINE_integer("l2_spill_bytes", 256 << 20,
                     "K/V bytes the layers read in turn should add up to "
                     "(several times an H100's 50 MB L2).")
flags.DEFINE_bool("check", True, "Check each variant against the reference.")
flags.DEFINE_bool("interpret", False,
                  "Run the Pallas kernel in interpret mode (CPU smoke test).")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("out", None, "Write one JSON line per measurement here.")


def _parse_config(text: str):
  text, _, widen = text.partition("+")
  extra = {"widen_to": widen} if widen else {}
  if text == "default":
    return extra
  ppb, splits, warps, stages = (int(x) for x in text.split(":"))
  cfg = {"pages_per_block": ppb or None, "num_splits": splits or None,
         **extra}
  if warps:
    cfg["num_warps"] = warps
  if stages:
    cfg["num_stages"] = stages
  return cfg


def _time(fn, args_for, iters: int, warmup: int):
  """(median ms of single waited calls, mean ms of queued calls); call i
  gets args_for(i)."""
  import jax
  for i in range(warmup):
    jax.block_until_ready(fn(*args_for(i)))
  times = []
  for i in range(iters):
    a = args_for(i)
    t = time.perf_counter()
    jax.block_until_ready(fn(*a))
    times.append(time.perf_counter() - t)
  arg_list = [args_for(i) for i in range(iters)]
  t = time.perf_counter()
  outs = [fn(*a) for a in arg_list]
  jax.block_until_ready(outs)
  queued = (time.perf_counter() - t) / iters
  return statistics.median(times) * 1e3, queued * 1e3


def _build(rows: int, context: int, pool_dtype, seed: int):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from pdjax.model.llama import kv_to_pool
  P, K, hd, H = FLAGS.page_size, FLAGS.kv_heads, FLAGS.head_dim, FLAGS.heads
  if context % P:
    raise ValueError(f"context {context} is not a multiple of {P}")
  M = context // P
  N = rows * (M + 1)                       # a spare page per row
  kv_bytes = 2 * rows * context * K * hd * jnp.dtype(pool_dtype).itemsize
  copies = FLAGS.copies or max(1, min(32, -(-FLAGS.l2_spill_bytes
                                             // kv_bytes)))
  key = jax.random.PRNGKey(seed)
  kk, kv, kq = jax.random.split(key, 3)
  shape = (copies * N, P, K, hd)

  @jax.jit
  def pools(kk, kv):
    return (kv_to_pool(0.5 * jax.random.normal(kk, shape), pool_dtype),
            kv_to_pool(0.5 * jax.random.normal(kv, shape), pool_dtype))

  kp, vp = pools(kk, kv)
  q = jax.random.normal(kq, (rows, 1, H, hd), jnp.float32).astype(
      jnp.bfloat16)
  rng = np.random.default_rng(seed)
  table = (1 + rng.permutation(N - 1)[:rows * M]).reshape(rows, M)
  tables = [jnp.asarray(table + c * N, jnp.int32) for c in range(copies)]
  kv_len = jnp.full((rows,), context, jnp.int32)
  return dict(q=q, kp=kp, vp=vp, tables=tables, kv_len=kv_len, M=M, N=N,
              copies=copies, kv_bytes=kv_bytes)


def _variants(d, cfg):
  """[(name, fn(q, kp, vp, table, kv_len), details)] for this case."""
  import jax
  import jax.numpy as jnp
  from pdjax.model import llama
  from pdjax.model import pallas_attention as pa
  out = []
  B, M = d["tables"][0].shape
  if "pallas" in FLAGS.variants:
    for text in FLAGS.kernel_configs:
      kw = _parse_config(text)
      try:
        ppb, splits, _ = pa.blocking(B, M, d["kp"], kw.get("pages_per_block"),
                                     kw.get("num_splits"))
      except Exception:  # pylint: disable=broad-except
        # The call itself raises it again, and it is reported there.
        name, details = f"pallas[{text}]", {"config": text}
      else:
        widen = f",{kw['widen_to']}" if "widen_to" in kw else ""
        name = (f"pallas[ppb={ppb},S={splits},w={kw.get('num_warps', 4)},"
                f"st={kw.get('num_stages', 2)}{widen}]")
        details = {**kw, "pages_per_block": ppb, "num_splits": splits}
      fn = jax.jit(lambda q, kp, vp, t, n, kw=kw: pa.paged_decode_attention(
          q, kp, vp, t, n, interpret=FLAGS.interpret, **kw))
      out.append((name, fn, details))
  if "gather" in FLAGS.variants:
    impl = None if FLAGS.gather_impl == "auto" else FLAGS.gather_impl

    @jax.jit
    def gather(q, kp, vp, table, kv_len):
      Bq, _, _, hd = q.shape
      _, P, K, _ = kp.shape
      kk = kp[table].reshape(Bq, M * P, K, hd).astype(q.dtype)
      vv = vp[table].reshape(Bq, M * P, K, hd).astype(q.dtype)
      return jax.nn.dot_product_attention(
          q, kk, vv, query_seq_lengths=jnp.ones((Bq,), jnp.int32),
          key_value_seq_lengths=kv_len, implementation=impl)

    out.append((f"gather[{FLAGS.gather_impl}]", gather, {}))
  if "cudnn" in FLAGS.variants:
    if d["kp"].dtype != jnp.bfloat16:
      pass                                     # cuDNN reads bf16 pools only
    elif not llama.cudnn_paged_attention_applies(
        d["cfg"], d["kp"].shape[0], B, M):
      print(f"  cudnn: does not apply here (backend "
            f"{jax.default_backend()})")
    else:
      out.append(("cudnn_paged", jax.jit(llama._cudnn_paged_attention), {}))
  return out


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  from pdjax.model import pallas_attention as pa
  from pdjax.model.presets import preset_config

  cfg = dataclasses.replace(
      preset_config("llama3-8b"), num_heads=FLAGS.heads,
      num_kv_heads=FLAGS.kv_heads, head_dim=FLAGS.head_dim)
  device = jax.devices()[0]
  print(f"jax {jax.__version__} on {device.device_kind} "
        f"({jax.default_backend()})")
  ref = jax.jit(pa.paged_decode_attention_reference)
  bound_fn = jax.jit(pa.paged_decode_attention_error_bound)
  records, failures = [], 0
  header = (f"{'pool':>14} {'rows':>4} {'ctx':>5} {'variant':<30} "
            f"{'ms':>8} {'ms_queued':>9} {'GB/s':>7} {'max_err':>9} "
            f"{'bound':>9}  note")
  print(header)
  for dtype_name in FLAGS.pool_dtypes:
    pool_dtype = jnp.dtype(dtype_name)
    for rows in map(int, FLAGS.rows):
      for context in map(int, FLAGS.contexts):
        try:
          d = _build(rows, context, pool_dtype, FLAGS.seed)
        except Exception as e:  # pylint: disable=broad-except
          print(f"{dtype_name:>14} {rows:>4} {context:>5} build failed: "
                f"{type(e).__name__}: {e}")
          continue
        d["cfg"] = cfg
        args0 = (d["q"], d["kp"], d["vp"], d["tables"][0], d["kv_len"])
        want = bound = None
        if FLAGS.check:
          try:
            want = ref(*args0)
            bound = bound_fn(*args0)
          except Exception as e:  # pylint: disable=broad-except
            print(f"  reference failed: {type(e).__name__}: {e}")
        for name, fn, details in _variants(d, cfg):
          rec = {"pool_dtype": dtype_name, "rows": rows, "context": context,
                 "variant": name, "heads": FLAGS.heads,
                 "kv_heads": FLAGS.kv_heads, "head_dim": FLAGS.head_dim,
                 "page_size": FLAGS.page_size, "copies": d["copies"],
                 "kv_bytes": d["kv_bytes"], "device": device.device_kind,
                 "jax": jax.__version__, **details}
          if name.startswith("gather"):
            # Reads the pool, writes the bf16 copy, attention reads it.
            copy = d["kv_bytes"] // pool_dtype.itemsize * 2
            rec["moved_GB"] = (d["kv_bytes"] + 2 * copy) / 1e9
          note = ""
          try:
            if want is not None:
              got = fn(*args0)
              err = jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))
              rec["max_abs_err"] = float(err.max())
              rec["max_bound"] = float(bound.max())
              rec["within_bound"] = bool((err <= bound).all())
              rec["finite"] = bool(jnp.isfinite(got.astype(jnp.float32)).all())
              if not (rec["within_bound"] and rec["finite"]):
                failures += 1
                worst = float((err - bound).max())
                note = f"ACCURACY FAILURE (exceeds bound by {worst:.3g})"
                print(f"  ACCURACY FAILURE: {name} {dtype_name} rows={rows} "
                      f"ctx={context}: max err {rec['max_abs_err']:.4g}, "
                      f"over bound by {worst:.3g}", flush=True)
            tables = d["tables"]
            ms, ms_q = _time(
                fn, lambda i: (d["q"], d["kp"], d["vp"],
                               tables[i % len(tables)], d["kv_len"]),
                FLAGS.iters, FLAGS.warmup)
            rec.update(ms=ms, ms_queued=ms_q,
                       gbps=d["kv_bytes"] / (ms * 1e-3) / 1e9)
          except Exception as e:  # pylint: disable=broad-except
            msg = f"{type(e).__name__}: {e}"
            rec["error"] = msg[:4000]
            note = "ERROR " + msg.splitlines()[0][:200] if msg else "ERROR"
            traceback.print_exc(limit=3)
          records.append(rec)
          print(f"{dtype_name:>14} {rows:>4} {context:>5} {name:<30} "
                f"{rec.get('ms', float('nan')):>8.4f} "
                f"{rec.get('ms_queued', float('nan')):>9.4f} "
                f"{rec.get('gbps', float('nan')):>7.1f} "
                f"{rec.get('max_abs_err', float('nan')):>9.3g} "
                f"{rec.get('max_bound', float('nan')):>9.3g}  {note}",
                flush=True)
          if FLAGS.out:
            with open(FLAGS.out, "a") as f:
              f.write(json.dumps(rec) + "\n")
        del d
  if failures:
    print(f"ACCURACY FAILURE in {failures} variant(s): see above")
    return 1
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
