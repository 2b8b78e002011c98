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
runs both pools in one worker process.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

from pdjax.launch.cluster import (LocalCluster, UsageError, chat_prompt,
                                  launch, router_client_settings,
                                  start_gateway, tail)

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


def main(argv) -> None:
  del argv
  config = CONFIG.value or ("local-gpu" if PLATFORM.value == "gpu"
                            else "local")
  run_dir = Path(LOG_DIR.value or tempfile.mkdtemp(prefix="pdjax-local-"))
  run_dir.mkdir(parents=True, exist_ok=True)
  cluster = LocalCluster(run_dir, PLATFORM.value, HOST.value)
  serve = SERVE.value if SERVE.value is not None else PROMPT.value is None
  interrupted = False

  def on_signal(signum, frame):
    raise KeyboardInterrupt

  signal.signal(signal.SIGTERM, on_signal)
  try:
    print(f"starting (logs in {run_dir}) ...", flush=True)
    t0 = time.monotonic()
    address = launch(
        cluster, config=config, checkpoint=CHECKPOINT.value,
        kv_transport=KV_TRANSPORT.value, num_prefill=NUM_PREFILL.value,
        num_decode=NUM_DECODE.value, prefill_mesh=PREFILL_MESH.value,
        decode_mesh=DECODE_MESH.value,
        prefill_processes=PREFILL_PROCESSES.value, router_port=PORT.value,
        local_prefill_threshold=LOCAL_PREFILL.value,
        worker_flags=EXTRA.value, router_flags=ROUTER_FLAGS.value,
        ready_timeout_s=READY_TIMEOUT.value)
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


if __name__ == "__main__":
  app.run(main)
