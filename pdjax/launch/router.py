"""``python -m pdjax.launch.router``: the client-facing router.

It loads only the tokenizer (no weights, no accelerator), learns the model
from the workers' handshake, and routes each request across the pools.
Workers join three ways, in any mix: listed here (``--prefill_workers``,
``--decode_workers``), announcing themselves (a worker started with
``--router`` registers through the ``pdjax.v1.Registry`` service this
process serves, behind the service token; ``pdjax.service.discovery``),
or found as the ready pods of a label selector per pool
(``--k8s_prefill_selector``, ``--k8s_decode_selector``;
``pdjax.service.k8s_discovery``). Its
health service says whether it can serve (readiness: a decode worker is
ready) and that it runs (the ``liveness`` service). On SIGTERM it drains:
readiness NOT_SERVING, new requests UNAVAILABLE, running ones finish for up
to ``--drain_timeout_s``; those left then end with UNAVAILABLE.

``--http_port`` also serves the OpenAI-compatible HTTP API
(``pdjax.gateway``, the gateway's flags: ``--chat_template``,
``--api_key``, ...) from this process, calling the router directly
(``pdjax.service.router_in_process``): each request's first token crosses
two gRPC hops (to a worker and back) instead of four through a gateway of
its own (``pdjax.launch.gateway``, which scales apart from the router).
Its /health and /readyz follow the router's readiness; a drain answers new
HTTP requests 503.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from absl import app, flags

from pdjax.launch import config_flags
from pdjax.launch import flags as F
from pdjax.service import gc_pauses

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> config_flags.ConfigFlags:
  """The router's flags: its workers, the ``[router]`` table (its keys are
  flags by their own names: ``--max_inflight``), the checkpoint (for the
  tokenizer) and transport, where it listens, its TLS and tokens."""
  flags.DEFINE_list("prefill_workers", [], "Prefill worker addresses "
                    "(host:port).", flag_values=fv)
  flags.DEFINE_list("decode_workers", [], "Decode worker addresses "
                    "(host:port).", flag_values=fv)
  flags.DEFINE_list(
      "kv_stores", [], "Shared KV: KV store addresses (python -m "
      "pdjax.launch.kvstore); their blocks count as fetchable and are named "
      "to prefill workers as sources.", flag_values=fv)
  # Kubernetes discovery (pdjax.service.k8s_discovery): the ready pods of
  # a label selector per pool join it.
  flags.DEFINE_string(
      "k8s_prefill_selector", None, "Kubernetes discovery: the label "
      "selector of the prefill pool's serving pods (e.g. 'app=pdjax-prefill,"
      "role=leader'); ready ones join, others leave.", flag_values=fv)
  flags.DEFINE_string(
      "k8s_decode_selector", None, "Kubernetes discovery: the label selector "
      "of the decode pool's pods (e.g. 'app=pdjax-decode').", flag_values=fv)
  flags.DEFINE_string(
      "k8s_namespace", None, "Kubernetes discovery: the pods' namespace "
      "(default: the router pod's own, else 'default').", flag_values=fv)
  flags.DEFINE_string(
      "k8s_port_name", "grpc", "Kubernetes discovery: the container port "
      "(by name) a worker pod serves on.", flag_values=fv)
  flags.DEFINE_integer(
      "k8s_port", None, "Kubernetes discovery: a fixed port instead of "
      "--k8s_port_name.", flag_values=fv)
  flags.DEFINE_string(
      "k8s_api", None, "Kubernetes discovery: the API server's URL (default: "
      "the pod's service account, else the local kubeconfig).",
      flag_values=fv)
  flags.DEFINE_float(
      "wait_workers_s", 0.0, "Wait this long for workers to join before "
      "reporting ready to a launcher (--port_file); the health service "
      "answers meanwhile, readiness NOT_SERVING until a decode worker is "
      "ready (0: do not wait; requests fail until one joins).",
      flag_values=fv)
  flags.DEFINE_integer(
      "http_port", None, "Also serve the OpenAI-compatible HTTP API on this "
      "port (0: a free one), calling the router in this process; unset: "
      "gRPC only.", flag_values=fv)
  from pdjax.launch.gateway import define_http_flags
  define_http_flags(fv)
  cfg_flags = config_flags.define(
      fv, shared=["checkpoint", "kv_transport"],
      tables={"router": config_flags.ALL})
  F.define_process(fv)
  F.define_security(fv, role="router")
  return cfg_flags


log = logging.getLogger("pdjax.router")


async def serve(dep) -> None:
  from pdjax.model.registry import resolve_checkpoint
  from pdjax.service import common, discovery
  from pdjax.service.metrics import Metrics
  from pdjax.service.registry import WorkerRegistry
  from pdjax.service.router import GENERATION_SERVICE, RouterServicer
  from pdjax.tokenizer import Tokenizer
  from pdjax.v1 import generate_pb2_grpc, registry_pb2_grpc

  sec = F.security()
  from pdjax.model import presets
  checkpoint = dep.checkpoint
  tokenizer = None
  if presets.is_random(checkpoint):
    log.info("random weights (%s): no tokenizer, clients send token ids",
             checkpoint)
  else:
    tokenizer = Tokenizer.from_checkpoint(resolve_checkpoint(checkpoint))
    if tokenizer is None:
      log.warning("no tokenizer in %s: clients must send token ids",
                  checkpoint)
  metrics = Metrics("router")
  config = dep.router
  registry = WorkerRegistry(sec, metrics=metrics,
                            poll_interval_s=config.poll_interval_s,
                            kv_overlap_weight=config.kv_overlap_weight,
                            kv_stale_after_s=config.kv_stale_after_s,
                            kv_fetch_weight=config.kv_fetch_weight)
  for a in FLAGS.prefill_workers:
    registry.add(a, "prefill")
  for a in FLAGS.kv_stores:
    registry.add(a, "kvstore")
  for a in FLAGS.decode_workers:
    registry.add(a, "decode")
  servicer = RouterServicer(registry, tokenizer, config, metrics)
  server = common.make_server(sec, client_facing=True,
                              internal=discovery.INTERNAL_PREFIXES)
  generate_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
  registry_pb2_grpc.add_RegistryServicer_to_server(
      discovery.RegistryServicer(registry, default_lease_s=config.lease_s),
      server)
  if not sec.service_token:
    log.warning("no --service_token: any caller that reaches this port can "
                "register a worker (pdjax.v1.Registry); give the "
                "deployment's processes one shared service token "
                "(docs/security.md)")
  pods = None
  selectors = {"prefill": FLAGS.k8s_prefill_selector,
               "decode": FLAGS.k8s_decode_selector}
  health = await common.add_health(server, [GENERATION_SERVICE])
  port = common.bind_or_exit(server, FLAGS.host, FLAGS.port, sec)
  # Health answers from the start: live at once, ready (readiness SERVING)
  # once a decode worker is.
  await server.start()
  await common.set_live(health)
  watch = asyncio.ensure_future(
      servicer.watch_health(health, registry.poll_interval_s))
  if any(selectors.values()):
    from pdjax.service.k8s_discovery import (PodWatch, current_namespace,
                                             load_api)
    try:
      api = load_api(FLAGS.k8s_api)
    except Exception as e:  # noqa: BLE001 - no cluster configuration
      raise SystemExit(f"error: Kubernetes discovery needs the API server: "
                       f"{type(e).__name__}: {e}") from None
    pods = PodWatch(registry, selectors,
                    current_namespace(FLAGS.k8s_namespace),
                    port_name=FLAGS.k8s_port_name, port=FLAGS.k8s_port,
                    api=api)
    pods.start()
  if FLAGS.wait_workers_s > 0:
    ok = await registry.wait_ready(
        FLAGS.wait_workers_s,
        prefill=min(1, len(FLAGS.prefill_workers)
                    + bool(FLAGS.k8s_prefill_selector)),
        decode=min(1, len(FLAGS.decode_workers)
                   + bool(FLAGS.k8s_decode_selector)))
    if not ok:
      log.warning("workers not ready after %.0f s; serving anyway",
                  FLAGS.wait_workers_s)
  registry.start()
  http = None
  if FLAGS.http_port is not None:
    http = await _serve_http(dep, servicer, tokenizer)
  gc_pauses.freeze_startup_heap()
  metrics_port = metrics.serve(FLAGS.metrics_port, FLAGS.host)
  log.info("router serving on %s:%d (%d prefill, %d decode workers)%s",
           FLAGS.host, port, len(FLAGS.prefill_workers),
           len(FLAGS.decode_workers),
           f", HTTP on http://{FLAGS.host}:{http[1]}" if http else "")
  F.write_port_file(port, metrics_port,
                    http_port=http[1] if http else None)
  loop = asyncio.get_running_loop()
  stop = asyncio.Event()
  for sig in (signal.SIGINT, signal.SIGTERM):
    loop.add_signal_handler(sig, stop.set)
  await stop.wait()
  watch.cancel()
  if pods is not None:
    pods.stop()
  await servicer.drain(FLAGS.drain_timeout_s, health)
  if http is not None:
    # Its requests were the router's: the drain has ended them.
    await http[0].cleanup()
  await server.stop(grace=1.0)
  await registry.close()
  log.info("stopped")


async def _serve_http(dep, servicer, tokenizer):
  """The OpenAI HTTP API over ``servicer`` on ``--http_port``: (its
  runner, the bound port)."""
  from pdjax.gateway import create_app
  from pdjax.launch.gateway import http_config, start_http
  from pdjax.service.router_in_process import InProcessRouterClient
  config = http_config(dep.checkpoint, tokenizer)
  if F.security().token and not config.api_key:
    log.warning("the gRPC API takes a client token (--auth_token) but the "
                "HTTP API on --http_port takes none: give it --api_key "
                "(docs/security.md)")
  router = InProcessRouterClient(servicer, timeout_s=config.request_timeout_s)
  return await start_http(create_app(config, router), FLAGS.host,
                          FLAGS.http_port)


def main(argv, cfg_flags: config_flags.ConfigFlags) -> None:
  del argv
  F.setup_logging()
  dep = cfg_flags.resolve(what="router ")
  asyncio.run(serve(dep))


if __name__ == "__main__":
  _CONFIG = F.define_for_main(define_flags)
  app.run(lambda argv: main(argv, _CONFIG))
