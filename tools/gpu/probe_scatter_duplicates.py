r"""Does a KV write whose rows share one slot cost more when they write
different values?

A decode step writes each row's new K/V into the pools with one scatter;
rows that are not live all write to the null page, at the same slot. This
probe times that scatter alone, on a pool of Llama-3-8B's KV shape (one
layer's worth of rows, bf16): 128 rows, ``--live`` of them at distinct
pages, the rest at the null page's first slot, writing either the same
values (as a fresh pool's free rows, all fed token 0) or different ones (as
free rows fed their last occupants' tokens), with XLA free to assume the
indices unique or not. Milliseconds per scatter, median of ``--repeat``.

  python tools/gpu/probe_scatter_duplicates.py --out $OUT/scatter.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rows", type=int, default=128)
  ap.add_argument("--live", type=int, default=1)
  ap.add_argument("--pages", type=int, default=16384)
  ap.add_argument("--page_size", type=int, default=16)
  ap.add_argument("--kv_heads", type=int, default=8)
  ap.add_argument("--head_dim", type=int, default=128)
  ap.add_argument("--repeat", type=int, default=50)
  ap.add_argument("--out", default=None)
  a = ap.parse_args()
  pool = jnp.zeros((a.pages, a.page_size, a.kv_heads, a.head_dim),
                   jnp.bfloat16)
  page = np.zeros((a.rows,), np.int32)
  page[:a.live] = np.arange(1, a.live + 1)
  page, off = jnp.asarray(page), jnp.zeros((a.rows,), jnp.int32)
  rng = np.random.default_rng(0)
  differ = jnp.asarray(rng.standard_normal(
      (a.rows, a.kv_heads, a.head_dim)), jnp.bfloat16)
  same = jnp.broadcast_to(differ[:1], differ.shape)
  results = []
  for unique in (False, True):
    write = jax.jit(lambda p, v, unique=unique: p.at[page, off].set(
        v, unique_indices=unique), donate_argnums=(0,))
    for name, values in (("same", same), ("different", differ)):
      pool = write(pool, values)
      pool.block_until_ready()
      times = []
      for _ in range(a.repeat):
        t = time.perf_counter()
        pool = write(pool, values)
        pool.block_until_ready()
        times.append(time.perf_counter() - t)
      ms = statistics.median(times) * 1e3
      results.append({"unique_indices": unique, "values": name, "ms": ms})
      print(f"unique_indices={unique!s:5}  {name:9} values: {ms:.4f} ms "
            "per scatter", flush=True)
  rec = {"device": jax.devices()[0].device_kind, "rows": a.rows,
         "live": a.live, "results": results}
  if a.out:
    with open(a.out, "w") as f:
      json.dump(rec, f, indent=1)


if __name__ == "__main__":
  main()
