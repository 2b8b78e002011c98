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
same grouped into the categories of ``CATEGORIES`` (first pattern that
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

import collections
import gc
import json
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import bench_common as bc  # Sets up sys.path and XLA_FLAGS before jax.
import bench_decode as bd  # Defines bench_decode's flags: same names.

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

# Category of a kernel: the first whose pattern matches (case-insensitive)
# "<kernel name> <XLA op name>". Order matters: cuDNN's attention kernels
# have "wgmma"/"gemm" in their names, XLA's fusions of copies end in
# "_fusion".
CATEGORIES = (
    ("attention", r"cudnn|flash|fmha|sdpa|paged|attention"),
    ("gemm", r"cublas|gemm|gemv|cutlass|xmma|nvjet|splitk|matmul|\bdot"
             r"|triton"),
    ("copy", r"copy|memcpy|memset|dynamic[-_]slice|dynamic[-_]update[-_]slice"
             r"|scatter|gather|transpose|concatenate"),
    ("reduce_sort", r"sort|reduce|argmax|top_?k"),
    ("fusion", r"fusion|loop_|input_"),
)
OTHER = "other"
_COMPILED = tuple((name, re.compile(p, re.I)) for name, p in CATEGORIES)

# Device-plane lines that hold kernels; the fallback line of XLA ops.
KERNEL_LINE = re.compile(r"^(Stream #|Kernels$)")
OP_LINE = "XLA Ops"
DEVICE_PLANE = re.compile(r"^/device:(GPU|TPU):\d+")


class Event(NamedTuple):
  """One kernel (or op) execution from the trace, in ns."""
  name: str
  start_ns: float
  duration_ns: float
  op: str = ""        # the XLA op, where the trace says (hlo_op stat)
  module: str = ""    # the XLA program (hlo_module stat)
  line: str = ""      # plane/line it came from
  jax_op: str = ""    # the JAX op path (name stat), e.g. jit(f)/concatenate


def categorize(name: str, op: str = "") -> str:
  """The ``CATEGORIES`` entry of a kernel (``OTHER`` if none matches)."""
  text = f"{name} {op}"
  for cat, pattern in _COMPILED:
    if pattern.search(text):
      return cat
  return OTHER


# ------------------------------------------------------------------ parsing
def find_xplane(trace_dir: str | Path) -> Path:
  """The newest ``*.xplane.pb`` under a trace folder (jax writes it to
  plugins/profile/<date>/<host>.xplane.pb)."""
  found = sorted(Path(trace_dir).rglob("*.xplane.pb"),
                 key=lambda p: p.stat().st_mtime)
  if not found:
    raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
  return found[-1]


def _stats(obj) -> dict[str, Any]:
  """An event's or plane's stats as a dict (ProfileData yields pairs)."""
  with warnings.catch_warnings():
    # Python 3.12 warns once about the binding's stats type; noise only.
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
      return {str(k): v for k, v in obj.stats}
    except (TypeError, ValueError):
      return {}


def _to_events(line, plane_name: str, *, need_hlo_op: bool = False
               ) -> list[Event]:
  out = []
  for e in line.events:
    if e.duration_ns <= 0:
      continue
    st = _stats(e)
    if need_hlo_op and "hlo_op" not in st:
      continue
    out.append(Event(str(e.name), float(e.start_ns), float(e.duration_ns),
                     str(st.get("hlo_op", "")), str(st.get("hlo_module", "")),
                     f"{plane_name}/{line.name}", str(st.get("name", ""))))
  return out


def load_events(path: str | Path) -> dict[str, Any]:
  """Kernel events of a trace: {"source", "events", "lines", "planes"}.

  Lines are found by name (module docstring) since the layout differs by
  platform and JAX version; events seen on two lines at the same time with
  the same name are counted once."""
  import jax
  data = jax.profiler.ProfileData.from_file(str(path))
  planes = list(data.planes)
  devices = [p for p in planes if DEVICE_PLANE.match(p.name)]
  lines: dict[str, int] = {}
  events: list[Event] = []
  source = None
  for plane in devices:
    for line in plane.lines:
      if KERNEL_LINE.match(line.name):
        ev = _to_events(line, plane.name)
        lines[f"{plane.name}/{line.name}"] = len(ev)
        events += ev
  if events:
    source = "device kernels"
  else:
    for plane in devices:
      for line in plane.lines:
        if line.name == OP_LINE:
          ev = _to_events(line, plane.name)
          lines[f"{plane.name}/{line.name}"] = len(ev)
          events += ev
    source = "device XLA ops" if events else None
  if not events:
    for plane in planes:
      if DEVICE_PLANE.match(plane.name):
        continue
      for line in plane.lines:
        ev = leaf_events(_to_events(line, plane.name, need_hlo_op=True))
        if ev:
          lines[f"{plane.name}/{line.name}"] = len(ev)
          events += ev
    source = "host XLA ops (no device plane)" if events else "nothing found"
  return {"source": source, "events": dedupe(events), "lines": lines,
          "planes": [p.name for p in planes]}


def dedupe(events: Iterable[Event]) -> list[Event]:
  """Drops repeats of (name, start, duration): a kernel listed on two lines
  of one stream would otherwise count twice."""
  seen, out = set(), []
  for e in events:
    key = (e.name, e.start_ns, e.duration_ns)
    if key not in seen:
      seen.add(key)
      out.append(e)
  return out


def leaf_events(events: Iterable[Event]) -> list[Event]:
  """Events of one line that enclose no other event of it: on CPU a while
  loop's (or a call's) thunk spans its body's thunks, and counting both
  would count the body twice."""
  evs = sorted(events, key=lambda e: (e.start_ns, -e.duration_ns))
  parent = [False] * len(evs)
  stack: list[int] = []
  for i, e in enumerate(evs):
    while stack and (evs[stack[-1]].start_ns + evs[stack[-1]].duration_ns
                     <= e.start_ns):
      stack.pop()
    if stack:
      parent[stack[-1]] = True
    stack.append(i)
  return [e for e, p in zip(evs, parent) if not p]


def union_ns(events: Iterable[Event]) -> float:
  """Time covered by at least one event: overlapping kernels (two streams)
  count once, so this is the time the device was doing something."""
  total, end = 0.0, None
  for e in sorted(events, key=lambda e: e.start_ns):
    s, t = e.start_ns, e.start_ns + e.duration_ns
    if end is None or s >= end:
      total += e.duration_ns
      end = t
    elif t > end:
      total += t - end
      end = t
  return total


# ------------------------------------------------------------------ aggregation
def aggregate(events: list[Event], steps: int) -> dict[str, Any]:
  """Per kernel name, per category and per XLA module: count and time, per
  step (``steps`` decode steps in the trace), and share of the kernel sum.

  Returns {"steps", "num_events", "kernel_us_per_step",
  "busy_us_per_step", "kernels": [{name, category, count, count_per_step,
  total_us, us_per_step, share, ops, jax_ops}], "categories": {cat: row},
  "modules": {module: row}}, kernels sorted by time, largest first."""
  steps = max(int(steps), 1)
  total_ns = sum(e.duration_ns for e in events)
  by_name: dict[str, dict[str, Any]] = {}
  for e in events:
    k = by_name.setdefault(e.name, {"name": e.name, "count": 0, "ns": 0.0,
                                    "ops": collections.Counter(),
                                    "jax_ops": collections.Counter()})
    k["count"] += 1
    k["ns"] += e.duration_ns
    if e.op:
      k["ops"][e.op] += 1
    if e.jax_op:
      k["jax_ops"][e.jax_op] += 1
  kernels = []
  for k in by_name.values():
    ops = [op for op, _ in k["ops"].most_common()]
    cat = categorize(k["name"], " ".join(ops[:3]))
    jax_ops = [op for op, _ in k["jax_ops"].most_common(5)]
    kernels.append(_row({"name": k["name"], "category": cat,
                         "ops": ops[:5], "jax_ops": jax_ops}, k["count"],
                        k["ns"], steps, total_ns))
  kernels.sort(key=lambda r: -r["total_us"])
  cats = _group(kernels, lambda r: r["category"], steps, total_ns)
  mods = collections.defaultdict(lambda: [0, 0.0])
  for e in events:
    mods[e.module or "?"][0] += 1
    mods[e.module or "?"][1] += e.duration_ns
  modules = {m: _row({}, c, ns, steps, total_ns) for m, (c, ns) in
             sorted(mods.items(), key=lambda kv: -kv[1][1])}
  return {"steps": steps, "num_events": len(events),
          "kernel_us_per_step": total_ns / 1e3 / steps,
          "busy_us_per_step": union_ns(events) / 1e3 / steps,
          "kernels": kernels, "categories": cats, "modules": modules}


def _row(base: dict[str, Any], count: int, ns: float, steps: int,
         total_ns: float) -> dict[str, Any]:
  return {**base, "count": count, "count_per_step": count / steps,
          "total_us": ns / 1e3, "us_per_step": ns / 1e3 / steps,
          "share": ns / total_ns if total_ns else 0.0}


def _group(kernels, key, steps: int, total_ns: float) -> dict[str, Any]:
  """Sums of kernel rows by ``key``; every category appears (0 if unseen)
  so records of different points line up."""
  acc = {c: [0, 0.0] for c, _ in CATEGORIES}
  acc[OTHER] = [0, 0.0]
  for r in kernels:
    a = acc.setdefault(key(r), [0, 0.0])
    a[0] += r["count"]
    a[1] += r["total_us"] * 1e3
  return {c: _row({}, n, ns, steps, total_ns) for c, (n, ns) in acc.items()}


# ------------------------------------------------------------------ roofline
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


def _make_call(engine, rep):
  """One call as bench_decode times it (--timed): the replica's dispatch, or
  the engine's whole iteration. Returns its output to wait on."""
  def call():
    if FLAGS.timed == "dispatch":
      return rep.dispatch()[0]
    engine.step()
    return engine._inflight[0][1]  # pylint: disable=protected-access
  return call


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
  from pdjax.engine.decode import DecodeEngine
  dcfg, mem = bd._layout(cfg, B, C, S)  # pylint: disable=protected-access
  if _calls_needed() > mem["total_calls"]:
    raise ValueError(
        f"{_calls_needed()} calls need more room than bench_decode's layout "
        f"leaves ({mem['total_calls']} calls): raise --repeat or "
        "--calls_per_sample, or lower --trace_calls/--warmup")
  engine = DecodeEngine(params, cfg, mesh, rules, dcfg, eos_ids=())
  if FLAGS.sampling_path == "device":
    on_device = engine.programs.generate_program(None)
    engine.programs.generate = lambda all_greedy: on_device
  rep = engine.replicas[0]
  bd._fill(engine, cfg, B, C, FLAGS.seed)  # pylint: disable=protected-access
  t0 = time.perf_counter()
  engine.step()
  jax.block_until_ready(rep.state)
  setup_s = time.perf_counter() - t0
  if rep.live_rows != B:
    raise RuntimeError(f"only {rep.live_rows} of {B} rows were admitted")
  engine.step()
  call = _make_call(engine, rep)
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
  params_rec = {"batch": B, "context": C, "steps_per_call": S,
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
    paged = engine.programs.paged_attention
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
      [[_short(k["name"]), k["category"], bc.fmt(k["count_per_step"], ".2f"),
        _us(k["us_per_step"]), f"{100 * k['share']:.1f}%",
        _short(_jax_op(k), 44, left=True)]
       for k in x["top"]])
  if len(x["modules"]) > 1:
    bc.print_table(f"{head}: XLA modules (per step)",
                   ["module", "count", "us", "share"],
                   [[_short(m), bc.fmt(v["count_per_step"], ".2f"),
                     _us(v["us_per_step"]), f"{100 * v['share']:.1f}%"]
                    for m, v in x["modules"].items()])


_SCAFFOLD = {"while", "body", "cond", "eval_jaxpr", "checkpoint", "remat"}


def _jax_op(kernel: dict[str, Any]) -> str:
  """Where in the model a kernel comes from: the last two parts of its
  commonest JAX op path, loop scaffolding and the outer jit(...) left out
  (e.g. "jit(dynamic_index_in_dim)/dynamic_slice"); else its XLA op."""
  parts = [q for q in (kernel.get("jax_ops") or [""])[0].split("/")[1:]
           if q not in _SCAFFOLD]
  if parts:
    return "/".join(parts[-2:])
  return (kernel.get("ops") or [""])[0]


def _short(name: str, width: int = 64, left: bool = False) -> str:
  """A table cell of at most ``width`` characters; ``left`` keeps the end."""
  if len(name) <= width:
    return name
  return "..." + name[3 - width:] if left else name[:width - 3] + "..."


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
  params = bc.random_params(cfg, rules, mesh, seed=FLAGS.seed)
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
