r"""What the host adds around one bucketed prefill on an idle card: the
prompt's upload, both ways JAX offers it, and the first token's read.

For each prompt length (batch 1, Llama-3-8B shapes, random bf16, joined
projections, the card idle ``--pause_ms`` before each call), the median of
``--repeat`` calls of:

  program        the prefill and first-token programs on inputs already on
                 the device, blocking on the result (bench_prefill's figure)
  engine         PrefillEngine.prefill() as serving calls it
  put_get        jax.device_put of the packed inputs, the programs,
                 jax.device_get of the first token (the engine's copies
                 before the upload moved into the call)
  arg_get        the packed inputs passed to the program as a NumPy array
                 (the jitted call uploads them), device_get (the engine's
                 copies where the devices have no pinned host memory)
  arg_ready_get  the same, blocking until the programs are done before the
                 device_get: what the read costs once the result is ready
                 (device_get queues the copy itself, so ``arg_get``'s copy
                 already waits on the device, not on the host)
  arg_pinned     the NumPy argument, the first-token program writing its
                 result to pinned host memory (``out_shardings`` with
                 ``memory_kind="pinned_host"``): no copy after the programs
                 (the engine's copies where the devices have that memory)

and, per variant, when the upload returned and when the programs' calls
returned, from the call's start.

  python3 tools/gpu/probe_prefill_host_copies.py --out $OUT/host_copies.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for _p in (ROOT, ROOT / "tools"):
  if str(_p) not in sys.path:
    sys.path.insert(0, str(_p))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="llama3-8b")
  ap.add_argument("--prompt_lengths", default="2048,512")
  ap.add_argument("--repeat", type=int, default=9)
  ap.add_argument("--pause_ms", type=float, default=300)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()

  import functools

  import bench_common as bc  # Sets XLA_FLAGS before jax is imported.
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec
  from pdjax.engine import prefill as prefill_module
  from pdjax.engine.prefill import PrefillEngine, pack_inputs
  from pdjax.engine.prefill_config import PrefillConfig
  from pdjax.engine.requests import PrefillRequest
  from pdjax.engine.sampling import SamplingArrays, SamplingParams
  from pdjax.engine.setup import fuse_sharded
  from pdjax.sharding import ShardingRules, make_mesh

  lengths = [int(x) for x in args.prompt_lengths.split(",")]
  cfg = bc.preset_config(args.model)
  rules = ShardingRules.load("prefill_tp")
  mesh = make_mesh({"tp": 1}, jax.devices()[:1])
  params = bc.random_params(cfg, rules, mesh)
  params, cfg = fuse_sharded(params, cfg, rules, mesh)
  jax.block_until_ready(params)
  engine = PrefillEngine(params, cfg, mesh, rules, PrefillConfig(
      buckets=tuple(sorted(lengths)), max_batch=1, page_size=16,
      max_seq_len=max(lengths) + 16))
  rep = NamedSharding(mesh, PartitionSpec())
  prog = engine._prefill  # pylint: disable=protected-access
  # The first-token program both ways, whichever the engine uses: its
  # result on the device (read by a copy) and in pinned host memory.
  # pylint: disable-next=protected-access
  greedy_first = functools.partial(prefill_module._first_token_program,
                                   all_greedy=True,
                                   eos_ids=cfg.eos_token_ids)
  first = jax.jit(greedy_first)
  first_pinned = jax.jit(greedy_first, out_shardings=NamedSharding(
      mesh, PartitionSpec(), memory_kind="pinned_host"))
  greedy = SamplingParams(max_tokens=1, temperature=0.0)
  results = {"device": bc.device_kind(), "pause_ms": args.pause_ms}

  for T in lengths:
    prompt = np.random.default_rng(T).integers(3, cfg.vocab_size, T)
    host = pack_inputs(prompt[None, :].astype(np.int32),
                       np.array([T], np.int32),
                       SamplingArrays.stack([(greedy, 0)], 1))
    on_device = jax.device_put(host, rep)
    req = [PrefillRequest("probe", prompt.tolist(), greedy)]

    def variant(upload: str, download: str):
      def call(marks):
        t0 = time.perf_counter()
        packed = (on_device if upload == "none" else
                  jax.device_put(host, rep) if upload == "put" else host)
        marks.append(time.perf_counter() - t0)
        logits, cols, rows = prog(params, packed)
        out = (first_pinned if download == "pinned" else first)(logits, cols)
        marks.append(time.perf_counter() - t0)
        if download in ("block", "ready_get"):
          jax.block_until_ready((out, rows))
        if download == "pinned":
          np.asarray(out)
        elif download != "block":
          jax.device_get(out)
        marks.append(time.perf_counter() - t0)
      return call

    def engine_call(marks):
      t0 = time.perf_counter()
      engine.prefill(req)
      marks.append(time.perf_counter() - t0)

    variants = {
        "program": variant("none", "block"),
        "engine": engine_call,
        "put_get": variant("put", "get"),
        "arg_get": variant("arg", "get"),
        "arg_ready_get": variant("arg", "ready_get"),
        "arg_pinned": variant("arg", "pinned"),
    }
    for name, fn in list(variants.items()):   # compile and warm each path
      try:
        for _ in range(2):
          fn([])
      except Exception as e:  # pylint: disable=broad-except
        # A platform without pinned host memory for program outputs: the
        # variant is left out and said so.
        print(f"  {name}: left out ({type(e).__name__}: {e})"[:300])
        del variants[name]
    samples = {name: [] for name in variants}
    for _ in range(args.repeat):   # interleaved: drift hits every variant
      for name, fn in variants.items():
        time.sleep(args.pause_ms / 1000)
        marks: list[float] = []
        fn(marks)
        samples[name].append(marks)
    row = {}
    for name, runs in samples.items():
      cols = list(zip(*runs))
      row[name] = [statistics.median(c) * 1e3 for c in cols]
    results[str(T)] = row
    print(f"T={T} (ms from the call's start, median of {args.repeat}):")
    for name, ms in row.items():
      label = ("done" if len(ms) == 1 else
               "upload %.3f, dispatched %.3f, done" % (ms[0], ms[1]))
      print(f"  {name:<13} {label} {ms[-1]:.3f}")
  if args.out:
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
