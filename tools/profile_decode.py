r"""Where a decode step's device time goes: a profiler trace of the generate
call, per kernel and per category, next to the HBM roofline.

``bench_decode`` says how far a step is from its roofline; this says which
kernels the gap is in. For each batch size B and context length C it builds
the same engine and layout as ``bench_decode`` (its ``_layout``, ``_fill``
and ``_step_bytes``, with its flags and defaults: ``--batch_sizes``,
``--context_lengths``, ``--steps_per_call``, ``--attention``,
``--triton_gemm``, ``--model`` ...), runs the first two iterations (insert,
compile) and ``--warmup`` calls, times ``--trace_calls`` calls without the
profiler, then traces the same number of calls with ``jax.profiler.trace``
(dispatched back to back, one wait, as bench_decode times them) and reads
the trace's ``*.xplane.pb`` with ``jax.profiler.ProfileData``.

What is counted, by where the trace has it:

* GPU: the kernels (and memcpys) on the device plane's stream lines
  (``/device:GPU:N``, lines named ``Stream #...``); if there are none, the
  plane's ``XLA Ops`` line.
* No device plane (CPU): the host events that carry an ``hlo_op`` stat (the
  XLA CPU runtime's thunks), leaves only (a while loop's thunk encloses its
  body's), so the tool runs end to end on CPU with the tiny model.

Per point: the wall time per step (traced and untraced), the sum of kernel
durations per step and the union of their intervals (busy: the device is
doing something; wall - busy is launch gaps and host waits), the kernels by
time per step with their count per step and share of the kernel sum, the
same grouped into the categories of ``trace_kernels.CATEGORIES`` (first pattern that
matches the kernel's name or its XLA op's name wins), and the roofline of
``bench_decode._step_bytes`` at ``--hbm_tbps`` (default: the device's
datasheet, ``bench_common.SPEC_LIMITS``: H100 SXM 3.35, H200 4.8), split so
the GEMMs can be held against the bytes of the weights they multiply by
(``matmul_params_per_token`` + the LM head) and attention against the KV
bytes.

Inside a CUDA graph (XLA's command buffers, on by default) a kernel's
event names only its command buffer as its XLA op; ``--nocommand_buffers``
runs without them so the table's "jax op" column says where in the model
each kernel comes from (the step then also pays one launch per kernel, which
the busy time leaves out).

``--out`` here is one JSON file (overwritten): ``{"tool", "points": [...]}``,
each point a bench_common record (environment, model, limits, params) whose
results hold all of the above and every kernel name's aggregate. The traces
stay under ``--trace_dir`` (TensorBoard / Perfetto can open them).

Example (GPU):
  python tools/profile_decode.py --model=llama3-8b --batch_sizes=32 \
      --context_lengths=1024 --out=/tmp/profile.json
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_common as bc  # Sets up sys.path and XLA_FLAGS before jax.
import bench_decode as bd  # Defines bench_decode's flags: same names.
from trace_kernels import (aggregate, cell, find_xplane, jax_op_label,
                           load_events)

from absl import app, flags

flags.DEFINE_integer("trace_calls", 3,
                     "Generate calls in the trace (and in the untraced "
                     "timing before it).")
flags.DEFINE_string("trace_dir", None,
                    "Where the traces are written, one folder per point "
                    "(default: a new temporary folder, kept).")
flags.DEFINE_float("hbm_tbps", None,
                   "HBM bandwidth (TB/s) of the rooflines. Default: the "
                   "device's datasheet (H100 SXM 3.35, H200 4.8; "
                   "--spec_hbm_bw where given); none on CPU.")
flags.DEFINE_integer("top", 25, "Rows of the printed kernel table.")
flags.DEFINE_bool("command_buffers", True,
                  "False: XLA runs without CUDA graphs "
                  "(--xla_gpu_enable_command_buffer= in XLA_FLAGS), so each "
                  "kernel's trace event names its XLA op and JAX op (inside "
                  "a graph they only name the command buffer); the step "
                  "then also pays a launch per kernel.")
FLAGS = flags.FLAGS

TOOL = "profile_decode"

def gemm_weight_bytes(cfg) -> float:
  """Bytes of the weights the step's GEMMs multiply by: the layers'
  projections and MLP, and the LM head (tied or not, it is read whole)."""
  item = bc.param_bytes(cfg)["embed"] // (cfg.vocab_size * cfg.hidden_size)
  return float((bc.matmul_params_per_token(cfg)
                + cfg.vocab_size * cfg.hidden_size) * item)


def roofline(cfg, B: int, ctx_mean: float, bw: float | None,
             agg: dict[str, Any], wall_step_s: float) -> dict[str, Any]:
  """The step's bytes (``bench_decode._step_bytes``) and their time at
  ``bw``; GEMM time against the GEMM weights' bytes, attention against the
  KV bytes. Times are None without a bandwidth."""
  by = bd._step_bytes(cfg, B, ctx_mean)  # pylint: disable=protected-access
  gemm_b = gemm_weight_bytes(cfg)
  cats = agg["categories"]

  def vs(us, nbytes):
    return {"us_per_step": us, "bytes": nbytes,
            "roofline_us": None if not bw else nbytes / bw * 1e6,
            "ratio": bc.ratio(us, None if not bw else nbytes / bw * 1e6),
            "achieved_bw": nbytes / (us * 1e-6) if us else None}

  roof = by["total"] / bw if bw else None
  return {"hbm_bw": bw, "bytes_per_step": by, "ctx_mean": ctx_mean,
          "roofline_s": roof,
          "ratio_wall": bc.ratio(wall_step_s, roof),
          "ratio_kernels": bc.ratio(agg["kernel_us_per_step"] * 1e-6, roof),
          "ratio_busy": bc.ratio(agg["busy_us_per_step"] * 1e-6, roof),
          "gemm": vs(cats["gemm"]["us_per_step"], gemm_b),
          "attention": vs(cats["attention"]["us_per_step"], by["kv"])}


# ------------------------------------------------------------------ running
def _calls_needed() -> int:
  """Generate calls a point makes: two setup iterations, the warm-up, the
  untraced timing and the trace."""
  return 2 + FLAGS.warmup + 2 * FLAGS.trace_calls


def _timed_calls(call, n: int) -> float:
  """Wall seconds of n calls dispatched back to back, then one wait."""
  import jax
  t0 = time.perf_counter()
  for _ in range(n):
    out = call()
  jax.block_until_ready(out)
  return time.perf_counter() - t0


def _setup(params, cfg, mesh, rules, B: int, C: int, S: int):
  """bench_decode's engine at (B, C, S), filled, past its first two
  iterations (insert + compile, first delivery) and the warm-up."""
  import jax
  dcfg, mem = bd._layout(cfg, B, C, S)  # pylint: disable=protected-access
  if _calls_needed() > mem["total_calls"]:
    raise ValueError(
        f"{_calls_needed()} calls need more room than bench_decode's layout "
        f"leaves ({mem['total_calls']} calls): raise --repeat or "
        "--calls_per_sample, or lower --trace_calls/--warmup")
  engine = bd.new_engine(params, cfg, mesh, rules, dcfg)
  rep = engine.replicas[0]
  setup_s = bd.first_iteration(engine, cfg, B, C)
  engine.step()
  call = bd.timed_call(engine)
  for _ in range(FLAGS.warmup):
    jax.block_until_ready(call())
  return engine, rep, call, dcfg, mem, setup_s


def profile_point(params, cfg, mesh, rules, B: int, C: int, S: int,
                  limits, bw: float | None, trace_root: Path,
                  writer) -> dict[str, Any]:
  """Sets up, times, traces and aggregates one (B, C, S) point; writes its
  record to ``writer`` and returns it."""
  import jax
  from pdjax.engine import compile_stats
  n = max(FLAGS.trace_calls, 1)
  params_rec = {"batch": B, "program_rows": bd.program_rows(B),
                "context": C, "steps_per_call": S,
                "trace_calls": n, "warmup": FLAGS.warmup,
                "page_size": FLAGS.page_size, "attention": FLAGS.attention,
                "triton_gemm": FLAGS.triton_gemm,
                "temperature": FLAGS.temperature,
                "sampling_path": FLAGS.sampling_path,
                "timed_call": FLAGS.timed,
                "command_buffers": FLAGS.command_buffers}
  engine, rep, call, dcfg, mem, setup_s = _setup(params, cfg, mesh, rules,
                                                 B, C, S)
  trace_dir = trace_root / f"B{B}_C{C}_S{S}"
  try:
    untraced_s = _timed_calls(call, n)
    with compile_stats.CompileCounter() as cc:
      jax.profiler.start_trace(str(trace_dir))
      try:
        traced_s = _timed_calls(call, n)
      finally:
        jax.profiler.stop_trace()
    paged = engine.programs.paged_attention[engine.dcfg.max_seqs]
  finally:
    del engine, rep, call
    gc.collect()
  xplane = find_xplane(trace_dir)
  found = load_events(xplane)
  steps = n * S
  agg = aggregate(found["events"], steps)
  wall_step_s = traced_s / steps
  # KV length during a step is position + 1; the trace's steps follow the
  # two setup iterations, the warm-up and the untraced calls.
  ctx_mean = C + S * (2 + FLAGS.warmup + n) + (steps - 1) / 2 + 1
  results = {
      "wall_step_s": wall_step_s, "wall_step_untraced_s": untraced_s / steps,
      "setup_s": setup_s, "compiles_during_trace": cc.count,
      "paged_attention": paged, "max_seq_len": dcfg.max_seq_len,
      "num_pages": dcfg.num_pages, "source": found["source"],
      "trace_dir": str(trace_dir), "xplane": str(xplane),
      "planes": found["planes"], "lines": found["lines"],
      "busy_fraction_of_wall": bc.ratio(agg["busy_us_per_step"] * 1e-6,
                                        wall_step_s),
      "roofline": roofline(cfg, B, ctx_mean, bw, agg, wall_step_s),
      "roofline_bench_bw": roofline(cfg, B, ctx_mean, limits.hbm_bw, agg,
                                    wall_step_s),
      **agg,
      "top": [{k: r[k] for k in ("name", "category", "count_per_step",
                                 "us_per_step", "share", "ops", "jax_ops")}
              for r in agg["kernels"][:FLAGS.top]],
      "kv_gathered_bytes": mem["kv_gathered_bytes"],
      "pool_bytes": mem["pool_bytes"]}
  return writer.write(TOOL, "profile", params_rec, results)


# ------------------------------------------------------------------ printing
def _us(x) -> str:
  return bc.fmt(x, ".1f")


def print_point(rec: dict[str, Any]) -> None:
  """The point's summary lines, its categories and its top kernels."""
  p, x = rec["params"], rec["results"]
  r, rb = x["roofline"], x["roofline_bench_bw"]
  head = f"B={p['batch']} C={p['context']} S={p['steps_per_call']}"
  print(f"\n#### {head}: {p['trace_calls']} calls x {p['steps_per_call']} "
        f"steps traced; source: {x['source']} ({len(x['lines'])} lines, "
        f"{x['num_events']} events); paged attention: "
        f"{x['paged_attention']}")
  busy = x["busy_fraction_of_wall"]
  print(f"  wall {_us(x['wall_step_s'] * 1e6)} us/step (untraced "
        f"{_us(x['wall_step_untraced_s'] * 1e6)}), kernel sum "
        f"{_us(x['kernel_us_per_step'])} us/step, busy (union) "
        f"{_us(x['busy_us_per_step'])} us/step = "
        f"{bc.fmt(busy and 100 * busy, '.0f')}% of wall")
  for label, rr in (("--hbm_tbps", r), ("bench_decode's hbm_bw", rb)):
    if not rr["hbm_bw"]:
      continue
    print(f"  roofline at {rr['hbm_bw'] / 1e12:.2f} TB/s ({label}): "
          f"{_us(rr['roofline_s'] * 1e6)} us (weights "
          f"{rr['bytes_per_step']['weights'] / 1e6:.1f} MB + KV "
          f"{rr['bytes_per_step']['kv'] / 1e6:.1f} MB); wall/roof "
          f"{bc.fmt(rr['ratio_wall'], '.2f')}, kernels/roof "
          f"{bc.fmt(rr['ratio_kernels'], '.2f')}, busy/roof "
          f"{bc.fmt(rr['ratio_busy'], '.2f')}")
    for name, bytes_of in (("gemm", "GEMM weights"), ("attention", "KV")):
      g = rr[name]
      print(f"    {name}: {_us(g['us_per_step'])} us/step vs {bytes_of} "
            f"{g['bytes'] / 1e6:.1f} MB / bw = {_us(g['roofline_us'])} us "
            f"-> {bc.fmt(g['ratio'], '.2f')}x ("
            f"{bc.fmt(g['achieved_bw'] and g['achieved_bw'] / 1e12, '.2f')}"
            " TB/s)")
  if not r["hbm_bw"] and not rb["hbm_bw"]:
    print("  roofline: n/a (no bandwidth for this device; --hbm_tbps)")
  bc.print_table(
      f"{head}: categories (per step)",
      ["category", "count", "us", "share"],
      [[c, bc.fmt(v["count_per_step"], ".2f"), _us(v["us_per_step"]),
        f"{100 * v['share']:.1f}%"]
       for c, v in sorted(x["categories"].items(),
                          key=lambda kv: -kv[1]["us_per_step"])])
  bc.print_table(
      f"{head}: top {len(x['top'])} of {len(x['kernels'])} kernels "
      "(per step)",
      ["kernel", "category", "count", "us", "share", "jax op"],
      [[cell(k["name"]), k["category"], bc.fmt(k["count_per_step"], ".2f"),
        _us(k["us_per_step"]), f"{100 * k['share']:.1f}%",
        cell(jax_op_label(k), 44, left=True)]
       for k in x["top"]])
  if len(x["modules"]) > 1:
    bc.print_table(f"{head}: XLA modules (per step)",
                   ["module", "count", "us", "share"],
                   [[cell(m), bc.fmt(v["count_per_step"], ".2f"),
                     _us(v["us_per_step"]), f"{100 * v['share']:.1f}%"]
                    for m, v in x["modules"].items()])


