"""A load ramp against an elastic deployment, and what it shows.

``run_ramp`` offers a piecewise-rate Poisson load (``pdjax.eval.load``) to
a running elastic deployment (``pdjax.launch.cluster.launch_elastic``) while
the planner's control loop (``pdjax.planner.control``) resizes its pools
through a ``LocalScaler``, and samples the router's pools every second;
``write_results`` turns that into per-step figures (requests, failures,
the planner's reaction time, SLO attainment over the step and after the
reaction), a Markdown table and a chart of offered rate, workers per pool
and TTFT/TPOT p90 against time. ``tools/elastic_ramp.py`` is the command
line (it also starts the deployment and measures the profile);
``tests/test_elastic.py`` runs a short ramp through the same code.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

SAMPLING = dict(temperature=0.0, top_p=1.0, top_k=0, seed=0,
                ignore_eos=True, stop_token_ids=None)


def items(n: int, seed: int, preset: str = "code",
          length_scale: float = 0.25, vocab_size: int = 320,
          max_model_len: int = 256):
  """The ramp's workload (defaults: the test model's 320 ids and 256
  positions)."""
  from pdjax.eval import workloads
  return workloads.generate(preset, n, vocab_size=vocab_size,
                            max_model_len=max_model_len, seed=seed,
                            exclude_token_ids=[0, 1, 2],
                            length_scale=length_scale)


async def measure_profile(backend, out: Path, slo, rates, seconds: float,
                          decode_workers: int, seed: int = 0,
                          config: str = "test", **workload) -> Path:
  """Short runs at ``rates`` on the deployment as started, fitted
  (``pdjax.planner.fit_profile``) and written as ``out/profile.json`` in
  ``tools/plan_pools.py --out``'s form."""
  from pdjax.eval import load
  from pdjax.planner import fit_profile
  from pdjax.planner.profile import profile_to_dict
  runs = []
  for k, rate in enumerate(float(r) for r in rates):
    n = max(10, round(rate * seconds))
    recs = await load.run_workload(backend, items(n, seed + 100 + k,
                                                  **workload),
                                   rate=rate, sampling=SAMPLING,
                                   seed=seed + k, progress=False)
    bad = [r for r in recs if r.error]
    print(f"profile run at {rate:g} req/s: {len(recs)} requests, "
          f"{len(bad)} failed", flush=True)
    runs.append(recs)
  profile = fit_profile(runs[0], runs, decode_workers=decode_workers)
  from pdjax.config import DeploymentConfig
  dep = DeploymentConfig.load(config)   # how its workers batch
  path = out / "profile.json"
  path.write_text(json.dumps({
      "profile": profile_to_dict(profile),
      "slo": dict(ttft_s=slo[0], tpot_s=slo[1], attainment=0.9),
      "batching": {"max_batch": dep.prefill.max_batch,
                   "max_batch_tokens": dep.prefill.max_batch_tokens or None},
      "max_rows": dep.decode.max_seqs}, indent=1) + "\n")
  p, d = profile.prefill, profile.decode
  print(f"profile: prefill {p.a * 1e3:.1f} ms + {p.b * 1e6:.1f} us/token; "
        f"fixed {profile.overhead_s * 1e3:.1f} ms; decode "
        f"{d.alpha * 1e3:.1f} ms + {d.beta * 1e3:.2f} ms/row "
        f"(p90/mean {d.tpot_spread:.2f})", flush=True)
  return path


async def sample_pools(cluster, timeline: list, stop: asyncio.Event,
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


def reaction_times(schedule, timeline) -> list[float | None]:
  """Per step: seconds from its start until the pools first had the size
  they end the step with (the planner's reaction: measuring, deciding,
  starting, moving or draining workers, their joining); None if the
  timeline has no sample in the step."""
  out, start = [], 0.0
  for _, seconds in schedule:
    end = start + seconds
    rows = [r for r in timeline if start <= r["t"] < end and "error" not in r]
    if not rows:
      out.append(None)
    else:
      last = (rows[-1]["prefill"], rows[-1]["decode"])
      first = next(r["t"] for r in rows
                   if (r["prefill"], r["decode"]) == last)
      out.append(max(0.0, first - start))
    start = end
  return out


def analyse(schedule, records, timeline, slo, out: Path) -> dict:
  from pdjax.eval import load, stats
  reactions = reaction_times(schedule, timeline)
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


def fmt(v, pct=False, ms=False):
  if v is None:
    return "-"
  if pct:
    return f"{100 * v:.1f}%"
  if ms:
    return f"{1e3 * v:.0f}"
  return f"{v:.1f}"


def table(summary: dict) -> str:
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
        f"{fmt(s['reaction_s'])} | {fmt(s['slo_attainment'], pct=True)} "
        f"| {fmt(s['slo_attainment_after_reaction'], pct=True)} | "
        f"{fmt(s['ttft_p90_after_reaction'], ms=True)} / "
        f"{fmt(s['tpot_p90_after_reaction'], ms=True)} |")
  return "\n".join(lines)


