r"""Does a decode step get slower once the engine has served other requests?

Why this exists: on two H100s, a disaggregated 8B deployment decoded the same
6,175-token summarize request at 42 ms per 4-step call before 10 s of chat
traffic and at 110 ms after it, whatever the KV transport
(``tools/gpu/run_after_chat.sh``; BENCHMARKS.md, "An open problem: decode
steps slow down after a chat load"). A fresh deployment decodes it fast
again, so something the engine or the device runtime keeps from the
traffic makes later steps slower. This tool takes the deployment out of the
question: one ``DecodeEngine`` in one process, the same probe request
before and after a churn of chat-shaped requests.

Phases, each on the same engine:

1. probe: one request of ``--probe_context`` tokens alone; after its first
   iteration (insert), ``--probe_calls`` engine iterations are timed as the
   serving loop runs them (``DecodeEngine.step``: dispatch the next call,
   deliver the previous one), then it runs to its end.
2. churn: ``--churn_requests`` requests with the ``chat`` preset's prompt
   and output lengths (``pdjax.eval.workloads``), admitted whenever the
   pool has room (up to ``--max_seqs`` live), each with a KV freshly
   allocated on the device as a transport's receive allocates it
   (``--churn_kv=shared``: one KV per size, so only the engine's own state
   changes), stepped until every one has finished.
3. probe again, the same request.

Per probe: the median time per iteration and per step, the median host time
of the replica's ``dispatch`` (page growth, slot upload, launching the
program: if it grows, the host is where the time goes, e.g. XLA updating a
CUDA graph's buffer addresses), the probe's pages (how scattered they are
in the pool after churn), and the device allocator's figures where the
backend reports them (bytes in use, peak, allocations, largest free block).
The last line is the ratio after / before.

``--nocommand_buffers`` runs without XLA's CUDA graphs
(``--xla_gpu_enable_command_buffer=`` in XLA_FLAGS), so a ratio that falls
to 1 there points at their update cost.

Examples:
  python tools/bench_decode_churn.py --model=tiny          # CPU, seconds
  python tools/bench_decode_churn.py --model=llama3-8b --out=/tmp/churn.jsonl
  python tools/bench_decode_churn.py --model=llama3-8b --nocommand_buffers
"""

from __future__ import annotations

import os
import statistics
import time

import bench_common as bc  # Sets up sys.path and XLA_FLAGS before jax.

from absl import app, flags

bc.define_common_flags()
flags.DEFINE_integer("probe_context", None,
                     "Prompt tokens of the probe request (default: 6144 on "
                     "GPU, 200 on CPU).")
flags.DEFINE_integer("probe_calls", 16, "Timed iterations per probe.")
flags.DEFINE_integer("churn_requests", None,
                     "Chat-shaped requests between the probes (default: 400 "
                     "on GPU, 40 on CPU).")
flags.DEFINE_enum("churn_kv", "fresh", ["fresh", "shared"],
                  "fresh: each churn request's KV is a new device array (as "
                  "a receive makes it); shared: one array for all.")
flags.DEFINE_integer("max_seqs", None, "Rows (default: 128 GPU, 8 CPU).")
flags.DEFINE_integer("num_pages", None,
                     "KV pages (default: 16384 GPU, 512 CPU).")
flags.DEFINE_integer("max_seq_len", None,
                     "Per sequence (default: 8192 GPU, 1024 CPU).")
flags.DEFINE_string("table_buckets", None,
                    "Page-table widths (default: 32,128 as gpu-8b.toml).")
flags.DEFINE_integer("steps_per_call", 4, "Decode steps per generate call.")
flags.DEFINE_enum("attention", "auto",
                  ["auto", "paged", "pallas", "gather"],
                  "Attention over the pages (DecodeConfig.attention).")
flags.DEFINE_enum("triton_gemm", "auto", ["auto", "on", "off"],
                  "DecodeConfig.triton_gemm.")
flags.DEFINE_enum("merge_dots", "auto", ["auto", "on", "off"],
                  "DecodeConfig.merge_dots (XLA's DotMerger).")
