r"""``pdjax bench``: offer a workload to a pdjax router and measure it.

The driver is how pdjax's claims get checked: the same workload, arrival
process and metric definitions (``pdjax.eval.stats``) against a disaggregated
and a colocated deployment, with one chart comparing them. It talks to the
router through a small ``Backend`` adapter (``pdjax.eval.backends``) so
that the measuring code never depends on the client's details; ``--backend=openai``
offers the same load to an OpenAI-compatible server instead (pdjax's
gateway, or vLLM/SGLang for a comparison on the same GPUs).

Examples:
  # 500 ShareGPT-like requests at 4 req/s (Poisson).
  pdjax bench --target=localhost:50051 --preset=chat \
      --num_requests=500 --rate=4 --label=disagg --out_dir=runs/chat_disagg

  # A rate sweep; one results dir per rate, sweep.json and sweep.png.
  pdjax bench --target=... --preset=code \
      --sweep_rates=1,2,4,8,16 --label=colocated --out_dir=runs/code_coloc

  # Tiny CPU model: same shapes scaled down to fit 512 tokens.
  pdjax bench --target=... --preset=summarize \
      --length_scale=0.05 --max_model_len=512 --vocab_size=320

  # The same through pdjax's OpenAI gateway (or any OpenAI-compatible server).
  pdjax bench --backend=openai --target=http://localhost:8000 \
      --preset=chat --num_requests=500 --rate=4 --out_dir=runs/chat_gateway

  # A load ramp: Poisson arrivals at 2, then 8, then 2 req/s, a minute
  # each; summary.json and the table add each step's SLO attainment.
  pdjax bench --target=... --preset=code \
      --rate_schedule=2:60,8:60,2:60 --out_dir=runs/ramp

  # One chart of several deployments' sweeps (or single runs).
  pdjax bench --plot_only=runs/code_disagg,runs/code_coloc \
      --out_dir=runs/code_compare

Outputs (``--out_dir``): ``results.jsonl`` (one line per request: every
timing, every ITL, generated text and token ids), ``summary.json``,
``latency_cdf.png``, ``config.json``; for sweeps, ``results.jsonl`` and
``summary.json`` per rate under ``rate_<r>/``, plus ``sweep.json``,
``sweep.png`` and ``latency_cdf.png`` (one line per rate). ``results.jsonl`` is
appended as requests finish, then rewritten in request order at the end, so a
killed run still leaves its finished requests on disk. The first Ctrl-C stops
sending, cancels requests in flight and writes everything (cancelled requests
are kept, marked ``"status": "cancelled"``); a second Ctrl-C exits at once.

``tools/batch_eval.py`` runs the same driver from a checkout. Charts and
the progress bar need the ``eval`` extra (``pip install 'pdjax[eval]'``).

Synthetic presets send random token ids drawn from ``[0, --vocab_size)``
minus ``--exclude_token_ids``: set both for the served model (defaults fit
Llama 2). ``--ignore_eos`` defaults to on for presets (so output lengths follow
the preset) and off for ``--input`` datasets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from absl import app, flags, logging

from pdjax.eval import load, plots, stats, workloads
from pdjax.eval.backends import KINDS, make_backend
from pdjax.eval.load import Backend
from pdjax.eval.stats import RequestRecord, Summary
from pdjax.eval.workloads import WorkItem

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
  """The driver's flags (on absl's global flags when it runs)."""
  flags.DEFINE_string("target", "localhost:50051",
                      "Router address host:port; with --backend=openai, the "
                      "server's URL (http://host:port).", flag_values=fv)
  flags.DEFINE_enum("backend", "pdjax", list(KINDS),
                    "pdjax: the router's gRPC API (pdjax.client); openai: an "
                    "OpenAI-compatible server's streamed /v1/completions "
                    "(pdjax.launch.gateway, vLLM, SGLang).", flag_values=fv)
  flags.DEFINE_string("model", None, "--backend=openai: the model name to "
                      "send (default: the first of the server's /v1/models).",
                      flag_values=fv)
  flags.DEFINE_string("api_key", None, "--backend=openai: sent as "
                      "'Authorization: Bearer'.", flag_values=fv)
  flags.DEFINE_bool("sessions", False,
                    "--backend=pdjax: requests as messages on one "
                    "GenerateSession stream to the router, not a call each "
                    "(pdjax.client.AsyncClient's sessions).", flag_values=fv)
  flags.DEFINE_string("input", None,
                      "JSONL (or JSON array) dataset: {'prompt': ...} lines, "
                      "{'prompt_token_ids': [...]} lines, or ShareGPT records. "
                      "Overrides --preset's workload (not its SLOs).",
                      flag_values=fv)
  flags.DEFINE_enum("preset", "chat", sorted(workloads.PRESETS),
                    "Synthetic workload; also the default SLOs.",
                    flag_values=fv)
  flags.DEFINE_integer("num_requests", 200, "Requests per run (per rate).",
                       flag_values=fv)
  flags.DEFINE_float("duration_s", None,
                     "Arrival window of each run instead of a fixed count: a "
                     "run at R req/s sends the workload's first round(R * "
                     "duration_s) requests, so every rate of a sweep is "
                     "measured over the same stretch of steady load (a fixed "
                     "count is a short burst at high rates). Needs a finite "
                     "--rate or --sweep_rates; --num_requests is ignored.",
                     flag_values=fv)
  flags.DEFINE_integer("seed", 0,
                       "Seeds the workload, the arrival times and sampling.",
                       flag_values=fv)
  flags.DEFINE_float("rate", math.inf,
                     "Offered load, requests/s (Poisson); inf = all at once.",
                     flag_values=fv)
  flags.DEFINE_integer("concurrency", None,
                       "Max requests in flight (with --rate=inf: a fixed-"
                       "concurrency run).", flag_values=fv)
  flags.DEFINE_list("sweep_rates", None,
                    "Comma list of rates (req/s); one run per rate.",
                    flag_values=fv)
  flags.DEFINE_list("rate_schedule", None,
                    "A piecewise-constant Poisson rate, RATE:SECONDS,... "
                    "(e.g. 2:60,8:60,2:60): one run whose offered rate steps "
                    "through the segments; the requests are as many as the "
                    "arrivals drawn, and each segment's SLO attainment is "
                    "reported. Instead of --rate and --num_requests.",
                    flag_values=fv)
  flags.DEFINE_float("ttft_slo", None, "TTFT SLO, seconds (default: preset's).",
                     flag_values=fv)
  flags.DEFINE_float("tpot_slo", None, "TPOT SLO, seconds (default: preset's).",
                     flag_values=fv)
  flags.DEFINE_float("attainment_target", 0.9,
                     "SLO attainment that defines the max goodput rate.",
                     flag_values=fv)
  flags.DEFINE_integer("max_tokens", None,
                       "Replaces every request's output budget.",
                       flag_values=fv)
  flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0 = greedy).",
                     flag_values=fv)
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.", flag_values=fv)
  flags.DEFINE_integer("top_k", 0, "Top-k sampling; 0 or -1 disables.",
                       flag_values=fv)
  flags.DEFINE_float("min_p", 0.0, "Min-p sampling in [0, 1]; 0 disables.",
                     flag_values=fv)
  flags.DEFINE_integer("min_tokens", 0, "No EOS or stop id before this many "
                       "tokens (at most each request's max_tokens); 0: off.",
                       flag_values=fv)
  flags.DEFINE_float("presence_penalty", 0.0, "vLLM's presence penalty in "
                     "[-2, 2]; 0: off.", flag_values=fv)
  flags.DEFINE_float("frequency_penalty", 0.0, "vLLM's frequency penalty in "
                     "[-2, 2]; 0: off.", flag_values=fv)
  flags.DEFINE_float("repetition_penalty", 1.0, "vLLM's repetition penalty "
                     "in (0, 2]; 1: off.", flag_values=fv)
  flags.DEFINE_bool("ignore_eos", None,
                    "Generate max_tokens regardless of EOS (default: on for "
                    "presets, off for --input).", flag_values=fv)
  flags.DEFINE_list("stop_token_ids", [], "Extra stop token ids.",
                    flag_values=fv)
  flags.DEFINE_float("length_scale", 1.0,
                     "Multiplies the preset's lengths (e.g. 0.05 on CPU).",
                     flag_values=fv)
  flags.DEFINE_integer("max_model_len", 4096,
                       "Every request keeps prompt + max_tokens <= this.",
                       flag_values=fv)
  flags.DEFINE_integer("vocab_size", 32000,
                       "Synthetic prompt ids are drawn below this.",
                       flag_values=fv)
  flags.DEFINE_list("exclude_token_ids", ["0", "1", "2"],
                    "Ids never drawn for synthetic prompts (special tokens).",
                    flag_values=fv)
  flags.DEFINE_string("tokenizer", None,
                      "tokenizer.json (or a dir holding one) to count --input "
                      "tokens: ShareGPT output targets and max_model_len fit.",
                      flag_values=fv)
  flags.DEFINE_string("label", "pdjax",
                      "Deployment name on the charts, e.g. disaggregated.",
                      flag_values=fv)
  flags.DEFINE_string("out_dir", "runs/batch_eval", "Where results go.",
                      flag_values=fv)
  flags.DEFINE_list("plot_only", None,
                    "Re-plot these existing out dirs into --out_dir instead of "
                    "running anything.", flag_values=fv)
  flags.DEFINE_bool("progress", True, "Show a progress bar.", flag_values=fv)


# ----------------------------------------------------------------------------


@dataclasses.dataclass
class EvalConfig:
  """Everything a run needs; built from flags by ``config_from_flags``."""
  target: str = "localhost:50051"
  backend: str = "pdjax"
  model: str | None = None
  api_key: str | None = dataclasses.field(default=None, repr=False)
  sessions: bool = False
  input: str | None = None
  preset: str = "chat"
  num_requests: int = 200
  duration_s: float | None = None
  seed: int = 0
  rate: float = math.inf
  concurrency: int | None = None
  sweep_rates: list[float] | None = None
  rate_schedule: list[tuple[float, float]] | None = None
  ttft_slo: float | None = None
  tpot_slo: float | None = None
  attainment_target: float = 0.9
  max_tokens: int | None = None
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  min_p: float = 0.0
  min_tokens: int = 0
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  repetition_penalty: float = 1.0
  ignore_eos: bool | None = None
  stop_token_ids: list[int] = dataclasses.field(default_factory=list)
  length_scale: float = 1.0
  max_model_len: int = 4096
  vocab_size: int = 32000
  exclude_token_ids: list[int] = dataclasses.field(
      default_factory=lambda: [0, 1, 2])
  tokenizer: str | None = None
  label: str = "pdjax"
  out_dir: str = "runs/batch_eval"
  progress: bool = True

  def __post_init__(self):
    preset = workloads.get_preset(self.preset)
    if self.ttft_slo is None:
      self.ttft_slo = preset.ttft_slo
    if self.tpot_slo is None:
      self.tpot_slo = preset.tpot_slo
    if self.ignore_eos is None:
      self.ignore_eos = self.input is None
    if self.rate_schedule is not None:
      if self.sweep_rates or self.duration_s is not None:
        raise ValueError("rate_schedule is one run: not with sweep_rates "
                         "or duration_s")
      self.rate_schedule = [(float(r), float(d))
                            for r, d in self.rate_schedule]
      self.num_requests = len(self.arrival_times())
      seconds = sum(d for _, d in self.rate_schedule)
      self.rate = self.num_requests / seconds
    if self.duration_s is not None:
      if not self.duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
      if not all(map(math.isfinite, self.sweep_rates or [self.rate])):
        raise ValueError("duration_s needs a finite rate (--rate or "
                         "--sweep_rates): an arrival window at an infinite "
                         "rate has no length")
      # Enough of the workload for the highest rate; lower rates send a
      # prefix of it, so every rate sees the same first requests.
      self.num_requests = self.requests_at(max(self.sweep_rates
                                               or [self.rate]))

  def arrival_times(self):
    """The schedule's send offsets (None without a schedule)."""
    if self.rate_schedule is None:
      return None
    return load.piecewise_arrival_times(self.rate_schedule, self.seed)

  def requests_at(self, rate: float) -> int:
    """Requests a run at ``rate`` sends."""
    if self.duration_s is None:
      return self.num_requests
    return max(1, round(rate * self.duration_s))

  def sampling(self) -> dict[str, Any]:
    return dict(temperature=self.temperature, top_p=self.top_p,
                top_k=self.top_k, min_p=self.min_p,
                min_tokens=self.min_tokens,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty, seed=self.seed,
                ignore_eos=self.ignore_eos,
                stop_token_ids=list(self.stop_token_ids) or None)


