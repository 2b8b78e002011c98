"""One process of a prefill pool spanning two processes (test helper).

  python tests/lockstep_process.py COORDINATOR NUM_PROCESSES PROCESS_ID OUT

Each process has one CPU device; the pool's TP=2 mesh spans both, over
jax.distributed with gloo collectives. Process 0 leads: it prefills a few
batches through ``LockstepPrefill`` (a bucketed pair, a chunked prompt,
greedy and seeded), then stops the followers, and checks its results
against the same requests on a one-device engine of its own (weights
gathered from the pool). Followers replay until stopped. Each writes a JSON
line to OUT.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split()
     if "force_host_platform_device_count" not in f]
    + ["--xla_force_host_platform_device_count=1"])
os.environ["JAX_PLATFORMS"] = "cpu"


def main() -> int:
  coordinator, nproc, pid, out = (sys.argv[1], int(sys.argv[2]),
                                  int(sys.argv[3]), sys.argv[4])
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, nproc, pid)
  import numpy as np
  from jax.experimental import multihost_utils

  from pdjax.engine import lockstep
  from pdjax.engine.prefill import PrefillConfig, PrefillEngine
  from pdjax.engine.requests import PrefillRequest
  from pdjax.engine.sampling import SamplingParams
  from pdjax.engine.setup import param_shardings
  from pdjax.model import llama
  from pdjax.model.presets import preset_config
  from pdjax.sharding import ShardingRules, make_mesh

  cfg = preset_config("tiny")
  rules = ShardingRules.load("prefill_tp")
  mesh = make_mesh({"tp": nproc}, jax.devices())
  assert lockstep.spans_processes(mesh)
  params = llama.init_params(cfg, 3, std=0.05,
                             shardings=param_shardings(cfg, rules, mesh))
  pcfg = PrefillConfig(buckets=(16, 32), max_batch=2, page_size=16,
                       max_seq_len=128)
  engine = PrefillEngine(params, cfg, mesh, rules, pcfg)
  # Every process gathers the weights (a collective: all take part).
  host_params = multihost_utils.process_allgather(params, tiled=True)

  if pid != 0:
    batches = lockstep.follow(engine)
    with open(out, "a") as f:
      f.write(json.dumps({"pid": pid, "replayed": batches}) + "\n")
    return 0

  rng = np.random.default_rng(1)
  greedy = SamplingParams(max_tokens=4, temperature=0.0)
  seeded = SamplingParams(max_tokens=4, temperature=0.9, top_p=0.9, seed=7)
  batches = [
      [PrefillRequest("a", rng.integers(3, 300, 20).tolist(), greedy),
       PrefillRequest("b", rng.integers(3, 300, 27).tolist(), seeded, 7)],
      [PrefillRequest("c", rng.integers(3, 300, 70).tolist(), greedy)],
  ]
  leader = lockstep.LockstepPrefill(engine)
  ready = []
  got = []
  for batch in batches:
    got += leader.prefill(batch, kv_ready=lambda i, kv: ready.append(kv))
  leader.close()

  # The reference: the same requests on this process's device alone.
  local = make_mesh({"tp": 1}, jax.local_devices()[:1])
  ref_params = jax.device_put(host_params, param_shardings(cfg, rules, local))
  ref = PrefillEngine(ref_params, cfg, local, rules, pcfg)
  want = []
  for batch in batches:
    want += ref.prefill(batch)
  me = jax.local_devices()[0]
  report = {"pid": pid, "requests": len(got),
            "tokens": [r.first_token for r in got],
            "want_tokens": [r.first_token for r in want],
            "kv_local": all(r.kv.kv.devices() == {me} for r in got),
            "ready_local": all(kv.kv.devices() == {me} for kv in ready),
            "max_kv_diff": max(
                float(np.max(np.abs(np.asarray(g.kv.kv) - np.asarray(w.kv.kv))))
                for g, w in zip(got, want)),
            "kv_scale": max(float(np.max(np.abs(np.asarray(w.kv.kv))))
                            for w in want)}
  with open(out, "a") as f:
    f.write(json.dumps(report) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