flags.DEFINE_bool("command_buffers", True,
                  "False: XLA runs without CUDA graphs "
                  "(--xla_gpu_enable_command_buffer= in XLA_FLAGS).")
flags.DEFINE_list("churn_presets", ["chat"], "Workload presets the churn "
                  "mixes, request by request (chat, summarize, multiturn, "
                  "code, shared-prefix).")
flags.DEFINE_float("cancel_share", 0.0, "Share of churn requests cancelled "
                   "part-way (after a random number of iterations).")
flags.DEFINE_integer("probe_rows", 1, "Requests the probe runs together "
                     "(more than a row program's count exercises the next "
                     "program, padded with free rows).")
flags.DEFINE_float("soak_minutes", 0.0, "Soak: churn and probe again, round "
                   "after round, for this long; every round's probe is a "
                   "record and a point of --chart (0: one churn).")
flags.DEFINE_string("chart", None, "Soak: a PNG of the probe's time per "
                    "call against time.")
flags.DEFINE_string("chart_from", None, "Draw --chart from a soak's records "
                    "(this file, JSON lines) and exit: for a soak run where "
                    "matplotlib was missing.")
flags.DEFINE_enum("page_order", "lowest", ["lowest", "fifo"],
                  "Which free pages a request gets: the lowest-numbered "
                  "(the pool's policy) or first-in-first-out (the policy "
                  "before it: after churn, every request's pages spread "
                  "over the whole pool).")
flags.DEFINE_string("row_buckets", "", "Row counts of the generate "
                    "programs (default: the pool's; 'MAX' for max_seqs "
                    "only, every call running every row as before row "
                    "programs).")
flags.DEFINE_list("reset_after_churn", [], "Which device-side state of the "
                  "free rows to set back to a fresh engine's after the churn, "
                  "one more probe after each (cumulative, in the order "
                  "given): tokens, positions, generated, done, null_page "
                  "(the null page's KV zeroed). Names the state a slowdown "
                  "comes from.")
FLAGS = flags.FLAGS

RESETTABLE = ("tokens", "positions", "generated", "done", "null_page")

TOOL = "bench_decode_churn"


def _defaults(gpu: bool) -> dict:
  """The flags left unset: gpu-8b.toml's decode pool on a GPU, a small
  pool on CPU (the tiny model, seconds)."""
  pick = lambda name, g, c: (FLAGS[name].value if FLAGS[name].value
                             is not None else (g if gpu else c))
  return {
      "probe_context": pick("probe_context", 6144, 200),
      "churn_requests": pick("churn_requests", 400, 40),
      "max_seqs": pick("max_seqs", 128, 8),
      "num_pages": pick("num_pages", 16384, 512),
      "max_seq_len": pick("max_seq_len", 8192, 1024),
      "table_buckets": tuple(bc.parse_ints(pick("table_buckets", "32,128",
                                                "4,16"))),
  }


def _submit(engine, cfg, rid: str, prompt_len: int, max_tokens: int, kv,
            on_finish) -> bool:
  """Reserves and submits one greedy request (False: no room now)."""
  from pdjax.engine.requests import DecodeRequest, RequestKV
  from pdjax.engine.sampling import SamplingParams
  res = engine.reserve(rid, prompt_len, max_tokens)
  if res is None:
    return False
  sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)

  def callback(ev):
    if ev.finish_reason is not None:
      on_finish(rid, ev)
  engine.submit(DecodeRequest(rid, range(prompt_len), 3, 0.0,
                              RequestKV(kv, prompt_len), sampling, 0, callback,
                              reservation=res))
  return True


def _device_memory() -> dict:
  """The allocator's figures for device 0 (empty where it reports none)."""
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  keys = ("bytes_in_use", "peak_bytes_in_use", "num_allocs",
          "largest_free_block_bytes", "bytes_limit")
  return {k: stats[k] for k in keys if k in stats}