def config_from_flags(FLAGS: flags.FlagValues = FLAGS) -> EvalConfig:
  return EvalConfig(
      target=FLAGS.target, backend=FLAGS.backend, model=FLAGS.model,
      api_key=FLAGS.api_key, sessions=FLAGS.sessions, input=FLAGS.input,
      preset=FLAGS.preset,
      num_requests=FLAGS.num_requests, duration_s=FLAGS.duration_s,
      seed=FLAGS.seed, rate=FLAGS.rate,
      concurrency=FLAGS.concurrency,
      sweep_rates=([float(r) for r in FLAGS.sweep_rates]
                   if FLAGS.sweep_rates else None),
      rate_schedule=(load.parse_schedule(FLAGS.rate_schedule)
                     if FLAGS.rate_schedule else None),
      ttft_slo=FLAGS.ttft_slo, tpot_slo=FLAGS.tpot_slo,
      attainment_target=FLAGS.attainment_target, max_tokens=FLAGS.max_tokens,
      temperature=FLAGS.temperature, top_p=FLAGS.top_p, top_k=FLAGS.top_k,
      min_p=FLAGS.min_p, min_tokens=FLAGS.min_tokens,
      presence_penalty=FLAGS.presence_penalty,
      frequency_penalty=FLAGS.frequency_penalty,
      repetition_penalty=FLAGS.repetition_penalty,
      ignore_eos=FLAGS.ignore_eos,
      stop_token_ids=[int(t) for t in FLAGS.stop_token_ids],
      length_scale=FLAGS.length_scale, max_model_len=FLAGS.max_model_len,
      vocab_size=FLAGS.vocab_size,
      exclude_token_ids=[int(t) for t in FLAGS.exclude_token_ids],
      tokenizer=FLAGS.tokenizer, label=FLAGS.label, out_dir=FLAGS.out_dir,
      progress=FLAGS.progress)


