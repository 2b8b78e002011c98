r"""Decode benchmark: the DecodeEngine's generate call against the HBM roofline.

For each batch size B and context length C (combinations whose KV does not
fit ``--hbm_gib`` are skipped and recorded as such), this builds a
``DecodeEngine`` (``decode_dp`` rules, one replica on device 0) with
``max_seqs=B`` and enough pages for B rows of C tokens plus the steps the
measurement advances them, fills every row with a sequence at position C,
and times the replica's generate call.

Setting up the rows: through the engine's own admission path. One dummy
request KV of C tokens (zeros, already in the replica's payload layout) is
submitted B times (``reserve`` -> ``submit``), and the first ``step()`` runs
the replica's jitted insert program once per row and then the first
generate call (which compiles). The KV values are zeros: decode time does
not depend on them, and a zero pool cannot hold NaNs that would change the
sampler's path. Every row runs greedy with ``ignore_eos`` and a budget that
outlasts the measurement, which checks afterwards that all B rows produced a
token at every step.

Timing: ``DecodeReplica.dispatch()`` (page growth on the host, a slot
upload when the page table changed, then ``programs.generate``), called
``--calls_per_sample`` times back to back without waiting, as the serving
loop does, then one wait; a sample is the elapsed time / calls. The median
sample / ``steps_per_call`` is the step time. ``host_ms`` is the time
``dispatch()`` itself takes to return: while it stays below the step time,
Python is hidden behind the device. ``--timed=step`` times
``DecodeEngine.step()`` instead: the serving loop's iteration, which also
delivers the previous call's tokens (host work the device must not wait
for). ``--sampling_path=device`` is the baseline of one program deciding
greedy or sampled on device (a ``lax.cond``, resolved on the host by XLA's
GPU runtime, so every call returns only once it has run); ``--temperature``
> 0 times the sampled program.

Roofline per step, what a perfect implementation must read from HBM:

  bytes = weights (all, minus the embedding table when it is not tied, plus
          the B rows of it the step looks up)
        + B * ctx * kv_bytes_per_token   (ctx: mean KV length over the timed
                                          steps, C plus the tokens generated)
  roofline_s = bytes / hbm_bw

``hbm_bw`` defaults to 2.55e12 B/s, the H100 figure measured as (bytes read
+ bytes written) / time of an elementwise pass: we divide the bytes *read*
by that total-traffic rate, i.e. assume reads alone stream at the rate reads
and writes together reach. The spec column divides by 3.35e12 B/s. ratio =
measured / roofline (target <= 1.25); GB/s = bytes / measured time.

Also recorded, to explain a gap: ``kv_gathered_bytes`` (decode_forward
gathers every page of each row's page table, ``max_seq_len / page_size``
pages, whatever the row's length) and ``pool_bytes`` (the whole KV pool).

``--compare_steps_per_call`` also times steps_per_call=1 (a second engine,
a second compile) for the combos in ``--compare_at`` (all if empty), to
show what per-call dispatch costs.

Examples:
  python tools/bench_decode.py --model=tiny --batch_sizes=1,4 \
      --context_lengths=32,128 --compare_steps_per_call
  python tools/bench_decode.py --model=llama3-8b --batch_sizes=1,32,128,256 \
      --context_lengths=1024,4096 --out=/tmp/decode.jsonl
"""

from __future__ import annotations

import gc
import math
import time
import traceback

import bench_common as bc  # Sets up sys.path and XLA_FLAGS before jax.

from absl import app, flags

bc.define_common_flags()
flags.DEFINE_string("batch_sizes", "1,8,32,64,128,256", "Rows per replica.")
flags.DEFINE_string("context_lengths", "128,1024,4096,8192",
                    "Tokens already in each row's KV when timing starts.")
flags.DEFINE_integer("steps_per_call", 8, "Decode steps per generate call.")
flags.DEFINE_integer("calls_per_sample", 4,
                     "Generate calls dispatched back to back per sample.")
flags.DEFINE_integer("page_size", 16, "KV page size.")
flags.DEFINE_enum("attention", "auto",
                  ["auto", "paged", "pallas", "gather"],
                  "How attention reads the pages (DecodeConfig.attention).")
flags.DEFINE_enum("triton_gemm", "auto", ["auto", "on", "off"],
                  "GEMM kernels of the generate program on GPUs "
                  "(DecodeConfig.triton_gemm).")
