"""What the OpenAI HTTP API costs: one workload offered to the router
directly (gRPC), through a gateway process in front of it
(``pdjax.launch.gateway``), and through the HTTP the router's own process
serves (``pdjax.launch.router --http_port``), in rounds that rotate the
paths' order, on the same deployment, with the same seeds.

  python tools/bench_gateway.py --config=local --platform=cpu \\
      --num_requests=64 --rate=8 --out=/tmp/gateway.json
  # An existing deployment instead of a new local one:
  python tools/bench_gateway.py --router=HOST:PORT \\
      --gateway=http://HOST:8000 [--router_http=http://HOST:8001] ...

``--concurrency=1``: one stream (each request sent when the last ended:
the time to first token with nothing queued). ``--num_prefill=0``: a local
deployment colocated (its decode worker prefills).

The limit is the direct path: HTTP can at best add nothing, so the table
gives each metric of the HTTP paths as a ratio to direct (1.00 is the
bound). Greedy sampling, so every path must also produce the same tokens
for every request; the tool counts the requests that do.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]

ROUTER = flags.DEFINE_string("router", None, "An existing router "
                             "(host:port); unset: start a local deployment.")
GATEWAY = flags.DEFINE_string("gateway", None, "The gateway in front of "
                              "--router (http://host:port).")
ROUTER_HTTP = flags.DEFINE_string(
    "router_http", None, "The HTTP API --router's own process serves "
    "(--http_port; http://host:port); a local deployment has it.")
CONFIG = flags.DEFINE_string("config", "test", "Deployment config (local).")
PLATFORM = flags.DEFINE_enum("platform", "cpu", ["cpu", "gpu"], "Where.")
CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model override.")
NUM_PREFILL = flags.DEFINE_integer(
    "num_prefill", 1, "A local deployment's prefill workers (0: "
    "colocated).")
PRESET = flags.DEFINE_string("preset", "chat", "Batch-eval preset.")
NUM = flags.DEFINE_integer("num_requests", 64, "Requests per round.")
RATE = flags.DEFINE_float("rate", 8.0, "Offered load (req/s).")
CONCURRENCY = flags.DEFINE_integer(
    "concurrency", None, "At most this many requests in flight (1: one "
    "stream, each request sent when the last ended, --rate ignored).")
SESSIONS = flags.DEFINE_bool(
    "sessions", True, "The direct path sends its requests on one "
    "GenerateSession stream, as the gateway does (else a call each).")
ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds per path, alternating.")
LENGTH_SCALE = flags.DEFINE_float("length_scale", 0.05,
                                  "Preset length scale (CPU: small).")
MAX_LEN = flags.DEFINE_integer("max_model_len", 256, "Prompt + output cap.")
VOCAB = flags.DEFINE_integer("vocab_size", 512, "Synthetic ids below this.")
OUT = flags.DEFINE_string("out", None, "JSON results file.")

# Each path's column in the table.
PATHS = {"direct": "direct (router, gRPC)", "gateway": "gateway process",
         "router_http": "the router's HTTP"}


async def _measure(targets: dict[str, tuple[str, str]], items, rounds: int,
                   rate: float | None, concurrency: int | None
                   ) -> dict[str, list]:
  """Records per path, the paths alternating round by round (a warm-up of
  a few requests each first: connections, any remaining compiles)."""
  from pdjax.eval import load
  from pdjax.eval.backends import make_backend
  sampling = dict(temperature=0.0, seed=0, ignore_eos=True)
  backends = {p: make_backend(t, kind, sessions=SESSIONS.value)
              for p, (t, kind) in targets.items()}
  paths = list(targets)
  out: dict[str, list] = {p: [] for p in paths}
  try:
    for p in paths:
      await load.run_workload(backends[p], items[:4], sampling=sampling,
                              progress=False)
    for r in range(rounds):
      for p in paths[r % len(paths):] + paths[:r % len(paths)]:
        out[p].append(await load.run_workload(
            backends[p], items, rate=rate, concurrency=concurrency,
            sampling=sampling, seed=r, progress=False))
  finally:
    for b in backends.values():
      await b.aclose()
  return out


def _row(name, direct, others, scale=1e3, unit="ms"):
  """A metric's row: direct, then each HTTP path and its ratio to it."""
  fmt = lambda v: "-" if v is None else f"{v * scale:.2f}"  # noqa: E731
  cells = [fmt(direct)]
  for v in others:
    ratio = f"{v / direct:.2f}x" if direct and v is not None else "-"
    cells.append(f"{fmt(v)} ({ratio})")
  return f"| {name} ({unit}) | " + " | ".join(cells) + " |"


