"""``python -m pdjax.launch.planner``: the pool planner as a control loop.

It reads a router's live metrics (``--router_metrics``), predicts the next
interval's rate, sizes each pool with ``pdjax.planner`` from a worker
profile (``--profile``: ``pdjax plan --out``'s JSON, or its
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
and stops processes (``pdjax serve --planner_profile``).
``--step_log`` writes one JSON line per pass (rate, prediction, pools, actions).
"""

from __future__ import annotations

import asyncio
import logging
import signal

from absl import app, flags

from pdjax.launch import flags as F

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
  """The planner's flags: the router it reads and moves workers through,
  the profile and SLOs, the policy, the scaler; its TLS and service token
  (a client of the router's internal API)."""
  flags.DEFINE_string("router", None, "The router's host:port "
                      "(ListWorkers; internal: --service_token).",
                      flag_values=fv)
  flags.DEFINE_string(
      "router_metrics", None, "The router's /metrics URL, e.g. "
      "http://pdjax-router:9090/metrics.", flag_values=fv)
  flags.DEFINE_string(
      "profile", None, "Worker profile JSON (pdjax plan --out).",
      flag_values=fv)
  flags.DEFINE_float("ttft_slo", None, "Seconds (default: the profile "
                     "file's 'slo').", flag_values=fv)
  flags.DEFINE_float("tpot_slo", None, "Seconds (default: the profile "
                     "file's 'slo').", flag_values=fv)
  flags.DEFINE_float("attainment", None, "Share of requests within both "
                     "SLOs (default: the file's, else 0.9).", flag_values=fv)
  flags.DEFINE_integer("max_batch", None, "Prefill prompts per program "
                       "(default: the file's, else 1).", flag_values=fv)
  flags.DEFINE_integer("max_batch_tokens", None, "Prefill tokens per "
                       "program.", flag_values=fv)
  flags.DEFINE_integer("max_rows", None, "Rows per decode worker.",
                       flag_values=fv)
  flags.DEFINE_float("interval_s", 5.0, "Seconds between passes.",
                     flag_values=fv)
  flags.DEFINE_float("window_s", 15.0, "Traffic measured over the last "
                     "this many seconds.", flag_values=fv)
  flags.DEFINE_enum("predictor", "constant", ["constant", "ewma", "holt"],
                    "Next interval's rate: the last, a weighted mean, or "
                    "Holt's linear trend.", flag_values=fv)
  flags.DEFINE_integer("min_prefill", 1, "Prefill pool bounds.",
                       flag_values=fv)
  flags.DEFINE_integer("max_prefill", 4, "", flag_values=fv)
  flags.DEFINE_integer("min_decode", 1, "Decode pool bounds.",
                       flag_values=fv)
  flags.DEFINE_integer("max_decode", 4, "", flag_values=fv)
  flags.DEFINE_float(
      "down_margin", 0.25, "Hysteresis: shrink a pool only if it is larger "
      "than needed at the predicted rate times (1 + this).", flag_values=fv)
  flags.DEFINE_float(
      "headroom", 0.2, "Size the pools for the predicted rate times (1 + "
      "this): what the profile did not measure.", flag_values=fv)
  flags.DEFINE_float("up_cooldown_s", 10.0, "Least time between a pool's "
                     "change and its growth.", flag_values=fv)
  flags.DEFINE_float("down_cooldown_s", 30.0, "Least time between a pool's "
                     "change and a shrink.", flag_values=fv)
  flags.DEFINE_float("down_after_s", 20.0, "A pool shrinks only after "
                     "being too large for this long.", flag_values=fv)
  flags.DEFINE_enum("scaler", "none", ["none", "kubernetes"],
                    "How workers are added and removed.", flag_values=fv)
  flags.DEFINE_string(
      "prefill_workload", None, "--scaler=kubernetes: the prefill pool's "
      "KIND/NAME (statefulset, deployment or leaderworkerset).",
      flag_values=fv)
  flags.DEFINE_string(
      "decode_workload", None, "--scaler=kubernetes: the decode pool's "
      "KIND/NAME.", flag_values=fv)
  flags.DEFINE_string("k8s_namespace", None, "The workloads' namespace "
                      "(default: this pod's, else 'default').",
                      flag_values=fv)
  flags.DEFINE_string("k8s_api", None, "The API server's URL (default: the "
                      "pod's service account, else the local kubeconfig).",
                      flag_values=fv)
  flags.DEFINE_string("step_log", None, "Append one JSON line per pass "
                      "here.", flag_values=fv)
  flags.DEFINE_enum("log_level", "INFO", ["DEBUG", "INFO", "WARNING",
                                          "ERROR"],
                    "Python logging level.", flag_values=fv)
  F.define_security(fv, role="internal")


