r"""A load ramp against an elastic deployment with the planner on: do the
pools grow and shrink with the offered rate, is the SLO kept after the
planner's reaction time, and does any request fail?

What runs, all on this machine (CPU, the tiny model of
``pdjax/configs/deployments/test.toml``):

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

The measuring is ``pdjax.eval.ramp`` (a test runs a short ramp through
it). Writes to ``--out_dir``: ``results.jsonl`` (every request),
``timeline.jsonl`` (pools each second), ``planner.jsonl`` (each pass of the
loop), ``profile.json``, ``summary.json`` and ``ramp.md`` (per step: rate,
requests, failures, the planner's reaction time, SLO attainment over the
step and after the reaction), and ``ramp.png`` (offered rate, workers per
pool, TTFT and TPOT p90 against time).

  python tools/elastic_ramp.py --out_dir=tools/results/2026-12-05-elastic

  # On GPUs (no emulation): the local GPU deployment's model, real lengths.
  python tools/elastic_ramp.py --platform=gpu --config=local-gpu \
      --emulate_prefill_s= --emulate_decode_s= --vocab_size=49152 \
      --max_model_len=2048 --length_scale=1 --schedule=4:120,32:300,4:300 \
      --profile_rates=2,4,8 --ttft_slo=0.25 --tpot_slo=0.05 \
      --out_dir=runs/elastic_ramp_gpu
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]

SCHEDULE = flags.DEFINE_string("schedule", "2:60,8:150,2:150",
                               "The ramp: RATE:SECONDS,... (req/s).")
PROFILE = flags.DEFINE_string("profile", None, "A tools/plan_pools.py --out "
                              "file instead of measuring one.")
PROFILE_RATES = flags.DEFINE_list("profile_rates", ["1", "2", "4"],
                                  "Rates (req/s) of the profiling runs.")
PROFILE_S = flags.DEFINE_float("profile_s", 20.0, "Seconds per profiling "
                               "run.")
TTFT_SLO = flags.DEFINE_float("ttft_slo", 1.0, "Seconds.")
TPOT_SLO = flags.DEFINE_float("tpot_slo", 0.05, "Seconds.")
CONFIG = flags.DEFINE_string("config", "test", "Deployment config.")
PLATFORM = flags.DEFINE_enum("platform", "cpu", ["cpu", "gpu"],
                             "Where the workers run (gpu: one card or mesh "
                             "per worker, launch.local's placement).")
VOCAB = flags.DEFINE_integer("vocab_size", 320, "Synthetic prompt ids are "
                             "drawn below this (the test model's 320).")
MAX_MODEL_LEN = flags.DEFINE_integer("max_model_len", 256, "Prompt + output "
                                     "fit this (the test deployment's).")
PRESET = flags.DEFINE_string("preset", "code", "batch-eval workload.")
LENGTH_SCALE = flags.DEFINE_float("length_scale", 0.25, "Of the preset's "
                                  "lengths (the test model serves 256).")
NUM_FLEX = flags.DEFINE_integer("num_flex", 0, "Workers of both pools "
                                "(start in decode).")
MAX_PREFILL = flags.DEFINE_integer("max_prefill", 3, "")
MAX_DECODE = flags.DEFINE_integer("max_decode", 3, "")
INTERVAL = flags.DEFINE_float("interval_s", 2.0, "Planner pass period.")
WINDOW = flags.DEFINE_float("window_s", 8.0, "Planner traffic window.")
HEADROOM = flags.DEFINE_float("headroom", 0.4, "Planner: size for the "
                              "predicted rate times (1 + this).")
UP_COOLDOWN = flags.DEFINE_float("up_cooldown_s", 10.0, "")
DOWN_COOLDOWN = flags.DEFINE_float("down_cooldown_s", 20.0, "")
DOWN_AFTER = flags.DEFINE_float("down_after_s", 15.0, "")
EMULATE_PREFILL = flags.DEFINE_string("emulate_prefill_s", "0.15,0.001",
                                      "A,B per prefill batch ('': none, "
                                      "as on GPUs).")
EMULATE_DECODE = flags.DEFINE_string("emulate_decode_s", "0.04,0.01",
                                     "A,B per decode step ('': none).")
SEED = flags.DEFINE_integer("seed", 0, "Workload and arrivals.")
OUT_DIR = flags.DEFINE_string("out_dir", "tools/results/elastic_ramp", "")
RUN_DIR = flags.DEFINE_string("run_dir", None, "Process logs (default: a "
                              "temporary directory).")
BIN_S = flags.DEFINE_float("bin_s", 10.0, "Chart bins (seconds).")


def main(argv) -> None:
  del argv
  sys.path.insert(0, str(ROOT))
  from pdjax.eval import load
  from pdjax.eval.backends import make_backend
  from pdjax.launch.cluster import LocalCluster, Supervisor, launch_elastic
  from pdjax.eval import ramp
  from pdjax.planner.control import Policy, load_settings

  schedule = load.parse_schedule(SCHEDULE.value)
  out = Path(OUT_DIR.value)
  out.mkdir(parents=True, exist_ok=True)
  run_dir = Path(RUN_DIR.value or tempfile.mkdtemp(prefix="elastic-ramp-"))
  slo = (TTFT_SLO.value, TPOT_SLO.value)
  workload = dict(preset=PRESET.value, length_scale=LENGTH_SCALE.value,
                  vocab_size=VOCAB.value, max_model_len=MAX_MODEL_LEN.value)
  cluster = LocalCluster(run_dir, PLATFORM.value)
  t_start = time.monotonic()
  worker_flags = ["--metrics_port=0"]
  if EMULATE_PREFILL.value:
    worker_flags.append(f"--emulate_prefill_s={EMULATE_PREFILL.value}")
  if EMULATE_DECODE.value:
    worker_flags.append(f"--emulate_decode_s={EMULATE_DECODE.value}")
  try:
    address = launch_elastic(cluster, config=CONFIG.value, num_prefill=1,
                             num_decode=1, num_flex=NUM_FLEX.value,
                             flex_role="decode", lease_s=3.0,
                             router_flags=["--metrics_port=0"],
                             worker_flags=worker_flags)
    print(f"deployment up at {address} ({time.monotonic() - t_start:.0f} "
          "s)", flush=True)
    supervisor = Supervisor(cluster, log=lambda m: print(m, flush=True))
    router = next(p for p in cluster.procs if p.name == "router")

    async def run():
      profile_path = PROFILE.value
      if not profile_path:
        backend = make_backend(address, "pdjax")
        profile_path = await ramp.measure_profile(
            backend, out, slo, PROFILE_RATES.value, PROFILE_S.value,
            decode_workers=1 + NUM_FLEX.value, seed=SEED.value,
            config=CONFIG.value, **workload)
        await backend.aclose()
      settings = load_settings(str(profile_path), ttft_s=slo[0],
                               tpot_s=slo[1])
      policy = Policy(max_workers={"prefill": MAX_PREFILL.value,
                                   "decode": MAX_DECODE.value},
                      headroom=HEADROOM.value,
                      up_cooldown_s=UP_COOLDOWN.value,
                      down_cooldown_s=DOWN_COOLDOWN.value,
                      down_after_s=DOWN_AFTER.value)
      return await ramp.run_ramp(
          cluster, address, router.metrics_port, schedule, settings, policy,
          out, supervisor=supervisor, interval_s=INTERVAL.value,
          window_s=WINDOW.value, seed=SEED.value, workload=workload)

    records, timeline, steps_log = asyncio.run(run())
  finally:
    cluster.stop()
  summary = ramp.write_results(
      out, schedule, records, timeline, steps_log, slo,
      dict(emulate_prefill_s=EMULATE_PREFILL.value,
           emulate_decode_s=EMULATE_DECODE.value, headroom=HEADROOM.value,
           restarts=len(supervisor.restarted),
           command=" ".join(["python", "tools/elastic_ramp.py",
                             *sys.argv[1:]])), bin_s=BIN_S.value)
  print(ramp.table(summary))
  print(f"{summary['requests']} requests, {summary['failed']} failed; "
        f"{summary['moves']} moves, {summary['scalings']} scalings; "
        f"results in {out}")


if __name__ == "__main__":
  app.run(main)
