r"""Pipeline-parallel decode: step time and bubble by stages and microbatches.

For each stage count ``pp`` (``--pp``) and microbatch count ``m``
(``--microbatches``), this builds a ``DecodeEngine`` of one replica over
``pp`` devices (``decode_dp_pp`` rules; pp=1 is the unpipelined
``decode_dp`` pool on one device, the baseline, timed once), fills its
``--batch`` rows with sequences at position ``--context`` through the
engine's own admission path (a zero request KV, placed split by stage,
submitted B times), and times the replica's generate call as
``tools/bench_decode.py`` does: ``--calls_per_sample`` calls dispatched
back to back, then one wait; the median sample / ``--steps_per_call`` is the
step time.

A pipelined step is ``m + pp - 1`` ticks; at each a stage runs its
``L / pp`` layers on one microbatch of ``ceil(B / m)`` rows. Two views of
the bubble:

* ``bubble_ideal = (pp - 1) / (m + pp - 1)``: the stages' idle share when
  every tick costs the same and stages run at once on their own devices.
* ``bubble_measured = 1 - T1 / (pp * T_pp)``: the share of the pipelined
  step (T_pp) a perfect split of the unpipelined step (T1, same rows, one
  device) over pp devices would not need. It holds the bubble and every
  other cost of pipelining (stage hand-offs, smaller matmuls per
  microbatch, padding rows).
* ``work_ratio = T_pp / T1`` against ``work_ratio_ideal = (m + pp - 1) /
  m``: where the stages' devices share the same cores (CPU virtual
  devices), they cannot run at once, and fill and drain ticks (which the
  pipelined step computes on placeholder input) cost as much as others, so
  the step is the total work of all ticks: ideally (m + pp - 1) / m times
  the unpipelined step's. This is the figure a CPU run can check.

Examples:
  python tools/bench_pipeline.py --num_layers=8 --pp=1,2,4 \
      --microbatches=1,2,4,8 --batch=8 --context=64
  python tools/bench_pipeline.py --model=llama3-8b --pp=1,2,4,8 \
      --microbatches=1,2,4,8 --batch=64 --context=1024 --out=/tmp/pp.jsonl
"""

from __future__ import annotations

import dataclasses
import gc
import time
import traceback

import bench_common as bc  # Sets up sys.path and XLA_FLAGS before jax.

from absl import app, flags

bc.define_common_flags()
flags.DEFINE_string("pp", "1,2,4", "Pipeline stages (1: the unpipelined "
                    "baseline on one device).")
flags.DEFINE_string("microbatches", "1,2,4,8",
                    "Microbatches per pipelined step "
                    "(DecodeConfig.num_microbatches).")
flags.DEFINE_integer("batch", 8, "Rows of the replica, all live.")
flags.DEFINE_integer("context", 64, "Tokens in each row's KV when timing "
                     "starts.")
flags.DEFINE_integer("num_layers", None,
                     "Override the model's layer count (the tiny preset has "
                     "2 layers; pp=4 needs a multiple of 4).")
flags.DEFINE_integer("steps_per_call", 4, "Decode steps per generate call.")
flags.DEFINE_integer("calls_per_sample", 2,
                     "Generate calls dispatched back to back per sample.")
flags.DEFINE_integer("page_size", 16, "KV page size.")
FLAGS = flags.FLAGS

TOOL = "bench_pipeline"


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _dcfg(m: int):
  """One program (one row count, one table width) whose B rows stay live
  for every call the measurement makes."""
  from pdjax.engine.decode import DecodeConfig
  B, C, S, P = FLAGS.batch, FLAGS.context, FLAGS.steps_per_call, \
      FLAGS.page_size
  calls = 2 + FLAGS.warmup + max(FLAGS.repeat, 1) * FLAGS.calls_per_sample
  max_seq_len = _round_up(C + S * calls + 2, P)
  M = max_seq_len // P
  return DecodeConfig(max_seqs=B, page_size=P, num_pages=B * M + 1,
                      max_seq_len=max_seq_len, steps_per_call=S,
                      table_buckets=(M,), row_buckets=(B,),
                      attention="gather", num_microbatches=m), calls


