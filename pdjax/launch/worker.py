"""Builds and serves a pool worker: ``prefill``, ``decode``, or ``both`` (the
two pools in one process, for the ``local`` transport).

Start-up order matters and is the same for every role: jax.distributed (if
the pool spans hosts) -> devices and mesh -> weights, born sharded -> engines
-> warm-up (every program compiled) -> gRPC server -> health SERVING -> port
file. A worker reports ready only when serving can no longer compile.

Membership: with ``--router`` the worker registers each pool it serves with
that router once it serves (``pdjax.service.discovery.Announcer``), renews
its lease, and deregisters first thing when it drains; without it the
router must list it (``--prefill_workers``/``--decode_workers``). A worker
of both pools (``--role=both``) serves ``--serve_role`` of them at start and
can be moved between them while it runs (``pdjax.v1.WorkerControl``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import signal
import sys

from absl import app, flags

from pdjax.launch import flags as F

ROUTER = flags.DEFINE_string(
    "router", None, "Register with the router at this host:port "
    "(pdjax.v1.Registry) once serving, renew the lease, and deregister when "
    "draining; the router then needs no --prefill_workers/--decode_workers "
    "entry for this worker. Internal: give it the deployment's "
    "--service_token.")
LEASE = flags.DEFINE_float(
    "lease_s", 10.0, "With --router: the lease asked for; renewed every "
    "third of it. A worker gone this long is dropped by the router.")
SERVE_ROLE = flags.DEFINE_enum(
    "serve_role", "both", ["prefill", "decode", "both"], "--role=both: the "
    "pool(s) this worker serves at start (it holds both programs, and "
    "pdjax.v1.WorkerControl.SetRole moves it between the pools).")
EMULATE_PREFILL = flags.DEFINE_list(
    "emulate_prefill_s", [], "DEMOS AND TESTS ONLY: 'A,B': sleep A + B x "
    "prompt tokens before each prefill batch, standing in for an "
    "accelerator's time on a CPU machine (where extra worker processes add "
    "no compute).")
EMULATE_DECODE = flags.DEFINE_list(
    "emulate_decode_s", [], "DEMOS AND TESTS ONLY: 'A,B': sleep A + B x "
    "live rows before each decode step (see --emulate_prefill_s).")

log = logging.getLogger("pdjax.worker")


def emulated_delay(value: list[str], name: str) -> tuple[float, float]:
  """(A, B) of an --emulate_*_s flag; (0, 0) when unset."""
  if not value:
    return 0.0, 0.0
  try:
    a, b = (float(v) for v in value)
  except ValueError:
    raise app.UsageError(f"--{name} takes 'A,B' (seconds, seconds per "
                         f"unit), got {','.join(value)!r}") from None
  if a < 0 or b < 0:
    raise app.UsageError(f"--{name}: A and B must be >= 0")
  return a, b


def xla_memory_env(fraction: float | None) -> dict[str, str]:
  """The environment that gives XLA ``fraction`` of each GPU's memory
  (``--gpu_memory_fraction``; None: XLA's default). XLA reads it when the
  GPU backend starts, so it is set before anything touches a device."""
  if fraction is None:
    return {}
  if not 0 < fraction <= 1:
    raise app.UsageError(f"--gpu_memory_fraction must be in (0, 1], got "
                         f"{fraction}")
  return {"XLA_PYTHON_CLIENT_MEM_FRACTION": str(fraction)}


def worker_memory_fraction(dep, role: str, flag: float | None
                           ) -> float | None:
  """XLA's share of each GPU in a worker of ``role``: the flag, else its
  pool's ``gpu_memory_fraction`` (the larger of the two pools' for a
  worker running both)."""
  if flag is not None:
    return flag
  pools = {"prefill": [dep.prefill], "decode": [dep.decode],
           "both": [dep.prefill, dep.decode]}[role]
  shares = [p.gpu_memory_fraction for p in pools
            if p.gpu_memory_fraction is not None]
  return max(shares) if shares else None


def wants_gpu(env) -> bool:
  """Whether the process was started for GPUs only (``JAX_PLATFORMS``
  names CUDA and not the CPU, as ``launch.local --platform=gpu`` does)."""
  platforms = {p.strip() for p in env.get("JAX_PLATFORMS", "").split(",")}
  return bool(platforms & {"cuda", "gpu"}) and "cpu" not in platforms


def check_gpu(jax) -> None:
  """A worker started for GPUs runs on them or stops here, saying why; it
  never falls back to the CPU without a word."""
  if not wants_gpu(os.environ):
    return
  try:
    devices = jax.devices()
    problem = ("" if devices and devices[0].platform == "gpu" else
               f"JAX's devices are {devices}")
  except Exception as e:  # noqa: BLE001 - JAX raises several kinds here
    problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
  if problem:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    raise SystemExit(
        "this worker cannot use the GPU it was started for (CUDA_VISIBLE_"
        f"DEVICES={visible if visible is not None else '(unset)'}, "
        f"JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')}): JAX found no "
        f"usable CUDA device ({problem}). Check that the GPU exists and is "
        "visible to this process (nvidia-smi -L) and that jax has its CUDA "
        "plugin; the worker does not fall back to the CPU.")


def _init_jax(memory_fraction: float | None = None):
  os.environ.update(xla_memory_env(memory_fraction))
  import jax
  if F.COORDINATOR.value:
    # Collectives between processes' CPU devices (tests, CPU deployments);
    # GPUs use NCCL whatever this says.
    try:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # a JAX without the option
      log.warning("no gloo CPU collectives in this JAX")
    # pdjax drains on SIGTERM itself (the leader's loop, below). JAX's
    # preemption service would install its own SIGTERM handler, which
    # takes the signal in a follower (no Python handler of its own there);
    # its shutdown then stalled the job's shutdown barrier until the
    # coordination service aborted both processes.
    try:
      jax.config.update("jax_enable_preemption_service", False)
    except AttributeError:  # a JAX without the service
      pass
    timeouts = dict(
        shutdown_timeout_seconds=F.DISTRIBUTED_SHUTDOWN_S.value)
    if F.COORDINATOR.value == "auto":
      jax.distributed.initialize(**timeouts)
    else:
      jax.distributed.initialize(F.COORDINATOR.value, F.NUM_PROCESSES.value,
                                 F.PROCESS_ID.value, **timeouts)
  if F.COMPILE_CACHE.value:
    jax.config.update("jax_compilation_cache_dir", F.COMPILE_CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  # After jax.distributed (which must come before a backend starts).
  check_gpu(jax)
  return jax


def check_spanning_pool(role: str, pool: str, cache_pages: int) -> None:
  """What a pool whose mesh spans processes may be, for now: a prefill pool
  on its own, without the prefix cache (``pdjax.engine.lockstep``)."""
  if pool != "prefill" or role == "both":
    raise app.UsageError(
        f"a {pool} pool spanning processes is not supported yet: run one "
        "decode worker per process (data parallel) and span processes with "
        "--role=prefill only")
  if cache_pages:
    raise app.UsageError("the prefix cache is not supported yet on a "
                         "prefill pool spanning processes; drop "
                         "--prefix_cache_pages / [prefill] cache_pages")


def check_context(max_seq_len: int, cfg) -> None:
  """Refuses (a one-line exit) to serve ``cfg`` past its trained context,
  unless --allow_long_max_seq_len says to."""
  from pdjax.model.config import context_length_problem
  problem = context_length_problem(cfg, max_seq_len)
  if problem is None:
    return
  if not F.ALLOW_LONG_MAX_SEQ_LEN.value:
    raise SystemExit(f"error: {problem}")
  log.warning("%s; serving anyway (--allow_long_max_seq_len)",
              problem.split(": lower", 1)[0])


def _mesh(jax, mesh_spec: str, devices: list | None, offset: int = 0):
  from pdjax.sharding import make_mesh, parse_mesh
  axes = parse_mesh(mesh_spec)
  all_devices = jax.devices()
  if devices is not None:
    by_id = {d.id: d for d in all_devices}
    chosen = [by_id[i] for i in devices]
  else:
    chosen = all_devices[offset:]
  return make_mesh(axes, chosen)


def _model_info(cfg, dcfg_page_size: int, max_seq_len: int):
  from pdjax.v1 import common_pb2
  info = common_pb2.ModelInfo(
      name=cfg.name, architecture=cfg.architecture,
      fingerprint=cfg.fingerprint(), vocab_size=cfg.vocab_size,
      max_seq_len=max_seq_len, num_layers=cfg.num_layers,
      num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      page_size=dcfg_page_size, dtype=cfg.dtype,
      eos_token_ids=list(cfg.eos_token_ids))
  if cfg.bos_token_id is not None:
    info.bos_token_id = cfg.bos_token_id
  # KV-aware routing: the router names blocks as the workers do.
  from pdjax.engine.prefix_cache import layout_fingerprint
  info.layout_fingerprint = layout_fingerprint(cfg, dcfg_page_size)
  return info


def check_serve_role(role: str, serve_role: str, transport: str) -> None:
  """Refuses, before anything loads, a --serve_role the worker's programs
  cannot serve."""
  if serve_role not in ("both", role) and role != "both":
    raise app.UsageError(f"--serve_role={serve_role} needs that pool's "
                         f"programs: start with --role=both")
  if role == "both" and transport == "local" and serve_role != "both":
    raise app.UsageError("--kv_transport=local serves both pools in one "
                         "process: --serve_role must be both")


async def serve(role: str) -> None:
  from pdjax.config import DeploymentConfig, resolve_layer_groups
  # Read before JAX starts a backend: the file may set XLA's memory share.
  dep = DeploymentConfig.load(F.CONFIG.value)
  check_serve_role(role, SERVE_ROLE.value,
                   F.KV_TRANSPORT.value or dep.kv_transport)
  emulated_delay(EMULATE_PREFILL.value, "emulate_prefill_s")   # checked
  emulated_delay(EMULATE_DECODE.value, "emulate_decode_s")     # early
  jax = _init_jax(worker_memory_fraction(dep, role,
                                         F.GPU_MEMORY_FRACTION.value))
  import socket

  from pdjax.engine.setup import load_sharded
  from pdjax.service import common
  from pdjax.service.metrics import Metrics
  from pdjax.sharding import ShardingRules
  from pdjax.v1 import (common_pb2, decode_pb2_grpc, prefill_pb2_grpc)

  from pdjax.model import presets
  from pdjax.model.registry import resolve_checkpoint
  checkpoint = F.CHECKPOINT.value or dep.checkpoint
  if not presets.is_random(checkpoint):
    checkpoint = resolve_checkpoint(checkpoint)
  dtype = F.DTYPE.value or dep.dtype
  transport = F.KV_TRANSPORT.value or dep.kv_transport
  sec = F.security()
  if not sec.service_token:
    log.warning("no --service_token: this worker's API (Reserve, Decode, "
                "Prefill, ...) serves any caller that reaches its port and "
                "passes its TLS; give the deployment's processes one shared "
                "service token (docs/security.md)")
  devices = F.parse_devices(F.DEVICES.value)
  server = common.make_server(sec)
  try:
    port = common.bind(server, F.HOST.value, F.PORT.value, sec)
  except common.BindError as e:
    raise SystemExit(f"error: {e}") from None
  address = F.ADVERTISE.value or f"{F.HOST.value}:{port}"
  roles = ("prefill", "decode") if role == "both" else (role,)
  exchange = None
  if transport == "local":
    if role != "both":
      raise app.UsageError("--kv_transport=local needs both pools in one "
                           "process (launch.worker --role=both)")
    from pdjax.transfer.local import LocalKvExchange
    exchange = LocalKvExchange(F.KV_TTL.value)

  metrics = Metrics(role)
  workers = []
  health_names = []
  infos: dict[str, object] = {}
  pools: dict[str, object] = {}
  offset = 0
  cfg = None
  from pdjax.engine import lockstep
  cache_pages = (F.PREFIX_CACHE_PAGES.value
                 if F.PREFIX_CACHE_PAGES.value is not None
                 else dep.prefill.cache_pages)   # the prefill worker's store
  for r in roles:
    pool = dep.prefill if r == "prefill" else dep.decode
    mesh_spec = F.MESH.value if (F.MESH.value and role != "both") else pool.mesh
    rules_name = (F.SHARDING.value if (F.SHARDING.value and role != "both")
                  else pool.sharding)
    mesh = _mesh(jax, mesh_spec, devices, offset)
    offset += mesh.size
    spans = lockstep.spans_processes(mesh)
    if spans:
      check_spanning_pool(role, r, cache_pages)
    rules = ShardingRules.load(rules_name)
    params, cfg = load_sharded(checkpoint, rules, mesh, dtype=dtype,
                               check_config=functools.partial(
                                   check_context, dep.max_seq_len))
    info = common_pb2.WorkerInfo(
        role=r, address=address,
        model=_model_info(cfg, dep.page_size, dep.max_seq_len),
        kv_transport=transport, mesh=mesh_spec, sharding=rules.name,
        process_id=common.PROCESS_ID, hostname=socket.gethostname())
    info.roles.extend(roles)
    infos[r] = info
    if r == "prefill":
      from pdjax.engine.prefill import PrefillEngine
      from pdjax.service.prefill_service import (PrefillServicer,
                                                 PrefillWorker)
      store = None
      if cache_pages:
        from pdjax.engine.prefix_cache import PrefillKVStore
        store = PrefillKVStore(cfg, mesh, rules, cache_pages, dep.page_size,
                               host_cache_blocks=F.HOST_CACHE_BLOCKS.value)
      leader = jax.process_index() == 0
      sender = _sender(transport, mesh, sec, exchange) if leader else None
      if sender is not None:
        info.kv_transfer_address = sender.address()
      # Every process of a pool must build the same programs: auto layer
      # groups may not depend on what one process's sender can do.
      groups = resolve_layer_groups(
          F.PREFILL_LAYER_GROUPS.value
          if F.PREFILL_LAYER_GROUPS.value is not None
          else dep.prefill.layer_groups,
          layer_wise_sender=(not spans and sender is not None
                             and sender.writes_landing))
      engine = PrefillEngine(
          params, cfg, mesh, rules,
          dep.prefill_engine_config(layer_groups=groups), prefix_store=store)
      log.info("prefill runs bucketed prompts in %d layer group(s) %s",
               len(engine.layer_group_sizes), engine.layer_group_sizes)
      if F.WARMUP.value:
        engine.warmup()
      if spans and not leader:
        log.info("prefill process %d of %d: replaying the leader's batches",
                 jax.process_index(), jax.process_count())
        _follow_through_sigterm()
        n = lockstep.follow(engine)
        log.info("stopped by the leader after %d batches", n)
        return
      if spans:
        log.info("prefill leader of %d processes (mesh %s)",
                 jax.process_count(), mesh_spec)
        engine = lockstep.LockstepPrefill(engine)
      landing = None
      if sender is not None and sender.writes_landing:   # CUDA IPC
        from pdjax.service.landing import LandingRequests
        landing = LandingRequests(sender, sec)
      worker = PrefillWorker(engine, sender, metrics=metrics,
                             max_queue=F.MAX_QUEUE.value,
                             transfer_timeout_s=F.TRANSFER_TIMEOUT.value,
                             fault_drop_kv=F.FAULT_DROP_KV.value,
                             landing=landing,
                             batch_delay_s=emulated_delay(
                                 EMULATE_PREFILL.value, "emulate_prefill_s"))
      prefill_pb2_grpc.add_PrefillServicer_to_server(
          PrefillServicer(worker, info), server)
      health_names.append("pdjax.v1.Prefill")
    else:
      from pdjax.engine.colocated import ColocatedEngine
      from pdjax.service.decode_service import (DecodeServicer, DecodeWorker,
                                                KvTransferServicer)
      dcfg = dep.decode_engine_config()
      if F.PREFIX_CACHING.value is not None:
        dcfg = dataclasses.replace(dcfg, prefix_caching=F.PREFIX_CACHING.value)
      if F.HOST_CACHE_BLOCKS.value:   # host KV tier
        dcfg = dataclasses.replace(dcfg,
                                   host_cache_blocks=F.HOST_CACHE_BLOCKS.value)
      engine = ColocatedEngine(
          params, cfg, mesh, rules,
          dep.prefill_engine_config(dep.decode), dcfg,
          max_waiting=F.MAX_QUEUE.value)
      if F.WARMUP.value:
        engine.warmup(dep.prefill_engine_config().payload_page_counts())
      receiver = _receiver(
          transport, mesh, exchange, cfg, dep.page_size,
          max(engine.decode.default_payload_page_counts()),
          prefill_buckets=dep.prefill_engine_config().buckets)
      step_a, step_b = emulated_delay(EMULATE_DECODE.value,
                                      "emulate_decode_s")
      worker = DecodeWorker(engine, receiver, metrics=metrics, security=sec,
                            transfer_timeout_s=F.TRANSFER_TIMEOUT.value,
                            reservation_ttl_s=F.KV_TTL.value,
                            fault_step_delay_s=F.FAULT_STEP_DELAY.value
                            + step_a, step_delay_per_row_s=step_b,
                            max_receive_bytes=(
                                dep.decode.max_receive_mib
                                if F.MAX_RECEIVE_MIB.value is None
                                else F.MAX_RECEIVE_MIB.value) << 20)
      decode_pb2_grpc.add_DecodeServicer_to_server(
          DecodeServicer(worker, info), server)
      if receiver.intake is not None:   # peers push KV streams here
        decode_pb2_grpc.add_KvTransferServicer_to_server(
            KvTransferServicer(receiver.intake), server)
      health_names.append("pdjax.v1.Decode")
    workers.append(worker)
    pools[r] = worker

  from pdjax.engine import compile_stats
  from pdjax.service import discovery
  from pdjax.v1 import registry_pb2_grpc
  compile_stats.warn_on_compile()
  health = await common.add_health(server, health_names)
  active = set(roles) if SERVE_ROLE.value == "both" else {SERVE_ROLE.value}
  announcer = None
  if ROUTER.value:
    announcer = discovery.Announcer(
        ROUTER.value, sec, lambda r: infos[r], lease_s=LEASE.value)
  control = discovery.RoleControl(
      pools, active, announcer=announcer, health=health,
      health_names={"prefill": "pdjax.v1.Prefill",
                    "decode": "pdjax.v1.Decode"},
      drain_timeout_s=F.DRAIN_TIMEOUT.value)
  registry_pb2_grpc.add_WorkerControlServicer_to_server(control, server)
  for w in workers:
    w.start()
  await server.start()
  await common.set_live(health)
  await common.set_serving(health, [], True)   # "": ready
  await control.start()                        # each pool's name, joins
  metrics_port = metrics.serve(F.METRICS_PORT.value, F.HOST.value)
  log.info("%s worker serving %s on %s (transport %s, metrics %s)%s%s",
           role, cfg.name, address, transport, metrics_port,
           f"; pools {'/'.join(sorted(active))}" if len(roles) == 2 else "",
           memory_note())
  F.write_port_file(port, metrics_port)
  await _run_until_signal(server, health, health_names, workers, control)


def advertised_host(advertise: str | None) -> str | None:
  """The host of ``--advertise_address`` (None: unset). The KV transfer
  server a ``device`` sender starts is reached at the same host as the
  worker: bound to 0.0.0.0 in a Kubernetes pod, it would otherwise tell
  decode workers to pull from 0.0.0.0."""
  if not advertise:
    return None
  return advertise.rsplit(":", 1)[0]


def _sender(transport, mesh, sec, exchange):
  from pdjax.service import common
  if transport == "local":
    from pdjax.transfer.local import LocalSender
    return LocalSender(exchange)
  if transport == "device":
    from pdjax.transfer.cuda_ipc import make_sender
    from pdjax.transfer.device import DeviceSender
    # Picks same-process / CUDA IPC / jax.experimental.transfer per hand-off.
    return make_sender(
        DeviceSender(mesh.devices.flat[0], host=F.HOST.value,
                     advertise_host=advertised_host(F.ADVERTISE.value),
                     ttl_s=F.KV_TTL.value),
        fast_path=F.KV_FAST_PATH.value, process_id=common.PROCESS_ID)
  from pdjax.transfer.grpc_stream import (DEFAULT_CHUNK_BYTES,
                                          GrpcStreamSender)
  # A chunk is one gRPC message: keep it well under --max_message_bytes, or
  # a deployment that lowers the limit could not push KV at all.
  chunk = min(DEFAULT_CHUNK_BYTES, max(sec.max_message_bytes // 2, 1 << 12))
  return GrpcStreamSender(lambda a: common.make_channel(a, sec),
                          chunk_bytes=chunk)


def _receiver(transport, mesh, exchange, cfg, page_size, max_payload_pages,
              prefill_buckets=None):
  geometry = (cfg.num_layers, page_size, cfg.num_kv_heads, cfg.head_dim,
              cfg.dtype, max_payload_pages)
  if transport == "local":
    from pdjax.transfer.local import LocalReceiver
    return LocalReceiver(exchange)
  if transport == "device":
    from pdjax.transfer.cuda_ipc import make_receiver
    from pdjax.transfer.device import DeviceReceiver
    # Lends CUDA IPC landing buffers at Reserve when the fast path is on.
    return make_receiver(
        DeviceReceiver(mesh.devices.flat[0], host=F.HOST.value),
        mesh.devices.flat[0], geometry=geometry,
        fast_path=F.KV_FAST_PATH.value,
        landing_buffers=F.IPC_LANDING_BUFFERS.value,
        landing_bytes=F.IPC_LANDING_BYTES.value,
        prefill_buckets=prefill_buckets, lease_s=F.KV_TTL.value)
  from pdjax.transfer.grpc_stream import GrpcStreamReceiver
  return GrpcStreamReceiver(ttl_s=F.KV_TTL.value, geometry=geometry)


def memory_note() -> str:
  """Device memory after warm-up, per local device that reports it (GPUs):
  what serving starts from, so an out-of-memory under load can be read
  against it (weights, pages, landing buffers, retained temporaries)."""
  import jax
  parts = []
  for d in jax.local_devices():
    stats = getattr(d, "memory_stats", lambda: None)() or {}
    if "bytes_in_use" in stats and stats.get("bytes_limit"):
      parts.append(f"{d}: {stats['bytes_in_use'] / 2**30:.1f} GiB in use, "
                   f"peak {stats.get('peak_bytes_in_use', 0) / 2**30:.1f}, "
                   f"limit {stats['bytes_limit'] / 2**30:.1f}")
  return "; memory " + "; ".join(parts) if parts else ""


def _follow_through_sigterm() -> None:
  """A follower leaves when its leader stops the pool, not on its own
  SIGTERM: Kubernetes signals every pod of a group at once, and a follower
  gone first would strand the leader's collectives mid-drain. A follower
  still waiting after the pod's grace period is killed, as it should be."""
  def note(signum, frame):
    log.info("%s: following until the leader stops the pool",
             signal.Signals(signum).name)
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, note)


