"""``python -m pdjax.launch.gateway``: the OpenAI-compatible HTTP gateway.

  python -m pdjax.launch.gateway --router=127.0.0.1:50051 --port=8000 \\
      --chat_template=plain

It loads no weights and needs no accelerator: only the checkpoint's
tokenizer files (``tokenizer_config.json`` for the chat template and its
special tokens, ``tokenizer.json`` for token counts and logprob token
names; a GGUF's metadata holds both), found as the router finds them
(``--checkpoint``, else the deployment file's). It serves HTTP at once
(/livez: liveness; /health and /readyz: readiness, 503 until the router is
ready) and waits for the router before reporting ready to a launcher; on
SIGTERM it stops accepting, lets running requests finish for up to
``--drain_timeout_s``, then cancels the rest (which cancels their router
calls). The router's TLS and token come from the usual ``--tls_*`` and
``--auth_token`` flags; ``--api_key`` is the gateway's own key.

The router's process serves the same HTTP API itself with ``--http_port``
(``pdjax.launch.router``; these flags, from ``define_http_flags``), two
gRPC hops fewer on each request's way; this process scales the HTTP front
apart from the router.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
from pathlib import Path

from absl import app, flags

from pdjax.launch import config_flags
from pdjax.launch import flags as F
from pdjax.service import gc_pauses

FLAGS = flags.FLAGS


def define_http_flags(fv: flags.FlagValues = FLAGS) -> None:
  """What the OpenAI HTTP API serves and its limits: the gateway's own
  flags, and the router's where it serves the HTTP itself
  (``pdjax.launch.router --http_port``)."""
  flags.DEFINE_string(
      "chat_template", None, "Jinja chat template for /v1/chat/completions: "
      "a file, or a packaged name (pdjax/configs/chat_templates: 'plain'); "
      "default: the checkpoint's tokenizer_config.json chat_template.",
      flag_values=fv)
  flags.DEFINE_string(
      "served_model_name", None, "The model name clients send and see "
      "(default: the router's model name).", flag_values=fv)
  flags.DEFINE_string(
      "api_key", os.environ.get("PDJAX_API_KEY"), "Clients must send "
      "'Authorization: Bearer <key>' (the /v1/ endpoints; /health and "
      "/metrics stay open); default: $PDJAX_API_KEY, unset: no auth.",
      flag_values=fv)
  flags.DEFINE_float(
      "request_timeout_s", None, "Deadline of each router call; past it the "
      "client gets a 504 (unset: none).", flag_values=fv)
  flags.DEFINE_float(
      "header_timeout_s", 10.0, "A connection's first request head must "
      "arrive within this long of its opening, a later one within this long "
      "of the previous response (it is closed otherwise: clients that never "
      "finish their headers cannot pile up).", flag_values=fv)
  flags.DEFINE_float(
      "body_timeout_s", 60.0, "A request body must arrive within this long "
      "of its head (408 otherwise).", flag_values=fv)
  flags.DEFINE_integer(
      "max_connections", 0, "Open HTTP connections beyond this are refused "
      "with a 503 (0: the process's file descriptor limit, less a "
      "reserve).", flag_values=fv)
  flags.DEFINE_integer(
      "max_body_mib", 64, "Larger request bodies are a 413 (token-id prompts "
      "of a long context are a few MiB of JSON).", flag_values=fv)


def define_flags(fv: flags.FlagValues = FLAGS) -> config_flags.ConfigFlags:
  """The gateway's flags: its router, HTTP limits, the checkpoint (for the
  tokenizer files), where it listens and how it dials the router."""
  flags.DEFINE_string("router", None, "The router's host:port.",
                      flag_values=fv)
  define_http_flags(fv)
  flags.DEFINE_bool(
      "router_sessions", True, "Send requests to the router as messages on "
      "one long-lived GenerateSession stream rather than a new gRPC call "
      "each (less set-up on a request's way to its first token).",
      flag_values=fv)
  flags.DEFINE_float(
      "wait_router_s", 60.0, "Wait this long for the router to be SERVING "
      "before reporting ready to a launcher (--port_file); HTTP is served "
      "meanwhile, /health and /readyz answering 503 until it is.",
      flag_values=fv)
  flags.mark_flag_as_required("router", flag_values=fv)
  cfg_flags = config_flags.define(fv, shared=["checkpoint"])
  # HTTP, where OpenAI-compatible servers (vLLM, SGLang) listen by default.
  F.define_process(fv, port_default=8000, metrics=False)
  F.define_security(fv, role="client")
  return cfg_flags


log = logging.getLogger("pdjax.gateway")


def template_path(spec: str) -> Path:
  """A template file, or a packaged template's name (``plain``)."""
  from pdjax import resources
  found = resources.find("chat_template", spec)
  return Path(str(found)) if found is not None else Path(spec)


