"""What the OpenAI gateway costs: one workload offered to the router directly
and through the gateway in front of it, in alternating rounds on the same
deployment, with the same seeds.

  python tools/bench_gateway.py --config=local --platform=cpu \\
      --num_requests=64 --rate=8 --out=/tmp/gateway.json
  # An existing deployment instead of a new local one:
  python tools/bench_gateway.py --router=HOST:PORT \\
      --gateway=http://HOST:8000 ...

The limit is the direct path: a gateway can at best add nothing, so the
table gives each metric through the gateway as a ratio to direct (1.00 is
the bound). Greedy sampling, so both paths must also produce the same
tokens for every request; the tool counts the requests that do.
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
CONFIG = flags.DEFINE_string("config", "test", "Deployment config (local).")
PLATFORM = flags.DEFINE_enum("platform", "cpu", ["cpu", "gpu"], "Where.")
CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model override.")
PRESET = flags.DEFINE_string("preset", "chat", "Batch-eval preset.")
NUM = flags.DEFINE_integer("num_requests", 64, "Requests per round.")
RATE = flags.DEFINE_float("rate", 8.0, "Offered load (req/s).")
ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds per path, alternating.")
LENGTH_SCALE = flags.DEFINE_float("length_scale", 0.05,
                                  "Preset length scale (CPU: small).")
MAX_LEN = flags.DEFINE_integer("max_model_len", 256, "Prompt + output cap.")
VOCAB = flags.DEFINE_integer("vocab_size", 512, "Synthetic ids below this.")
OUT = flags.DEFINE_string("out", None, "JSON results file.")

PATHS = ("direct", "gateway")


async def _measure(targets: dict[str, tuple[str, str]], items, rounds: int,
                   rate: float) -> dict[str, list]:
  """Records per path, the paths alternating round by round (a warm-up of
  a few requests each first: connections, any remaining compiles)."""
  from pdjax.eval import load
  from pdjax.eval.backends import make_backend
  sampling = dict(temperature=0.0, seed=0, ignore_eos=True)
  backends = {p: make_backend(t, kind) for p, (t, kind) in targets.items()}
  out: dict[str, list] = {p: [] for p in PATHS}
  try:
    for p in PATHS:
      await load.run_workload(backends[p], items[:4], sampling=sampling,
                              progress=False)
    for r in range(rounds):
      for p in (PATHS if r % 2 == 0 else PATHS[::-1]):
        out[p].append(await load.run_workload(
            backends[p], items, rate=rate, sampling=sampling, seed=r,
            progress=False))
  finally:
    for b in backends.values():
      await b.aclose()
  return out


def _row(name, direct, gateway, scale=1e3, unit="ms"):
  ratio = (f"{gateway / direct:.2f}x" if direct and gateway is not None
           else "-")
  fmt = lambda v: "-" if v is None else f"{v * scale:.2f}"  # noqa: E731
  return f"| {name} ({unit}) | {fmt(direct)} | {fmt(gateway)} | {ratio} |"


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
    if router is None:
      cluster = LocalCluster(Path(tempfile.mkdtemp(prefix="bench-gw-")),
                             PLATFORM.value)
      router = launch(cluster, config=CONFIG.value,
                      checkpoint=CHECKPOINT.value)
      gateway = start_gateway(cluster, router, config=CONFIG.value,
                              checkpoint=CHECKPOINT.value)
    elif gateway is None:
      raise app.UsageError("--router needs --gateway")
    records = asyncio.run(_measure(
        {"direct": (router, "pdjax"), "gateway": (gateway, "openai")},
        items, ROUNDS.value, RATE.value))
  finally:
    if cluster is not None:
      cluster.stop()

  summaries, failed = {}, 0
  for p in PATHS:
    flat = [rec for run in records[p] for rec in run]
    failed += sum(rec.error is not None for rec in flat)
    summaries[p] = stats.summarize(
        flat, sum(stats.wall_duration(run) for run in records[p]),
        preset.ttft_slo, preset.tpot_slo, label=p, rate=RATE.value)
  same = sum(
      a.token_ids == b.token_ids and a.error is None and b.error is None
      for da, db in zip(records["direct"], records["gateway"])
      for a, b in zip(sorted(da, key=lambda r: r.request_id),
                      sorted(db, key=lambda r: r.request_id)))
  total = NUM.value * ROUNDS.value
  d, g = summaries["direct"], summaries["gateway"]
  print(f"\n{PRESET.value}, {NUM.value} requests x {ROUNDS.value} rounds "
        f"per path at {RATE.value:g} req/s; tokens identical on both paths: "
        f"{same}/{total}; failed: {failed}\n")
  print("| metric | direct (router) | through the gateway | gateway / "
        "direct |\n|---|---|---|---|")
  for name in ("ttft", "tpot", "itl", "e2e"):
    for q in ("p50", "p90"):
      print(_row(f"{name.upper()} {q}", getattr(getattr(d, name), q),
                 getattr(getattr(g, name), q)))
  print(_row("output tokens/s", d.output_token_throughput,
             g.output_token_throughput, scale=1, unit="tok/s"))
  if OUT.value:
    Path(OUT.value).write_text(json.dumps(
        {"preset": PRESET.value, "rate": RATE.value, "rounds": ROUNDS.value,
         "num_requests": NUM.value, "identical_tokens": same,
         "requests": total, "failed": failed,
         "summaries": {p: s.to_dict() for p, s in summaries.items()}},
        indent=2) + "\n")
  if failed or same != total:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
