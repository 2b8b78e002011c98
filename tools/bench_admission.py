r"""Decode admission: how many streams a decode pool serves at once, and how
many tokens per second, when requests come without max_tokens.

An OpenAI client's chat request without ``max_tokens`` gets ``max_tokens =
context - prompt`` at the gateway (as vLLM does). Whole-budget admission
(``DecodeConfig.kv_admission="full"``, the policy before pages on demand)
reserves that whole context of KV pages for every such request, so a pool
runs only as many as it holds whole contexts, however short the answers;
the rest wait in the queue and, past its deadline, are refused (429).
On-demand admission (``"on_demand"``) reserves a request's prompt and
first calls' pages, grows rows as they generate and preempts the newest
when the pool runs out. This tool runs one workload under both.

The pool: one ``ColocatedEngine`` in this process, one replica (a decode
worker prefilling its own requests), with the deployment's pool shape:
``gpu-8b.toml``'s decode pool on a GPU (128 rows, 16384 pages of 16,
8192-token context), on CPU a pool of the same proportions for the tiny
model (64 rows, 1024 pages, 1024-token context). One warmed engine serves
both runs (its programs do not depend on the admission policy), so nothing
compiles while timed.

The workload: ``--streams`` requests submitted at once, prompt and answer
lengths from the ``chat`` preset (``pdjax.eval.workloads``, scaled by
``--length_scale``), sampled at ``--temperature`` with a per-stream seed,
each with max_tokens = max_seq_len - prompt. A stream ends at its answer's
length: ``--stop=length`` (default) has the client stop reading there (it
cancels the stream: the engine frees the row at its next iteration; this
stands in for the EOS a real model emits there, which random weights never
do); ``--stop=eos`` leaves it to the model's own EOS (pdjax-tiny's, whose
answers are long). The queue in front of the pool has the decode worker's
bound and deadline (``--queue_timeout_s``).

Reported per policy (medians over ``--rounds``, the policies alternating
so that a busy machine weighs on both): rows running at once (peak, and the mean over the run
weighted by time), output tokens per second (tokens the streams received,
up to their answer's length, over the wall time from the submissions to
the last stream's end), streams answered and refused, time to first token
(median, p90, max), preemptions (rows swapped out, recomputed). With both
policies, the streams answered in both are compared token by token (the
first round's): preemption itself changes no token (swap is bit for bit;
sampling is keyed by seed and token index), but the two policies batch the
streams differently, and the generate programs of different row counts
may round differently, which can flip a near-tie (on CPU, one token of
11,000 here, identical again with one row count, ``row_buckets``); the
tool reports where any stream's tokens part.

Examples:
  python tools/bench_admission.py --rounds=3             # CPU, tiny model
  python tools/bench_admission.py --model=llama3-8b --out=/tmp/adm.jsonl
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time

import bench_common as bc  # Sets up sys.path and XLA_FLAGS before jax.

from absl import app, flags

# One engine's programs compile once per process; a persistent cache also
# spares a rerun (set JAX_COMPILATION_CACHE_DIR to choose where).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), "pdjax_bench_jax_cache"))

bc.define_common_flags()
flags.DEFINE_enum("admission", "both", ["both", "full", "on_demand"],
                  "Admission policies to run (DecodeConfig.kv_admission).")
flags.DEFINE_integer("streams", 200, "Requests submitted at once.")
flags.DEFINE_string("preset", "chat", "Workload preset (length shapes).")
flags.DEFINE_float("length_scale", None,
                   "Multiplies the preset's lengths (default: 1 on GPU, "
                   "0.25 on CPU).")
flags.DEFINE_enum("stop", "length", ["length", "eos"],
                  "Where a stream ends: at its answer's length (the client "
                  "stops reading) or at the model's EOS.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature (seeded per "
                   "stream; 0: greedy).")
flags.DEFINE_integer("max_seqs", None, "Rows (default: 128 GPU, 64 CPU).")
flags.DEFINE_integer("num_pages", None,
                     "KV pages (default: 16384 GPU, 1024 CPU).")
flags.DEFINE_integer("max_seq_len", None,
                     "Context per sequence (default: 8192 GPU, 1024 CPU).")
flags.DEFINE_string("table_buckets", None,
                    "Page-table widths (default: 32,128 GPU; 8,32 CPU).")
flags.DEFINE_integer("steps_per_call", 4, "Decode steps per generate call.")
flags.DEFINE_integer("swap_pages", -1, "Host pages for preempted rows' KV "
                     "(DecodeConfig.swap_pages; -1: the pool's size).")
flags.DEFINE_float("queue_timeout_s", 30.0,
                   "Deadline of the queue in front of the pool (a decode "
                   "worker's --queue_deadline_s default); 0: none.")
flags.DEFINE_integer("max_waiting", 1024, "Bound of that queue.")
flags.DEFINE_bool("engine_warmup", True, "Compile every serving program before "
                  "the runs. Off, each compiles when first needed, inside the "
                  "first run's wall time: for smoke tests of the tool, "
                  "whose checks do not depend on its timings.")
flags.DEFINE_integer("rounds", 1, "Runs of each policy, alternating; the "
                     "table shows medians.")
FLAGS = flags.FLAGS

TOOL = "bench_admission"


def _defaults(gpu: bool) -> dict:
  pick = lambda name, g, c: (FLAGS[name].value if FLAGS[name].value
                             is not None else (g if gpu else c))
  return {
      "max_seqs": pick("max_seqs", 128, 64),
      "num_pages": pick("num_pages", 16384, 1024),
      "max_seq_len": pick("max_seq_len", 8192, 1024),
      "table_buckets": tuple(bc.parse_ints(pick("table_buckets", "32,128",
                                                "8,32"))),
      "length_scale": pick("length_scale", 1.0, 0.25),
  }


def _model(rules, mesh):
  """(params, cfg): pdjax-tiny's checkpoint for --model=tiny (its EOS is a
  real one; --dtype does not apply), random weights of the preset
  otherwise."""
  if FLAGS.model == "tiny":
    from pdjax.engine.setup import load_sharded
    from pdjax.model.tiny import ensure_tiny_model
    return load_sharded(ensure_tiny_model(), rules, mesh)
  cfg = bc.model_from_flags()
  return bc.random_params(cfg, rules, mesh, seed=FLAGS.seed), cfg


def _set_admission(engine, mode: str) -> None:
  """Switches the pool's admission policy between runs (nothing is live).
  The programs do not depend on it; the swap space made for on_demand is
  never used by full admission, which never preempts."""
  dcfg = dataclasses.replace(engine.decode.dcfg, kv_admission=mode)
  engine.decode.dcfg = dcfg
  for rep in engine.decode.replicas:
    rep.dcfg = dcfg


class _Streams:
  """The clients: each stream's tokens, first-token and end times; a
  stream that has its answer's length stops reading (``--stop=length``)."""

  def __init__(self, engine, items, stop_at_length: bool):
    self.engine = engine
    self.want = {it.request_id: it.max_tokens for it in items}
    self.stop_at_length = stop_at_length
    self.tokens = {rid: [] for rid in self.want}
    self.first: dict[str, float] = {}
    self.end: dict[str, float] = {}
    self.outcome: dict[str, str] = {}

  def callback(self, ev) -> None:
    rid, now = ev.request_id, time.perf_counter()
    if rid in self.outcome:
      return   # stopped reading
    toks = self.tokens[rid]
    if ev.token_ids and rid not in self.first:
      self.first[rid] = now
    toks.extend(ev.token_ids)
    if self.stop_at_length and len(toks) >= self.want[rid]:
      del toks[self.want[rid]:]
      self.outcome[rid], self.end[rid] = "answered", now
      self.engine.cancel(rid)
    elif ev.finish_reason is not None:
      self.outcome[rid] = ("refused" if ev.exhausted else "error" if ev.error
                           else "answered")
      self.end[rid] = now


