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
"""

from __future__ import annotations

import asyncio
import logging
import signal
from absl import app, flags

from pdjax.launch import flags as F

PREFILL_WORKERS = flags.DEFINE_list(
    "prefill_workers", [], "Prefill worker addresses (host:port).")
DECODE_WORKERS = flags.DEFINE_list(
    "decode_workers", [], "Decode worker addresses (host:port).")
LOCAL_PREFILL = flags.DEFINE_integer(
    "local_prefill_threshold", None, "Prompts shorter than this many tokens "
    "are prefilled on the decode worker (default: the deployment's, else 0).")
MAX_INFLIGHT = flags.DEFINE_integer(
    "max_inflight", 4096, "Requests the router admits at once; beyond it, "
    "RESOURCE_EXHAUSTED.")
ON_FULL = flags.DEFINE_enum(
    "on_full", "queue", ["queue", "reject"], "When decode KV capacity is "
    "full: wait for it (up to --queue_timeout_s) or refuse at once.")
QUEUE_TIMEOUT = flags.DEFINE_float("queue_timeout_s", 30.0,
                                   "Longest wait for decode capacity.")
KV_FAILURE_POLICY = flags.DEFINE_enum(
    "kv_failure_policy", "recompute", ["recompute", "fail"],
    "After a failed KV hand-off: recompute the prompt on a decode worker, or "
    "fail the request.")
KV_OVERLAP_WEIGHT = flags.DEFINE_float(
    "kv_overlap_weight", 0.0, "KV-aware routing: a worker's score is this "
    "times the request's prompt blocks it holds cached, minus its load "
    "(prefill: queued requests; decode: KV pages); 0: load only.")
KV_STALE_AFTER = flags.DEFINE_float(
    "kv_stale_after_s", 2.0, "KV-aware routing: a worker whose cache was "
    "last polled longer ago than this is judged on load alone.")
WAIT_WORKERS = flags.DEFINE_float(
    "wait_workers_s", 0.0, "Wait this long for workers to join before "
    "reporting ready to a launcher (--port_file); the health service "
    "answers meanwhile, readiness NOT_SERVING until a decode worker is "
    "ready (0: do not wait; requests fail until one joins).")

LEASE = flags.DEFINE_float(
    "lease_s", 10.0, "Lease of a worker that registers (pdjax.v1.Registry) "
    "when it asks for none: a worker that has not renewed for this long is "
    "dropped.")
K8S_PREFILL = flags.DEFINE_string(
    "k8s_prefill_selector", None, "Kubernetes discovery: the label selector "
    "of the prefill pool's serving pods (e.g. 'app=pdjax-prefill,"
    "role=leader'); ready ones join, others leave.")
K8S_DECODE = flags.DEFINE_string(
    "k8s_decode_selector", None, "Kubernetes discovery: the label selector "
    "of the decode pool's pods (e.g. 'app=pdjax-decode').")
K8S_NAMESPACE = flags.DEFINE_string(
    "k8s_namespace", None, "Kubernetes discovery: the pods' namespace "
    "(default: the router pod's own, else 'default').")
K8S_PORT_NAME = flags.DEFINE_string(
    "k8s_port_name", "grpc", "Kubernetes discovery: the container port "
    "(by name) a worker pod serves on.")
K8S_PORT = flags.DEFINE_integer(
    "k8s_port", None, "Kubernetes discovery: a fixed port instead of "
    "--k8s_port_name.")
K8S_API = flags.DEFINE_string(
    "k8s_api", None, "Kubernetes discovery: the API server's URL (default: "
    "the pod's service account, else the local kubeconfig).")

log = logging.getLogger("pdjax.router")


async def serve() -> None:
  from pdjax.config import DeploymentConfig
  from pdjax.model.registry import resolve_checkpoint
  from pdjax.service import common, discovery
  from pdjax.service.metrics import Metrics
  from pdjax.service.registry import WorkerRegistry
  from pdjax.service.router import (GENERATION_SERVICE, RouterConfig,
                                    RouterServicer)
  from pdjax.tokenizer import Tokenizer
  from pdjax.v1 import generate_pb2_grpc, registry_pb2_grpc

  dep = DeploymentConfig.load(F.CONFIG.value)
  sec = F.security()
  from pdjax.model import presets
  checkpoint = F.CHECKPOINT.value or dep.checkpoint
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
  registry = WorkerRegistry(sec, metrics=metrics,
                            kv_overlap_weight=KV_OVERLAP_WEIGHT.value,
                            kv_stale_after_s=KV_STALE_AFTER.value)
  for a in PREFILL_WORKERS.value:
    registry.add(a, "prefill")
  for a in DECODE_WORKERS.value:
    registry.add(a, "decode")
  threshold = LOCAL_PREFILL.value
  if threshold is None:
    threshold = int(dep.router.get("local_prefill_threshold", 0))
  config = RouterConfig(
      local_prefill_threshold=threshold,
      kv_transport=F.KV_TRANSPORT.value or dep.kv_transport,
      transfer_timeout_s=F.TRANSFER_TIMEOUT.value,
      max_inflight=MAX_INFLIGHT.value, on_full=ON_FULL.value,
      queue_timeout_s=QUEUE_TIMEOUT.value,
      kv_failure_policy=KV_FAILURE_POLICY.value)
  servicer = RouterServicer(registry, tokenizer, config, metrics)
  server = common.make_server(sec, client_facing=True,
                              internal=discovery.INTERNAL_PREFIXES)
  generate_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
  registry_pb2_grpc.add_RegistryServicer_to_server(
      discovery.RegistryServicer(registry, default_lease_s=LEASE.value),
      server)
  if not sec.service_token:
    log.warning("no --service_token: any caller that reaches this port can "
                "register a worker (pdjax.v1.Registry); give the "
                "deployment's processes one shared service token "
                "(docs/security.md)")
  pods = None
  selectors = {"prefill": K8S_PREFILL.value, "decode": K8S_DECODE.value}
  health = await common.add_health(server, [GENERATION_SERVICE])
  try:
    port = common.bind(server, F.HOST.value, F.PORT.value, sec)
  except common.BindError as e:
    raise SystemExit(f"error: {e}") from None
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
      api = load_api(K8S_API.value)
    except Exception as e:  # noqa: BLE001 - no cluster configuration
      raise SystemExit(f"error: Kubernetes discovery needs the API server: "
                       f"{type(e).__name__}: {e}") from None
    pods = PodWatch(registry, selectors, current_namespace(K8S_NAMESPACE.value),
                    port_name=K8S_PORT_NAME.value, port=K8S_PORT.value,
                    api=api)
    pods.start()
  if WAIT_WORKERS.value > 0:
    ok = await registry.wait_ready(
        WAIT_WORKERS.value,
        prefill=min(1, len(PREFILL_WORKERS.value) + bool(K8S_PREFILL.value)),
        decode=min(1, len(DECODE_WORKERS.value) + bool(K8S_DECODE.value)))
    if not ok:
      log.warning("workers not ready after %.0f s; serving anyway",
                  WAIT_WORKERS.value)
  registry.start()
  metrics_port = metrics.serve(F.METRICS_PORT.value, F.HOST.value)
  log.info("router serving on %s:%d (%d prefill, %d decode workers)",
           F.HOST.value, port, len(PREFILL_WORKERS.value),
           len(DECODE_WORKERS.value))
  F.write_port_file(port, metrics_port)
  loop = asyncio.get_running_loop()
  stop = asyncio.Event()
  for sig in (signal.SIGINT, signal.SIGTERM):
    loop.add_signal_handler(sig, stop.set)
  await stop.wait()
  watch.cancel()
  if pods is not None:
    pods.stop()
  await servicer.drain(F.DRAIN_TIMEOUT.value, health)
  await server.stop(grace=1.0)
  await registry.close()
  log.info("stopped")


def main(argv) -> None:
  del argv
  F.setup_logging()
  asyncio.run(serve())


if __name__ == "__main__":
  app.run(main)
