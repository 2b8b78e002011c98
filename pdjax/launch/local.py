"""``pdjax serve`` (``python -m pdjax.launch.local``): a whole deployment on
this machine.

Starts prefill and decode workers and a router as separate processes (each
initialises JAX itself; nothing is forked after JAX starts), gives each its
own devices (CPU: ``--xla_force_host_platform_device_count`` per process;
GPU: ``CUDA_VISIBLE_DEVICES``), waits until every one is serving, prints the
router's address (and with ``--gateway_port`` the router serves the
OpenAI-compatible HTTP API too), and with ``--prompt`` runs a generation
through it: as the one user message of a chat, rendered with the model's
chat template when it has one (``--nochat``: the raw text). Ctrl-C
(or the end of ``--prompt`` without ``--serve``) shuts everything down:
SIGTERM (workers drain), then SIGKILL after a grace period.

Deployments: the default is disaggregated (``--num_prefill`` prefill
workers + ``--num_decode`` decode workers). ``--num_prefill=0`` is the
colocated baseline (decode workers prefill locally). ``--kv_transport=local``
runs both pools in one worker process. ``--elastic`` starts the router
first and the workers register with it (``--router``), so pools can change
while it serves; ``--num_flex`` adds workers holding both pools' programs
(movable between the pools); ``--planner_profile`` runs the planner's
control loop here, starting and stopping worker processes
(``pdjax.planner.scaler.LocalScaler``) and moving the flexible ones.

The launcher supervises what it starts (``pdjax.launch.cluster``): every
process dies with it (a parent-death signal, so also when the launcher is
killed with SIGKILL; SIGHUP, SIGTERM and Ctrl-C stop the deployment
gracefully), and a process that exits while serving is restarted on its
port and rejoins while the others keep serving. Exit status and the last
line say what happened: 0 stopped (a signal, or the end of ``--prompt``);
130 ``--prompt`` interrupted; 1 a process failed (it exited before
serving, or kept dying: its name, status and last log line); 2 the
deployment cannot run as asked (a port in use, a bad flag combination).

Configuration: ``--config`` (default ``local``, or ``local-gpu`` with
``--platform=gpu``) and every configuration flag (``--checkpoint``,
``--prefill_mesh``, ``--decode_max_seqs``, ``--max_inflight``, ...) resolve
into one deployment file that every process runs
(``pdjax.launch.cluster.launch``); ``--worker_flags``, ``--router_flags``
and ``--gateway_flags`` pass other flags to those processes.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

from pdjax.launch import config_flags
from pdjax.launch.cluster import (LocalCluster, ProcessFailed, Supervisor,
                                  UsageError, chat_prompt, launch,
                                  launch_elastic, router_client_settings,
                                  router_security)

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> config_flags.ConfigFlags:
  """The local launcher's flags: the processes to start, ``--prompt``, and
  the whole deployment configuration (every table)."""
  cfg_flags = config_flags.define(
      fv, config_default=None,
      tables={"prefill": config_flags.ALL, "decode": config_flags.ALL,
              "router": config_flags.ALL})
  fv["config"].help = ("Deployment file: a TOML path or a packaged name "
                       "(default: 'local' on the CPU, 'local-gpu' with "
                       "--platform=gpu).")
  flags.DEFINE_integer("num_prefill", 1, "Prefill workers (0: colocated).",
                       flag_values=fv)
  flags.DEFINE_integer("num_decode", 1, "Decode workers.", flag_values=fv)
  flags.DEFINE_integer(
      "prefill_processes", 1, "Processes per prefill worker (jax.distributed"
      ", the mesh spread over them; as the hosts of a multi-host pool).",
      flag_values=fv)
  flags.DEFINE_enum("platform", "cpu", ["cpu", "gpu"],
                    "Where the workers run.", flag_values=fv)
  flags.DEFINE_integer("port", 0, "Router port (0: a free one).",
                       flag_values=fv)
  flags.DEFINE_string("host", "127.0.0.1", "Bind address of every "
                      "service.", flag_values=fv)
  flags.DEFINE_string("prompt", None, "Generate from this prompt through "
                      "the router once everything is up.", flag_values=fv)
  flags.DEFINE_integer("max_tokens", 32, "For --prompt.", flag_values=fv)
  flags.DEFINE_bool("chat", True, "For --prompt: send it as a user message "
                    "through the model's chat template (when the checkpoint "
                    "has one); --nochat sends the text as is.",
                    flag_values=fv)
  flags.DEFINE_bool("serve", None, "Keep serving until Ctrl-C (default: "
                    "true unless --prompt is given).", flag_values=fv)
  flags.DEFINE_float("ready_timeout_s", 600.0, "Longest wait for every "
                     "process to be up.", flag_values=fv)
  flags.DEFINE_string("run_dir", None, "Per-process logs and port files, "
                      "and the resolved deployment.toml (default: a "
                      "temporary directory).", flag_values=fv)
  flags.DEFINE_list("worker_flags", [], "Extra flags for the workers (each "
                    "goes to those whose launcher defines it), e.g. "
                    "--worker_flags=--kv_ttl_s=30.", flag_values=fv)
  flags.DEFINE_list("router_flags", [], "Extra router flags.",
                    flag_values=fv)
  flags.DEFINE_integer(
      "gateway_port", None, "Also serve the OpenAI-compatible HTTP API on "
      "this port (0: a free one), from the router's process (its "
      "--http_port); unset: gRPC only.", flag_values=fv)
  flags.DEFINE_list("gateway_flags", [], "Extra flags of the HTTP API "
                    "(pdjax.launch.gateway.define_http_flags), e.g. "
                    "--gateway_flags=--api_key=k.", flag_values=fv)
  # Elastic pools and the planner's control loop.
  flags.DEFINE_bool(
      "elastic", False, "Start the router first and let the workers "
      "register with it (--router) instead of listing them, so the pools "
      "can grow, shrink and move while it serves.", flag_values=fv)
  flags.DEFINE_integer(
      "num_flex", 0, "--elastic: workers holding both pools' programs "
      "(--role=both), serving --flex_role at start; the planner moves them "
      "between the pools.", flag_values=fv)
  flags.DEFINE_enum("flex_role", "decode", ["prefill", "decode"],
                    "The pool the --num_flex workers start in.",
                    flag_values=fv)
  flags.DEFINE_bool(
      "restart", True, "Restart a process that exits while serving (on its "
      "port; it rejoins); without it, one that exits stops the deployment.",
      flag_values=fv)
  flags.DEFINE_string(
      "planner_profile", None, "Run the planner's control loop with this "
      "worker profile (pdjax plan --out): it sizes the pools for the "
      "router's live traffic and starts, stops and moves workers here. "
      "Implies --elastic.", flag_values=fv)
  flags.DEFINE_float("ttft_slo", None, "Planner: TTFT SLO in seconds "
                     "(default: the profile file's).", flag_values=fv)
  flags.DEFINE_float("tpot_slo", None, "Planner: TPOT SLO in seconds "
                     "(default: the profile file's).", flag_values=fv)
  flags.DEFINE_integer("max_prefill", 4, "Planner: most prefill workers.",
                       flag_values=fv)
  flags.DEFINE_integer("max_decode", 4, "Planner: most decode workers.",
                       flag_values=fv)
  flags.DEFINE_float("planner_interval_s", 5.0, "Planner: seconds between "
                     "passes.", flag_values=fv)
  flags.DEFINE_string("planner_log", None, "Planner: append one JSON line "
                      "per pass here.", flag_values=fv)
  return cfg_flags


def fail(code: int, message: str):
  """Ends the launcher with one line on stderr (no traceback)."""
  print(f"pdjax.launch.local: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def check_port(host: str, port: int) -> None:
  from pdjax.service.common import in_use_message, port_in_use
  if port_in_use(host, port):
    raise UsageError(in_use_message(host, port))


async def supervise(cluster: LocalCluster, supervisor: Supervisor | None,
                    planner=None) -> None:
  """Serves until stopped: restarts processes that die (or raises
  ``ProcessFailed`` without ``--restart``), and runs the planner's loop
  beside it. Both run on this (the main) thread."""
  import asyncio
  tasks = []
  if planner is not None:
    tasks.append(asyncio.ensure_future(planner.run()))
  try:
    while True:
      if supervisor is not None:
        supervisor.check()
      else:
        for p in cluster.procs:
          if not p.stopping and p.popen.poll() is not None:
            from pdjax.launch.cluster import exit_status, last_line
            raise ProcessFailed(f"{p.name} exited with "
                                f"{exit_status(p.popen.returncode)}: "
                                f"{last_line(p.log)} (log {p.log})", p.name)
      await asyncio.sleep(0.25)
  finally:
    for t in tasks:
      t.cancel()


def make_planner(cluster: LocalCluster, metrics_port: int, router_flags):
  """The control loop with a local scaler, from the planner flags."""
  from pdjax.planner.control import (Policy, build_loop, load_settings,
                                     step_writer)
  from pdjax.planner.scaler import LocalScaler
  try:
    settings = load_settings(FLAGS.planner_profile, ttft_s=FLAGS.ttft_slo,
                             tpot_s=FLAGS.tpot_slo)
    policy = Policy(max_workers={"prefill": FLAGS.max_prefill,
                                 "decode": FLAGS.max_decode}, headroom=0.2)
  except ValueError as e:
    raise UsageError(f"--planner_profile: {e}") from None
  loop, _ = build_loop(
      cluster.router_address, f"http://{cluster.host}:{metrics_port}/metrics",
      LocalScaler(cluster), router_security(cluster, router_flags),
      settings, policy, interval_s=FLAGS.planner_interval_s,
      on_step=step_writer(FLAGS.planner_log))
  return loop


def main(argv, cfg_flags: config_flags.ConfigFlags) -> None:
  del argv
  config = FLAGS.config or ("local-gpu" if FLAGS.platform == "gpu"
                            else "local")
  run_dir = Path(FLAGS.run_dir or tempfile.mkdtemp(prefix="pdjax-local-"))
  run_dir.mkdir(parents=True, exist_ok=True)
  cluster = LocalCluster(run_dir, FLAGS.platform, FLAGS.host)
  serve = FLAGS.serve if FLAGS.serve is not None else FLAGS.prompt is None
  elastic = FLAGS.elastic or bool(FLAGS.planner_profile)
  router_flags = list(FLAGS.router_flags)
  if FLAGS.gateway_port is not None:
    router_flags += [f"--http_port={FLAGS.gateway_port}",
                     *FLAGS.gateway_flags]
  if FLAGS.planner_profile and not any(
      f.lstrip("-").startswith("metrics_port") for f in router_flags):
    router_flags.append("--metrics_port=0")   # the planner reads it
  interrupted = False
  code, message = 0, None

  def on_signal(signum, frame):
    raise KeyboardInterrupt

  # SIGHUP: the terminal went away; stop as on Ctrl-C, never leave the
  # deployment running without its launcher.
  for sig in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, on_signal)
  try:
    check_port(FLAGS.host, FLAGS.port)
    if FLAGS.gateway_port:
      check_port(FLAGS.host, FLAGS.gateway_port)
    print(f"starting (logs in {run_dir}) ...", flush=True)
    t0 = time.monotonic()
    common = dict(
        config=config, overrides=cfg_flags.overrides(),
        num_prefill=FLAGS.num_prefill, num_decode=FLAGS.num_decode,
        router_port=FLAGS.port, worker_flags=FLAGS.worker_flags,
        router_flags=router_flags, ready_timeout_s=FLAGS.ready_timeout_s)
    if elastic:
      if FLAGS.prefill_processes != 1:
        raise UsageError("--elastic runs one process per worker: drop "
                         "--prefill_processes")
      address = launch_elastic(cluster, num_flex=FLAGS.num_flex,
                               flex_role=FLAGS.flex_role, **common)
    else:
      if FLAGS.num_flex:
        raise UsageError("--num_flex needs --elastic")
      address = launch(cluster, prefill_processes=FLAGS.prefill_processes,
                       **common)
    print(f"configuration: {cluster.config_path}", flush=True)
    print(f"router ready at {address} ({time.monotonic() - t0:.1f} s)",
          flush=True)
    if FLAGS.gateway_port is not None:
      router = next(p for p in cluster.procs if p.name == "router")
      print(f"OpenAI-compatible API at http://{cluster.host}:"
            f"{router.http_port}/v1", flush=True)
    if FLAGS.prompt is not None:
      from pdjax.client import Client
      chat = (chat_prompt(cluster.config_path, None, FLAGS.prompt)
              if FLAGS.chat else None)
      # A rendered template holds its special tokens (BOS where the model
      # wants one) as text: no BOS on top, and none in the answer's text.
      text, options = FLAGS.prompt, {}
      if chat is not None:
        text = chat[0]
        options = dict(add_special_tokens=False, skip_special_tokens=True)
      tls, token = router_client_settings(FLAGS.router_flags)
      with Client(address, tls=tls, token=token) as client:
        result = client.generate(text, max_tokens=FLAGS.max_tokens,
                                 temperature=0.0, **options)
      print(f"prompt: {FLAGS.prompt!r}"
            + (f" (chat template of {chat[1]})" if chat else ""))
      print(f"completion: {result.text!r}")
      u = result.usage
      print(f"{u.completion_tokens} tokens, finish={result.finish_reason}, "
            f"TTFT {u.ttft_s * 1e3:.1f} ms, total {u.total_time_s * 1e3:.1f} "
            f"ms (prefill {u.prefill_worker or 'local'} -> decode "
            f"{u.decode_worker})", flush=True)
    if serve:
      import asyncio
      planner = None
      if FLAGS.planner_profile:
        router = next(p for p in cluster.procs if p.name == "router")
        if not router.metrics_port or router.metrics_port < 0:
          raise UsageError("--planner_profile reads the router's metrics: "
                           "drop --router_flags=--metrics_port=-1")
        planner = make_planner(cluster, router.metrics_port, router_flags)
      supervisor = (Supervisor(cluster, log=lambda m: print(m, flush=True))
                    if FLAGS.restart else None)
      print("serving; Ctrl-C to stop", flush=True)
      asyncio.run(supervise(cluster, supervisor, planner))
  except KeyboardInterrupt:
    interrupted = True
  except UsageError as e:    # the deployment cannot run here as asked
    code, message = 2, str(e)
  except ProcessFailed as e:
    code, message = 1, str(e)
  finally:
    print("shutting down ...", flush=True)
    cluster.stop()
  if message:
    fail(code, message)
  if interrupted:
    sys.exit(130 if not serve else 0)


def run(argv=None) -> None:
  """``pdjax serve``: defines the flags, parses ``argv``, runs."""
  from pdjax.launch.flags import define_for_main
  cfg_flags = define_for_main(define_flags)
  app.run(lambda argv: main(argv, cfg_flags), argv=argv)


if __name__ == "__main__":
  run()