flags.DEFINE_enum("merge_dots", "auto", ["auto", "on", "off"],
                  "XLA's DotMerger in the generate program "
                  "(DecodeConfig.merge_dots; auto: off).")
flags.DEFINE_float("hbm_gib", None,
                   "Device memory for the fit check (default: the "
                   "allocator's bytes_limit on device 0, else 80).")
flags.DEFINE_float("pool_copies", 0.0,
                   "Extra copies of the KV pool the generate program holds "
                   "as temporaries, for the fit check (0 since the pools are "
                   "updated in place).")
flags.DEFINE_float("temperature", 0.0,
                   "Every row's temperature: 0 times the greedy program, "
                   "> 0 the sampled one (top_p 0.9, top_k 0: a sort of the "
                   "vocabulary per row and step).")
flags.DEFINE_enum("sampling_path", "host", ["host", "device"],
                  "host: the program for the rows' sampling, chosen per "
                  "call (serving). device: one program deciding with an "
                  "on-device lax.cond, as before 2026-11-26 (the baseline "
                  "for what the host choice saves).")
flags.DEFINE_enum("timed", "dispatch", ["dispatch", "step"],
                  "dispatch: DecodeReplica.dispatch alone. step: "
                  "DecodeEngine.step, which also delivers the previous "
                  "call's tokens to the requests (the serving loop).")
flags.DEFINE_integer("program_rows", None,
                     "Rows of the program that runs a batch (at least the "
                     "batch; default: the program serving would pick, "
                     "DecodeConfig.row_buckets). Padding rows idle.")
flags.DEFINE_string("pallas_widen_to", None,
                    "The Pallas attention's widen_to for this run (e.g. "
                    "bfloat16: an FP8 pool's products in bf16, as before "
                    "they ran in float16; a probe of the kernel's option, "
                    "not an engine setting).")
flags.DEFINE_integer("cpu_max_batch", 8, "On CPU, larger batches are skipped.")
flags.DEFINE_integer("cpu_max_context", 256,
                     "On CPU, longer contexts are skipped.")
flags.DEFINE_bool("compare_steps_per_call", False,
                  "Also time steps_per_call=1 (dispatch overhead).")
flags.DEFINE_string("compare_at", "",
                    "BxC combos for --compare_steps_per_call, e.g. "
                    "'32x1024,1x1024' (empty: every combo).")
flags.DEFINE_string("verify_tokens", "",
                    "Speculative decoding's verify call: for each k listed "
                    "(e.g. 0,1,2,4,8), also times the verify program over k "
                    "drafted tokens per row (one pass of k + 1 tokens; k = 0 "
                    "is one step through the same path) at every point, "
                    "against the generate step.")
flags.DEFINE_enum("kv_dtype", "auto", ["auto", "fp8"],
                  "The KV pool's storage (DecodeConfig.kv_dtype): the "
                  "model's dtype, or fp8 (e4m3: the roofline reads a byte "
                  "per K/V value).")
flags.DEFINE_bool("memory_analysis", False,
                  "Also compile the generate program ahead of time and "
                  "record XLA's memory analysis (one more compile per combo).")
FLAGS = flags.FLAGS

TOOL = "bench_decode"


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _kv_bytes_per_token(cfg) -> float:
  """KV bytes a token takes in the pool (--kv_dtype)."""
  per_token = cfg.kv_bytes_per_token()
  if FLAGS.kv_dtype == "fp8":
    import jax.numpy as jnp
    per_token //= jnp.dtype(cfg.jnp_dtype).itemsize
  return per_token


def _step_bytes(cfg, B: int, ctx_mean: float) -> dict[str, float]:
  """HBM bytes a perfect decode step reads (module docstring)."""
  pb = bc.param_bytes(cfg)
  item = pb["embed"] // (cfg.vocab_size * cfg.hidden_size)
  weights = pb["total"] - (0 if cfg.tie_word_embeddings else pb["embed"])
  weights += B * cfg.hidden_size * item
  kv = B * ctx_mean * _kv_bytes_per_token(cfg)
  return {"weights": float(weights), "kv": float(kv),
          "total": float(weights + kv)}


def program_rows(B: int) -> int:
  """Rows of the program a batch of B live rows runs in (--program_rows,
  else serving's smallest that holds them)."""
  from pdjax.engine.decode_config import MIN_PROGRAM_ROWS
  return max(B, FLAGS.program_rows or MIN_PROGRAM_ROWS)


