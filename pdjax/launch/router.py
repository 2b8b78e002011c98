"""``python -m pdjax.launch.router``: the client-facing router.

It loads only the tokenizer (no weights, no accelerator), learns the model
from the workers' handshake, and routes each request across the pools. Its
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
KV_FETCH_WEIGHT = flags.DEFINE_float(
    "kv_fetch_weight", 0.5, "Shared KV: a prompt block a prefill worker "
    "can fetch from a peer or a store counts this much (0..1) of a block it "
    "holds in its KV-aware score.")
KV_STORES = flags.DEFINE_list(
    "kv_stores", [], "Shared KV: KV store addresses (python -m "
    "pdjax.launch.kvstore); their blocks count as fetchable and are named "
    "to prefill workers as sources.")
KV_STALE_AFTER = flags.DEFINE_float(
    "kv_stale_after_s", 2.0, "KV-aware routing: a worker whose cache was "
    "last polled longer ago than this is judged on load alone.")
WAIT_WORKERS = flags.DEFINE_float(
    "wait_workers_s", 0.0, "Wait this long for workers to join before "
    "reporting ready to a launcher (--port_file); the health service "
    "answers meanwhile, readiness NOT_SERVING until a decode worker is "
    "ready (0: do not wait; requests fail until one joins).")

log = logging.getLogger("pdjax.router")


async def serve() -> None:
  from pdjax.config import DeploymentConfig
  from pdjax.model.registry import resolve_checkpoint
  from pdjax.service import common
  from pdjax.service.metrics import Metrics
  from pdjax.service.registry import WorkerRegistry
  from pdjax.service.router import (GENERATION_SERVICE, RouterConfig,
                                    RouterServicer)
  from pdjax.tokenizer import Tokenizer
  from pdjax.v1 import generate_pb2_grpc

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
                            kv_stale_after_s=KV_STALE_AFTER.value,
                            kv_fetch_weight=KV_FETCH_WEIGHT.value)
  for a in PREFILL_WORKERS.value:
    registry.add(a, "prefill")
  for a in KV_STORES.value:
    registry.add(a, "kvstore")
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
  server = common.make_server(sec, client_facing=True)
  generate_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
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
  if WAIT_WORKERS.value > 0:
    ok = await registry.wait_ready(WAIT_WORKERS.value,
                                   prefill=min(1, len(PREFILL_WORKERS.value)),
                                   decode=min(1, len(DECODE_WORKERS.value)))
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
