r"""A load ramp against an elastic deployment with the planner on: do the
pools grow and shrink with the offered rate, is the SLO kept after the
planner's reaction time, and does any request fail?

What runs, all on this machine (CPU, the tiny model of
``configs/deployments/test.toml``):

  1. an elastic deployment (``pdjax.launch.cluster.launch_elastic``): the
     router, one prefill and one decode worker, and ``--num_flex`` workers
     of both pools, supervised as ``pdjax.launch.local`` supervises them;
  2. the profile: short batch-eval runs at ``--profile_rates`` against the
     deployment as started, fitted with ``pdjax.planner.fit_profile`` (or
     ``--profile``, a ``tools/plan_pools.py --out`` file);
  3. the ramp: Poisson arrivals at the ``--schedule``'s rates (e.g. 2 -> 8 ->
     2 req/s) with the planner's control loop acting through a
     ``LocalScaler`` (processes started and drained away) and moving the
     workers of both pools; the router's pools are sampled every second.

On a CPU machine extra worker processes add no compute (they share the
same cores), so the workers stand in for accelerators with
``--emulate_prefill_s`` / ``--emulate_decode_s``: a sleep of A + B x tokens
per prefill batch and A + B x rows per decode step, time a worker spends
without using a core, as a device's would be. Everything else (discovery,
the planner, drains, moves, routing) is the real thing.

Writes to ``--out_dir``: ``results.jsonl`` (every request),
``timeline.jsonl`` (pools each second), ``planner.jsonl`` (each pass of the
loop), ``profile.json``, ``summary.json`` and ``ramp.md`` (per step: rate,
requests, failures, the planner's reaction time, SLO attainment over the
step and after the reaction), and ``ramp.png`` (offered rate, workers per
pool, TTFT and TPOT p90 against time).

  python tools/elastic_ramp.py --schedule=2:60,8:120,2:150 \
      --out_dir=tools/results/elastic_ramp
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import sys
import threading
import time
from pathlib import Path

import numpy as np
from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]

SCHEDULE = flags.DEFINE_string("schedule", "2:60,8:120,2:150",
                               "The ramp: RATE:SECONDS,... (req/s).")
PROFILE = flags.DEFINE_string("profile", None, "A tools/plan_pools.py --out "
                              "file instead of measuring one.")
PROFILE_RATES = flags.DEFINE_list("profile_rates", ["1", "2", "4"],
                                  "Rates (req/s) of the profiling runs.")
PROFILE_S = flags.DEFINE_float("profile_s", 20.0, "Seconds per profiling "
                               "run.")
TTFT_SLO = flags.DEFINE_float("ttft_slo", 0.6, "Seconds.")
TPOT_SLO = flags.DEFINE_float("tpot_slo", 0.05, "Seconds.")
PRESET = flags.DEFINE_string("preset", "code", "batch-eval workload.")
LENGTH_SCALE = flags.DEFINE_float("length_scale", 0.25, "Of the preset's "
                                  "lengths (the test model serves 256).")
NUM_FLEX = flags.DEFINE_integer("num_flex", 1, "Workers of both pools.")
MAX_PREFILL = flags.DEFINE_integer("max_prefill", 3, "")
MAX_DECODE = flags.DEFINE_integer("max_decode", 3, "")
INTERVAL = flags.DEFINE_float("interval_s", 2.0, "Planner pass period.")
WINDOW = flags.DEFINE_float("window_s", 6.0, "Planner traffic window.")
UP_COOLDOWN = flags.DEFINE_float("up_cooldown_s", 10.0, "")
DOWN_COOLDOWN = flags.DEFINE_float("down_cooldown_s", 20.0, "")
DOWN_AFTER = flags.DEFINE_float("down_after_s", 15.0, "")
EMULATE_PREFILL = flags.DEFINE_string("emulate_prefill_s", "0.12,0.0005",
                                      "A,B per prefill batch.")
EMULATE_DECODE = flags.DEFINE_string("emulate_decode_s", "0.02,0.008",
                                     "A,B per decode step.")
SEED = flags.DEFINE_integer("seed", 0, "Workload and arrivals.")
OUT_DIR = flags.DEFINE_string("out_dir", "tools/results/elastic_ramp", "")
RUN_DIR = flags.DEFINE_string("run_dir", None, "Process logs (default: "
                              "OUT_DIR/run, not for committing).")
BIN_S = flags.DEFINE_float("bin_s", 10.0, "Chart bins (seconds).")


def _items(n: int, seed: int):
  from pdjax.eval import workloads
  return workloads.generate(PRESET.value, n, vocab_size=320,
                            max_model_len=256, seed=seed,
                            exclude_token_ids=[0, 1, 2],
                            length_scale=LENGTH_SCALE.value)


SAMPLING = dict(temperature=0.0, top_p=1.0, top_k=0, seed=0,
                ignore_eos=True, stop_token_ids=None)


async def _profile(backend, out: Path, settings_slo) -> Path:
  """Short runs at the profiling rates on the deployment as started
  (1 prefill + 1 decode worker + the flexible ones in decode), fitted."""
  from pdjax.eval import load
  from pdjax.planner import fit_profile
  from pdjax.planner.profile import profile_to_dict
  runs = []
  for k, rate in enumerate(float(r) for r in PROFILE_RATES.value):
    n = max(10, round(rate * PROFILE_S.value))
    recs = await load.run_workload(backend, _items(n, SEED.value + 100 + k),
                                   rate=rate, sampling=SAMPLING,
                                   seed=SEED.value + k, progress=False)
    bad = [r for r in recs if r.error]
    print(f"profile run at {rate:g} req/s: {len(recs)} requests, "
          f"{len(bad)} failed", flush=True)
    runs.append(recs)
  decode_workers = 1 + (NUM_FLEX.value if NUM_FLEX.value else 0)
  profile = fit_profile(runs[0], runs, decode_workers=decode_workers)
  path = out / "profile.json"
  path.write_text(json.dumps({
      "profile": profile_to_dict(profile),
      "slo": dict(ttft_s=settings_slo[0], tpot_s=settings_slo[1],
                  attainment=0.9),
      "batching": {"max_batch": 2}, "max_rows": 16}, indent=1) + "\n")
  p, d = profile.prefill, profile.decode
  print(f"profile: prefill {p.a * 1e3:.1f} ms + {p.b * 1e6:.1f} us/token; "
        f"fixed {profile.overhead_s * 1e3:.1f} ms; decode "
        f"{d.alpha * 1e3:.1f} ms + {d.beta * 1e3:.2f} ms/row "
        f"(p90/mean {d.tpot_spread:.2f})", flush=True)
  return path


async def _sample_pools(cluster, timeline: list, stop: asyncio.Event,
                        t0: float) -> None:
  from pdjax.launch.cluster import router_workers
  while not stop.is_set():
    try:
      ws = await asyncio.to_thread(router_workers, cluster)
      row = {"t": time.perf_counter() - t0, "prefill": 0, "decode": 0,
             "draining": 0,
             "processes": sum(1 for p in cluster.procs
                              if p.role != "router" and p.popen.poll()
                              is None)}
      for w in ws:
        if w.state == "ready":
          row[w.role] += 1
        elif w.state == "draining":
          row["draining"] += 1
      timeline.append(row)
    except Exception as e:  # noqa: BLE001 - a restarting router
      timeline.append({"t": time.perf_counter() - t0, "error": str(e)})
    try:
      await asyncio.wait_for(stop.wait(), 1.0)
    except asyncio.TimeoutError:
      pass


def _reaction(schedule, timeline) -> list[float | None]:
  """Per step: seconds from its start until the pools reached the size
  they keep for the rest of the step (the planner's reaction: measuring,
  deciding, starting or moving workers, their joining); None if they
  never settled."""
  out, start = [], 0.0
  for _, seconds in schedule:
    end = start + seconds
    rows = [r for r in timeline if start <= r["t"] < end and "error" not in r]
    if not rows:
      out.append(None)
    else:
      last = (rows[-1]["prefill"], rows[-1]["decode"])
      settled = start
      for r in rows:
        if (r["prefill"], r["decode"]) != last:
          settled = r["t"] + 1.0
      out.append(settled - start if settled < end else None)
    start = end
  return out


def _analyse(schedule, records, timeline, slo, out: Path) -> dict:
  from pdjax.eval import load, stats
  reactions = _reaction(schedule, timeline)
  steps, start = [], 0.0
  for i, (rate, seconds) in enumerate(schedule):
    mine = [r for r in records if load.segment_of(r.send_time, schedule)
            == i]
    react = reactions[i]
    after = [r for r in mine if react is not None
             and r.send_time >= start + react]
    s_all = stats.summarize(mine, seconds, *slo) if mine else None
    s_after = stats.summarize(after, seconds - (react or 0), *slo) \
        if after else None
    rows = [r for r in timeline if start <= r["t"] < start + seconds
            and "error" not in r]
    steps.append({
        "rate": rate, "start_s": start, "end_s": start + seconds,
        "requests": len(mine),
        "failed": sum(r.error is not None for r in mine),
        "reaction_s": react,
        "pools_at_end": ({"prefill": rows[-1]["prefill"],
                          "decode": rows[-1]["decode"]} if rows else None),
        "max_pools": ({"prefill": max(r["prefill"] for r in rows),
                       "decode": max(r["decode"] for r in rows)}
                      if rows else None),
        "slo_attainment": s_all.slo_attainment if s_all else None,
        "slo_attainment_after_reaction": (s_after.slo_attainment
                                          if s_after else None),
        "ttft_p90_after_reaction": s_after.ttft.p90 if s_after else None,
        "tpot_p90_after_reaction": s_after.tpot.p90 if s_after else None,
    })
    start += seconds
  return {"steps": steps, "requests": len(records),
          "failed": sum(r.error is not None for r in records),
          "ttft_slo": slo[0], "tpot_slo": slo[1]}


def _fmt(v, pct=False, ms=False):
  if v is None:
    return "-"
  if pct:
    return f"{100 * v:.1f}%"
  if ms:
    return f"{1e3 * v:.0f}"
  return f"{v:.1f}"


def _table(summary: dict) -> str:
  lines = ["| step | rate (req/s) | requests | failed | pools at end (P+D)"
           " | reaction (s) | SLO attainment, whole step | after reaction "
           "| TTFT / TPOT p90 after (ms) |",
           "|---|---|---|---|---|---|---|---|---|"]
  for s in summary["steps"]:
    pools = s["pools_at_end"]
    lines.append(
        f"| {s['start_s']:.0f}-{s['end_s']:.0f} s | {s['rate']:g} | "
        f"{s['requests']} | {s['failed']} | "
        f"{pools['prefill']}+{pools['decode'] if pools else '-'} | "
        f"{_fmt(s['reaction_s'])} | {_fmt(s['slo_attainment'], pct=True)} "
        f"| {_fmt(s['slo_attainment_after_reaction'], pct=True)} | "
        f"{_fmt(s['ttft_p90_after_reaction'], ms=True)} / "
        f"{_fmt(s['tpot_p90_after_reaction'], ms=True)} |")
  return "\n".join(lines)


def _chart(schedule, records, timeline, steps_log, slo, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  total = sum(d for _, d in schedule)
  bin_s = BIN_S.value
  edges = np.arange(0, total + bin_s, bin_s)
  mids = (edges[:-1] + edges[1:]) / 2
  sends = np.array([r.send_time for r in records])
  fig, ax = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
  offered = np.histogram(sends, edges)[0] / bin_s
  ax[0].step(edges[:-1], offered, where="post", label="offered (measured)")
  t, sched = 0.0, []
  for rate, seconds in schedule:
    sched += [(t, rate), (t + seconds, rate)]
    t += seconds
  ax[0].plot(*zip(*sched), "k--", lw=1, label="schedule")
  pts = [(s["t"], s["predicted"]) for s in steps_log if "predicted" in s
         and s.get("t") is not None]
  if pts:
    ax[0].plot(*zip(*pts), ".", ms=3, label="planner's prediction")
  ax[0].set_ylabel("req/s")
  ax[0].legend(fontsize=8)
  rows = [r for r in timeline if "error" not in r]
  tt = [r["t"] for r in rows]
  ax[1].step(tt, [r["prefill"] for r in rows], where="post",
             label="prefill (ready)")
  ax[1].step(tt, [r["decode"] for r in rows], where="post",
             label="decode (ready)")
  ax[1].step(tt, [r["processes"] for r in rows], where="post", ls=":",
             label="worker processes")
  ax[1].set_ylabel("workers")
  ax[1].legend(fontsize=8)
  done = [r for r in records if r.error is None and r.ttft is not None]
  for name, get, style, line in (("TTFT p90", lambda r: r.ttft, "-o",
                                  slo[0]),
                                 ("TPOT p90", lambda r: r.tpot, "-s",
                                  slo[1])):
    ys = []
    for lo, hi in zip(edges[:-1], edges[1:]):
      v = [get(r) for r in done if lo <= r.send_time < hi
           and get(r) is not None]
      ys.append(np.percentile(v, 90) * 1e3 if v else np.nan)
    h = ax[2].plot(mids, ys, style, ms=3, label=name)
    ax[2].axhline(line * 1e3, color=h[0].get_color(), ls="--", lw=1)
  ax[2].set_yscale("log")
  ax[2].set_ylabel("ms (dashed: SLO)")
  ax[2].set_xlabel("seconds")
  ax[2].legend(fontsize=8)
  fig.suptitle("Elastic pools under a load ramp (CPU, tiny model)")
  fig.tight_layout()
  fig.savefig(path, dpi=80)


def main(argv) -> None:
  del argv
  sys.path.insert(0, str(ROOT))
  from pdjax.eval import load
  from pdjax.eval.backends import make_backend
  from pdjax.launch.cluster import (LocalCluster, Supervisor, launch_elastic,
                                    router_security)
  from pdjax.planner.control import Policy, build_loop, load_settings
  from pdjax.planner.scaler import LocalScaler

  schedule = load.parse_schedule(SCHEDULE.value)
  out = Path(OUT_DIR.value)
  out.mkdir(parents=True, exist_ok=True)
  run_dir = Path(RUN_DIR.value or out / "run")
  slo = (TTFT_SLO.value, TPOT_SLO.value)
  cluster = LocalCluster(run_dir)
  t_start = time.monotonic()
  worker_flags = ["--metrics_port=0",
                  f"--emulate_prefill_s={EMULATE_PREFILL.value}",
                  f"--emulate_decode_s={EMULATE_DECODE.value}"]
  try:
    address = launch_elastic(cluster, config="test", num_prefill=1,
                             num_decode=1, num_flex=NUM_FLEX.value,
                             flex_role="decode", lease_s=3.0,
                             router_flags=["--metrics_port=0"],
                             worker_flags=worker_flags)
    print(f"deployment up at {address} ({time.monotonic() - t_start:.0f} "
          "s)", flush=True)
    supervisor = Supervisor(cluster, log=lambda m: print(m, flush=True))
    router = next(p for p in cluster.procs if p.name == "router")

    async def run():
      backend = make_backend(address, "pdjax")
      stop = asyncio.Event()

      async def supervise():
        while not stop.is_set():
          supervisor.check()
          await asyncio.sleep(0.2)
      sup = asyncio.ensure_future(supervise())
      profile_path = (Path(PROFILE.value) if PROFILE.value
                      else await _profile(backend, out, slo))
      settings = load_settings(str(profile_path), ttft_s=slo[0],
                               tpot_s=slo[1])
      policy = Policy(max_workers={"prefill": MAX_PREFILL.value,
                                   "decode": MAX_DECODE.value},
                      up_cooldown_s=UP_COOLDOWN.value,
                      down_cooldown_s=DOWN_COOLDOWN.value,
                      down_after_s=DOWN_AFTER.value)
      steps_log: list[dict] = []
      t0 = time.perf_counter()
      (out / "planner.jsonl").unlink(missing_ok=True)

      def on_step(st):
        d = dataclasses.asdict(st)
        d["t"] = time.perf_counter() - t0
        steps_log.append(d)
        with open(out / "planner.jsonl", "a") as f:
          f.write(json.dumps(d) + "\n")
        if st.actions:
          print(f"[{d['t']:6.1f} s] rate {st.rate or 0:.2f} (predicted "
                f"{st.predicted:.2f}) pools {st.current} -> {st.targets}: "
                f"{st.actions}", flush=True)
      loop, client = build_loop(
          address, f"http://127.0.0.1:{router.metrics_port}/metrics",
          LocalScaler(cluster), router_security(cluster), settings, policy,
          interval_s=INTERVAL.value, window_s=WINDOW.value, on_step=on_step)
      timeline: list[dict] = []
      tasks = [asyncio.ensure_future(loop.run(stop)),
               asyncio.ensure_future(_sample_pools(cluster, timeline, stop,
                                                   t0))]
      times = load.piecewise_arrival_times(schedule, SEED.value)
      items = _items(len(times), SEED.value)
      print(f"ramp {SCHEDULE.value}: {len(items)} requests", flush=True)
      # The runner's clock starts at its call, a moment after t0 (the
      # planner's and the timeline's): one clock for all within ~ms.
      records = await load.run_workload(backend, items, arrival_times=times,
                                        sampling=SAMPLING, progress=False)
      stop.set()
      await asyncio.gather(*tasks, sup)
      await client.close()
      await backend.aclose()
      return records, timeline, steps_log

    records, timeline, steps_log = asyncio.run(run())
  finally:
    cluster.stop()
  with open(out / "results.jsonl", "w") as f:
    for r in records:
      f.write(json.dumps(r.to_dict()) + "\n")
  with open(out / "timeline.jsonl", "w") as f:
    for row in timeline:
      f.write(json.dumps(row) + "\n")
  summary = _analyse(schedule, records, timeline, slo, out)
  summary.update(schedule=schedule, emulate_prefill_s=EMULATE_PREFILL.value,
                 emulate_decode_s=EMULATE_DECODE.value,
                 moves=sum(a[0] == "move" for s in steps_log
                           for a in s.get("actions", [])),
                 scalings=sum(a[0] == "scale" for s in steps_log
                              for a in s.get("actions", [])),
                 restarts=len(supervisor.restarted))
  (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
  table = _table(summary)
  (out / "ramp.md").write_text(table + "\n")
  _chart(schedule, records, timeline, steps_log, slo, out / "ramp.png")
  print(table)
  print(f"{summary['requests']} requests, {summary['failed']} failed; "
        f"{summary['moves']} moves, {summary['scalings']} scalings; "
        f"results in {out}")


if __name__ == "__main__":
  app.run(main)