def _layout(cfg, B: int, C: int, S: int):
  """DecodeConfig for B rows at context C that stay live for the whole
  measurement; plus the memory estimate of the fit check."""
  from pdjax.engine.decode import DecodeConfig
  from pdjax.engine.kv import pages_for, payload_pages
  P = FLAGS.page_size
  total_calls = 2 + FLAGS.warmup + FLAGS.repeat * FLAGS.calls_per_sample
  # The last step writes at C + S*calls - 1; the row finishes once
  # position + 2 reaches max_seq_len, so leave room past it.
  # Verify calls (--verify_tokens) start again from the same positions for
  # each k and write k + 1 positions per call.
  verify_ks = bc.parse_ints(FLAGS.verify_tokens) if FLAGS.verify_tokens else []
  verify_room = (max(verify_ks) + 1) * (verify_calls() + 1) if verify_ks else 0
  max_seq_len = _round_up(C + S * total_calls + verify_room + 2, P)
  M = max_seq_len // P
  # One page-table width (every row is at the same length): one program.
  # Pages rounded so layers x pages is a multiple of B (cuDNN's paged
  # attention wants the pool's blocks to be B x a table width).
  # A pool of at least MIN_PROGRAM_ROWS rows (--program_rows: as many as
  # asked), one program of that many: B live rows run the program serving
  # would run them with (one stream runs the smallest program,
  # DecodeConfig.row_buckets), the rest idle.
  rows = program_rows(B)
  step = rows // math.gcd(rows, cfg.num_layers)
  dcfg = DecodeConfig(max_seqs=rows, page_size=P,
                      num_pages=_round_up(rows * M + 1, step),
                      max_seq_len=max_seq_len, steps_per_call=S,
                      table_buckets=(M,), row_buckets=(rows,),
                      triton_gemm=FLAGS.triton_gemm,
                      merge_dots=FLAGS.merge_dots,
                      attention=FLAGS.attention, kv_dtype=FLAGS.kv_dtype)
  kvbpt = _kv_bytes_per_token(cfg)
  pool = dcfg.num_pages * P * kvbpt
  payload = payload_pages(pages_for(C, P)) * P * kvbpt
  gathered = B * M * P * kvbpt
  weights = bc.param_bytes(cfg)["total"]
  need = (weights + pool * (1 + FLAGS.pool_copies) + payload
          + 2 * gathered / cfg.num_layers + 3 * B * cfg.vocab_size * 4
          + (256 << 20))
  return dcfg, {"pool_bytes": pool, "payload_bytes": payload,
                "kv_gathered_bytes": gathered, "weight_bytes": weights,
                "estimated_need_bytes": need, "total_calls": total_calls}


def _fill(engine, cfg, B: int, C: int, seed: int):
  """Queues B requests at context C (see the module docstring)."""
  import numpy as np
  from pdjax.engine.requests import DecodeRequest, RequestKV
  from pdjax.engine.sampling import SamplingParams
  kv = bc.zero_request_kv(engine, cfg, C)
  greedy = SamplingParams(max_tokens=engine.dcfg.max_seq_len - C,
                          temperature=FLAGS.temperature,
                          top_p=0.9 if FLAGS.temperature else 1.0,
                          ignore_eos=True)
  first = np.random.default_rng(seed).integers(3, cfg.vocab_size, B)
  for i in range(B):
    rid = f"bench-{i}"
    res = engine.reserve(rid, C, greedy.max_tokens)
    if res is None:
      raise RuntimeError(f"decode pool refused row {i} of {B}")
    engine.submit(DecodeRequest(
        rid, range(C), int(first[i]), 0.0, RequestKV(kv, C), greedy, i,
        lambda ev: None, reservation=res))


def new_engine(params, cfg, mesh, rules, dcfg):
  """The engine a point is measured on (with --sampling_path=device, its
  one program for every batch, the sampling path a lax.cond on device)."""
  from pdjax.engine.decode import DecodeEngine
  engine = DecodeEngine(params, cfg, mesh, rules, dcfg, eos_ids=())
  if FLAGS.sampling_path == "device":
    on_device = {rows: engine.programs.generate_program(None, rows)
                 for rows in dcfg.row_counts}
    engine.programs.generate = lambda all_greedy, rows: on_device[rows]
  return engine


