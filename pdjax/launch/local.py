"""``pdjax serve`` (``python -m pdjax.launch.local``): a whole deployment on
this machine.

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
runs both pools in one worker process.

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
from pdjax.launch.cluster import (LocalCluster, UsageError, chat_prompt,
                                  launch, router_client_settings,
                                  start_gateway, tail)

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
      "gateway_port", None, "Also serve the OpenAI-compatible HTTP API "
      "(pdjax.launch.gateway) on this port (0: a free one); unset: no "
      "gateway.", flag_values=fv)
  flags.DEFINE_list("gateway_flags", [], "Extra gateway flags, e.g. "
                    "--gateway_flags=--api_key=k.", flag_values=fv)
  return cfg_flags


def main(argv, cfg_flags: config_flags.ConfigFlags) -> None:
  del argv
  config = FLAGS.config or ("local-gpu" if FLAGS.platform == "gpu"
                            else "local")
  run_dir = Path(FLAGS.run_dir or tempfile.mkdtemp(prefix="pdjax-local-"))
  run_dir.mkdir(parents=True, exist_ok=True)
  cluster = LocalCluster(run_dir, FLAGS.platform, FLAGS.host)
  serve = FLAGS.serve if FLAGS.serve is not None else FLAGS.prompt is None
  interrupted = False

  def on_signal(signum, frame):
    raise KeyboardInterrupt

  signal.signal(signal.SIGTERM, on_signal)
  try:
    print(f"starting (logs in {run_dir}) ...", flush=True)
    t0 = time.monotonic()
    address = launch(
        cluster, config=config, overrides=cfg_flags.overrides(),
        num_prefill=FLAGS.num_prefill, num_decode=FLAGS.num_decode,
        prefill_processes=FLAGS.prefill_processes, router_port=FLAGS.port,
        worker_flags=FLAGS.worker_flags, router_flags=FLAGS.router_flags,
        ready_timeout_s=FLAGS.ready_timeout_s)
    print(f"configuration: {cluster.config_path}", flush=True)
    print(f"router ready at {address} ({time.monotonic() - t0:.1f} s)",
          flush=True)
    if FLAGS.gateway_port is not None:
      url = start_gateway(
          cluster, address, port=FLAGS.gateway_port,
          router_flags=FLAGS.router_flags,
          gateway_flags=FLAGS.gateway_flags)
      print(f"OpenAI-compatible gateway at {url}/v1", flush=True)
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
      print("serving; Ctrl-C to stop", flush=True)
      while True:
        for p in cluster.procs:
          if p.popen.poll() is not None:
            raise RuntimeError(f"{p.name} exited with {p.popen.returncode}:"
                               f"\n{tail(p.log)}")
        time.sleep(0.5)
  except KeyboardInterrupt:
    interrupted = True
  except UsageError as e:    # the deployment cannot run here as asked
    sys.exit(f"pdjax.launch.local: {e}")
  finally:
    print("shutting down ...", flush=True)
    cluster.stop()
  if interrupted:
    sys.exit(130 if not serve else 0)


def run(argv=None) -> None:
  """``pdjax serve``: defines the flags, parses ``argv``, runs."""
  from pdjax.launch.flags import define_for_main
  cfg_flags = define_for_main(define_flags)
  app.run(lambda argv: main(argv, cfg_flags), argv=argv)


if __name__ == "__main__":
  run()
