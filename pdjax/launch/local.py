"""``python -m pdjax.launch.local``: a whole deployment on this machine.

Starts prefill and decode workers and a router as separate processes (each
initialises JAX itself; nothing is forked after JAX starts), gives each its
own devices (CPU: ``--xla_force_host_platform_device_count`` per process;
GPU: ``CUDA_VISIBLE_DEVICES``), waits until every one is serving, prints the
router's address (and with ``--gateway_port`` starts the OpenAI-compatible
HTTP gateway in front of it), and with ``--prompt`` runs a generation
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
"""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

from pdjax.launch.cluster import (LocalCluster, ProcessFailed, Supervisor,
                                  UsageError, chat_prompt, launch,
                                  launch_elastic, router_client_settings,
                                  router_security, start_gateway)

CONFIG = flags.DEFINE_string(
    "config", None, "Deployment config (default: 'local' on the CPU, "
    "'local-gpu' with --platform=gpu).")
CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model (default: the "
                                 "deployment's).")
KV_TRANSPORT = flags.DEFINE_enum("kv_transport", None,
                                 ["grpc", "device", "local"],
                                 "KV transport (default: the deployment's).")
NUM_PREFILL = flags.DEFINE_integer("num_prefill", 1,
                                   "Prefill workers (0: colocated).")
NUM_DECODE = flags.DEFINE_integer("num_decode", 1, "Decode workers.")
PREFILL_MESH = flags.DEFINE_string("prefill_mesh", None, "e.g. tp=2.")
PREFILL_PROCESSES = flags.DEFINE_integer(
    "prefill_processes", 1, "Processes per prefill worker (jax.distributed, "
    "the mesh spread over them; as the hosts of a multi-host pool).")
DECODE_MESH = flags.DEFINE_string("decode_mesh", None, "e.g. dp=2.")
PLATFORM = flags.DEFINE_enum("platform", "cpu", ["cpu", "gpu"],
                             "Where the workers run.")
PORT = flags.DEFINE_integer("port", 0, "Router port (0: a free one).")
HOST = flags.DEFINE_string("host", "127.0.0.1", "Bind address of every "
                           "service.")
LOCAL_PREFILL = flags.DEFINE_integer("local_prefill_threshold", None,
                                     "Router's local-prefill threshold.")
PROMPT = flags.DEFINE_string("prompt", None, "Generate from this prompt "
                             "through the router once everything is up.")
MAX_TOKENS = flags.DEFINE_integer("max_tokens", 32, "For --prompt.")
CHAT = flags.DEFINE_bool("chat", True, "For --prompt: send it as a user "
                         "message through the model's chat template (when "
                         "the checkpoint has one); --nochat sends the text "
                         "as is.")
SERVE = flags.DEFINE_bool("serve", None, "Keep serving until Ctrl-C "
                          "(default: true unless --prompt is given).")
READY_TIMEOUT = flags.DEFINE_float("ready_timeout_s", 600.0,
                                   "Longest wait for every process to be up.")
LOG_DIR = flags.DEFINE_string("run_dir", None, "Per-process logs and port files (default: a "
                              "temporary directory).")
EXTRA = flags.DEFINE_list("worker_flags", [], "Extra flags for every worker, "
                          "e.g. --worker_flags=--kv_ttl_s=30.")
ROUTER_FLAGS = flags.DEFINE_list("router_flags", [], "Extra router flags.")
GATEWAY_PORT = flags.DEFINE_integer(
    "gateway_port", None, "Also serve the OpenAI-compatible HTTP API "
    "(pdjax.launch.gateway) on this port (0: a free one); unset: no gateway.")
GATEWAY_FLAGS = flags.DEFINE_list("gateway_flags", [], "Extra gateway "
                                  "flags, e.g. --gateway_flags=--api_key=k.")
ELASTIC = flags.DEFINE_bool(
    "elastic", False, "Start the router first and let the workers register "
    "with it (--router) instead of listing them, so the pools can grow, "
    "shrink and move while it serves.")
NUM_FLEX = flags.DEFINE_integer(
    "num_flex", 0, "--elastic: workers holding both pools' programs "
    "(--role=both), serving --flex_role at start; the planner moves them "
    "between the pools.")
FLEX_ROLE = flags.DEFINE_enum("flex_role", "decode", ["prefill", "decode"],
                              "The pool the --num_flex workers start in.")
RESTART = flags.DEFINE_bool(
    "restart", True, "Restart a process that exits while serving (on its "
    "port; it rejoins); without it, one that exits stops the deployment.")
PLANNER_PROFILE = flags.DEFINE_string(
    "planner_profile", None, "Run the planner's control loop with this "
    "worker profile (tools/plan_pools.py --out): it sizes the pools for the "
    "router's live traffic and starts, stops and moves workers here. "
    "Implies --elastic.")
TTFT_SLO = flags.DEFINE_float("ttft_slo", None, "Planner: TTFT SLO in "
                              "seconds (default: the profile file's).")