def chart(schedule, records, timeline, steps_log, slo, path: Path,
          bin_s: float = 10.0) -> None:
  """Offered rate, workers per pool, TTFT and TPOT p90 against time."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  total = sum(d for _, d in schedule)
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


async def run_ramp(cluster, address: str, metrics_port: int, schedule,
                   settings, policy, out: Path, *, supervisor=None,
                   interval_s: float = 2.0, window_s: float = 6.0,
                   seed: int = 0, workload: dict | None = None):
  """The ramp against a running elastic deployment (its ``LocalCluster``)
  with the planner's loop acting through a ``LocalScaler``: (records,
  timeline, planner passes)."""
  from pdjax.eval import load
  from pdjax.eval.backends import make_backend
  from pdjax.launch.cluster import router_security
  from pdjax.planner.control import build_loop
  from pdjax.planner.scaler import LocalScaler
  backend = make_backend(address, "pdjax")
  stop = asyncio.Event()

  async def supervise():
    while supervisor is not None and not stop.is_set():
      supervisor.check()
      await asyncio.sleep(0.2)
  sup = asyncio.ensure_future(supervise())
  steps_log: list[dict] = []
  (out / "planner.jsonl").unlink(missing_ok=True)
  t0 = time.perf_counter()

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
      address, f"http://127.0.0.1:{metrics_port}/metrics",
      LocalScaler(cluster), router_security(cluster), settings, policy,
      interval_s=interval_s, window_s=window_s, on_step=on_step)
  timeline: list[dict] = []
  tasks = [asyncio.ensure_future(loop.run(stop)),
           asyncio.ensure_future(sample_pools(cluster, timeline, stop, t0))]
  times = load.piecewise_arrival_times(schedule, seed)
  work = items(len(times), seed, **(workload or {}))
  print(f"ramp {schedule}: {len(work)} requests", flush=True)
  try:
    # The runner's clock starts at its call, a moment after t0 (the
    # planner's and the timeline's): one clock for all within ~ms.
    records = await load.run_workload(backend, work, arrival_times=times,
                                      sampling=SAMPLING, progress=False)
  finally:
    stop.set()
    await asyncio.gather(*tasks, sup)
    await client.close()
    await backend.aclose()
  return records, timeline, steps_log


def write_requests_csv(path: Path, records) -> None:
  """One line per request, small enough to keep beside the chart: send
  time (s from the ramp's start), lengths, TTFT, TPOT, status."""
  with open(path, "w") as f:
    f.write("send_s,prompt_tokens,output_tokens,ttft_s,tpot_s,status\n")
    for r in records:
      f.write(f"{r.send_time:.3f},{r.prompt_tokens},{r.output_tokens},"
              + (f"{r.ttft:.4f}" if r.ttft is not None else "") + ","
              + (f"{r.tpot:.5f}" if r.tpot is not None else "") + ","
              + f"{r.status}\n")


def write_results(out: Path, schedule, records, timeline, steps_log, slo,
                  extra: dict, bin_s: float = 10.0) -> dict:
  """results.jsonl (every request, every token's time: large),
  requests.csv (the same, a line each), timeline.jsonl, summary.json,
  ramp.md, ramp.png."""
  with open(out / "results.jsonl", "w") as f:
    for r in records:
      f.write(json.dumps(r.to_dict()) + "\n")
  write_requests_csv(out / "requests.csv", records)
  with open(out / "timeline.jsonl", "w") as f:
    for row in timeline:
      f.write(json.dumps(row) + "\n")
  summary = analyse(schedule, records, timeline, slo, out)
  summary.update(schedule=schedule,
                 moves=sum(a[0] == "move" for s in steps_log
                           for a in s.get("actions", [])),
                 scalings=sum(a[0] == "scale" for s in steps_log
                              for a in s.get("actions", [])), **extra)
  (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
  (out / "ramp.md").write_text(table(summary) + "\n")
  chart(schedule, records, timeline, steps_log, slo, out / "ramp.png",
        bin_s)
  return summary


__all__ = ["SAMPLING", "analyse", "chart", "items", "measure_profile",
           "reaction_times", "run_ramp", "table", "write_results"]