def _token_counter(path: str) -> Callable[[str], int]:
  import tokenizers  # pylint: disable=import-outside-toplevel
  p = Path(path)
  tok = tokenizers.Tokenizer.from_file(
      str(p / "tokenizer.json" if p.is_dir() else p))
  return lambda s: len(tok.encode(s, add_special_tokens=False).ids)


def build_items(cfg: EvalConfig) -> list[WorkItem]:
  """The workload: the --input dataset, else the synthetic preset."""
  if cfg.input:
    return workloads.load_dataset(
        cfg.input, num_requests=cfg.num_requests, seed=cfg.seed,
        count_tokens=_token_counter(cfg.tokenizer) if cfg.tokenizer else None,
        max_tokens=cfg.max_tokens, max_model_len=cfg.max_model_len)
  return workloads.generate(
      cfg.preset, cfg.num_requests, vocab_size=cfg.vocab_size,
      max_model_len=cfg.max_model_len, seed=cfg.seed,
      exclude_token_ids=cfg.exclude_token_ids,
      length_scale=cfg.length_scale, max_tokens=cfg.max_tokens)


class _ResultsWriter:
  """results.jsonl: appended as requests end, rewritten in order at close."""

  def __init__(self, path: Path, extra: dict[str, Any]):
    self._path = path
    self._extra = extra
    path.parent.mkdir(parents=True, exist_ok=True)
    self._f: TextIO | None = path.open("w")

  def _line(self, rec: RequestRecord) -> str:
    return json.dumps({**self._extra, **rec.to_dict()}) + "\n"

  def append(self, rec: RequestRecord) -> None:
    if self._f is not None:
      self._f.write(self._line(rec))
      self._f.flush()

  def finish(self, records: Sequence[RequestRecord]) -> None:
    if self._f is not None:
      self._f.close()
      self._f = None
    tmp = self._path.with_suffix(".jsonl.tmp")
    with tmp.open("w") as f:
      f.writelines(self._line(r) for r in records)
    tmp.replace(self._path)


