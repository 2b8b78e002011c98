"""``python -m pdjax.launch.kvstore``: the KV store process of a host (or of
a deployment), shared by the prefill workers that name it (``--kv_store``).

It holds KV blocks by name in host memory (``--capacity_mib``, LRU) and,
with ``--disk_dir``, on local disk below that (``--disk_capacity_mib``,
LRU; files a previous run left are served again), and serves the
``BlockStore`` API (``pdjax.service.kvstore``) behind the deployment's
service token. It loads no model and uses no accelerator: blocks of any
model may share it, each served only to workers of its own layout. Workers
fall back to computing when it is down; the router counts its blocks as
fetchable when it is given as ``--kv_stores``.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from absl import app, flags

from pdjax.launch import flags as F
from pdjax.service import gc_pauses

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
  """The store's flags: its tiers, where it listens, its TLS and service
  token (it loads no model: no deployment configuration)."""
  flags.DEFINE_integer(
      "capacity_mib", 4096, "Host memory for blocks (MiB); past it the "
      "least recently used go to the disk tier, or are dropped without one.",
      flag_values=fv)
  flags.DEFINE_string(
      "disk_dir", None, "Directory of the disk tier (one file per block); "
      "unset: no disk tier.", flag_values=fv)
  flags.DEFINE_integer(
      "disk_capacity_mib", 16384, "Disk for blocks (MiB), with --disk_dir.",
      flag_values=fv)
  flags.DEFINE_integer(
      "max_block_mib", 64, "Largest block accepted (MiB).", flag_values=fv)
  F.define_process(fv, advertise=True, drain=False)
  F.define_security(fv, role="worker")


log = logging.getLogger("pdjax.kvstore")


async def serve() -> None:
  from pdjax.service import common
  from pdjax.service.kvstore import (BlockStoreCore, StoreMetrics,
                                     StoreServicer, store_info)
  from pdjax.service.metrics import Metrics
  from pdjax.v1 import blockstore_pb2_grpc

  sec = F.security()
  if not sec.service_token:
    log.warning("no --service_token: this store serves and keeps blocks for "
                "any caller that reaches its port (docs/security.md)")
  core = BlockStoreCore(FLAGS.capacity_mib << 20, disk_dir=FLAGS.disk_dir,
                        disk_capacity_bytes=FLAGS.disk_capacity_mib << 20,
                        max_block_bytes=FLAGS.max_block_mib << 20)
  server = common.make_server(sec)
  port = common.bind_or_exit(server, FLAGS.host, FLAGS.port, sec)
  address = FLAGS.advertise_address or f"{FLAGS.host}:{port}"
  metrics = Metrics("kvstore")
  store_metrics = StoreMetrics(metrics)
  blockstore_pb2_grpc.add_BlockStoreServicer_to_server(
      StoreServicer(core, store_info(address), store_metrics), server)
  names = ["pdjax.v1.BlockStore"]
  health = await common.add_health(server, names)
  await server.start()
  await common.set_live(health)
  await common.set_serving(health, names, True)
  gc_pauses.freeze_startup_heap()
  metrics_port = metrics.serve(FLAGS.metrics_port, FLAGS.host)
  log.info("KV store serving on %s: %d MiB of memory, disk %s (metrics %s)",
           address, FLAGS.capacity_mib,
           f"{FLAGS.disk_dir} ({FLAGS.disk_capacity_mib} MiB)"
           if FLAGS.disk_dir else "off", metrics_port)
  F.write_port_file(port, metrics_port)
  loop = asyncio.get_running_loop()
  stop = asyncio.Event()
  for sig in (signal.SIGINT, signal.SIGTERM):
    loop.add_signal_handler(sig, stop.set)
  while not stop.is_set():
    store_metrics.observe(core)
    try:
      await asyncio.wait_for(stop.wait(), 0.5)
    except asyncio.TimeoutError:
      pass
  await common.set_serving(health, names, False)
  await server.stop(grace=1.0)
  log.info("stopped")


def main(argv) -> None:
  del argv
  F.setup_logging()
  asyncio.run(serve())


if __name__ == "__main__":
  F.define_for_main(define_flags)
  app.run(main)