async def _run_until_signal(server, health, names, workers,
                            control=None) -> None:
  """Serves until SIGINT/SIGTERM, then drains: leaves the router's pools
  (deregisters), health NOT_SERVING, no new requests, running ones finish
  (bounded), then exit."""
  from pdjax.service import common
  loop = asyncio.get_running_loop()
  stop = asyncio.Event()
  for sig in (signal.SIGINT, signal.SIGTERM):
    loop.add_signal_handler(sig, stop.set)
  await stop.wait()
  log.info("draining: no new requests; waiting for %d running",
           sum(w.active() for w in workers))
  if control is not None:   # the router sends nothing new from here on
    await control.leave_all()
  for w in workers:
    w.draining = True
  await common.set_serving(health, names, False)
  deadline = loop.time() + F.DRAIN_TIMEOUT.value
  while any(w.active() for w in workers) and loop.time() < deadline:
    await asyncio.sleep(0.05)
  left = sum(w.active() for w in workers)
  if left:
    log.warning("drain timeout: cancelling %d requests", left)
  await server.stop(grace=1.0)
  for w in workers:
    w.stop()
  log.info("stopped")


def run(role: str) -> None:
  F.setup_logging()
  # Not asyncio.run: its teardown joins the default executor's threads
  # without a bound, and one still blocked there (a hand-off waiting on a
  # peer) would hold the exit; the process leaves by os._exit below anyway,
  # once serve() has drained and stopped.
  loop = asyncio.new_event_loop()
  asyncio.set_event_loop(loop)
  loop.run_until_complete(serve(role))
  if F.COORDINATOR.value:
    # Leave the jax.distributed job together: process 0 hosts its
    # coordination service, and a peer that finds it gone aborts. Bounded
    # by --distributed_shutdown_timeout_s; logged, so a slow exit shows
    # which step it is in.
    import jax
    log.info("leaving the jax.distributed job")
    try:
      jax.distributed.shutdown()
      log.info("left the jax.distributed job")
    except Exception as e:  # noqa: BLE001 - leaving anyway
      log.warning("jax.distributed shutdown: %s", e)
  # Drained and stopped. Leave without waiting for runtime threads (gRPC
  # pollers, XLA) whose teardown can block interpreter exit.
  logging.shutdown()
  sys.stdout.flush()
  os._exit(0)


if __name__ == "__main__":
  from absl import flags as _flags
  _ROLE = _flags.DEFINE_enum("role", "decode", ["prefill", "decode", "both"],
                             "Which pool(s) this process serves.")
  app.run(lambda argv: run(_ROLE.value))
