r"""Prefill benchmark: the PrefillEngine's program against the matmul limit.

For each prompt length T and tensor-parallel degree (``prefill_tp`` rules on
a mesh over the first ``tp`` devices), batch 1, this times the engine's
jitted prefill program (forward pass, first-token sampling and the KV laid
out in pages and sharded for hand-off: everything a prefill worker's device
does for one prompt) with device-resident inputs, and also the whole
``PrefillEngine.prefill`` call (host padding, uploads, the program and the
first token's download) as ``e2e``.

FLOPs are counted analytically, as the useful work of one causal prefill:

  linear    = 2 * T * L * (D*hd*(2*H + 2*K) + 3*D*F)     q,k,v,o + MLP
  attention = 2 * 2 * L * T^2 * H * hd / 2                QK^T and PV, causal
  lm_head   = 2 * D * V                                   last token only

(B = 1; L layers, D hidden, F MLP width, H query heads, K KV heads, hd head
dim, V vocabulary). Embedding lookups, norms, rotary and softmax are not
counted; a kernel that computes masked blocks of the causal triangle does
work this does not count. MFU = FLOPs / (time * limit * tp): the limit is
per device, so a TP=2 run is held to twice the rate.

Examples:
  # CPU, tiny model (lengths above --cpu_max_prompt_len are skipped):
  python tools/bench_prefill.py --model=tiny --prompt_lengths=64,128 --tp=1,2

  # GPU, Llama-3-8B shapes with random bf16 weights:
  python tools/bench_prefill.py --model=llama3-8b \
      --prompt_lengths=512,2048,8192 --tp=1,2 --out=/tmp/prefill.jsonl

  # ... and where each length's time goes: a profiler trace of a few calls,
  # their kernels summed by category (GEMMs, attention, fusions, copies):
  python tools/bench_prefill.py --model=llama3-8b --tp=1 --pause_ms=300 \
      --noe2e --trace_dir=/tmp/prefill_traces
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import bench_common as bc  # Sets up sys.path and XLA_FLAGS before jax.
from trace_kernels import aggregate, find_xplane, load_events

from absl import app, flags

bc.define_common_flags()
flags.DEFINE_string("prompt_lengths", "128,512,2048,8192",
                    "Prompt lengths (tokens), batch 1.")
flags.DEFINE_string("tp", "1,2", "Tensor-parallel degrees; those needing "
                    "more devices than exist are skipped.")
flags.DEFINE_integer("cpu_max_prompt_len", 512,
                     "On CPU, prompt lengths above this are skipped.")
flags.DEFINE_integer("page_size", 16, "KV page size of the engine.")
flags.DEFINE_enum("triton_gemm", "auto", ["auto", "on", "off"],
                  "GEMM kernels of the prefill programs on GPUs "
                  "(PrefillConfig.triton_gemm): on Triton, off cuBLAS.")
flags.DEFINE_enum("merge_dots", "auto", ["auto", "on", "off"],
                  "XLA's DotMerger in the prefill programs "
                  "(PrefillConfig.merge_dots; auto: off).")
flags.DEFINE_integer("pause_ms", 0, "The device left idle this long before "
                     "each timed call, the program's and the e2e call's "
                     "(0: back to back). A compute-bound "
                     "program run back to back may hold the GPU at its power "
                     "limit, at lower clocks than one-at-a-time serving "
                     "finds it.")
flags.DEFINE_bool("e2e", True, "Also time PrefillEngine.prefill() (the "
                  "host path around the same program).")
flags.DEFINE_string("trace_dir", None, "Also trace --trace_calls calls of "
                    "the program per prompt length (a folder each under "
                    "this one) and report their kernels by category and "
                    "the GEMMs' rate over the linear and LM head FLOPs "
                    "(tools/trace_kernels.py).")
flags.DEFINE_integer("trace_calls", 3, "Calls traced per prompt length "
                     "(--trace_dir), --pause_ms apart.")
FLAGS = flags.FLAGS

TOOL = "bench_prefill"


def _trace(call, T: int, flops: dict) -> dict:
  """Kernels of ``--trace_calls`` calls of the program: per call by
  category and the top ones, the GEMMs' rate over the linear and LM head
  FLOPs, attention's over its own."""
  import jax
  trace_dir = Path(FLAGS.trace_dir) / f"T{T}"
  n = max(FLAGS.trace_calls, 1)
  jax.profiler.start_trace(str(trace_dir))
  try:
    for _ in range(n):
      if FLAGS.pause_ms:
        time.sleep(FLAGS.pause_ms / 1000)
      jax.block_until_ready(call())
  finally:
    jax.profiler.stop_trace()
  agg = aggregate(load_events(find_xplane(trace_dir))["events"], n)
  cats = {k: v["us_per_step"] for k, v in agg["categories"].items()}

  def rate(fl, cat):
    us = cats.get(cat)
    return fl / (us * 1e-6) if us else None

  return {"trace_dir": str(trace_dir), "calls": n,
          "kernel_us_per_call": agg["kernel_us_per_step"],
          "busy_us_per_call": agg["busy_us_per_step"],
          "us_per_call_by_category": cats,
          "gemm_flops_per_s": rate(flops["linear"] + flops["lm_head"],
                                   "gemm"),
          "attention_flops_per_s": rate(flops["attention"], "attention"),
          "top": [{k: r[k] for k in ("name", "category", "count_per_step",
                                     "us_per_step", "share")}
                  for r in agg["kernels"][:25]]}


