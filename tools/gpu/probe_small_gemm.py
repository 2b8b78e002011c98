r"""Decode's projections at a few rows: XLA's GEMM against ``small_gemm``
(beside this: Pallas, Triton backend), weight bytes read per second.

For each projection of Llama-3-8B (q, k, o, gate, down, the LM head) and
each row count, in bf16 (input-major ``[K, N]``, as the model stores it) and
FP8 e4m3 with a scale per output channel (output-major ``[N, K]``, widened
to bf16 in the GEMM, as the model's W8A16 path): the time of one GEMM and
the weight's bytes over it. Each program runs its GEMM over several copies
of the weight, one after another, so no copy is still in L2 when it is read
again (as in the model, where every layer has its own). The kernel's
tilings are tried at each row count and the fastest is reported.

  python3 tools/gpu/probe_small_gemm.py --out /tmp/small_gemm.json
  python3 tools/gpu/probe_small_gemm.py --interpret --shapes 256x128 \
      --rows 1 --repeat 1 --copies_bytes 1 --out /tmp/sg.json  # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for _p in (ROOT, Path(__file__).resolve().parent):
  if str(_p) not in sys.path:
    sys.path.insert(0, str(_p))

# (name, K, N) of Llama-3-8B's projections
# (q's shape is o's too; k's is v's, gate's is up's.)
SHAPES = {"q": (4096, 4096), "k": (4096, 1024), "gate": (4096, 14336),
          "down": (14336, 4096), "lm_head": (4096, 128256)}
# Per layer: q, k, v, o, gate, up, down (the LM head once per step).
PER_LAYER = {"q": 2, "k": 2, "gate": 2, "down": 1}


def tilings(k: int, n: int, m: int, sms: int):
  """Candidate tilings of a [k, n] weight at ``m`` rows: a few block
  shapes, each with the contraction split for about 2 and 4 blocks per SM,
  within what keeps the float32 partial sums (split x m x n x 4 bytes)
  under 6% of the weight's bytes."""
  from small_gemm import Tiling
  max_split = max(1, int(0.06 * k * n / (m * n * 4)))
  out = []
  for bn, bk, warps, stages in ((64, 128, 4, 4), (128, 64, 4, 4),
                                (128, 128, 4, 3), (256, 64, 8, 4)):
    if n % bn:
      continue
    cols = n // bn
    for per_sm in (2, 4):
      split = 1
      while (cols * split < per_sm * sms and k // (split * 2) >= bk
             and split * 2 <= max_split):
        split *= 2
      # K / split a power of two (14336 = 7 * 2048: splits of 7, 14, ...)
      while split <= k and not Tiling(bn, bk, split, warps, stages).fits(
          k, n):
        split += 1
      t = Tiling(bn, bk, split, warps, stages)
      if t.fits(k, n) and t not in out:
        out.append(t)
  return out


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--shapes", default=",".join(SHAPES))
  ap.add_argument("--rows", default="1,8,32")
  ap.add_argument("--dtypes", default="bf16,fp8")
  ap.add_argument("--copies_bytes", type=float, default=160e6,
                  help="weight bytes per timed program (over L2's 50 MB)")
  ap.add_argument("--repeat", type=int, default=20)
  ap.add_argument("--interpret", action="store_true")
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from small_gemm import small_gemm

  dev = jax.devices()[0]
  sms = getattr(dev, "core_count", None) or 132
  print(f"device {dev.device_kind}, {sms} SMs", flush=True)
  rows_list = [int(r) for r in args.rows.split(",")]
  results = []
  exact = [True]   # masked stores of the real rows, until refused

  def timed(fn, *a):
    out = fn(*a)
    jax.block_until_ready(out)
    best = float("inf")
    for _ in range(3):
      t0 = time.perf_counter()
      for _ in range(args.repeat):
        out = fn(*a)
      jax.block_until_ready(out)
      best = min(best, (time.perf_counter() - t0) / args.repeat)
    return best

  for name in args.shapes.split(","):
    # a name above, or KxN
    k, n = SHAPES[name] if name in SHAPES else map(int, name.split("x"))
    for dt in args.dtypes.split(","):
      fp8 = dt == "fp8"
      wbytes = k * n * (1 if fp8 else 2)
      copies = int(max(1, min(16, -(-args.copies_bytes // wbytes))))
      key = jax.random.PRNGKey(0)
      ws, scales = [], []
      for c in range(copies):
        w = jax.random.normal(jax.random.fold_in(key, c), (k, n),
                              jnp.float32) / np.sqrt(k)
        if fp8:
          s = jnp.max(jnp.abs(w), axis=0) / 448.0
          ws.append((w / s).T.astype(jnp.float8_e4m3fn))
          scales.append(s)
        else:
          ws.append(w.astype(jnp.bfloat16))
        del w

      def xla_fn(x, ws, scales):
        if fp8:
          return [(jnp.einsum("mk,nk->mn", x, w.astype(x.dtype),
                              preferred_element_type=jnp.float32) * s
                   ).astype(x.dtype) for w, s in zip(ws, scales)]
        return [jnp.dot(x, w, preferred_element_type=jnp.float32
                        ).astype(x.dtype) for w in ws]

      def kernel_fn(tiling, exact_rows):
        def f(x, ws, scales):
          return [small_gemm(x, w, s if fp8 else None, tiling=tiling,
                             output_major=fp8, interpret=args.interpret,
                             exact_rows=exact_rows)
                  for w, s in zip(ws, scales or [None] * len(ws))]
        return jax.jit(f)

      xla = jax.jit(xla_fn)
      for m in rows_list:
        x = jax.random.normal(key, (m, k), jnp.bfloat16)
        ref = xla(x, ws, scales)[0].astype(jnp.float32)
        t_xla = timed(xla, x, ws, scales) / copies
        row = dict(shape=name, k=k, n=n, dtype=dt, rows=m, copies=copies,
                   weight_bytes=wbytes, xla_ms=t_xla * 1e3,
                   xla_tbps=wbytes / t_xla / 1e12)
        best = None
        for t in tilings(k, n, m, sms):
          try:
            f = kernel_fn(t, exact[0])
            got = f(x, ws, scales)[0].astype(jnp.float32)
          except Exception as e:  # noqa: BLE001 - reported, then skipped
            print(f"  {name} {dt} m={m} {t} exact_rows={exact[0]}: "
                  f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
                  flush=True)
            if exact[0]:
              exact[0] = False   # masked stores refused: padded rows
            continue
          err = float(jnp.max(jnp.abs(got - ref)) /
                      (jnp.max(jnp.abs(ref)) + 1e-30))
          sec = timed(f, x, ws, scales) / copies
          print(f"  {name} {dt} m={m} {t}: {sec * 1e3:.4f} ms "
                f"{wbytes / sec / 1e12:.2f} TB/s rel err {err:.1e}",
                flush=True)
          if best is None or sec < best[1]:
            best = (t, sec, err)
        if best is not None:
          t_k = best[1]
          row.update(kernel_ms=t_k * 1e3, kernel_tbps=wbytes / t_k / 1e12,
                     tiling=vars(best[0]), speedup=t_xla / t_k,
                     rel_err=best[2], exact_rows=exact[0])
        results.append(row)
        print(f"{name:7s} {dt:4s} m={m:3d}: XLA {row['xla_ms']:.4f} ms "
              f"({row['xla_tbps']:.2f} TB/s)" + (
                  f", kernel {row['kernel_ms']:.4f} ms "
                  f"({row['kernel_tbps']:.2f} TB/s, {row['speedup']:.2f}x)"
                  if best else ""), flush=True)
      del ws, scales
  # A layer's GEMMs and the step's: the sum of XLA's against the kernel's.
  for dt in args.dtypes.split(","):
    for m in rows_list:
      rows = {r["shape"]: r for r in results
              if r["dtype"] == dt and r["rows"] == m}
      if not all(s in rows and "kernel_ms" in rows[s] for s in PER_LAYER):
        continue
      xla_ms = sum(rows[s]["xla_ms"] * c for s, c in PER_LAYER.items()) * 32
      k_ms = sum(min(rows[s]["kernel_ms"], rows[s]["xla_ms"]) * c
                 for s, c in PER_LAYER.items()) * 32
      print(f"32 layers' GEMMs, {dt}, m={m}: XLA {xla_ms:.3f} ms, "
            f"best of both {k_ms:.3f} ms")
  Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