def first_iteration(engine, cfg, B: int, C: int) -> float:
  """Fills B rows of C tokens and runs the engine's first iteration (the
  inserts, then the first generate call, which compiles); its seconds."""
  import jax
  rep = engine.replicas[0]
  _fill(engine, cfg, B, C, FLAGS.seed)
  t0 = time.perf_counter()
  engine.step()
  jax.block_until_ready(rep.state)
  seconds = time.perf_counter() - t0
  if rep.live_rows != B:
    raise RuntimeError(f"only {rep.live_rows} of {B} rows were admitted")
  return seconds


def timed_call(engine):
  """One call as --timed says: the replica's dispatch, or the engine's
  whole iteration (dispatch, then delivering the previous call's tokens).
  Returns the call's output to wait on."""
  rep = engine.replicas[0]

  def call():
    if FLAGS.timed == "dispatch":
      return rep.dispatch().out
    engine.step()
    return engine._inflight[0][1].out  # pylint: disable=protected-access
  return call


def verify_calls() -> int:
  """Verify calls per k: one that compiles, the warm-up, the samples."""
  return 1 + FLAGS.warmup + max(FLAGS.repeat, 1) * FLAGS.calls_per_sample


def _time_verify(engine, cfg, B: int, ks: list[int]) -> dict[int, dict]:
  """Speculative decoding's verify call over k drafted tokens per row, for
  each k: the pool's verify program (``engine.programs.verify_program``)
  called on the B live rows as they stand after the generate timing, each
  row on pages of its own (row i on pages 1 + i*M ..), random drafts (the
  model keeps next to none: each call emits about one token per row, as a
  call whose drafts all miss; its cost does not depend on how many it
  keeps). Every k starts from the same positions. Returns per k the call
  time and whether every live row emitted a token in every call."""
  import jax
  import numpy as np
  from pdjax.engine import compile_stats
  from pdjax.engine.decode_programs import unpack_step_output
  rep = engine.replicas[0]
  rows = list(range(B))
  call_rows = rep._call_rows(rows)  # pylint: disable=protected-access
  b, M = len(call_rows), engine.dcfg.pages_per_seq
  program = engine.programs.verify_program(True, b)
  table = np.zeros((b, M), np.int32)
  table[:B] = 1 + np.arange(B * M, dtype=np.int32).reshape(B, M)
  slots = rep._slot_inputs(rows, call_rows, M)  # pylint: disable=protected-access
  slots = slots.replace(page_table=jax.device_put(table, rep.replicated))
  start = {f: np.asarray(getattr(rep.state, f))
           for f in ("tokens", "positions", "generated", "done")}
  rng = np.random.default_rng(FLAGS.seed)
  out = {}
  for k in ks:
    rep.state = rep.state.replace(**{
        f: jax.device_put(v, getattr(rep.state, f).sharding)
        for f, v in start.items()})
    drafts = jax.device_put(
        rng.integers(3, cfg.vocab_size, (b, k)).astype(np.int32),
        rep.replicated)
    num = jax.device_put(np.where(np.arange(b) < B, k, 0).astype(np.int32),
                         rep.replicated)
    ok = True

    def call():
      rep.state, packed = program(rep.params, rep.state, slots, drafts, num)
      return packed
    with compile_stats.CompileCounter() as cc:
      jax.block_until_ready(call())
    for _ in range(FLAGS.warmup):
      jax.block_until_ready(call())
    samples = []
    for _ in range(max(FLAGS.repeat, 1)):
      t0 = time.perf_counter()
      outs = [call() for _ in range(FLAGS.calls_per_sample)]
      jax.block_until_ready(outs)
      samples.append((time.perf_counter() - t0) / FLAGS.calls_per_sample)
      ok = ok and all(bool(unpack_step_output(o).valid[0, :B].all())
                      for o in outs)
    out[k] = {"call_time_s": bc.Timing(samples).as_dict(),
              "compile_s": cc.seconds, "rows_emitted_every_call": ok}
  return out