def _write_json(path: Path, obj: Any) -> None:
  path.write_text(json.dumps(stats.to_jsonable(obj), indent=2) + "\n")


_RATE_DIR = "rate_"   # a sweep's run at rate R is in rate_R/


def _rate_dir_name(rate: float) -> str:
  return f"{_RATE_DIR}{rate:g}"


async def _aclose(backend: Any) -> None:
  close = getattr(backend, "aclose", None)
  if close is not None:
    await close()


@dataclasses.dataclass
class EvalOutcome:
  summaries: list[Summary]
  interrupted: bool
  out_dir: Path


async def run_eval(cfg: EvalConfig,
                   backend: Backend | None = None) -> EvalOutcome:
  """Runs the configured workload (once, or per sweep rate) and writes it all.

  ``backend`` defaults to ``make_backend(cfg.target, cfg.backend)``,
  closed at the end.
  """
  out = Path(cfg.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  _write_json(out / "config.json",
              {**dataclasses.asdict(cfg), "api_key": None})  # no secrets
  items = build_items(cfg)
  own_backend = backend is None
  if backend is None:
    backend = make_backend(cfg.target, cfg.backend, model=cfg.model,
                           api_key=cfg.api_key, sessions=cfg.sessions)
  slo = dict(ttft_slo=cfg.ttft_slo, tpot_slo=cfg.tpot_slo)
  meta = dict(label=cfg.label, preset=None if cfg.input else cfg.preset,
              input=cfg.input, num_items=len(items))
  task = asyncio.current_task()
  try:
    rates = cfg.sweep_rates or [cfg.rate]
    sweep = cfg.sweep_rates is not None
    results: list[tuple[float, list[RequestRecord], Summary]] = []
    for rate in rates:
      run_dir = out / _rate_dir_name(rate) if sweep else out
      writer = _ResultsWriter(run_dir / "results.jsonl",
                              dict(label=cfg.label, rate=rate))
      records = await load.run_workload(
          backend, items[:cfg.requests_at(rate)], rate=rate,
          concurrency=cfg.concurrency, sampling=cfg.sampling(),
          seed=cfg.seed, on_record=writer.append, progress=cfg.progress,
          arrival_times=cfg.arrival_times())
      interrupted = bool(task is not None and task.cancelling())
      writer.finish(records)
      summary = stats.summarize(
          records, stats.wall_duration(records), **slo, label=cfg.label,
          rate=rate, concurrency=cfg.concurrency)
      extra = {}
      if cfg.rate_schedule is not None:
        extra["segments"] = segment_summaries(records, cfg)
        for seg in extra["segments"]:
          att = seg["slo_attainment"]
          print(f"  {seg['start_s']:6.0f}-{seg['end_s']:<6.0f} s at "
                f"{seg['rate']:g} req/s: {seg['requests']} requests, "
                f"{seg['failed']} failed, SLO attainment "
                + ("-" if att is None else f"{att:.1%}"), flush=True)
      _write_json(run_dir / "summary.json",
                  {**summary.to_dict(), **meta, **extra,
                   "interrupted": interrupted})
      if not sweep:
        plots.plot_latency_cdfs({cfg.label: records},
                                run_dir / "latency_cdf.png", **slo,
                                title=f"{cfg.label} @ {rate:g} req/s")
      print(stats.format_table(summary), flush=True)
      results.append((rate, records, summary))
      if interrupted:
        print("Interrupted: wrote the requests finished so far.",
              file=sys.stderr)
        break
    summaries = [s for _, _, s in results]
    if sweep:
      best = stats.max_goodput_rate(summaries, cfg.attainment_target)
      _write_json(out / "sweep.json", {
          **meta, "attainment_target": cfg.attainment_target,
          "max_goodput_rate": best, "interrupted": interrupted,
          "points": [s.to_dict() for s in summaries]})
      plots.plot_sweep({cfg.label: summaries}, out / "sweep.png",
                       attainment_target=cfg.attainment_target,
                       title=f"{cfg.label}: {meta['preset'] or cfg.input}")
      plots.plot_latency_cdfs(
          {f"{cfg.label} @ {r:g} req/s": recs for r, recs, _ in results},
          out / "latency_cdf.png", **slo)
      print(stats.format_sweep_table(summaries, cfg.attainment_target),
            flush=True)
    return EvalOutcome(summaries, interrupted, out)
  finally:
    if own_backend:
      await _aclose(backend)


def segment_summaries(records: Sequence[RequestRecord], cfg: EvalConfig,
                      ) -> list[dict[str, Any]]:
  """Per segment of the rate schedule: its requests (by send time), how
  many failed, and their SLO attainment."""
  out, start = [], 0.0
  for i, (rate, seconds) in enumerate(cfg.rate_schedule):
    mine = [r for r in records
            if load.segment_of(r.send_time, cfg.rate_schedule) == i]
    s = stats.summarize(mine, seconds, cfg.ttft_slo, cfg.tpot_slo,
                        rate=rate) if mine else None
    out.append({"rate": rate, "start_s": start, "end_s": start + seconds,
                "requests": len(mine),
                "failed": sum(r.error is not None for r in mine),
                "slo_attainment": s.slo_attainment if s else None,
                "ttft_p90": s.ttft.p90 if s else None,
                "tpot_p90": s.tpot.p90 if s else None})
    start += seconds
  return out


def _read_jsonl(path: Path) -> list[RequestRecord]:
  with path.open() as f:
    return [RequestRecord.from_dict(json.loads(l)) for l in f if l.strip()]


def _finished_runs(d: Path) -> list[Path]:
  """The rate runs of a sweep that was cut off (a time limit) before it
  wrote ``sweep.json``: those that finished, lowest rate first."""
  done = [p.parent for p in d.glob(f"{_RATE_DIR}*/summary.json")]
  return sorted(done, key=lambda p: float(p.name[len(_RATE_DIR):]))


def plot_only(dirs: Sequence[str], out_dir: str,
              attainment_target: float = 0.9) -> dict[str, Path]:
  """Re-plots existing out dirs into ``out_dir``; returns the written PNGs.

  Sweep dirs (``sweep.json``) and single-run dirs (``summary.json``) are both
  accepted, and so is a sweep cut off before its ``sweep.json`` (its
  finished rate runs stand for it); points sharing a label form one line
  on the sweep chart (so single runs at several rates combine; of repeated
  rates the first dir given wins), and single runs' ``results.jsonl`` feed
  the latency CDF chart.
  """
  sweeps: dict[str, list[Summary]] = {}
  runs: dict[str, list[RequestRecord]] = {}
  ttft_slo = tpot_slo = None
  expanded = []
  for d in map(Path, dirs):
    cut = not ((d / "sweep.json").exists() or (d / "summary.json").exists())
    expanded += (_finished_runs(d) or [d]) if cut else [d]
  for d in expanded:
    if (d / "sweep.json").exists():
      data = json.loads((d / "sweep.json").read_text())
      pts = [Summary.from_dict(p) for p in data["points"]]
      sweeps.setdefault(data.get("label") or d.name, []).extend(pts)
    elif (d / "summary.json").exists():
      s = Summary.from_dict(json.loads((d / "summary.json").read_text()))
      label = s.label or d.name
      sweeps.setdefault(label, []).append(s)
      if (d / "results.jsonl").exists():
        key = label if label not in runs else f"{label} ({d.name})"
        runs[key] = _read_jsonl(d / "results.jsonl")
      pts = [s]
    else:
      raise FileNotFoundError(f"{d}: neither sweep.json nor summary.json")
    if pts and ttft_slo is None:
      ttft_slo, tpot_slo = pts[0].ttft_slo, pts[0].tpot_slo
  for label, pts in sweeps.items():  # one point per (label, rate)
    seen: set[float | None] = set()
    sweeps[label] = [p for p in pts
                     if not (p.rate in seen or seen.add(p.rate))]
    if len(sweeps[label]) < len(pts):
      print(f"[{label}] repeated rates: kept the first run of each",
            file=sys.stderr)
  out = Path(out_dir)
  written = {}
  if any(len(v) for v in sweeps.values()):
    written["sweep"] = plots.plot_sweep(sweeps, out / "sweep.png",
                                        attainment_target=attainment_target)
    for label, pts in sweeps.items():
      print(f"[{label}]")
      print(stats.format_sweep_table(pts, attainment_target))
  if runs:
    written["latency_cdf"] = plots.plot_latency_cdfs(
        runs, out / "latency_cdf.png", ttft_slo=ttft_slo, tpot_slo=tpot_slo)
  return written


def main(argv: Sequence[str], FLAGS: flags.FlagValues = FLAGS) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.plot_only:
    for name, path in plot_only(FLAGS.plot_only, FLAGS.out_dir,
                                FLAGS.attainment_target).items():
      print(f"wrote {name}: {path}")
    return 0
  if FLAGS.input is None and FLAGS.length_scale <= 0:
    raise app.UsageError("--length_scale must be > 0")
  if FLAGS.input and FLAGS.length_scale != 1.0:
    logging.warning("--length_scale applies to synthetic presets only; "
                    "ignored with --input")
  try:
    cfg = config_from_flags(FLAGS)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  outcome = asyncio.run(run_eval(cfg))
  print(f"results in {outcome.out_dir}")
  return 130 if outcome.interrupted else 0


def run(argv: Sequence[str] | None = None) -> None:
  """``pdjax bench``: defines the flags, parses ``argv``, runs."""
  from pdjax.launch.flags import define_for_main
  define_for_main(define_flags)
  app.run(main, argv=argv)


if __name__ == "__main__":
  run()
