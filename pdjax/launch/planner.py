"""``python -m pdjax.launch.planner``: the pool planner as a control loop.

It reads a router's live metrics (``--router_metrics``), predicts the next
interval's rate, sizes each pool with ``pdjax.planner`` from a worker
profile (``--profile``: ``tools/plan_pools.py --out``'s JSON, or its
``profile`` entry alone) and the SLOs, and acts (``pdjax.planner.control``):

* ``--scaler=kubernetes``: sets the replica count of each pool's workload
  (``--prefill_workload=leaderworkerset/pdjax-prefill``,
  ``--decode_workload=statefulset/pdjax-decode``) through the API server
  (in a pod: its service account; else the local kubeconfig;
  ``--k8s_api`` overrides both);
* ``--scaler=none``: changes nothing, logs what it would do.

Workers of both pools the router lists (started ``--role=both``) are moved
between the pools (``WorkerControl.SetRole``) before anything is started or
stopped. The local launcher runs the same loop with a scaler that starts
and stops processes (``python -m pdjax.launch.local --planner``).
``--step_log`` writes one JSON line per pass (rate, prediction, pools, actions).
"""

from __future__ import annotations

import asyncio
import logging
import signal

from absl import app, flags

from pdjax.launch import flags as F

ROUTER = flags.DEFINE_string("router", None, "The router's host:port "
                             "(ListWorkers; internal: --service_token).")
ROUTER_METRICS = flags.DEFINE_string(
    "router_metrics", None, "The router's /metrics URL, e.g. "
    "http://pdjax-router:9090/metrics.")
PROFILE = flags.DEFINE_string(
    "profile", None, "Worker profile JSON (tools/plan_pools.py --out).")
TTFT_SLO = flags.DEFINE_float("ttft_slo", None, "Seconds (default: the "
                              "profile file's 'slo').")
TPOT_SLO = flags.DEFINE_float("tpot_slo", None, "Seconds (default: the "
                              "profile file's 'slo').")
ATTAINMENT = flags.DEFINE_float("attainment", None, "Share of requests "
                                "within both SLOs (default: the file's, "
                                "else 0.9).")
MAX_BATCH = flags.DEFINE_integer("max_batch", None, "Prefill prompts per "
                                 "program (default: the file's, else 1).")
MAX_BATCH_TOKENS = flags.DEFINE_integer("max_batch_tokens", None,
                                        "Prefill tokens per program.")
MAX_ROWS = flags.DEFINE_integer("max_rows", None, "Rows per decode worker.")
INTERVAL = flags.DEFINE_float("interval_s", 5.0, "Seconds between passes.")
WINDOW = flags.DEFINE_float("window_s", 15.0, "Traffic measured over the "
                            "last this many seconds.")
PREDICTOR = flags.DEFINE_enum("predictor", "constant",
                              ["constant", "ewma", "holt"],
                              "Next interval's rate: the last, a weighted "
                              "mean, or Holt's linear trend.")
MIN_PREFILL = flags.DEFINE_integer("min_prefill", 1, "Prefill pool bounds.")
MAX_PREFILL = flags.DEFINE_integer("max_prefill", 4, "")
MIN_DECODE = flags.DEFINE_integer("min_decode", 1, "Decode pool bounds.")
MAX_DECODE = flags.DEFINE_integer("max_decode", 4, "")
DOWN_MARGIN = flags.DEFINE_float(
    "down_margin", 0.25, "Hysteresis: shrink a pool only if it is larger "
    "than needed at the predicted rate times (1 + this).")
HEADROOM = flags.DEFINE_float(
    "headroom", 0.2, "Size the pools for the predicted rate times (1 + "
    "this): what the profile did not measure.")
UP_COOLDOWN = flags.DEFINE_float("up_cooldown_s", 10.0, "Least time "
                                 "between a pool's change and its growth.")
DOWN_COOLDOWN = flags.DEFINE_float("down_cooldown_s", 30.0, "Least time "
                                   "between a pool's change and a shrink.")
DOWN_AFTER = flags.DEFINE_float("down_after_s", 20.0, "A pool shrinks only "
                                "after being too large for this long.")
SCALER = flags.DEFINE_enum("scaler", "none", ["none", "kubernetes"],
                           "How workers are added and removed.")