# ------------------------------------------------------------------ main
def _bandwidth(limits) -> float | None:
  """--hbm_tbps in B/s, else the device's datasheet figure."""
  if FLAGS.hbm_tbps:
    return FLAGS.hbm_tbps * 1e12
  return limits.spec_hbm_bw


def _disable_command_buffers() -> None:
  """Appends the XLA flag that turns CUDA graphs off. XLA reads XLA_FLAGS
  when the backend starts, so this must run before jax touches a device."""
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_gpu_enable_command_buffer=").strip()


def main(argv) -> None:
  del argv
  if not FLAGS.command_buffers:
    _disable_command_buffers()
  import jax
  from pdjax.sharding import ShardingRules, make_mesh
  cfg = bc.model_from_flags()
  limits = bc.resolve_limits()
  bw = _bandwidth(limits)
  writer = bc.RecordWriter(None, model=FLAGS.model, cfg=cfg, limits=limits)
  batches, contexts = bd.grid()
  trace_root = Path(FLAGS.trace_dir or tempfile.mkdtemp(prefix=TOOL + "_"))
  rules = ShardingRules.load("decode_dp")
  mesh = make_mesh({"dp": 1}, jax.devices()[:1])
  params, cfg = bc.benchmark_weights(cfg, rules, mesh, seed=FLAGS.seed)
  budget = bc.hbm_budget_bytes(FLAGS.hbm_gib)
  print(f"profile_decode: {cfg.name} ({cfg.param_count() / 1e9:.2f}B, "
        f"{cfg.dtype}) on {bc.device_kind()}; bandwidth "
        f"{bc.fmt(bw and bw / 1e12, '.2f')} TB/s; traces under {trace_root}",
        flush=True)
  S = FLAGS.steps_per_call
  for C in contexts:
    for B in batches:
      mem = bd._layout(cfg, B, C, S)[1]  # pylint: disable=protected-access
      need = mem["estimated_need_bytes"]
      if need > budget:
        print(f"  B={B} C={C}: skipped, needs ~{need / 2**30:.1f} GiB of "
              f"{budget / 2**30:.1f}", flush=True)
        continue
      try:
        rec = profile_point(params, cfg, mesh, rules, B, C, S, limits, bw,
                            trace_root, writer)
      except Exception as e:  # pylint: disable=broad-except
        # One point's OOM or failure leaves the others to run.
        print(f"  B={B} C={C}: FAILED: {str(e)[:300]}", flush=True)
        writer.write(TOOL, "error", {"batch": B, "context": C,
                                     "steps_per_call": S},
                     {"error": str(e)[:2000]})
        gc.collect()
        continue
      print_point(rec)
  if FLAGS.out:
    Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.out).write_text(json.dumps(
        {"tool": TOOL, "points": writer.records}, indent=1))
    print(f"\nwrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