def run(engine, items, mode: str) -> tuple[dict, dict]:
  """Submits every stream at once and steps the engine until all ended;
  (results, each answered stream's tokens)."""
  import jax
  from pdjax.engine.sampling import SamplingParams
  _set_admission(engine, mode)
  before = engine.preemption_stats()
  streams = _Streams(engine, items, FLAGS.stop == "length")
  L = engine.decode.dcfg.max_seq_len
  t0 = time.perf_counter()
  for it in items:
    p = it.prompt_token_ids
    s = SamplingParams(max_tokens=L - len(p), temperature=FLAGS.temperature,
                       seed=FLAGS.seed * 1000003 + it.index,
                       ignore_eos=FLAGS.stop == "length")
    engine.submit(it.request_id, p, s, streams.callback,
                  seed_u32=s.seed_u32(0))
  peak = iterations = 0
  rows_time = 0.0
  last = t0
  while engine.has_work:
    live = engine.step()
    now = time.perf_counter()
    rows_time += live * (now - last)
    last = now
    peak = max(peak, live)
    iterations += 1
  jax.block_until_ready(engine.decode.replicas[0].state)
  wall = time.perf_counter() - t0
  answered = [r for r, o in streams.outcome.items() if o == "answered"]
  ttft = sorted(streams.first[r] - t0 for r in streams.first)
  tokens = sum(len(v) for v in streams.tokens.values())
  after = engine.preemption_stats()
  u = engine.kv_usage()
  if u["pages_used"] or u["rows_live"] or u["reservations"]:
    raise RuntimeError(f"{mode}: the pool is not clean afterwards: {u}")

  def pct(q):
    return ttft[min(len(ttft) - 1, int(q * len(ttft)))] if ttft else None

  results = {
      "admission": mode, "streams": len(items), "answered": len(answered),
      "refused": sum(o == "refused" for o in streams.outcome.values()),
      "errors": sum(o == "error" for o in streams.outcome.values()),
      "peak_rows": peak, "mean_rows": rows_time / wall,
      "output_tokens": tokens, "tokens_per_s": tokens / wall,
      "wall_s": wall, "iterations": iterations,
      "ttft_median_s": statistics.median(ttft) if ttft else None,
      "ttft_p90_s": pct(0.9), "ttft_max_s": ttft[-1] if ttft else None,
      "last_answer_s": max((streams.end[r] - t0 for r in answered),
                           default=None),
      **{k: after[k] - before.get(k, 0) for k in after}}
  return results, {r: streams.tokens[r] for r in answered}