def _runs(pages: list[int]) -> int:
  """Contiguous runs in a page list: 1 = one block of the pool."""
  return 1 + sum(b != a + 1 for a, b in zip(pages, pages[1:]))


def probe(engine, cfg, context: int, calls: int, tag: str,
          rows: int = 1) -> dict:
  """Times ``calls`` serving-loop iterations of ``rows`` requests of
  ``context`` tokens alone."""
  import jax
  from pdjax.engine import compile_stats
  rep = engine.replicas[0]
  S = engine.dcfg.steps_per_call
  done = []
  # Two iterations to admit and fill the pipeline, the timed ones, and one
  # more to deliver the last of them.
  max_tokens = S * (calls + 4)
  kv = bc.zero_request_kv(engine, cfg, context)
  for i in range(rows):
    if not _submit(engine, cfg, f"probe-{tag}-{i}", context, max_tokens, kv,
                   lambda rid, ev: done.append(ev)):
      raise RuntimeError(f"the pool refused probe request {i} of {rows}")
  host_s = []
  dispatch = rep.dispatch

  def timed_dispatch():
    t = time.perf_counter()
    out = dispatch()
    host_s.append(time.perf_counter() - t)
    return out
  rep.dispatch = timed_dispatch
  try:
    for _ in range(2):
      engine.step()
    pages = list(next(r for r in rep.rows if r is not None).pages)
    host_s.clear()
    stamps = [time.perf_counter()]
    with compile_stats.CompileCounter() as compiled:
      for _ in range(calls):
        engine.step()
        stamps.append(time.perf_counter())
    timed_host = list(host_s)
    engine.drain()
    jax.block_until_ready(rep.state)
  finally:
    rep.dispatch = dispatch
  if len(done) != rows or any(ev.error for ev in done):
    raise RuntimeError(f"probe {tag} did not finish cleanly: {done}")
  per_call = [b - a for a, b in zip(stamps, stamps[1:])]
  call_s = statistics.median(per_call)
  return {"context": context, "calls": calls, "rows": rows,
          "call_ms": call_s * 1e3, "step_ms": call_s / S * 1e3,
          "call_ms_max": max(per_call) * 1e3,
          "dispatch_host_ms": statistics.median(timed_host) * 1e3,
          "pages": len(pages), "page_runs": _runs(sorted(pages)),
          "first_page": min(pages), "last_page": max(pages),
          "compiles_during_timing": compiled.count,
          "memory": _device_memory()}