def model_dir(checkpoint: str) -> Path | None:
  """The checkpoint holding the tokenizer: a directory with its files, or a
  GGUF file (None for random-weight presets, which have none)."""
  from pdjax.model import presets
  from pdjax.model.registry import resolve_checkpoint
  if presets.is_random(checkpoint):
    return None
  return Path(resolve_checkpoint(checkpoint))


def load_tokenizer(path: Path | None):
  """The model's tokenizer, loaded as the router loads it, or None."""
  if path is None:
    return None
  from pdjax.tokenizer import Tokenizer
  return Tokenizer.from_checkpoint(path)


def http_config(checkpoint: str, tokenizer, **router) -> "GatewayConfig":
  """The HTTP API's configuration from ``define_http_flags``' flags: the
  chat template (``--chat_template``, else the checkpoint's), ``tokenizer``
  (the checkpoint's, or None), and how it reaches the router (``router``:
  ``GatewayConfig``'s router fields)."""
  from pdjax.gateway import GatewayConfig
  from pdjax.gateway.chat_template import (ChatTemplateError,
                                           load_chat_template)
  directory = model_dir(checkpoint)
  try:
    template = load_chat_template(
        template_path(FLAGS.chat_template) if FLAGS.chat_template else None,
        directory)
  except ChatTemplateError as e:
    raise SystemExit(f"error: {e}") from e
  if template is None:
    log.warning("no chat template in %s (tokenizer_config.json or GGUF "
                "metadata) and no --chat_template: /v1/chat/completions "
                "answers 400", directory)
  return GatewayConfig(
      served_model_name=FLAGS.served_model_name,
      api_key=FLAGS.api_key or None, chat_template=template,
      tokenizer=tokenizer, request_timeout_s=FLAGS.request_timeout_s,
      header_timeout_s=FLAGS.header_timeout_s,
      body_timeout_s=FLAGS.body_timeout_s,
      max_connections=FLAGS.max_connections or None,
      max_body_bytes=FLAGS.max_body_mib << 20, **router)


async def start_http(app, host: str, port: int):
  """Serves ``app`` (``pdjax.gateway.create_app``) on ``host:port``; returns
  its runner (``cleanup()`` drains it for up to ``--drain_timeout_s``) and
  the bound port. A port in use ends the process with a message."""
  from aiohttp import web

  from pdjax.gateway.server import make_runner
  runner = make_runner(app, shutdown_timeout_s=FLAGS.drain_timeout_s)
  await runner.setup()
  site = web.TCPSite(runner, host, port)
  try:
    await site.start()
  except OSError as e:
    await runner.cleanup()
    from pdjax.service.common import in_use_message
    if e.errno == errno.EADDRINUSE:
      raise SystemExit(f"error: {in_use_message(host, port)}") from None
    raise SystemExit(f"error: cannot serve on {host}:{port}: "
                     f"{e.strerror or e}") from None
  return runner, runner.addresses[0][1]


async def serve(dep) -> None:
  from pdjax.client import GenerationError
  from pdjax.gateway import create_app
  from pdjax.gateway.server import CLIENT

  tls, token = F.router_client_settings()
  config = http_config(
      dep.checkpoint, load_tokenizer(model_dir(dep.checkpoint)),
      router=FLAGS.router, tls=tls, router_token=token,
      router_sessions=FLAGS.router_sessions)
  gateway = create_app(config)
  # HTTP first: liveness (/livez) answers at once, readiness (/health,
  # /readyz) 503 until the router is ready.
  runner, port = await start_http(gateway, FLAGS.host, FLAGS.port)
  try:
    if FLAGS.wait_router_s > 0:
      try:
        await gateway[CLIENT].wait_ready(FLAGS.wait_router_s)
      except TimeoutError as e:
        log.warning("%s; serving anyway", e)
      except GenerationError as e:   # e.g. a wrong token: waiting won't help
        raise SystemExit(f"error: router {FLAGS.router}: {e}") from e
    gc_pauses.freeze_startup_heap()
    template = config.chat_template
    log.info("gateway serving http://%s:%d (router %s, chat template: %s)",
             FLAGS.host, port, FLAGS.router,
             template.origin if template else "none")
    F.write_port_file(port, -1)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
      loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining (up to %.0f s)", FLAGS.drain_timeout_s)
  finally:
    await runner.cleanup()


def main(argv, cfg_flags: config_flags.ConfigFlags) -> None:
  del argv
  F.setup_logging()
  dep = cfg_flags.resolve(what="gateway ", log_it=False)
  asyncio.run(serve(dep))


if __name__ == "__main__":
  _CONFIG = F.define_for_main(define_flags)
  app.run(lambda argv: main(argv, _CONFIG))