TPOT_SLO = flags.DEFINE_float("tpot_slo", None, "Planner: TPOT SLO in "
                              "seconds (default: the profile file's).")
MAX_PREFILL = flags.DEFINE_integer("max_prefill", 4, "Planner: most prefill "
                                   "workers.")
MAX_DECODE = flags.DEFINE_integer("max_decode", 4, "Planner: most decode "
                                  "workers.")
PLANNER_INTERVAL = flags.DEFINE_float("planner_interval_s", 5.0, "Planner: "
                                      "seconds between passes.")
PLANNER_LOG = flags.DEFINE_string("planner_log", None, "Planner: append one "
                                  "JSON line per pass here.")


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
    settings = load_settings(PLANNER_PROFILE.value, ttft_s=TTFT_SLO.value,
                             tpot_s=TPOT_SLO.value)
    policy = Policy(max_workers={"prefill": MAX_PREFILL.value,
                                 "decode": MAX_DECODE.value}, headroom=0.2)
  except ValueError as e:
    raise UsageError(f"--planner_profile: {e}") from None
  loop, _ = build_loop(
      cluster.router_address, f"http://{cluster.host}:{metrics_port}/metrics",
      LocalScaler(cluster), router_security(cluster, router_flags),
      settings, policy, interval_s=PLANNER_INTERVAL.value,
      on_step=step_writer(PLANNER_LOG.value))
  return loop


def main(argv) -> None:
  del argv
  config = CONFIG.value or ("local-gpu" if PLATFORM.value == "gpu"
                            else "local")
  run_dir = Path(LOG_DIR.value or tempfile.mkdtemp(prefix="pdjax-local-"))
  run_dir.mkdir(parents=True, exist_ok=True)
  cluster = LocalCluster(run_dir, PLATFORM.value, HOST.value)
  serve = SERVE.value if SERVE.value is not None else PROMPT.value is None
  elastic = ELASTIC.value or bool(PLANNER_PROFILE.value)
  router_flags = list(ROUTER_FLAGS.value)
  if PLANNER_PROFILE.value and not any(
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
    check_port(HOST.value, PORT.value)
    if GATEWAY_PORT.value:
      check_port(HOST.value, GATEWAY_PORT.value)
    print(f"starting (logs in {run_dir}) ...", flush=True)
    t0 = time.monotonic()
    common = dict(
        config=config, checkpoint=CHECKPOINT.value,
        kv_transport=KV_TRANSPORT.value, num_prefill=NUM_PREFILL.value,
        num_decode=NUM_DECODE.value, prefill_mesh=PREFILL_MESH.value,
        decode_mesh=DECODE_MESH.value, router_port=PORT.value,
        local_prefill_threshold=LOCAL_PREFILL.value,
        worker_flags=EXTRA.value, router_flags=router_flags,
        ready_timeout_s=READY_TIMEOUT.value)
    if elastic:
      if PREFILL_PROCESSES.value != 1:
        raise UsageError("--elastic runs one process per worker: drop "
                         "--prefill_processes")
      address = launch_elastic(cluster, num_flex=NUM_FLEX.value,
                               flex_role=FLEX_ROLE.value, **common)
    else:
      if NUM_FLEX.value:
        raise UsageError("--num_flex needs --elastic")
      address = launch(cluster, prefill_processes=PREFILL_PROCESSES.value,
                       **common)
    print(f"router ready at {address} ({time.monotonic() - t0:.1f} s)",
          flush=True)
    if GATEWAY_PORT.value is not None:
      url = start_gateway(
          cluster, address, config=config, checkpoint=CHECKPOINT.value,
          port=GATEWAY_PORT.value, router_flags=ROUTER_FLAGS.value,
          gateway_flags=GATEWAY_FLAGS.value)
      print(f"OpenAI-compatible gateway at {url}/v1", flush=True)
    if PROMPT.value is not None:
      from pdjax.client import Client
      chat = (chat_prompt(config, CHECKPOINT.value, PROMPT.value)
              if CHAT.value else None)
      # A rendered template holds its special tokens (BOS where the model
      # wants one) as text: no BOS on top, and none in the answer's text.
      text, options = PROMPT.value, {}
      if chat is not None:
        text = chat[0]
        options = dict(add_special_tokens=False, skip_special_tokens=True)
      tls, token = router_client_settings(ROUTER_FLAGS.value)
      with Client(address, tls=tls, token=token) as client:
        result = client.generate(text, max_tokens=MAX_TOKENS.value,
                                 temperature=0.0, **options)
      print(f"prompt: {PROMPT.value!r}"
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
      if PLANNER_PROFILE.value:
        router = next(p for p in cluster.procs if p.name == "router")
        if not router.metrics_port or router.metrics_port < 0:
          raise UsageError("--planner_profile reads the router's metrics: "
                           "drop --router_flags=--metrics_port=-1")
        planner = make_planner(cluster, router.metrics_port, router_flags)
      supervisor = (Supervisor(cluster, log=lambda m: print(m, flush=True))
                    if RESTART.value else None)
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


if __name__ == "__main__":
  app.run(main)