def reset_free_rows(engine, what: str) -> None:
  """Sets one part of the free rows' device state (or the null page's KV)
  back to what a fresh engine holds."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  for rep in engine.replicas:
    st = rep.state
    if what == "null_page":   # in place: the pools are donated
      n = st.k.shape[0] // rep.cfg.num_layers
      null = jnp.asarray(np.arange(rep.cfg.num_layers) * n, jnp.int32)
      zero = jax.jit(lambda k, v, i: (k.at[i].set(0), v.at[i].set(0)),
                     donate_argnums=(0, 1))
      k, v = zero(st.k, st.v, null)
      rep.state = st.replace(k=k, v=v)
      continue
    free = jnp.asarray([i for i, r in enumerate(rep.rows) if r is None],
                       jnp.int32)
    field = getattr(st, what)
    rep.state = st.replace(**{what: field.at[free].set(
        jnp.zeros((), field.dtype))})


def _churn_items(cfg, num_requests: int, max_seq_len: int, seed: int):
  """(request id, prompt tokens, output tokens) of the churn: the presets'
  requests, interleaved."""
  from pdjax.eval import workloads
  presets = list(FLAGS.churn_presets)
  per = [workloads.generate(p, -(-num_requests // len(presets)),
                            vocab_size=cfg.vocab_size,
                            max_model_len=max_seq_len, seed=seed)
         for p in presets]
  out = []
  for i in range(num_requests):
    it = per[i % len(presets)][i // len(presets)]
    out.append((f"{presets[i % len(presets)]}-{seed}-{i}",
                it.num_prompt_tokens, it.max_tokens))
  return out


def churn(engine, cfg, num_requests: int, fresh_kv: bool,
          seed: int = 0) -> dict:
  """Serves the churn's requests, as many at once as the pool takes, until
  all have finished; ``--cancel_share`` of them are cancelled part-way."""
  import random

  import jax
  rng = random.Random(seed)
  pending = _churn_items(cfg, num_requests, engine.dcfg.max_seq_len, seed)
  shared: dict[int, object] = {}   # payload pages -> the one KV of them
  finished: dict[str, object] = {}
  cancel_at: dict[int, list[str]] = {}
  t0 = time.perf_counter()
  iterations = tokens = peak_live = 0
  while pending or engine.has_work:
    while pending:
      rid, plen, out = pending[0]
      if fresh_kv:
        kv = bc.zero_request_kv(engine, cfg, plen)
      else:
        n = bc.payload_page_count(engine, plen)
        if n not in shared:
          shared[n] = bc.zero_request_kv(engine, cfg, plen)
        kv = shared[n]
      if not _submit(engine, cfg, rid, plen, out, kv,
                     lambda r, ev: finished.__setitem__(r, ev)):
        break
      pending.pop(0)
      tokens += out
      if rng.random() < FLAGS.cancel_share:
        when = iterations + rng.randint(1, max(out // 4, 2))
        cancel_at.setdefault(when, []).append(rid)
    for rid in cancel_at.pop(iterations, ()):
      engine.cancel(rid)
    peak_live = max(peak_live, engine.step())
    iterations += 1
  jax.block_until_ready(engine.replicas[0].state)
  errors = [r for r, ev in finished.items() if ev.error]
  if len(finished) != num_requests or errors:
    raise RuntimeError(f"churn: {len(finished)} of {num_requests} finished, "
                       f"{len(errors)} with errors")
  cancelled = sum(ev.finish_reason is not None
                  and ev.finish_reason.value == "abort"
                  for ev in finished.values())
  return {"requests": num_requests, "output_tokens": tokens,
          "cancelled": cancelled, "presets": list(FLAGS.churn_presets),
          "iterations": iterations, "peak_live_rows": peak_live,
          "seconds": time.perf_counter() - t0, "kv": FLAGS.churn_kv}


def soak(engine, cfg, d, writer, params_rec, before) -> None:
  """Churn then probe, round after round, for ``--soak_minutes``: the
  probe's time per call over time (a line going up is the slowdown)."""
  start = time.monotonic()
  points = [(0.0, before["call_ms"])]
  rnd = 0
  chart = bool(FLAGS.chart)
  while time.monotonic() - start < FLAGS.soak_minutes * 60:
    rnd += 1
    traffic = churn(engine, cfg, d["churn_requests"],
                    FLAGS.churn_kv == "fresh", seed=FLAGS.seed + rnd)
    p = probe(engine, cfg, d["probe_context"], FLAGS.probe_calls,
              f"round{rnd}", FLAGS.probe_rows)
    minutes = (time.monotonic() - start) / 60
    points.append((minutes, p["call_ms"]))
    writer.write(TOOL, "soak_round", params_rec,
                 {"round": rnd, "minutes": minutes, "churn": traffic,
                  "probe": p, "before_call_ms": before["call_ms"],
                  "ratio": p["call_ms"] / before["call_ms"]})
    print(f"  [{minutes:7.2f} min] round {rnd}: {traffic['requests']} "
          f"requests ({traffic['cancelled']} cancelled); probe "
          f"{p['call_ms']:.2f} ms per call, "
          f"{p['call_ms'] / before['call_ms']:.2f}x of the fresh engine",
          flush=True)
    if chart:    # every round: a run cut short still leaves its chart
      try:
        _soak_chart(points, _soak_title(cfg.name, FLAGS.probe_rows, d),
                    FLAGS.chart)
      except ImportError as e:   # the records still have every point
        print(f"  no chart: {e}", flush=True)
        chart = False