PREFILL_WORKLOAD = flags.DEFINE_string(
    "prefill_workload", None, "--scaler=kubernetes: the prefill pool's "
    "KIND/NAME (statefulset, deployment or leaderworkerset).")
DECODE_WORKLOAD = flags.DEFINE_string(
    "decode_workload", None, "--scaler=kubernetes: the decode pool's "
    "KIND/NAME.")
K8S_NAMESPACE = flags.DEFINE_string("k8s_namespace", None, "The workloads' "
                                    "namespace (default: this pod's, else "
                                    "'default').")
K8S_API = flags.DEFINE_string("k8s_api", None, "The API server's URL "
                              "(default: the pod's service account, else "
                              "the local kubeconfig).")
STEP_LOG = flags.DEFINE_string("step_log", None, "Append one JSON line per "
                               "pass here.")

log = logging.getLogger("pdjax.planner")


def policy_from_flags():
  from pdjax.planner.control import Policy
  try:
    return Policy(min_workers={"prefill": MIN_PREFILL.value,
                               "decode": MIN_DECODE.value},
                  max_workers={"prefill": MAX_PREFILL.value,
                               "decode": MAX_DECODE.value},
                  down_margin=DOWN_MARGIN.value, headroom=HEADROOM.value,
                  up_cooldown_s=UP_COOLDOWN.value,
                  down_cooldown_s=DOWN_COOLDOWN.value,
                  down_after_s=DOWN_AFTER.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None


async def serve() -> None:
  sec = F.security()
  if not (ROUTER.value and ROUTER_METRICS.value and PROFILE.value):
    raise app.UsageError("give --router, --router_metrics and --profile")
  from pdjax.planner.control import build_loop, load_settings, step_writer
  from pdjax.planner.scaler import KubernetesScaler, StaticScaler
  from pdjax.service.k8s_discovery import current_namespace
  try:
    settings = load_settings(
        PROFILE.value, ttft_s=TTFT_SLO.value, tpot_s=TPOT_SLO.value,
        attainment=ATTAINMENT.value, max_batch=MAX_BATCH.value,
        max_batch_tokens=MAX_BATCH_TOKENS.value, max_rows=MAX_ROWS.value)
  except ValueError as e:
    raise app.UsageError(f"--profile: {e}") from None
  if SCALER.value == "kubernetes":
    api_client = None
    if K8S_API.value:
      from kubernetes import client
      cfg = client.Configuration()
      cfg.host = K8S_API.value
      api_client = client.ApiClient(cfg)
    else:
      from kubernetes import config
      try:
        config.load_incluster_config()
      except config.ConfigException:
        config.load_kube_config()
    try:
      scaler = KubernetesScaler({"prefill": PREFILL_WORKLOAD.value,
                                 "decode": DECODE_WORKLOAD.value},
                                current_namespace(K8S_NAMESPACE.value),
                                api_client)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  else:
    scaler = StaticScaler({})
  loop, client = build_loop(
      ROUTER.value, ROUTER_METRICS.value, scaler, sec, settings,
      policy_from_flags(), interval_s=INTERVAL.value, window_s=WINDOW.value,
      predictor=PREDICTOR.value, on_step=step_writer(STEP_LOG.value))
  if isinstance(scaler, StaticScaler):
    # Start the advice from the pools the router has now.
    import grpc
    try:
      for w in await client.workers():
        if len(w.roles) < 2 and w.state in ("ready", "joining"):
          scaler.asked[w.role] = scaler.asked.get(w.role, 0) + 1
    except grpc.aio.AioRpcError as e:
      log.warning("the router at %s did not list its workers (%s); "
                  "advising from empty pools", ROUTER.value, e.code().name)
  stop = asyncio.Event()
  aloop = asyncio.get_running_loop()
  for sig in (signal.SIGINT, signal.SIGTERM):
    aloop.add_signal_handler(sig, stop.set)
  log.info("planning every %.0f s over %.0f s of traffic (scaler %s)",
           INTERVAL.value, WINDOW.value, SCALER.value)
  await loop.run(stop)
  await client.close()


def main(argv) -> None:
  del argv
  F.setup_logging()
  asyncio.run(serve())


if __name__ == "__main__":
  app.run(main)