def _run_combo(params, cfg, mesh, rules, B, C, S, limits, writer, budget):
  import jax
  import numpy as np
  from pdjax.engine import compile_stats

  dcfg, mem = _layout(cfg, B, C, S)
  params_rec = {"batch": B, "program_rows": dcfg.rows_for(B), "context": C,
                "steps_per_call": S,
                "calls_per_sample": FLAGS.calls_per_sample,
                "page_size": dcfg.page_size, "max_seq_len": dcfg.max_seq_len,
                "num_pages": dcfg.num_pages, "warmup": FLAGS.warmup,
                "repeat": FLAGS.repeat, "rules": "decode_dp", "dp": 1,
                "triton_gemm": dcfg.triton_gemm, "attention": dcfg.attention,
                "merge_dots": dcfg.merge_dots, "kv_dtype": dcfg.kv_dtype,
                "pallas_widen_to": FLAGS.pallas_widen_to,
                "temperature": FLAGS.temperature,
                "sampling_path": FLAGS.sampling_path, "timed_call": FLAGS.timed,
                "setup": "engine.submit of a zero KV -> insert program",
                "timed": "DecodeReplica.dispatch -> programs.generate"}
  if mem["estimated_need_bytes"] > budget:
    print(f"  B={B} C={C} S={S}: skipped, needs ~"
          f"{mem['estimated_need_bytes'] / 2**30:.1f} GiB of "
          f"{budget / 2**30:.1f}", flush=True)
    return writer.write(TOOL, "skipped", params_rec,
                        {"reason": "does not fit", **mem,
                         "budget_bytes": budget})
  engine = new_engine(params, cfg, mesh, rules, dcfg)
  call = None
  program_rows = dcfg.rows_for(B)
  compiler_options = engine.programs.compiler_options[program_rows]
  paged_attention = engine.programs.paged_attention[program_rows]
  rep = engine.replicas[0]
  try:
    with compile_stats.CompileCounter() as cc:
      setup_s = first_iteration(engine, cfg, B, C)
    mem_analysis = None
    if FLAGS.memory_analysis:   # the rows are admitted by now
      rows = list(range(B))
      compiled = engine.programs.generate(True, program_rows).lower(
          rep.params, rep.state, rep._slot_inputs(rows, rows, rep._width(rows))  # pylint: disable=protected-access
      ).compile()
      m = compiled.memory_analysis()
      mem_analysis = {k: getattr(m, k, None) for k in (
          "temp_size_in_bytes", "argument_size_in_bytes",
          "output_size_in_bytes", "alias_size_in_bytes",
          "generated_code_size_in_bytes")}
      del compiled
    call = timed_call(engine)
    engine.step()  # the first iteration's tokens are delivered here
    for _ in range(FLAGS.warmup):
      jax.block_until_ready(call())
    samples, host = [], []
    with compile_stats.CompileCounter() as timed_cc:
      for _ in range(max(FLAGS.repeat, 1)):
        t0 = time.perf_counter()
        for _ in range(FLAGS.calls_per_sample):
          h0 = time.perf_counter()
          out = call()
          host.append(time.perf_counter() - h0)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / FLAGS.calls_per_sample)
    from pdjax.engine.decode_programs import unpack_step_output
    valid = unpack_step_output(out).valid
    positions = np.asarray(rep.state.positions)
    calls = 2 + FLAGS.warmup + max(FLAGS.repeat, 1) * FLAGS.calls_per_sample
    # The call's first B columns are the B live rows (state rows 0..B-1);
    # the rest pad the program's row count.
    rows_ok = (bool(valid[:, :B].all())
               and bool((positions[:B] == C + S * calls).all()))
    verify = (_time_verify(engine, cfg, B, bc.parse_ints(FLAGS.verify_tokens))
              if FLAGS.verify_tokens else None)
  finally:
    # Every reference to the engine goes before the collection: the
    # engine's objects refer to each other, so only the collector frees
    # its pools, and a closure over it (``call``) that outlived this
    # collect kept both pools of a 64-row x 4K combo alive into the next
    # combo, which then failed to allocate its own (H100, 8.2 GiB short).
    del engine, rep, call
    gc.collect()
  timing = bc.Timing(samples)
  step_s = timing.median / S
  timed_steps = max(FLAGS.repeat, 1) * FLAGS.calls_per_sample * S
  # KV length during a step is position + 1.
  ctx_mean = C + S * (2 + FLAGS.warmup) + (timed_steps - 1) / 2 + 1
  by = _step_bytes(cfg, B, ctx_mean)

  def roof(bw):
    return None if bw is None else by["total"] / bw

  results = {
      "call_time_s": timing.as_dict(), "step_time_s": step_s,
      "host_dispatch_s": bc.Timing(host).as_dict(),
      "setup_s": setup_s, "compile_s": cc.seconds,
      "compiler_options": compiler_options,
      "paged_attention": paged_attention,
      "compiles_during_timing": timed_cc.count,
      "rows_live_every_step": rows_ok, "ctx_mean": ctx_mean,
      "bytes_per_step": by, "tokens_per_s": B / step_s,
      "achieved_bw": by["total"] / step_s,
      "roofline_s": roof(limits.hbm_bw),
      "roofline_spec_s": roof(limits.spec_hbm_bw),
      "roofline_run_s": roof(limits.run_hbm_bw),
      "ratio": bc.ratio(step_s, roof(limits.hbm_bw)),
      "ratio_spec": bc.ratio(step_s, roof(limits.spec_hbm_bw)),
      "ratio_run": bc.ratio(step_s, roof(limits.run_hbm_bw)),
      "memory_analysis": mem_analysis, **mem}
  if verify is not None:
    # A verify call of k drafts against one step of the generate call.
    results["verify"] = {
        str(k): {**v, "vs_step": v["call_time_s"]["median"] / step_s}
        for k, v in verify.items()}
  rec = writer.write(TOOL, "decode", params_rec, results)
  print(f"  B={B} C={C} S={S}: step {step_s * 1e3:.3f} ms, roofline "
        f"{bc.fmt(results['roofline_s'] and results['roofline_s'] * 1e3, '.3f')}"
        f" ms, ratio {bc.fmt(results['ratio'], '.2f')}, "
        f"{B / step_s:.0f} tok/s (compile {cc.seconds:.1f} s)"
        + ("" if rows_ok else "  WARNING: rows finished early"), flush=True)
  for k, v in (verify or {}).items():
    print(f"    verify k={k}: {v['call_time_s']['median'] * 1e3:.3f} ms per "
          f"call, {v['call_time_s']['median'] / step_s:.2f}x the step"
          + ("" if v["rows_emitted_every_call"] else
             "  WARNING: a row emitted nothing"), flush=True)
  return rec