def _soak_title(model: str, probe_rows: int, d: dict) -> str:
  return (f"{model}: {probe_rows} x {d['probe_context']}-token probe "
          f"between rounds of {d['churn_requests']} requests")


def chart_from_records(records_path: str, out: str) -> int:
  """The soak chart from its records (the ``soak_round`` lines of one run,
  the last run in the file); returns the rounds drawn."""
  import json
  rounds = []
  with open(records_path) as f:
    for line in f:
      rec = json.loads(line)
      if rec.get("measurement") == "soak_round":
        rounds.append(rec)
  if not rounds:
    raise app.UsageError(f"{records_path}: no soak_round records")
  run = rounds[-1]["run_id"]
  rounds = [r for r in rounds if r["run_id"] == run]
  first = rounds[0]["results"]
  points = [(0.0, first["before_call_ms"])] + [
      (r["results"]["minutes"], r["results"]["probe"]["call_ms"])
      for r in rounds]
  d = {"probe_context": first["probe"]["context"],
       "churn_requests": first["churn"]["requests"]}
  _soak_chart(points, _soak_title(rounds[0]["model"],
                                  rounds[0]["params"]["probe_rows"], d), out)
  return len(rounds)


def _soak_chart(points, title: str, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 3.5))
  ax.plot([m for m, _ in points], [c for _, c in points], marker="o")
  ax.set_xlabel("minutes of traffic")
  ax.set_ylabel("probe ms per generate call")
  ax.set_ylim(bottom=0)
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv) -> None:
  del argv
  if FLAGS.chart_from:
    if not FLAGS.chart:
      raise app.UsageError("--chart_from needs --chart (the PNG to write)")
    n = chart_from_records(FLAGS.chart_from, FLAGS.chart)
    print(f"{FLAGS.chart}: {n} rounds")
    return
  unknown = set(FLAGS.reset_after_churn) - set(RESETTABLE)
  if unknown:
    raise app.UsageError(f"--reset_after_churn: unknown {sorted(unknown)}; "
                         f"choose from {', '.join(RESETTABLE)}")
  if not FLAGS.command_buffers:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_gpu_enable_command_buffer=").strip()
  import jax
  from pdjax.engine.decode import DecodeConfig, DecodeEngine
  from pdjax.sharding import ShardingRules, make_mesh

  cfg = bc.model_from_flags()
  limits = bc.resolve_limits()
  writer = bc.RecordWriter(FLAGS.out, model=FLAGS.model, cfg=cfg,
                           limits=limits)
  d = _defaults(bc.is_gpu())
  dcfg = DecodeConfig(max_seqs=d["max_seqs"], num_pages=d["num_pages"],
                      max_seq_len=d["max_seq_len"],
                      steps_per_call=FLAGS.steps_per_call,
                      table_buckets=d["table_buckets"],
                      triton_gemm=FLAGS.triton_gemm,
                      merge_dots=FLAGS.merge_dots, attention=FLAGS.attention,
                      row_buckets=(() if not FLAGS.row_buckets else
                                   (d["max_seqs"],)
                                   if FLAGS.row_buckets == "MAX" else
                                   tuple(bc.parse_ints(FLAGS.row_buckets))))
  if d["probe_context"] + FLAGS.steps_per_call * (FLAGS.probe_calls + 4) > (
      dcfg.max_seq_len):
    raise app.UsageError("--probe_context + the probe's steps exceed "
                         "--max_seq_len")
  rules = ShardingRules.load("decode_dp")
  mesh = make_mesh({"dp": 1}, jax.devices()[:1])
  t0 = time.perf_counter()
  params = bc.random_params(cfg, rules, mesh, seed=FLAGS.seed)
  engine = DecodeEngine(params, cfg, mesh, rules, dcfg, eos_ids=())
  if FLAGS.page_order != "lowest":
    from pdjax.engine.block_pool import BlockPool
    for rep in engine.replicas:    # before any page is handed out
      rep.pool = BlockPool(dcfg.num_pages, order=FLAGS.page_order)
  engine.warmup()
  print(f"{TOOL}: {cfg.name} on {bc.device_kind()}, {dcfg.max_seqs} rows, "
        f"{dcfg.num_pages} pages, widths {dcfg.widths}; command buffers "
        f"{'on' if FLAGS.command_buffers else 'off'}; ready in "
        f"{time.perf_counter() - t0:.1f} s", flush=True)
  params_rec = {"max_seqs": dcfg.max_seqs, "num_pages": dcfg.num_pages,
                "max_seq_len": dcfg.max_seq_len,
                "steps_per_call": dcfg.steps_per_call,
                "table_buckets": list(dcfg.table_buckets),
                "attention": FLAGS.attention,
                "triton_gemm": FLAGS.triton_gemm,
                "merge_dots": FLAGS.merge_dots,
                "command_buffers": FLAGS.command_buffers,
                "churn_kv": FLAGS.churn_kv, "page_order": FLAGS.page_order,
                "row_counts": list(dcfg.row_counts)}
  params_rec.update(churn_presets=list(FLAGS.churn_presets),
                    cancel_share=FLAGS.cancel_share,
                    probe_rows=FLAGS.probe_rows)
  before = probe(engine, cfg, d["probe_context"], FLAGS.probe_calls, "before",
                 FLAGS.probe_rows)
  print(f"  before: {before['call_ms']:.2f} ms per call", flush=True)
  if FLAGS.soak_minutes:
    soak(engine, cfg, d, writer, params_rec, before)
    return
  traffic = churn(engine, cfg, d["churn_requests"], FLAGS.churn_kv == "fresh")
  print(f"  churn: {traffic['requests']} requests, {traffic['iterations']} "
        f"iterations, up to {traffic['peak_live_rows']} rows, "
        f"{traffic['seconds']:.1f} s", flush=True)
  after = probe(engine, cfg, d["probe_context"], FLAGS.probe_calls, "after",
                FLAGS.probe_rows)
  ratio = after["call_ms"] / before["call_ms"]
  print(f"  after: {after['call_ms']:.2f} ms per call, {ratio:.2f}x",
        flush=True)
  resets, reset_probes = [], []
  for what in FLAGS.reset_after_churn:
    reset_free_rows(engine, what)
    resets.append(what)
    p = probe(engine, cfg, d["probe_context"], FLAGS.probe_calls,
              "reset-" + what, FLAGS.probe_rows)
    reset_probes.append({"reset": list(resets), "call_ms": p["call_ms"],
                         "ratio": p["call_ms"] / before["call_ms"]})
    print(f"  after resetting {'+'.join(resets)}: {p['call_ms']:.2f} ms per "
          f"call, {p['call_ms'] / before['call_ms']:.2f}x", flush=True)
  writer.write(TOOL, "probe_ratio", params_rec,
               {"before": before, "churn": traffic, "after": after,
                "ratio": ratio, "after_resets": reset_probes})
  rows = []
  for name, p in (("before", before), ("after", after)):
    m = p["memory"]
    rows.append([name, bc.fmt(p["call_ms"], ".2f"), bc.fmt(p["step_ms"], ".2f"),
                 bc.fmt(p["call_ms_max"], ".2f"),
                 bc.fmt(p["dispatch_host_ms"], ".3f"),
                 f"{p['pages']}/{p['page_runs']}",
                 bc.fmt(m.get("bytes_in_use", 0) / 2**30, ".2f"),
                 bc.fmt(m.get("num_allocs"))])
  bc.print_table(
      f"{FLAGS.probe_rows} x {d['probe_context']}-token request(s), before "
      f"and after {traffic['requests']} requests "
      f"({'/'.join(FLAGS.churn_presets)}, {traffic['cancelled']} cancelled)",
      ["probe", "ms/call", "ms/step", "max ms/call", "dispatch host ms",
       "pages/runs", "GiB in use", "allocs"], rows,
      note=f"after / before: {ratio:.2f}x")


if __name__ == "__main__":
  app.run(main)