def main(argv) -> None:
  del argv
  import jax
  from pdjax.engine.colocated import ColocatedEngine
  from pdjax.engine.decode import DecodeConfig
  from pdjax.engine.prefill import PrefillConfig
  from pdjax.eval import workloads
  from pdjax.sharding import ShardingRules, make_mesh

  gpu = bc.is_gpu()
  d = _defaults(gpu)
  rules = ShardingRules.load("decode_dp")
  mesh = make_mesh({"dp": 1}, jax.devices()[:1])
  t0 = time.perf_counter()
  params, cfg = _model(rules, mesh)
  limits = bc.resolve_limits()
  writer = bc.RecordWriter(FLAGS.out, model=FLAGS.model, cfg=cfg,
                           limits=limits)
  L = d["max_seq_len"]
  buckets = ((128, 512, 1024, 2048, 4096, 8192) if gpu
             else (16, 32, 64, 128, 256))
  pcfg = PrefillConfig(buckets=tuple(b for b in buckets if b <= L),
                       max_batch=4, max_batch_tokens=8192 if gpu else 0,
                       page_size=16, max_seq_len=L)
  dcfg = DecodeConfig(max_seqs=d["max_seqs"], num_pages=d["num_pages"],
                      max_seq_len=L, steps_per_call=FLAGS.steps_per_call,
                      table_buckets=d["table_buckets"],
                      swap_pages=FLAGS.swap_pages)
  engine = ColocatedEngine(
      params, cfg, mesh, rules, pcfg, dcfg, max_waiting=FLAGS.max_waiting,
      queue_timeout_s=FLAGS.queue_timeout_s or None)
  if FLAGS.engine_warmup:
    engine.warmup()
  items = workloads.generate(FLAGS.preset, FLAGS.streams,
                             vocab_size=cfg.vocab_size, max_model_len=L,
                             seed=FLAGS.seed, length_scale=d["length_scale"],
                             exclude_token_ids=cfg.eos_token_ids)
  whole = -(-L // dcfg.page_size)
  print(f"{TOOL}: {cfg.name} on {bc.device_kind()}; {dcfg.max_seqs} rows, "
        f"{dcfg.num_pages - 1} pages ({(dcfg.num_pages - 1) // whole} whole "
        f"contexts of {L}); {len(items)} streams without max_tokens, "
        f"prompts {statistics.median(len(i.prompt_token_ids) for i in items)}"
        f" and answers {statistics.median(i.max_tokens for i in items)} "
        f"tokens (medians), stop at {FLAGS.stop}; ready in "
        f"{time.perf_counter() - t0:.1f} s", flush=True)
  params_rec = {"streams": len(items), "preset": FLAGS.preset,
                "length_scale": d["length_scale"], "stop": FLAGS.stop,
                "temperature": FLAGS.temperature,
                "max_seqs": dcfg.max_seqs, "num_pages": dcfg.num_pages,
                "max_seq_len": L, "page_size": dcfg.page_size,
                "steps_per_call": dcfg.steps_per_call,
                "table_buckets": list(dcfg.table_buckets),
                "swap_pages": dcfg.swap_capacity,
                "queue_timeout_s": FLAGS.queue_timeout_s,
                "max_waiting": FLAGS.max_waiting}
  modes = (["full", "on_demand"] if FLAGS.admission == "both"
           else [FLAGS.admission])
  results = {m: [] for m in modes}
  outputs = {}
  for rnd in range(FLAGS.rounds):
    for mode in modes:   # alternating, so a busy machine weighs on both
      r, out = run(engine, items, mode)
      results[mode].append(r)
      outputs.setdefault(mode, out)
      print(f"  round {rnd} {mode}: {r['answered']} answered, "
            f"{r['refused']} refused, up to {r['peak_rows']} rows "
            f"({r['mean_rows']:.1f} on average), {r['tokens_per_s']:.0f} "
            f"tokens/s, {r['wall_s']:.1f} s", flush=True)
      writer.write(TOOL, "admission",
                   {**params_rec, "admission": mode, "round": rnd}, r)
  mismatched = None
  if len(modes) == 2:
    both = set(outputs["full"]) & set(outputs["on_demand"])
    mismatched = sorted(r for r in both
                        if outputs["full"][r] != outputs["on_demand"][r])

  def med(mode, key):
    vals = [r[key] for r in results[mode] if r[key] is not None]
    return statistics.median(vals) if vals else None

  writer.write(TOOL, "summary", params_rec, {
      "rounds": FLAGS.rounds,
      "median": {m: {k: med(m, k) for k in results[m][0]
                     if isinstance(results[m][0][k], (int, float))}
                 for m in modes},
      "tokens_mismatched": mismatched})

  rows = [[m, med(m, "answered"), med(m, "refused"), med(m, "peak_rows"),
           bc.fmt(med(m, "mean_rows"), ".1f"),
           bc.fmt(med(m, "tokens_per_s"), ".0f"),
           bc.fmt(med(m, "wall_s"), ".1f"),
           bc.fmt(med(m, "ttft_median_s"), ".2f"),
           bc.fmt(med(m, "ttft_p90_s"), ".2f"),
           bc.fmt(med(m, "ttft_max_s"), ".2f"),
           med(m, "preempted_swap"), med(m, "preempted_recompute")]
          for m in modes]
  note = ""
  if len(modes) == 2:
    note = (f"on_demand / full (medians of {FLAGS.rounds} rounds): "
            f"{med('on_demand', 'mean_rows') / med('full', 'mean_rows'):.2f}"
            f"x rows at once, {med('on_demand', 'tokens_per_s') / med('full', 'tokens_per_s'):.2f}"
            f"x tokens/s; streams answered under both (first round) with "
            f"different tokens: {len(mismatched)}")
  bc.print_table(
      f"{len(items)} streams without max_tokens, {dcfg.max_seqs} rows, "
      f"{dcfg.num_pages - 1} pages (medians of {FLAGS.rounds} rounds)",
      ["admission", "answered", "refused", "peak rows", "mean rows",
       "tok/s", "wall s", "ttft p50", "ttft p90", "ttft max", "swapped",
       "recomputed"], rows, note=note)
  for rid in mismatched or ():
    a, b = outputs["full"][rid], outputs["on_demand"][rid]
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
              min(len(a), len(b)))
    print(f"  {rid}: tokens differ from index {at} of {len(a)}: "
          f"{a[at:at + 4]} (full) vs {b[at:at + 4]} (on_demand)")


if __name__ == "__main__":
  app.run(main)
