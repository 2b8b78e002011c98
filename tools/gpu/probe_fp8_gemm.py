r"""How the decode step's projections run in FP8: which kernel XLA gives a
projection of FP8 weights, and how fast, against bf16.

For each row count, a loop over 32 layers of one projection's weights
(Llama-3-8B's MLP up-projection, 4096 x 14336; the scan reads every layer's
weights once, as a decode step does) in these forms:

  bf16          x [M, K] @ w [K, N], both bf16
  w8a8_inmajor  FP8 x @ FP8 w stored [K, N] (the layout pdjax stored
                quantized weights in before)
  w8a8          FP8 x @ FP8 w stored [N, K] (contracted axis minor, the
                layout cuBLASLt's FP8 GEMMs read)
  w8a16         bf16 x @ FP8 w [N, K] widened to bf16 in the program

and reports the median time per layer, the weights' bytes over it (GB/s),
and the kernels in the optimized HLO (custom calls, fusions of kind
"__triton_gemm", transposes and converts of weight-sized arrays).

  python3 tools/gpu/probe_fp8_gemm.py --out $OUT/fp8_gemm.json
"""

from __future__ import annotations

import argparse
import json
import re
import time


def _kernels(hlo: str, weight_elems: int) -> dict:
  targets = re.findall(r'custom_call_target="([^"]+)"', hlo)
  triton = len(re.findall(r'"kind":"__triton_gemm"|kind=kCustom.*triton',
                          hlo))
  big = []
  for m in re.finditer(r"= (\w+)\[([\d,]*)\]\{[^}]*\} (transpose|convert|"
                       r"copy)\(", hlo):
    dims = [int(d) for d in m.group(2).split(",") if d]
    n = 1
    for d in dims:
      n *= d
    if n >= weight_elems // 2:
      big.append(f"{m.group(3)} {m.group(1)}[{m.group(2)}]")
  return {"custom_calls": sorted(set(targets)), "triton_gemm_fusions": triton,
          "weight_sized_ops": big[:6]}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--rows", default="1,8,32,128")
  ap.add_argument("--layers", type=int, default=32)
  ap.add_argument("--k", type=int, default=4096)
  ap.add_argument("--n", type=int, default=14336)
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  import jax
  import jax.numpy as jnp

  L, K, N = args.layers, args.k, args.n
  key = jax.random.PRNGKey(0)
  w_kn = (jax.random.normal(key, (L, K, N), jnp.float32) * 0.02).astype(
      jnp.bfloat16)
  w8_kn = (w_kn.astype(jnp.float32) * 64).astype(jnp.float8_e4m3fn)
  w8_nk = jnp.swapaxes(w8_kn, 1, 2).copy()
  scale = jnp.full((L, N), 1 / 64, jnp.float32)
  jax.block_until_ready((w_kn, w8_kn, w8_nk))

  def layers(step):
    def run(x, ws, scale):
      def body(acc, xs):
        w, s = xs
        y = step(x, w, s)
        return acc + y[:, :8].astype(jnp.float32).sum(), None
      acc, _ = jax.lax.scan(body, jnp.float32(0), (ws, scale))
      return acc
    return jax.jit(run)

  def quant_x(x):
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=1, keepdims=True)
    s = jnp.maximum(amax / 448.0, 1e-30)
    return (x.astype(jnp.float32) / s).astype(jnp.float8_e4m3fn), s

  def bf16(x, w, s):
    return jnp.einsum("md,df->mf", x, w,
                      preferred_element_type=jnp.float32).astype(x.dtype)

  def w8a8_inmajor(x, w, s):
    xq, xs = quant_x(x)
    y = jnp.einsum("md,df->mf", xq, w, preferred_element_type=jnp.float32)
    return (y * xs * s).astype(x.dtype)

  def w8a8(x, w, s):
    xq, xs = quant_x(x)
    y = jnp.einsum("md,fd->mf", xq, w, preferred_element_type=jnp.float32)
    return (y * xs * s).astype(x.dtype)

  def w8a16(x, w, s):
    y = jnp.einsum("md,fd->mf", x, w.astype(x.dtype),
                   preferred_element_type=jnp.float32)
    return (y * s).astype(x.dtype)

  forms = {"bf16": (bf16, w_kn, 2), "w8a8_inmajor": (w8a8_inmajor, w8_kn, 1),
           "w8a8": (w8a8, w8_nk, 1), "w8a16": (w8a16, w8_nk, 1)}
  results = []
  for m in [int(r) for r in args.rows.split(",")]:
    x = (jax.random.normal(jax.random.PRNGKey(m), (m, K), jnp.float32)
         ).astype(jnp.bfloat16)
    for name, (step, ws, itemsize) in forms.items():
      fn = layers(step)
      try:
        compiled = fn.lower(x, ws, scale).compile()
        hlo = compiled.as_text()
        jax.block_until_ready(compiled(x, ws, scale))
        times = []
        for _ in range(args.reps):
          t = time.perf_counter()
          jax.block_until_ready(compiled(x, ws, scale))
          times.append(time.perf_counter() - t)
        times.sort()
        per_layer = times[len(times) // 2] / L
        row = {"rows": m, "form": name, "ms_per_layer": per_layer * 1e3,
               "weight_GBps": K * N * itemsize / per_layer / 1e9,
               **_kernels(hlo, K * N)}
      except Exception as e:   # a form XLA cannot compile: say so, go on
        row = {"rows": m, "form": name, "error": f"{type(e).__name__}: {e}"[:300]}
      results.append(row)
      print(json.dumps(row), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"device": str(jax.devices()[0]), "L": L, "K": K, "N": N,
                 "results": results}, f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