def grid() -> tuple[list[int], list[int]]:
  """The batch sizes and context lengths the flags ask for, capped on CPU
  (--cpu_max_batch, --cpu_max_context)."""
  batches = bc.parse_ints(FLAGS.batch_sizes)
  contexts = bc.parse_ints(FLAGS.context_lengths)
  if not bc.is_gpu():
    batches = [b for b in batches if b <= FLAGS.cpu_max_batch]
    contexts = [c for c in contexts if c <= FLAGS.cpu_max_context]
    print(f"CPU: batches {batches}, contexts {contexts} (caps "
          f"--cpu_max_batch/--cpu_max_context)")
  return batches, contexts


def main(argv) -> None:
  del argv
  import jax
  from pdjax.sharding import ShardingRules, make_mesh

  cfg = bc.model_from_flags()
  limits = bc.resolve_limits()
  writer = bc.RecordWriter(FLAGS.out, model=FLAGS.model, cfg=cfg,
                           limits=limits)
  if FLAGS.measure_ceilings:
    bc.measure_ceilings(limits, writer, TOOL)
  batches, contexts = grid()
  compare_at = {tuple(int(v) for v in s.split("x"))
                for s in FLAGS.compare_at.split(",") if s}
  rules = ShardingRules.load("decode_dp")
  mesh = make_mesh({"dp": 1}, jax.devices()[:1])
  if FLAGS.pallas_widen_to:
    import functools
    from pdjax.model import pallas_attention
    pallas_attention.paged_decode_attention = functools.partial(
        pallas_attention.paged_decode_attention,
        widen_to=FLAGS.pallas_widen_to)
  t0 = time.perf_counter()
  params, cfg = bc.benchmark_weights(cfg, rules, mesh, seed=FLAGS.seed)
  budget = bc.hbm_budget_bytes(FLAGS.hbm_gib)
  print(f"decode benchmark: {cfg.name} ({cfg.param_count() / 1e9:.2f}B, "
        f"{cfg.dtype}) on {bc.device_kind()}, weights ready in "
        f"{time.perf_counter() - t0:.1f} s; memory budget "
        f"{budget / 2**30:.1f} GiB; limits: {limits.source}", flush=True)
  # Context-major: the whole batch sweep at the first context comes first,
  # so a run cut short by its timeout still has a throughput curve.
  for C in contexts:
    for B in batches:
      steps = [FLAGS.steps_per_call]
      if FLAGS.compare_steps_per_call and FLAGS.steps_per_call != 1 and (
          not compare_at or (B, C) in compare_at):
        steps.append(1)
      for S in steps:
        try:
          _run_combo(params, cfg, mesh, rules, B, C, S, limits, writer,
                     budget)
        except Exception as e:  # pylint: disable=broad-except
          oom = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(
              e).lower()
          print(f"  B={B} C={C} S={S}: {'OOM' if oom else 'FAILED'}: "
                f"{str(e)[:300]}", flush=True)
          if not oom:
            traceback.print_exc()
          writer.write(TOOL, "oom" if oom else "error",
                       {"batch": B, "context": C, "steps_per_call": S},
                       {"error": str(e)[:2000]})
          gc.collect()
  _print_summary(writer.records, limits)


