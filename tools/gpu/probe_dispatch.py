r"""Does a jitted call return before its program has run (async dispatch)?

A hand-off that moves layer groups under the rest of the prefill needs the
prefill's programs dispatched ahead of the GPU. This probe times, for a few
programs, how long the call takes to return against how long until its
result is ready, and reports whether XLA knows each while loop's trip count
(a loop whose trip count it does not know syncs with the host every
iteration, which makes the launch itself as slow as the program).

  python tools/gpu/probe_dispatch.py [--xla_flags "..."] --out x.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for _p in (ROOT, ROOT / "tools"):
  if str(_p) not in sys.path:
    sys.path.insert(0, str(_p))


def _timed(fn, reps=5):
  """(median ms until the call returned, median ms until ready)."""
  import jax
  out = fn()
  jax.block_until_ready(out)
  ret, ready = [], []
  for _ in range(reps):
    t = time.perf_counter()
    out = fn()
    ret.append(time.perf_counter() - t)
    jax.block_until_ready(out)
    ready.append(time.perf_counter() - t)
  ret.sort()
  ready.sort()
  return ret[len(ret) // 2] * 1e3, ready[len(ready) // 2] * 1e3


def _loops(compiled_text: str) -> dict:
  whiles = re.findall(r"= .*? while\(.*", compiled_text)
  known = [w for w in whiles if "known_trip_count" in w]
  return {"while_loops": len(whiles), "known_trip_count": len(known),
          "examples": [w[-300:] for w in whiles[:3]]}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=None)
  ap.add_argument("--lengths", default="2048")
  args = ap.parse_args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np

  import bench_common as bc
  from pdjax.engine.prefill import PrefillConfig, PrefillEngine
  from pdjax.engine.sampling import SamplingArrays, SamplingParams
  from pdjax.model.presets import preset_config
  from pdjax.sharding import ShardingRules, make_mesh

  res = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": []}
  dev = jax.devices()[0]

  # A plain scan of matmuls: 32 x [2048, 4096] @ [4096, 4096].
  w = jax.device_put(jnp.ones((32, 4096, 4096), jnp.bfloat16) * 0.001, dev)
  x0 = jax.device_put(jnp.ones((2048, 4096), jnp.bfloat16), dev)

  @jax.jit
  def scan_mm(w, x):
    def body(x, wi):
      return jnp.tanh(x @ wi), None
    return jax.lax.scan(body, x, w)[0]

  @jax.jit
  def unrolled_mm(w, x):
    for i in range(32):
      x = jnp.tanh(x @ w[i])
    return x

  for name, fn in (("scan_matmul", scan_mm), ("unrolled_matmul",
                                              unrolled_mm)):
    r, d = _timed(lambda fn=fn: fn(w, x0))
    loops = _loops(fn.lower(w, x0).compile().as_text())
    res["rows"].append({"program": name, "return_ms": r, "ready_ms": d,
                        **loops})
    print(name, round(r, 3), round(d, 3), loops["while_loops"],
          loops["known_trip_count"], flush=True)
  del w

  cfg = preset_config("llama3-8b")
  rules = ShardingRules.load("prefill_tp")
  mesh = make_mesh({"tp": 1}, [dev])
  params = bc.random_params(cfg, rules, mesh)
  greedy = SamplingParams(max_tokens=1, temperature=0.0)
  for T in [int(t) for t in args.lengths.split(",")]:
    for groups in (1, 4):
      engine = PrefillEngine(params, cfg, mesh, rules, PrefillConfig(
          buckets=(T,), max_batch=1, page_size=16, max_seq_len=2 * T,
          layer_groups=groups))
      put = engine._put  # pylint: disable=protected-access
      tokens = put(np.ones((1, T), np.int32))
      true_len = put(np.array([T], np.int32))
      samp = tuple(put(a) for a in SamplingArrays.stack(
          [(greedy, 0)], 1).as_tuple())
      if groups == 1:
        prog = engine._prefill  # pylint: disable=protected-access
        args_ = (params, tokens, true_len, samp)
        r, d = _timed(lambda: prog(*args_))
        loops = _loops(prog.lower(*args_).compile().as_text())
      else:
        n = engine.layer_group_sizes[0]
        prog = engine._groups[n]  # pylint: disable=protected-access
        x = engine._embed(params, tokens)  # pylint: disable=protected-access
        first = put(np.int32(0))
        r, d = _timed(lambda: prog(params, x, first))
        loops = _loops(prog.lower(params, x, first).compile().as_text())
      res["rows"].append({"program": f"prefill T={T} groups={groups}",
                          "return_ms": r, "ready_ms": d, **loops})
      print(f"prefill T={T} groups={groups}", round(r, 3), round(d, 3),
            loops["while_loops"], loops["known_trip_count"], flush=True)
  if args.out:
    Path(args.out).write_text(json.dumps(res, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
