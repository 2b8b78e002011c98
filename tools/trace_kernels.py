"""A profiler trace's kernels, categorized and summed per step (no flags:
``tools/profile_decode.py`` makes the traces; tests import this alone).

``load_events`` reads a ``*.xplane.pb`` with ``jax.profiler.ProfileData``:
on GPU the kernels (and memcpys) on the device plane's stream lines, else
that plane's ``XLA Ops`` line; with no device plane (CPU) the host events
that carry an ``hlo_op`` stat, leaves only. ``aggregate`` sums them per
step by kernel, by category (``CATEGORIES``) and by XLA program.
"""

from __future__ import annotations

import collections
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, NamedTuple

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
  hosts = [p for p in planes if not DEVICE_PLANE.match(p.name)]
  # Where to look, in order; the first that yields events is used. Host
  # lines hold the CPU runtime's thunks: leaves only, and only those that
  # name their XLA op.
  attempts = (("device kernels", devices, KERNEL_LINE.match, False),
              ("device XLA ops", devices, lambda n: n == OP_LINE, False),
              ("host XLA ops (no device plane)", hosts, lambda n: True, True))
  lines: dict[str, int] = {}
  events: list[Event] = []
  for source, where, wanted, host in attempts:
    for plane in where:
      for line in plane.lines:
        if not wanted(line.name):
          continue
        ev = _to_events(line, plane.name, need_hlo_op=host)
        if host:
          ev = leaf_events(ev)
          if not ev:
            continue
        lines[f"{plane.name}/{line.name}"] = len(ev)
        events += ev
    if events:
      break
  else:
    source = "nothing found"
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


_SCAFFOLD = {"while", "body", "cond", "eval_jaxpr", "checkpoint", "remat"}


def jax_op_label(kernel: dict[str, Any]) -> str:
  """Where in the model a kernel comes from: the last two parts of its
  commonest JAX op path, loop scaffolding and the outer jit(...) left out
  (e.g. "jit(dynamic_index_in_dim)/dynamic_slice"); else its XLA op."""
  parts = [q for q in (kernel.get("jax_ops") or [""])[0].split("/")[1:]
           if q not in _SCAFFOLD]
  if parts:
    return "/".join(parts[-2:])
  return (kernel.get("ops") or [""])[0]


def cell(name: str, width: int = 64, left: bool = False) -> str:
  """A table cell of at most ``width`` characters; ``left`` keeps the end."""
  if len(name) <= width:
    return name
  return "..." + name[3 - width:] if left else name[:width - 3] + "..."


__all__ = ["CATEGORIES", "OTHER", "Event", "categorize", "find_xplane",
           "load_events", "dedupe", "leaf_events", "union_ns", "aggregate",
           "jax_op_label", "cell"]