def _print_summary(records, limits) -> None:
  rows, steps = [], {}
  for r in records:
    p, x = r["params"], r["results"]
    if r["measurement"] != "decode":
      continue
    steps[(p["batch"], p["context"], p["steps_per_call"])] = x["step_time_s"]
    rows.append([
        p["batch"], p["context"], p["steps_per_call"],
        bc.fmt(x["step_time_s"] * 1e3, ".3f"),
        bc.fmt(x["roofline_s"] and x["roofline_s"] * 1e3, ".3f"),
        bc.fmt(x["ratio"], ".2f"), bc.fmt(x["ratio_spec"], ".2f"),
        bc.fmt(x["ratio_run"], ".2f"),
        bc.fmt(x["achieved_bw"] / 1e9, ".1f"),
        bc.fmt(x["tokens_per_s"], ".0f"),
        bc.fmt(x["host_dispatch_s"]["median"] * 1e3, ".3f"),
        bc.fmt(x["compile_s"], ".1f"),
        "ok" if x["rows_live_every_step"] else "ROWS-ENDED"])

  def gbs(x):
    return bc.fmt(None if x is None else x / 1e9, ".4g")

  note = ("roofline = (weight bytes + B*ctx*kv_bytes_per_token) / HBM rate; "
          f"rate (GB/s): measured {gbs(limits.hbm_bw)} ({limits.source}; "
          "read+write elementwise figure, bytes read divided by it), spec "
          f"{gbs(limits.spec_hbm_bw)}, this run {gbs(limits.run_hbm_bw)}. "
          "ratio = step / roofline (target <= 1.25).")
  bc.print_table("decode step (median), one replica",
                 ["B", "ctx", "S", "step_ms", "roof_ms", "ratio",
                  "ratio_spec", "ratio_run", "GB/s", "tok/s", "host_ms",
                  "compile_s", "rows"], rows, note)
  pairs = [(b, c, s) for (b, c, s) in steps if s != 1 and (b, c, 1) in steps]
  if pairs:
    bc.print_table(
        "dispatch overhead: steps_per_call 1 vs N (per-step ms)",
        ["B", "ctx", "N", "S=1_ms", "S=N_ms", "S=1/S=N", "overhead_ms"],
        [[b, c, s, bc.fmt(steps[(b, c, 1)] * 1e3, ".3f"),
          bc.fmt(steps[(b, c, s)] * 1e3, ".3f"),
          bc.fmt(steps[(b, c, 1)] / steps[(b, c, s)], ".2f"),
          bc.fmt((steps[(b, c, 1)] - steps[(b, c, s)]) * 1e3, ".3f")]
         for b, c, s in pairs])
  verify = [[r["params"]["batch"], r["params"]["context"], k,
             bc.fmt(v["call_time_s"]["median"] * 1e3, ".3f"),
             bc.fmt(v["vs_step"], ".2f"),
             "ok" if v["rows_emitted_every_call"] else "ROW-EMPTY"]
            for r in records if r["measurement"] == "decode"
            for k, v in r["results"].get("verify", {}).items()]
  if verify:
    bc.print_table(
        "verify call (speculative decoding) against one generate step",
        ["B", "ctx", "k", "verify_ms", "x_step", "rows"], verify,
        "x_step = verify call / (generate call / steps_per_call); a "
        "speculating pool breaks even where the tokens a verify call emits "
        "(kept drafts + 1) equal x_step.")
  skipped = [r for r in records if r["measurement"] in ("skipped", "oom",
                                                         "error")]
  if skipped:
    print("not measured: " + ", ".join(
        f"B={r['params']['batch']} C={r['params']['context']} "
        f"({r['measurement']})" for r in skipped))


if __name__ == "__main__":
  app.run(main)
