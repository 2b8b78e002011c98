"""``pdjax plan``: size the prefill and decode pools from SLOs and a measured
run.

  # Fit on a batch-eval sweep of one prefill + one decode worker: the
  # prefill from its lowest rate, the decode from every rate; then plan.
  pdjax plan --sweep=runs/chat_disagg --rates=16,32,64 \\
      --max_batch=4 --max_batch_tokens=8192 --max_rows=128

  # Check the model against a measurement: predicted TTFT and TPOT p90 of
  # 1 + 1 workers at each measured rate next to the measured (the fitted
  # sweep, or another one of the same deployment with --validate_on).
  pdjax plan --sweep=runs/chat_disagg --validate \
      --validate_on=runs/chat_disagg_again ...

``--sweep`` is a ``pdjax bench --sweep_rates`` output directory
(``rate_*/results.jsonl``, ``config.json`` for the SLOs); ``--profile`` a
single run's ``results.jsonl`` instead. ``--max_batch``,
``--max_batch_tokens`` and ``--max_rows`` are the deployment's prefill
batching and decode rows (``[prefill] max_batch``, ``max_batch_tokens``,
``[decode] max_seqs``). ``--router_metrics`` plans for the traffic a
running deployment's router finished over ``--window_s`` (its request
rate and lengths, ``pdjax.planner.traffic``). Prints tables; ``--out``
writes them as JSON, the whole fitted profile included (what the planner's
control loop, ``python -m pdjax.launch.planner --profile``, reads back).
``tools/plan_pools.py`` runs the same from a checkout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
  """The planner's flags (on absl's global flags when it runs)."""
  flags.DEFINE_string("sweep", None, "A `pdjax bench --sweep_rates` output "
                      "directory.", flag_values=fv)
  flags.DEFINE_string("profile", None, "One run's results.jsonl "
                      "(instead of --sweep).", flag_values=fv)
  flags.DEFINE_integer(
      "profiled_decode_workers", 1, "Decode workers of the measured "
      "deployment.", flag_values=fv)
  flags.DEFINE_list("rates", [], "Traffic rates (req/s) to plan for.",
                    flag_values=fv)
  flags.DEFINE_float("ttft_slo", None, "Seconds (default: the "
                     "sweep's config).", flag_values=fv)
  flags.DEFINE_float("tpot_slo", None, "Seconds (default: the "
                     "sweep's config).", flag_values=fv)
  flags.DEFINE_float("attainment", 0.9, "Share of requests that "
                     "must meet both SLOs.", flag_values=fv)
  flags.DEFINE_integer("max_batch", 1, "Prefill prompts per "
                       "program.", flag_values=fv)
  flags.DEFINE_integer("max_batch_tokens", None,
                       "Prefill tokens per program.", flag_values=fv)
  flags.DEFINE_integer("max_rows", None, "Rows per decode worker.",
                       flag_values=fv)
  flags.DEFINE_bool("validate", False, "Predict the measured "
                    "deployment at each measured rate.", flag_values=fv)
  flags.DEFINE_string(
      "validate_on", None, "--validate against this sweep directory (another "
      "measurement of the same deployment) instead of --sweep.",
      flag_values=fv)
  flags.DEFINE_string(
      "router_metrics", None, "A running router's /metrics URL: measure its "
      "traffic over --window_s and plan for it (--rates then take the "
      "measured lengths).", flag_values=fv)
  flags.DEFINE_float("window_s", 30.0, "--router_metrics: seconds "
                     "between the two scrapes.", flag_values=fv)
  flags.DEFINE_string("out", None, "JSON results file.", flag_values=fv)


def _read(path: Path):
  from pdjax.eval.stats import RequestRecord
  with path.open() as f:
    return [RequestRecord.from_dict(json.loads(line)) for line in f
            if line.strip()]


def _sweep_runs(sweep: Path) -> list[tuple[float, Path]]:
  runs = sorted((float(d.name.split("_", 1)[1]), d)
                for d in sweep.glob("rate_*") if (d / "results.jsonl")
                .exists())
  if not runs:
    raise app.UsageError(f"{sweep}: no rate_*/results.jsonl")
  return runs


def _summary(run: Path, slo) -> dict:
  """The run's summary.json, or the same computed from its records (a run
  a time limit cut off has none)."""
  if (run / "summary.json").exists():
    return json.loads((run / "summary.json").read_text())
  from pdjax.eval import stats
  records = _read(run / "results.jsonl")
  return stats.summarize(records, stats.wall_duration(records), slo.ttft_s,
                         slo.tpot_s).to_dict()


def _ms(v: float) -> str:
  return "inf" if math.isinf(v) else f"{v * 1e3:.1f}"


def main(argv) -> None:
  del argv
  from pdjax.planner import (Batching, Slo, Traffic, capacity, fit_profile,
                             plan, predict)
  from pdjax.planner.profile import profile_to_dict
  if bool(FLAGS.sweep) == bool(FLAGS.profile):
    raise app.UsageError("give one of --sweep or --profile")
  config: dict = {}
  runs: list[tuple[float, Path]] = []
  if FLAGS.sweep:
    sweep = Path(FLAGS.sweep)
    runs = _sweep_runs(sweep)
    if (sweep / "config.json").exists():
      config = json.loads((sweep / "config.json").read_text())
    records = _read(runs[0][1] / "results.jsonl")
    decode_runs = [_read(d / "results.jsonl") for _, d in runs]
  else:
    records = _read(Path(FLAGS.profile))
    decode_runs = None
  ttft = FLAGS.ttft_slo or config.get("ttft_slo")
  tpot = FLAGS.tpot_slo or config.get("tpot_slo")
  if ttft is None or tpot is None:
    raise app.UsageError("no SLOs: pass --ttft_slo and --tpot_slo")
  slo = Slo(float(ttft), float(tpot), FLAGS.attainment)
  batching = Batching(FLAGS.max_batch, FLAGS.max_batch_tokens)
  profile = fit_profile(records, decode_runs,
                        decode_workers=FLAGS.profiled_decode_workers)
  p, d = profile.prefill, profile.decode
  print(f"profile: {profile.requests} requests"
        + (f" (prefill from the {runs[0][0]:g} req/s run, decode from "
           f"{len(runs)} runs)" if runs else "")
        + f"\n  prefill s = {p.a * 1e3:.2f} ms + {p.b * 1e6:.3f} us/token"
        f" + {p.c * 1e9:.3f} ns/token^2; fixed TTFT cost "
        f"{profile.overhead_s * 1e3:.2f} ms\n  decode TPOT = "
        f"{d.alpha * 1e3:.2f} ms + {d.beta * 1e6:.2f} us/row "
        f"(p90/mean {d.tpot_spread:.2f})\n  SLO: TTFT <= {slo.ttft_s:g} s, "
        f"TPOT <= {slo.tpot_s:g} s for {slo.attainment:.0%}; prefill "
        f"batches of {batching.max_batch}"
        + (f", rows per decode worker {FLAGS.max_rows}"
           if FLAGS.max_rows else ""))
  result: dict = {
      "slo": dataclasses.asdict(slo),
      "batching": dataclasses.asdict(batching), "max_rows": FLAGS.max_rows,
      # What the planner loop (python -m pdjax.launch.planner --profile)
      # reads back.
      "profile": profile_to_dict(profile)}
  cap = capacity(profile, slo, 1, 1, max_rows=FLAGS.max_rows,
                 batching=batching)
  print(f"  1 prefill + 1 decode worker: up to {cap:.1f} req/s\n")
  result["capacity_1p1d"] = cap

  if FLAGS.validate and FLAGS.validate_on:
    runs = _sweep_runs(Path(FLAGS.validate_on))
  if FLAGS.validate and runs:
    print(f"measured: {FLAGS.validate_on or FLAGS.sweep}")
    print("| rate | TTFT p90 predicted / measured (ms) | TPOT p90 predicted"
          " / measured (ms) | measured attainment |\n|---|---|---|---|")
    rows = []
    for rate, path in runs:
      s = _summary(path, slo)
      pr = predict(profile, Traffic.like(profile, rate), 1, 1,
                   quantile=slo.attainment, max_rows=FLAGS.max_rows,
                   batching=batching)
      print(f"| {rate:g} | {_ms(pr.ttft_s)} / {_ms(s['ttft']['p90'])} | "
            f"{_ms(pr.tpot_s)} / {_ms(s['tpot']['p90'])} | "
            f"{s['slo_attainment']:.1%} |")
      rows.append({"rate": rate, "predicted_ttft_s": pr.ttft_s,
                   "measured_ttft_s": s["ttft"]["p90"],
                   "predicted_tpot_s": pr.tpot_s,
                   "measured_tpot_s": s["tpot"]["p90"],
                   "measured_attainment": s["slo_attainment"]})
    result["validation"] = rows
    print()

  lengths = (profile.prompt_tokens, profile.output_tokens)
  rates = [float(r) for r in FLAGS.rates]
  if FLAGS.router_metrics:
    from pdjax.planner.traffic import scrape, traffic_between
    before = scrape(FLAGS.router_metrics)
    time.sleep(FLAGS.window_s)
    measured = traffic_between(before, scrape(FLAGS.router_metrics),
                               FLAGS.window_s)
    lengths = (measured.prompt_tokens, measured.output_tokens)
    print(f"measured traffic: {measured.rate:.2f} req/s over "
          f"{FLAGS.window_s:g} s, prompt {np.mean(lengths[0]):.0f} tokens, "
          f"output {np.mean(lengths[1]):.0f} tokens on average\n")
    result["measured_traffic"] = {
        "rate": measured.rate, "mean_prompt_tokens": float(np.mean(
            lengths[0])), "mean_output_tokens": float(np.mean(lengths[1]))}
    rates = rates or [measured.rate]
  if rates:
    print("| rate | prefill workers | decode workers | TTFT p90 (ms) | "
          "TPOT p90 (ms) | rows per decode worker |\n|---|---|---|---|---|"
          "---|")
    plans = []
    for rate in rates:
      pl = plan(profile, Traffic(rate, *lengths), slo,
                max_rows=FLAGS.max_rows, batching=batching)
      if pl is None:
        print(f"| {rate:g} | - | - | no deployment meets the SLOs | | |")
        plans.append({"rate": rate})
        continue
      print(f"| {rate:g} | {pl.num_prefill} | {pl.num_decode} | "
            f"{_ms(pl.ttft_s)} | {_ms(pl.tpot_s)} | {pl.decode_rows:.0f} |")
      plans.append({"rate": rate, "num_prefill": pl.num_prefill,
                    "num_decode": pl.num_decode, "ttft_s": pl.ttft_s,
                    "tpot_s": pl.tpot_s, "decode_rows": pl.decode_rows})
    result["plans"] = plans
  if FLAGS.out:
    Path(FLAGS.out).write_text(json.dumps(result, indent=2,
                                          default=float) + "\n")


def run(argv=None) -> None:
  """``pdjax plan``: defines the flags, parses ``argv``, runs."""
  from pdjax.launch.flags import define_for_main
  define_for_main(define_flags)
  app.run(main, argv=argv)


if __name__ == "__main__":
  run()