def measure(params, cfg, mesh, rules, m: int) -> dict:
  """Times one engine's generate call; returns the results record part."""
  import jax
  import numpy as np
  from pdjax.engine import compile_stats
  from pdjax.engine.decode import DecodeEngine
  from pdjax.engine.decode_programs import unpack_step_output
  from pdjax.engine.requests import DecodeRequest, RequestKV
  from pdjax.engine.sampling import SamplingParams

  B, C, S = FLAGS.batch, FLAGS.context, FLAGS.steps_per_call
  dcfg, calls = _dcfg(m)
  engine = DecodeEngine(params, cfg, mesh, rules, dcfg, eos_ids=())
  rep = engine.replicas[0]
  try:
    kv = bc.zero_request_kv(engine, cfg, C)
    greedy = SamplingParams(max_tokens=dcfg.max_seq_len - C, temperature=0.0,
                            ignore_eos=True)
    first = np.random.default_rng(FLAGS.seed).integers(3, cfg.vocab_size, B)
    for i in range(B):
      res = engine.reserve(f"bench-{i}", C, greedy.max_tokens)
      if res is None:
        raise RuntimeError(f"decode pool refused row {i} of {B}")
      engine.submit(DecodeRequest(
          f"bench-{i}", range(C), int(first[i]), 0.0, RequestKV(kv, C),
          greedy, i, lambda ev: None, reservation=res))
    with compile_stats.CompileCounter() as cc:
      engine.step()                       # inserts + the compiling call
      jax.block_until_ready(rep.state)
    engine.step()                         # delivers the first call
    for _ in range(FLAGS.warmup):
      jax.block_until_ready(rep.dispatch().out)
    samples = []
    with compile_stats.CompileCounter() as timed_cc:
      for _ in range(max(FLAGS.repeat, 1)):
        t0 = time.perf_counter()
        for _ in range(FLAGS.calls_per_sample):
          out = rep.dispatch().out
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / FLAGS.calls_per_sample)
    valid = unpack_step_output(out).valid
    positions = np.asarray(rep.state.positions)
    rows_ok = (bool(valid[:, :B].all())
               and bool((positions[:B] == C + S * calls).all()))
    stages = engine.programs.stages
    microbatches = engine.programs.num_microbatches if stages > 1 else 1
  finally:
    del engine, rep
    gc.collect()
  timing = bc.Timing(samples)
  return {"call_time_s": timing.as_dict(), "step_time_s": timing.median / S,
          "compile_s": cc.seconds, "compiles_during_timing": timed_cc.count,
          "rows_live_every_step": rows_ok, "stages": stages,
          "microbatches": microbatches}


