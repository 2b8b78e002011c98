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
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
from pathlib import Path

from absl import app, flags

from pdjax.launch import flags as F

ROUTER = flags.DEFINE_string("router", None, "The router's host:port.")
CHAT_TEMPLATE = flags.DEFINE_string(
    "chat_template", None, "Jinja chat template for /v1/chat/completions: "
    "a file, or a packaged name (pdjax/configs/chat_templates: 'plain'); "
    "default: the checkpoint's tokenizer_config.json chat_template.")
SERVED_MODEL_NAME = flags.DEFINE_string(
    "served_model_name", None, "The model name clients send and see "
    "(default: the router's model name).")
API_KEY = flags.DEFINE_string(
    "api_key", os.environ.get("PDJAX_API_KEY"), "Clients must send "
    "'Authorization: Bearer <key>' (the /v1/ endpoints; /health and "
    "/metrics stay open); default: "
    "$PDJAX_API_KEY, unset: no auth.")
REQUEST_TIMEOUT = flags.DEFINE_float(
    "request_timeout_s", None, "Deadline of each router call; past it the "
    "client gets a 504 (unset: none).")
WAIT_ROUTER = flags.DEFINE_float(
    "wait_router_s", 60.0, "Wait this long for the router to be SERVING "
    "before reporting ready to a launcher (--port_file); HTTP is served "
    "meanwhile, /health and /readyz answering 503 until it is.")
HEADER_TIMEOUT = flags.DEFINE_float(
    "header_timeout_s", 10.0, "A connection's first request head must "
    "arrive within this long of its opening, a later one within this long "
    "of the previous response (it is closed otherwise: clients that never "
    "finish their headers cannot pile up).")
BODY_TIMEOUT = flags.DEFINE_float(
    "body_timeout_s", 60.0, "A request body must arrive within this long of "
    "its head (408 otherwise).")
MAX_CONNECTIONS = flags.DEFINE_integer(
    "max_connections", 0, "Open HTTP connections beyond this are refused "
    "with a 503 (0: the process's file descriptor limit, less a reserve).")
MAX_BODY_MIB = flags.DEFINE_integer(
    "max_body_mib", 64, "Larger request bodies are a 413 (token-id prompts "
    "of a long context are a few MiB of JSON).")
flags.mark_flag_as_required("router")
# HTTP, where OpenAI-compatible servers (vLLM, SGLang) listen by default.
flags.set_default(F.PORT, 8000)

log = logging.getLogger("pdjax.gateway")


def template_path(spec: str) -> Path:
  """A template file, or a packaged template's name (``plain``)."""
  from pdjax import resources
  found = resources.find("chat_template", spec)
  return Path(str(found)) if found is not None else Path(spec)


def model_dir() -> Path | None:
  """The checkpoint holding the tokenizer: a directory with its files, or a
  GGUF file (None for random-weight presets, which have none)."""
  from pdjax.config import DeploymentConfig
  from pdjax.model import presets
  from pdjax.model.registry import resolve_checkpoint
  checkpoint = (F.CHECKPOINT.value or
                DeploymentConfig.load(F.CONFIG.value).checkpoint)
  if presets.is_random(checkpoint):
    return None
  return Path(resolve_checkpoint(checkpoint))


def load_tokenizer(path: Path | None):
  """The model's tokenizer, loaded as the router loads it, or None."""
  if path is None:
    return None
  from pdjax.tokenizer import Tokenizer
  return Tokenizer.from_checkpoint(path)


async def serve() -> None:
  from aiohttp import web

  from pdjax.client import GenerationError
  from pdjax.gateway import GatewayConfig, create_app
  from pdjax.gateway.chat_template import (ChatTemplateError,
                                           load_chat_template)
  from pdjax.gateway.server import CLIENT, make_runner

  directory = model_dir()
  try:
    template = load_chat_template(
        template_path(CHAT_TEMPLATE.value) if CHAT_TEMPLATE.value else None,
        directory)
  except ChatTemplateError as e:
    raise SystemExit(f"error: {e}") from e
  if template is None:
    log.warning("no chat template in %s (tokenizer_config.json or GGUF "
                "metadata) and no --chat_template: /v1/chat/completions "
                "answers 400", directory)
  tls, token = F.router_client_settings()
  config = GatewayConfig(
      router=ROUTER.value, served_model_name=SERVED_MODEL_NAME.value,
      api_key=API_KEY.value or None, chat_template=template,
      tokenizer=load_tokenizer(directory),
      request_timeout_s=REQUEST_TIMEOUT.value, tls=tls, router_token=token,
      header_timeout_s=HEADER_TIMEOUT.value,
      body_timeout_s=BODY_TIMEOUT.value,
      max_connections=MAX_CONNECTIONS.value or None,
      max_body_bytes=MAX_BODY_MIB.value << 20)
  gateway = create_app(config)
  runner = make_runner(gateway, shutdown_timeout_s=F.DRAIN_TIMEOUT.value)
  await runner.setup()
  try:
    # HTTP first: liveness (/livez) answers at once, readiness (/health,
    # /readyz) 503 until the router is ready.
    site = web.TCPSite(runner, F.HOST.value, F.PORT.value)
    try:
      await site.start()
    except OSError as e:
      from pdjax.service.common import in_use_message
      if e.errno == errno.EADDRINUSE:
        raise SystemExit(
            f"error: {in_use_message(F.HOST.value, F.PORT.value)}") from None
      raise SystemExit(f"error: cannot serve on {F.HOST.value}:"
                       f"{F.PORT.value}: {e.strerror or e}") from None
    if WAIT_ROUTER.value > 0:
      try:
        await gateway[CLIENT].wait_ready(WAIT_ROUTER.value)
      except TimeoutError as e:
        log.warning("%s; serving anyway", e)
      except GenerationError as e:   # e.g. a wrong token: waiting won't help
        raise SystemExit(f"error: router {ROUTER.value}: {e}") from e
    port = runner.addresses[0][1]
    log.info("gateway serving http://%s:%d (router %s, chat template: %s)",
             F.HOST.value, port, ROUTER.value,
             template.origin if template else "none")
    F.write_port_file(port, -1)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
      loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining (up to %.0f s)", F.DRAIN_TIMEOUT.value)
  finally:
    await runner.cleanup()


def main(argv) -> None:
  del argv
  F.setup_logging()
  asyncio.run(serve())


if __name__ == "__main__":
  app.run(main)