log = logging.getLogger("pdjax.planner")


def policy_from_flags():
  from pdjax.planner.control import Policy
  try:
    return Policy(min_workers={"prefill": FLAGS.min_prefill,
                               "decode": FLAGS.min_decode},
                  max_workers={"prefill": FLAGS.max_prefill,
                               "decode": FLAGS.max_decode},
                  down_margin=FLAGS.down_margin, headroom=FLAGS.headroom,
                  up_cooldown_s=FLAGS.up_cooldown_s,
                  down_cooldown_s=FLAGS.down_cooldown_s,
                  down_after_s=FLAGS.down_after_s)
  except ValueError as e:
    raise app.UsageError(str(e)) from None


async def serve() -> None:
  sec = F.security()
  if not (FLAGS.router and FLAGS.router_metrics and FLAGS.profile):
    raise app.UsageError("give --router, --router_metrics and --profile")
  from pdjax.planner.control import build_loop, load_settings, step_writer
  from pdjax.planner.scaler import KubernetesScaler, StaticScaler
  from pdjax.service.k8s_discovery import current_namespace
  try:
    settings = load_settings(
        FLAGS.profile, ttft_s=FLAGS.ttft_slo, tpot_s=FLAGS.tpot_slo,
        attainment=FLAGS.attainment, max_batch=FLAGS.max_batch,
        max_batch_tokens=FLAGS.max_batch_tokens, max_rows=FLAGS.max_rows)
  except ValueError as e:
    raise app.UsageError(f"--profile: {e}") from None
  if FLAGS.scaler == "kubernetes":
    api_client = None
    if FLAGS.k8s_api:
      from kubernetes import client
      cfg = client.Configuration()
      cfg.host = FLAGS.k8s_api
      api_client = client.ApiClient(cfg)
    else:
      from kubernetes import config
      try:
        config.load_incluster_config()
      except config.ConfigException:
        config.load_kube_config()
    try:
      scaler = KubernetesScaler({"prefill": FLAGS.prefill_workload,
                                 "decode": FLAGS.decode_workload},
                                current_namespace(FLAGS.k8s_namespace),
                                api_client)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  else:
    scaler = StaticScaler({})
  loop, client = build_loop(
      FLAGS.router, FLAGS.router_metrics, scaler, sec, settings,
      policy_from_flags(), interval_s=FLAGS.interval_s, window_s=FLAGS.window_s,
      predictor=FLAGS.predictor, on_step=step_writer(FLAGS.step_log))
  if isinstance(scaler, StaticScaler):
    # Start the advice from the pools the router has now.
    import grpc
    try:
      for w in await client.workers():
        if (w.role in ("prefill", "decode") and len(w.roles) < 2
            and w.state in ("ready", "joining")):
          scaler.asked[w.role] = scaler.asked.get(w.role, 0) + 1
    except grpc.aio.AioRpcError as e:
      log.warning("the router at %s did not list its workers (%s); "
                  "advising from empty pools", FLAGS.router, e.code().name)
  stop = asyncio.Event()
  aloop = asyncio.get_running_loop()
  for sig in (signal.SIGINT, signal.SIGTERM):
    aloop.add_signal_handler(sig, stop.set)
  log.info("planning every %.0f s over %.0f s of traffic (scaler %s)",
           FLAGS.interval_s, FLAGS.window_s, FLAGS.scaler)
  await loop.run(stop)
  await client.close()


def main(argv) -> None:
  del argv
  F.setup_logging()
  asyncio.run(serve())


if __name__ == "__main__":
  F.define_for_main(define_flags)
  app.run(main)