def main(argv) -> None:
  del argv
  import jax
  from pdjax.model.pipeline import bubble_fraction, microbatch_rows
  from pdjax.sharding import ShardingRules, make_mesh

  cfg = bc.model_from_flags()
  if FLAGS.num_layers:
    cfg = dataclasses.replace(cfg, num_layers=FLAGS.num_layers)
  limits = bc.resolve_limits()
  writer = bc.RecordWriter(FLAGS.out, model=FLAGS.model, cfg=cfg,
                           limits=limits)
  stage_counts = bc.parse_ints(FLAGS.pp)
  micro = bc.parse_ints(FLAGS.microbatches)
  print(f"pipeline benchmark: {cfg.name} ({cfg.num_layers} layers, "
        f"{cfg.dtype}) on {len(jax.devices())} x {bc.device_kind()}; "
        f"B={FLAGS.batch} C={FLAGS.context} S={FLAGS.steps_per_call}",
        flush=True)
  if 1 not in stage_counts:
    stage_counts = [1] + stage_counts     # the baseline every ratio needs
  t1 = None
  for pp in stage_counts:
    params_base = {"pp": pp, "batch": FLAGS.batch, "context": FLAGS.context,
                   "steps_per_call": FLAGS.steps_per_call,
                   "calls_per_sample": FLAGS.calls_per_sample,
                   "page_size": FLAGS.page_size, "warmup": FLAGS.warmup,
                   "repeat": FLAGS.repeat,
                   "rules": "decode_dp" if pp == 1 else "decode_dp_pp"}
    if cfg.num_layers % pp or pp > len(jax.devices()):
      reason = (f"{cfg.num_layers} layers do not split into {pp} stages"
                if cfg.num_layers % pp else
                f"{pp} stages need {pp} devices")
      print(f"  pp={pp}: skipped, {reason}", flush=True)
      writer.write(TOOL, "skipped", params_base, {"reason": reason})
      continue
    name = "decode_dp" if pp == 1 else "decode_dp_pp"
    rules = ShardingRules.load(name)
    axes = {"dp": 1} if pp == 1 else {"dp": 1, "pp": pp}
    mesh = make_mesh(axes, jax.devices()[:pp])
    params = bc.random_params(cfg, rules, mesh, seed=FLAGS.seed)
    for m in ([1] if pp == 1 else micro):
      p = {**params_base, "microbatches": m,
           "microbatch_rows": microbatch_rows(FLAGS.batch, m)}
      try:
        x = measure(params, cfg, mesh, rules, m)
      except Exception as e:  # pylint: disable=broad-except
        print(f"  pp={pp} m={m}: FAILED: {str(e)[:300]}", flush=True)
        traceback.print_exc()
        writer.write(TOOL, "error", p, {"error": str(e)[:2000]})
        continue
      step = x["step_time_s"]
      if pp == 1:
        t1 = step
      x["bubble_ideal"] = bubble_fraction(pp, m)
      x["work_ratio_ideal"] = (m + pp - 1) / m
      x["baseline_step_time_s"] = t1
      x["bubble_measured"] = None if t1 is None else 1.0 - t1 / (pp * step)
      x["work_ratio"] = None if t1 is None else step / t1
      writer.write(TOOL, "pipeline", p, x)
      print(f"  pp={pp} m={m}: step {step * 1e3:.3f} ms, bubble measured "
            f"{bc.fmt(x['bubble_measured'], '.3f')} (ideal "
            f"{x['bubble_ideal']:.3f}), T/T1 {bc.fmt(x['work_ratio'], '.2f')}"
            f" (ideal {x['work_ratio_ideal']:.2f}), compile "
            f"{x['compile_s']:.1f} s"
            + ("" if x["rows_live_every_step"] else
               "  WARNING: rows finished early"), flush=True)
    del params
    gc.collect()
  _print_summary(writer.records)


def _print_summary(records) -> None:
  rows = []
  for r in records:
    if r["measurement"] != "pipeline":
      continue
    p, x = r["params"], r["results"]
    rows.append([p["pp"], p["microbatches"], p["microbatch_rows"],
                 bc.fmt(x["step_time_s"] * 1e3, ".3f"),
                 bc.fmt(x["bubble_ideal"], ".3f"),
                 bc.fmt(x["bubble_measured"], ".3f"),
                 bc.fmt(x["work_ratio_ideal"], ".2f"),
                 bc.fmt(x["work_ratio"], ".2f"),
                 "ok" if x["rows_live_every_step"] else "ROWS-ENDED"])
  bc.print_table(
      "pipelined decode step (median), one replica",
      ["pp", "m", "rows/mb", "step_ms", "bubble_ideal", "bubble_meas",
       "T/T1_ideal", "T/T1", "rows"], rows,
      "bubble_ideal = (pp-1)/(m+pp-1); bubble_meas = 1 - T1/(pp*T); "
      "T/T1_ideal = (m+pp-1)/m (stages sharing cores). T1: pp=1.")
  skipped = [r for r in records if r["measurement"] in ("skipped", "error")]
  if skipped:
    print("not measured: " + ", ".join(
        f"pp={r['params']['pp']} ({r['measurement']})" for r in skipped))


if __name__ == "__main__":
  app.run(main)