def _run_one(engine, params, cfg, tp, T, limits, writer):
  """Times one (tp, T) pair; returns its record."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec
  from pdjax.engine import compile_stats
  from pdjax.engine.prefill import pack_inputs
  from pdjax.engine.requests import PrefillRequest
  from pdjax.engine.sampling import SamplingArrays, SamplingParams

  rng = np.random.default_rng(FLAGS.seed + T)
  prompt = rng.integers(3, cfg.vocab_size, T).astype(np.int32)
  rep = NamedSharding(engine.mesh, PartitionSpec())
  greedy = SamplingParams(max_tokens=1, temperature=0.0)
  packed = jax.device_put(pack_inputs(
      prompt[None, :], np.array([T], np.int32),
      SamplingArrays.stack([(greedy, 0)], 1)), rep)
  # The engine's own jitted programs (private attributes: the engine has no
  # public handle on them yet): the prefill, then the greedy first token.
  program = engine._prefill  # pylint: disable=protected-access
  first_token = engine._first_token[True]  # pylint: disable=protected-access

  def call():
    logits, cols, rows = program(params, packed)
    return first_token(logits, cols), rows

  with compile_stats.CompileCounter() as cc:
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    first_s = time.perf_counter() - t0
  with compile_stats.CompileCounter() as timed_cc:
    t = bc.time_calls(call, warmup=FLAGS.warmup, repeat=FLAGS.repeat,
                      pause_s=FLAGS.pause_ms / 1000)
  e2e = None
  if FLAGS.e2e:
    req = [PrefillRequest("bench", prompt.tolist(), greedy)]
    e2e = bc.time_calls(lambda: engine.prefill(req)[0].kv.kv,
                        warmup=1, repeat=FLAGS.repeat,
                        pause_s=FLAGS.pause_ms / 1000)
  fl = bc.prefill_flops(cfg, 1, T)
  traced = _trace(call, T, fl) if FLAGS.trace_dir else None
  sec = t.median
  achieved = fl["total"] / sec

  def per_dev(limit):
    return None if limit is None else limit * tp

  results = {
      "time_s": t.as_dict(), "e2e_time_s": e2e.as_dict() if e2e else None,
      "compile_s": cc.seconds, "first_call_s": first_s,
      "compiles_during_timing": timed_cc.count,
      "tokens_per_s": T / sec, "flops": fl, "achieved_flops": achieved,
      "mfu": bc.ratio(achieved, per_dev(limits.matmul_flops)),
      "mfu_spec": bc.ratio(achieved, per_dev(limits.spec_matmul_flops)),
      "mfu_run_ceiling": bc.ratio(achieved, per_dev(limits.run_matmul_flops)),
      "kernels": traced,
  }
  params_rec = {"tp": tp, "prompt_len": T, "batch": 1,
                "page_size": FLAGS.page_size, "warmup": FLAGS.warmup,
                "repeat": FLAGS.repeat, "pause_ms": FLAGS.pause_ms,
                "rules": "prefill_tp",
                "program": "PrefillEngine._prefill + _first_token",
                "triton_gemm": FLAGS.triton_gemm,
                "merge_dots": FLAGS.merge_dots,
                "fused_projections": cfg.fused_projections,
                "compiler_options": engine.compiler_options}
  return writer.write(TOOL, "prefill", params_rec, results)


def main(argv) -> None:
  del argv
  import jax
  from pdjax.engine.prefill import PrefillConfig, PrefillEngine
  from pdjax.sharding import ShardingRules, make_mesh

  cfg = bc.model_from_flags()
  limits = bc.resolve_limits()
  writer = bc.RecordWriter(FLAGS.out, model=FLAGS.model, cfg=cfg,
                           limits=limits)
  if FLAGS.measure_ceilings:
    bc.measure_ceilings(limits, writer, TOOL)
  devices = jax.devices()
  lengths = bc.parse_ints(FLAGS.prompt_lengths)
  if not bc.is_gpu():
    skipped = [n for n in lengths if n > FLAGS.cpu_max_prompt_len]
    if skipped:
      print(f"CPU: skipping prompt lengths {skipped} (> "
            f"--cpu_max_prompt_len={FLAGS.cpu_max_prompt_len})")
    lengths = [n for n in lengths if n <= FLAGS.cpu_max_prompt_len]
  P = FLAGS.page_size
  lengths = sorted({-(-n // P) * P for n in lengths})
  rules = ShardingRules.load("prefill_tp")
  print(f"prefill benchmark: {cfg.name} ({cfg.param_count() / 1e9:.2f}B "
        f"params, {cfg.dtype}) on {len(devices)} x {bc.device_kind()}; "
        f"limits: {limits.source}", flush=True)
  for tp in bc.parse_ints(FLAGS.tp):
    if tp > len(devices):
      print(f"tp={tp}: skipped, only {len(devices)} device(s)")
      writer.write(TOOL, "skipped", {"tp": tp},
                   {"reason": f"needs {tp} devices, {len(devices)} exist"})
      continue
    mesh = make_mesh({"tp": tp}, devices[:tp])
    t0 = time.perf_counter()
    params, run_cfg = bc.benchmark_weights(cfg, rules, mesh, seed=FLAGS.seed)
    print(f"tp={tp}: weights ready in {time.perf_counter() - t0:.1f} s",
          flush=True)
    engine = PrefillEngine(params, run_cfg, mesh, rules, PrefillConfig(
        buckets=tuple(lengths), max_batch=1, page_size=P,
        max_seq_len=lengths[-1] + P, triton_gemm=FLAGS.triton_gemm,
        merge_dots=FLAGS.merge_dots))
    for T in lengths:
      rec = _run_one(engine, params, run_cfg, tp, T, limits, writer)
      r = rec["results"]
      print(f"  tp={tp} T={T}: {r['time_s']['median'] * 1e3:.2f} ms, "
            f"{r['achieved_flops'] / 1e12:.2f} TFLOP/s, MFU "
            f"{bc.fmt(r['mfu'], '.1%')} (compile {r['compile_s']:.1f} s)",
            flush=True)
      if r["kernels"]:
        k = r["kernels"]
        cats = sorted(k["us_per_call_by_category"].items(),
                      key=lambda i: -i[1])
        gemm = k["gemm_flops_per_s"]
        print("    kernels per call (us): "
              + ", ".join(f"{c} {us:.0f}" for c, us in cats)
              + f"; busy {k['busy_us_per_call']:.0f}; GEMMs "
              f"{bc.fmt(gemm and gemm / 1e12, '.0f')} TFLOP/s", flush=True)
        for row in k["top"][:12]:
          print(f"      {row['us_per_step']:9.1f} us x{row['count_per_step']:g}"
                f"  {row['category']:9s} {row['name'][:90]}", flush=True)
    del engine, params
    gc.collect()
  _print_summary(writer.records, limits)


def _print_summary(records, limits) -> None:
  rows = [r for r in records if r["measurement"] == "prefill"]
  base = {r["params"]["prompt_len"]: r["results"]["time_s"]["median"]
          for r in rows if r["params"]["tp"] == 1}
  table = []
  for r in rows:
    p, x = r["params"], r["results"]
    sec = x["time_s"]["median"]
    speedup = (base[p["prompt_len"]] / sec if p["prompt_len"] in base
               else None)
    table.append([
        p["tp"], p["prompt_len"], bc.fmt(sec * 1e3, ".2f"),
        bc.fmt(x["e2e_time_s"]["median"] * 1e3 if x["e2e_time_s"] else None,
               ".2f"),
        bc.fmt(x["tokens_per_s"], ".0f"),
        bc.fmt(x["achieved_flops"] / 1e12, ".2f"),
        bc.fmt(x["mfu"], ".1%"), bc.fmt(x["mfu_spec"], ".1%"),
        bc.fmt(x["mfu_run_ceiling"], ".1%"),
        bc.fmt(speedup, ".2f"), bc.fmt(x["compile_s"], ".1f")])
  def tf(x):
    return bc.fmt(None if x is None else x / 1e12, ".4g")

  note = (f"MFU: achieved / (limit x tp). Limit per device (TFLOP/s): "
          f"measured {tf(limits.matmul_flops)} ({limits.source}), spec "
          f"{tf(limits.spec_matmul_flops)}, this run's ceiling "
          f"{tf(limits.run_matmul_flops)}. speedup = time(tp=1) / time(tp).")
  bc.print_table("prefill, batch 1 (median of timed calls)",
                 ["tp", "T", "ms", "e2e_ms", "tok/s", "TFLOP/s", "MFU",
                  "MFU_spec", "MFU_run", "speedup", "compile_s"], table,
                 note)


if __name__ == "__main__":
  app.run(main)
