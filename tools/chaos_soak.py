"""Chaos soak of a local deployment (pdjax.eval.chaos).

Starts a deployment of ``--config`` (``--num_prefill`` prefill and
``--num_decode`` decode workers, grpc KV transport, a router and the
OpenAI-compatible gateway, supervised), then sends ``--num_requests``
greedy requests with ``--cancel_share`` cancelled at a random token and a
few with tiny deadlines, while a worker is killed with SIGKILL at
``--kill_at`` of the run (the supervisor restarts it), ``--slow_clients``
connections stall in their request headers and ``--bad_requests`` invalid
requests arrive in a burst. Then checks that every request completed with
the reference tokens, was cancelled, ran past its deadline or failed with a
clear status; that every worker's KV allocations and pages are back after
an idle wait; that the restarted worker serves again and the gateway
answers /health. Prints a table, writes the summary (``--out``) and exits
1 when a check failed.

  python tools/chaos_soak.py --num_requests=2000 --out=chaos.json
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from absl import app, flags

from pdjax.eval.chaos import ChaosConfig, Deployment, format_table, run_chaos

NUM = flags.DEFINE_integer("num_requests", 2000, "Requests in all.")
CANCEL = flags.DEFINE_float("cancel_share", 0.2,
                            "Share cancelled at a random token.")
DEADLINE = flags.DEFINE_float("deadline_share", 0.03,
                              "Share given a tiny deadline (1-20 ms).")
GATEWAY_SHARE = flags.DEFINE_float(
    "gateway_share", 0.1, "Share sent through the gateway's "
    "/v1/completions (the rest through the router's gRPC API).")
CONCURRENCY = flags.DEFINE_integer("concurrency", 32,
                                   "Requests in flight at once.")
KILL_AT = flags.DEFINE_float(
    "kill_at", 0.1, "Fraction of the run after which a worker is killed "
    "with SIGKILL (the supervisor restarts it); negative: no kill.")
KILL_ROLE = flags.DEFINE_enum("kill_role", "decode", ["decode", "prefill"],
                              "Which pool's first worker is killed.")
SLOW = flags.DEFINE_integer(
    "slow_clients", 20, "Connections to the gateway that send part of a "
    "request head and stall.")
BAD = flags.DEFINE_integer(
    "bad_requests", 40, "Invalid requests sent in one burst (each must be "
    "a 4xx / INVALID_ARGUMENT).")
MAX_TOKENS = flags.DEFINE_integer("max_tokens", 16,
                                  "Output lengths are 1..this.")
PROMPTS = flags.DEFINE_integer("num_prompts", 16,
                               "Distinct prompts (each has a reference).")
SEED = flags.DEFINE_integer("seed", 0, "Randomness of the run.")
CONFIG = flags.DEFINE_string("config", "test", "Deployment config.")
NUM_PREFILL = flags.DEFINE_integer("num_prefill", 2, "Prefill workers.")
NUM_DECODE = flags.DEFINE_integer("num_decode", 2, "Decode workers.")
HEADER_TIMEOUT = flags.DEFINE_float(
    "header_timeout_s", 2.0, "The gateway's --header_timeout_s.")
IDLE = flags.DEFINE_float("idle_timeout_s", 30.0,
                          "How long everything may take to be given back.")
RUN_DIR = flags.DEFINE_string("run_dir", None,
                              "Logs of the processes (default: a temp dir).")
OUT = flags.DEFINE_string("out", None, "JSON summary.")


def main(argv):
  del argv
  cfg = ChaosConfig(
      num_requests=NUM.value, cancel_share=CANCEL.value,
      deadline_share=DEADLINE.value, gateway_share=GATEWAY_SHARE.value,
      concurrency=CONCURRENCY.value,
      kill_at=KILL_AT.value if KILL_AT.value >= 0 else None,
      kill_role=KILL_ROLE.value, slow_clients=SLOW.value,
      bad_requests=BAD.value, num_prompts=PROMPTS.value,
      max_tokens=MAX_TOKENS.value, seed=SEED.value,
      idle_timeout_s=IDLE.value)
  run_dir = Path(RUN_DIR.value or tempfile.mkdtemp(prefix="pdjax-chaos-"))
  print(f"logs in {run_dir}", flush=True)
  dep = Deployment(run_dir, config=CONFIG.value,
                   num_prefill=NUM_PREFILL.value,
                   num_decode=NUM_DECODE.value,
                   header_timeout_s=HEADER_TIMEOUT.value,
                   log=lambda m: print(m, flush=True))
  try:
    summary = run_chaos(cfg, dep, log=lambda m: print(m, flush=True))
  finally:
    dep.stop()
  summary["deployment"] = {"config": CONFIG.value,
                           "num_prefill": NUM_PREFILL.value,
                           "num_decode": NUM_DECODE.value,
                           "kv_transport": "grpc"}
  print(format_table(summary))
  failed = [k for k, v in summary["checks"].items() if not v]
  if failed:
    print(f"FAILED: {', '.join(failed)}")
    for r in summary["unacceptable"][:10]:
      print("  ", r)
  if OUT.value:
    Path(OUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(OUT.value).write_text(json.dumps(summary, indent=1, default=str))
  return 0 if summary["passed"] else 1


if __name__ == "__main__":
  app.run(main)