def main(argv) -> None:
  del argv
  sys.path.insert(0, str(ROOT))
  from pdjax.eval import stats, workloads
  from pdjax.launch.cluster import LocalCluster, launch, start_gateway

  items = workloads.generate(
      PRESET.value, NUM.value, vocab_size=VOCAB.value,
      max_model_len=MAX_LEN.value, seed=0, exclude_token_ids=[0, 1, 2],
      length_scale=LENGTH_SCALE.value)
  preset = workloads.get_preset(PRESET.value)
  cluster = None
  try:
    router, gateway = ROUTER.value, GATEWAY.value
    router_http = ROUTER_HTTP.value
    if router is None:
      cluster = LocalCluster(Path(tempfile.mkdtemp(prefix="bench-gw-")),
                             PLATFORM.value)
      router = launch(cluster, config=CONFIG.value,
                      checkpoint=CHECKPOINT.value,
                      num_prefill=NUM_PREFILL.value,
                      router_flags=["--http_port=0"])
      proc = next(p for p in cluster.procs if p.name == "router")
      router_http = f"http://{cluster.host}:{proc.http_port}"
      gateway = start_gateway(cluster, router, config=CONFIG.value,
                              checkpoint=CHECKPOINT.value)
    elif gateway is None:
      raise app.UsageError("--router needs --gateway")
    targets = {"direct": (router, "pdjax"), "gateway": (gateway, "openai")}
    if router_http:
      targets["router_http"] = (router_http, "openai")
    one_stream = CONCURRENCY.value is not None
    records = asyncio.run(_measure(
        targets, items, ROUNDS.value, None if one_stream else RATE.value,
        CONCURRENCY.value))
  finally:
    if cluster is not None:
      cluster.stop()

  paths = list(records)
  summaries, failed = {}, 0
  for p in paths:
    flat = [rec for run in records[p] for rec in run]
    failed += sum(rec.error is not None for rec in flat)
    summaries[p] = stats.summarize(
        flat, sum(stats.wall_duration(run) for run in records[p]),
        preset.ttft_slo, preset.tpot_slo, label=p,
        rate=None if one_stream else RATE.value,
        concurrency=CONCURRENCY.value)
  by_id = lambda run: sorted(run, key=lambda r: r.request_id)  # noqa: E731
  same = sum(
      all(r.error is None and r.token_ids == recs[0].token_ids
          for r in recs)
      for rounds in zip(*(records[p] for p in paths))
      for recs in zip(*(by_id(run) for run in rounds)))
  total = NUM.value * ROUNDS.value
  d = summaries["direct"]
  others = [summaries[p] for p in paths[1:]]
  load_desc = (f"{CONCURRENCY.value} at a time" if one_stream
               else f"{RATE.value:g} req/s")
  print(f"\n{PRESET.value}, {NUM.value} requests x {ROUNDS.value} rounds "
        f"per path, {load_desc}; tokens identical on every path: "
        f"{same}/{total}; failed: {failed}\n")
  print("| metric | " + " | ".join(
      PATHS[p] + ("" if p == "direct" else " (/ direct)") for p in paths)
        + " |\n|---|" + "---|" * len(paths))
  for name in ("ttft", "tpot", "itl", "e2e"):
    for q in ("p50", "p90"):
      print(_row(f"{name.upper()} {q}", getattr(getattr(d, name), q),
                 [getattr(getattr(o, name), q) for o in others]))
  print(_row("output tokens/s", d.output_token_throughput,
             [o.output_token_throughput for o in others], scale=1,
             unit="tok/s"))
  if OUT.value:
    Path(OUT.value).write_text(json.dumps(
        {"preset": PRESET.value, "rate": None if one_stream else RATE.value,
         "concurrency": CONCURRENCY.value,
         "direct_sessions": SESSIONS.value, "rounds": ROUNDS.value,
         "num_requests": NUM.value, "identical_tokens": same,
         "requests": total, "failed": failed,
         "summaries": {p: s.to_dict() for p, s in summaries.items()}},
        indent=2) + "\n")
  if failed or same != total:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
