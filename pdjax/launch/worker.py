"""Builds and serves a pool worker: ``prefill``, ``decode``, or ``both`` (the
two pools in one process, for the ``local`` transport).

``python -m pdjax.launch.worker --role=ROLE`` runs any of them;
``pdjax.launch.prefill`` and ``pdjax.launch.decode`` are one role each.
``define_flags(role)`` gives each exactly the flags it reads: the shared
keys and its pools' tables of the deployment configuration (a decode
worker also reads ``[prefill] buckets``: the KV sizes it must accept), the
worker settings below, and the process and security groups. The flags of
``PROCESS_POOL_FLAGS`` (``--mesh``, ``--sharding``, ``--max_queue``,
``--kv_ttl_s``, ...) set the pool(s) the process serves (``--prefill_mesh``
and the like name one); ``worker_config`` resolves them with the file into
the one configuration the worker runs, and logs it.

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
import functools
import logging
import os
import signal
import sys

from absl import app, flags

from pdjax import config as C
from pdjax.launch import config_flags
from pdjax.launch import flags as F
from pdjax.launch import host_latency
from pdjax.service import gc_pauses
from pdjax.service.call_sessions import CallSessions

log = logging.getLogger("pdjax.worker")
FLAGS = flags.FLAGS
# Settings of the pool(s) a worker process serves, by their table key: the
# flag sets the key of each pool the process serves (``--mesh``: only one).
PROCESS_POOL_FLAGS = {
    "mesh": "This worker's mesh, e.g. 'tp=2' or 'dp=2,tp=1' (a --role=both "
            "worker takes --prefill_mesh and --decode_mesh).",
    "sharding": "This worker's sharding rule set: a packaged name "
                "(prefill_tp, decode_dp, decode_dp_tp) or a TOML path.",
    "gpu_memory_fraction": "Share of each GPU's memory XLA may use in this "
                           "process (XLA_PYTHON_CLIENT_MEM_FRACTION). An 8B "
                           "decode worker on an 80 GB card holds 47 of XLA's "
                           "59.4 GiB after warm-up (docs/notes/2026-11-26-"
                           "h100x4-steady-goodput.md); CUDA IPC landing "
                           "buffers are allocated outside it.",
    "host_cache_blocks": "KV blocks evicted from this worker's device prefix "
                         "cache kept in host memory (pinned where the backend "
                         "has it) and uploaded back on a later hit instead "
                         "of recomputed (0: off; decode needs prefix "
                         "caching).",
    "max_queue": "Requests a worker queues before RESOURCE_EXHAUSTED.",
    "transfer_timeout_s": "Longest a KV hand-off may take.",
    "kv_ttl_s": "Unclaimed KV (and unredeemed reservations) are freed after "
                "this long.",
}


def _pools(role: str) -> tuple[str, ...]:
  return ("prefill", "decode") if role == "both" else (role,)


def define_flags(fv: flags.FlagValues = FLAGS, role: str = "both"
                 ) -> config_flags.ConfigFlags:
  """The flags of a worker of ``role`` (``both``: a worker that may run
  any role, ``python -m pdjax.launch.worker``); returns its configuration
  flags."""
  pools = _pools(role)
  tables: dict = {p: config_flags.ALL for p in pools}
  if "decode" in pools and "prefill" not in pools:
    # The KV sizes a prefill worker may send (insert programs, landing
    # buffers).
    tables["prefill"] = ["buckets"]
  aliases = {}
  if "prefill" in pools:
    aliases["prefix_cache_pages"] = "prefill_cache_pages"
    for key in ("kv_fetch", "kv_store_write", "kv_fetch_timeout_s",
                "kv_pull_landing_mib"):
      aliases[key] = f"prefill_{key}"
  if "decode" in pools:
    for key in ("prefix_caching", "max_receive_mib", "ipc_landing_buffers",
                "ipc_landing_bytes", "queue_deadline_s"):
      aliases[key] = f"decode_{key}"
  # Elastic pools: the lease a worker started with --router asks for is
  # the deployment's.
  tables["router"] = ["lease_s"]
  cfg_flags = config_flags.define(fv, tables=tables, aliases=aliases)
  for key, help_ in PROCESS_POOL_FLAGS.items():
    cls = C.SECTIONS[pools[0]]
    config_flags.define_field(fv, key, cls, key, help_)
  flags.DEFINE_string(
      "devices", "", "Local device ids for this worker's mesh, e.g. '0-3' or "
      "'4,5' (default: the first ones the mesh needs).", flag_values=fv)
  flags.DEFINE_bool("warmup", True, "Compile every serving program before "
                    "reporting ready.", flag_values=fv)
  flags.DEFINE_enum(
      "kv_fast_path", "auto", ["auto", "off"],
      "--kv_transport=device: hand KV to a decode worker in this process by "
      "device_put, and to one on this host by CUDA IPC into a landing buffer "
      "it lends (NVLink), else by jax.experimental.transfer; shared KV's "
      "pulls from a peer prefill worker on this host also take CUDA IPC. "
      "auto: on when the backend is GPU (cuda-bindings and CuPy "
      "importable); off: always jax.experimental.transfer.", flag_values=fv)
  flags.DEFINE_bool(
      "allow_long_max_seq_len",
      os.environ.get("PDJAX_ALLOW_LONG_MAX_SEQ_LEN", "") not in ("", "0"),
      "Serve the deployment's max_seq_len even where it is longer than the "
      "model's trained context (config.json max_position_embeddings, "
      "stretched by linear rope scaling); outputs past it may be garbage. "
      "Without it such a worker refuses to start (as vLLM without "
      "VLLM_ALLOW_LONG_MAX_MODEL_LEN). Default: "
      "$PDJAX_ALLOW_LONG_MAX_SEQ_LEN.", flag_values=fv)
  flags.DEFINE_float(
      "gil_switch_interval_ms", 0.5,
      "How long a thread of this process may hold the GIL while another "
      "waits for it (sys.setswitchinterval; Python's default is 5 ms). The "
      "engine's thread dispatches programs while the gRPC streams' thread "
      "sends the tokens they made; at 5 ms a first token waits behind the "
      "next decode call's dispatch. 0.5 ms: time to first token 0.5-0.6 ms "
      "lower at one stream, TPOT unchanged at 32 (Llama-3-8B shapes, one "
      "H100).", flag_values=fv)
  flags.DEFINE_string(
      "compilation_cache_dir", os.environ.get("PDJAX_COMPILATION_CACHE"),
      "JAX persistent compilation cache directory (speeds up restarts).",
      flag_values=fv)
  flags.DEFINE_string(
      "router", None, "Register with the router at this host:port "
      "(pdjax.v1.Registry) once serving, renew the lease ([router] "
      "lease_s), and deregister when draining; the router then needs no "
      "--prefill_workers/--decode_workers entry for this worker. Internal: "
      "give it the deployment's --service_token.", flag_values=fv)
  if "prefill" in pools:
    flags.DEFINE_list(
        "emulate_prefill_s", [], "DEMOS AND TESTS ONLY: 'A,B': sleep A + B "
        "x prompt tokens before each prefill batch, standing in for an "
        "accelerator's time on a CPU machine (where extra worker processes "
        "add no compute).", flag_values=fv)
  if "decode" in pools:
    flags.DEFINE_list(
        "emulate_decode_s", [], "DEMOS AND TESTS ONLY: 'A,B': sleep A + B x "
        "live rows before each decode step (see --emulate_prefill_s).",
        flag_values=fv)
  if "prefill" in pools:
    flags.DEFINE_string(
        "kv_store", None, "Prefill workers sharing KV ([prefill] kv_fetch): "
        "host:port of the KV store process of this host (python -m "
        "pdjax.launch.kvstore): blocks this worker computes are written to "
        "it ([prefill] kv_store_write), and it is asked for blocks no peer "
        "has.", flag_values=fv)
    flags.DEFINE_float(
        "fault_injection_drop_kv", 0.0, "TESTING ONLY: share of KV hand-offs "
        "a prefill worker silently drops (exercises the recovery path).",
        flag_values=fv)
  if "decode" in pools:
    flags.DEFINE_float(
        "fault_injection_decode_step_delay_s", 0.0, "TESTING ONLY: a decode "
        "worker sleeps this long before each engine step (a slow device), "
        "so tests can act on streams that are certainly mid-generation.",
        flag_values=fv)
  F.define_distributed(fv)
  F.define_process(fv, advertise=True)
  F.define_security(fv, role="worker")
  if role == "both":
    flags.DEFINE_enum("role", "decode", ["prefill", "decode", "both"],
                      "Which pool(s) this process serves.", flag_values=fv)
    flags.DEFINE_enum(
        "serve_role", "both", ["prefill", "decode", "both"], "--role=both: "
        "the pool(s) this worker serves at start (it holds both programs, "
        "and pdjax.v1.WorkerControl.SetRole moves it between the pools).",
        flag_values=fv)
  return cfg_flags


def worker_config(role: str, cfg_flags: config_flags.ConfigFlags,
                  fv: flags.FlagValues = FLAGS):
  """The configuration a worker of ``role`` runs: the deployment file, its
  configuration flags, and the process's pool flags (``--mesh`` and the
  like) on the pool(s) it serves; logged once resolved."""
  pools = _pools(role)
  extra: dict = {}
  given = cfg_flags.overrides()
  for key in PROCESS_POOL_FLAGS:
    value = fv[key].value
    if value is None:
      continue
    if len(pools) > 1 and key in ("mesh", "sharding"):
      raise app.UsageError(
          f"--{key} names one pool's {key}; a worker serving both pools "
          f"takes --prefill_{key} and --decode_{key}")
    for pool in pools:
      own = given.get(pool, {}).get(key)
      if own is not None and own != value:
        raise app.UsageError(f"--{key}={value} and --{pool}_{key}={own} "
                             "disagree")
      extra.setdefault(pool, {})[key] = value
  if role != "both":
    # Flags of the other pool (a --role worker defines both) are not read.
    other = [f"--{config_flags.flag_name(t, k)}" for t, keys in given.items()
             if t in ("prefill", "decode") and t not in pools
             for k in keys if not (t == "prefill" and k == "buckets")]
    if other:
      raise app.UsageError(f"a {role} worker does not read {', '.join(other)}")
  return cfg_flags.resolve(extra, what=f"{role} worker ")



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


def set_switch_interval(ms: float) -> None:
  """``--gil_switch_interval_ms``: a positive interval, or a usage error
  that names the flag."""
  if not ms > 0:
    raise app.UsageError(f"--gil_switch_interval_ms must be positive, got "
                         f"{ms}")
  sys.setswitchinterval(ms / 1e3)


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

  from pdjax.engine import compile_stats  # counts from the first compile
  compile_stats.install()
  if FLAGS.coordinator_address:
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
        shutdown_timeout_seconds=FLAGS.distributed_shutdown_timeout_s)
    if FLAGS.coordinator_address == "auto":
      jax.distributed.initialize(**timeouts)
    else:
      jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                 FLAGS.process_id, **timeouts)
  if FLAGS.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir)
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
  if not FLAGS.allow_long_max_seq_len:
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


def _model_info(cfg, dcfg_page_size: int, max_seq_len: int, kv_dtype: str):
  from pdjax.engine.kv_dtype import kv_dtype_name
  from pdjax.v1 import common_pb2
  info = common_pb2.ModelInfo(
      name=cfg.name, architecture=cfg.architecture,
      fingerprint=cfg.fingerprint(), vocab_size=cfg.vocab_size,
      max_seq_len=max_seq_len, num_layers=cfg.num_layers,
      num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      page_size=dcfg_page_size, dtype=cfg.dtype,
      kv_dtype=kv_dtype_name(kv_dtype, cfg.dtype),
      kv_scales=cfg.kv_scales or "",
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


def _flag(name: str, default=None):
  """A worker flag that only some roles define (``define_flags``)."""
  return FLAGS[name].value if name in FLAGS else default


async def serve(role: str, dep) -> None:
  """Serves ``dep`` (the resolved configuration) as a worker of ``role``
  until SIGTERM."""
  from pdjax.config import resolve_layer_groups
  roles = _pools(role)
  serve_role = _flag("serve_role", "both")
  check_serve_role(role, serve_role, dep.kv_transport)
  emulate_prefill = emulated_delay(_flag("emulate_prefill_s", []),
                                   "emulate_prefill_s")    # checked early
  emulate_decode = emulated_delay(_flag("emulate_decode_s", []),
                                  "emulate_decode_s")
  # Before JAX starts a backend: the pools may set XLA's memory share.
  jax = _init_jax(dep.memory_fraction(roles))
  import socket

  from pdjax.engine.setup import load_sharded
  from pdjax.service import common
  from pdjax.service.metrics import Metrics
  from pdjax.sharding import ShardingRules
  from pdjax.v1 import (common_pb2, decode_pb2_grpc, prefill_pb2_grpc)

  from pdjax.model import presets
  from pdjax.model.registry import resolve_checkpoint
  def resolved(name: str) -> str:
    """A checkpoint name or path as load_sharded takes it."""
    return name if presets.is_random(name) else resolve_checkpoint(name)
  checkpoint = resolved(dep.checkpoint)
  dtype = dep.dtype
  transport = dep.kv_transport
  sec = F.security()
  if not sec.service_token:
    log.warning("no --service_token: this worker's API (Reserve, Decode, "
                "Prefill, ...) serves any caller that reaches its port and "
                "passes its TLS; give the deployment's processes one shared "
                "service token (docs/security.md)")
  note = host_latency.idle_wake_note()
  if note:
    log.warning("%s", note)
  devices = F.parse_devices(FLAGS.devices)
  server = common.make_server(sec)
  port = common.bind_or_exit(server, FLAGS.host, FLAGS.port, sec)
  address = FLAGS.advertise_address or f"{FLAGS.host}:{port}"
  exchange = None
  if transport == "local":
    if role != "both":
      raise app.UsageError("--kv_transport=local needs both pools in one "
                           "process (launch.worker --role=both)")
    from pdjax.transfer.local import LocalKvExchange
    exchange = LocalKvExchange(dep.decode.kv_ttl_s)

  metrics = Metrics(role)
  sessions = CallSessions()   # the router's streams to this process
  metrics.sessions.set_function(lambda: sessions.open)
  workers = []
  health_names = []
  infos: dict[str, object] = {}
  pools: dict[str, object] = {}
  offset = 0
  cfg = None
  from pdjax.engine import lockstep
  cache_pages = dep.prefill.cache_pages    # the prefill worker's store
  for r in roles:
    pool = dep.pool(r)
    mesh_spec, rules_name = pool.mesh, pool.sharding
    mesh = _mesh(jax, mesh_spec, devices, offset)
    offset += mesh.size
    spans = lockstep.spans_processes(mesh)
    if spans:
      check_spanning_pool(role, r, cache_pages)
    rules = ShardingRules.load(rules_name)
    params, cfg = load_sharded(checkpoint, rules, mesh, dtype=dtype,
                               check_config=functools.partial(
                                   check_context, dep.max_seq_len),
                               weight_dtype=pool.weight_dtype,
                               activation_dtype=pool.activation_dtype,
                               kv_dtype=dep.kv_dtype,
                               kv_scales=dep.kv_scales,
                               fuse_projections=pool.fuse_projections)
    info = common_pb2.WorkerInfo(
        role=r, address=address,
        model=_model_info(cfg, dep.page_size, dep.max_seq_len, dep.kv_dtype),
        kv_transport=transport, mesh=mesh_spec, sharding=rules.name,
        process_id=common.PROCESS_ID, hostname=socket.gethostname())
    info.roles.extend(roles)
    infos[r] = info
    if r == "prefill":
      from pdjax.engine.prefill import PrefillEngine
      from pdjax.service.prefill_service import (PrefillServicer,
                                                 PrefillWorker)
      store = None
      pulls = _block_pulls(transport, mesh, pool)
      remote = _remote_tier(cfg, dep, pool, cache_pages, sec, address,
                            metrics, pulls)
      if cache_pages:
        from pdjax.engine.prefix_cache import PrefillKVStore
        host_blocks = pool.host_cache_blocks
        if remote is not None and not host_blocks:
          # Fetched blocks land in the host tier: room for two prompts.
          host_blocks = 2 * (dep.max_seq_len // dep.page_size)
        store = PrefillKVStore(cfg, mesh, rules, cache_pages, dep.page_size,
                               host_cache_blocks=host_blocks, remote=remote)
      leader = jax.process_index() == 0
      sender = (_sender(transport, mesh, sec, exchange, pool.kv_ttl_s)
                if leader else None)
      if sender is not None:
        info.kv_transfer_address = sender.address()
      # Every process of a pool must build the same programs: auto layer
      # groups may not depend on what one process's sender can do.
      groups = resolve_layer_groups(
          pool.layer_groups, layer_wise_sender=(not spans and sender is not None
                             and sender.writes_landing))
      engine = PrefillEngine(
          params, cfg, mesh, rules,
          dep.prefill_engine_config(layer_groups=groups), prefix_store=store)
      log.info("prefill runs bucketed prompts in %d layer group(s) %s",
               len(engine.layer_group_sizes), engine.layer_group_sizes)
      if FLAGS.warmup:
        # With the programs that leave out of a hand-off the pages its
        # decode worker holds: any decode worker may cache prefixes (its
        # own --prefix_caching, or one that joins later), whatever this
        # deployment file says of the pool.
        engine.warmup(skip_pages=True)
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
                             max_queue=pool.max_queue,
                             transfer_timeout_s=pool.transfer_timeout_s,
                             fault_drop_kv=FLAGS.fault_injection_drop_kv,
                             landing=landing,
                             batch_delay_s=emulate_prefill)
      prefill_pb2_grpc.add_PrefillServicer_to_server(
          PrefillServicer(worker, info, sessions), server)
      health_names.append("pdjax.v1.Prefill")
      if remote is not None:   # shared KV: peers fetch from this cache
        from pdjax.service.kvstore import PeerServicer
        from pdjax.v1 import blockstore_pb2_grpc
        blockstore_pb2_grpc.add_BlockStoreServicer_to_server(
            PeerServicer(store, timeout_s=pool.kv_fetch_timeout_s,
                         pulls=pulls), server)
        info.serves_blocks = True
        log.info("sharing the prefix cache: fetch policy %s, store %s",
                 pool.kv_fetch, FLAGS.kv_store or "none")
    else:
      from pdjax.engine.colocated import ColocatedEngine
      from pdjax.service.decode_service import (DecodeServicer, DecodeWorker,
                                                KvTransferServicer)
      dcfg = dep.decode_engine_config()
      if dcfg.on_demand:   # what the router's placement counts per request
        info.admission_tokens_past_prompt = dcfg.first_calls_tokens
      draft = None
      if dcfg.speculative == "draft":
        if not pool.draft_checkpoint:
          raise app.UsageError("[decode] speculative = 'draft' needs "
                               "draft_checkpoint")
        draft = load_sharded(resolved(pool.draft_checkpoint), rules, mesh,
                             dtype=dtype)
        log.info("draft model %s: %d layers", draft[1].name,
                 draft[1].num_layers)
      engine = ColocatedEngine(
          params, cfg, mesh, rules,
          dep.prefill_engine_config(dep.decode), dcfg,
          max_waiting=pool.max_queue,
          queue_timeout_s=pool.queue_deadline_s or None, draft=draft)
      if FLAGS.warmup:
        engine.warmup(dep.prefill_engine_config().payload_page_counts())
      receiver = _receiver(
          transport, mesh, exchange, cfg, dep.page_size,
          max(engine.decode.default_payload_page_counts()), pool,
          dep.kv_dtype, prefill_buckets=dep.prefill_engine_config().buckets)
      step_a, step_b = emulate_decode
      worker = DecodeWorker(engine, receiver, metrics=metrics, security=sec,
                            transfer_timeout_s=pool.transfer_timeout_s,
                            reservation_ttl_s=pool.kv_ttl_s,
                            fault_step_delay_s=(
                                FLAGS.fault_injection_decode_step_delay_s
                                + step_a), step_delay_per_row_s=step_b,
                            max_receive_bytes=pool.max_receive_mib << 20)
      decode_pb2_grpc.add_DecodeServicer_to_server(
          DecodeServicer(worker, info, sessions), server)
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
  active = set(roles) if serve_role == "both" else {serve_role}
  announcer = None
  if FLAGS.router:
    announcer = discovery.Announcer(
        FLAGS.router, sec, lambda r: infos[r], lease_s=dep.router.lease_s)
  control = discovery.RoleControl(
      pools, active, announcer=announcer, health=health,
      health_names={"prefill": "pdjax.v1.Prefill",
                    "decode": "pdjax.v1.Decode"},
      drain_timeout_s=FLAGS.drain_timeout_s)
  registry_pb2_grpc.add_WorkerControlServicer_to_server(control, server)
  gc_pauses.freeze_startup_heap()   # the model, the programs: long-lived
  set_switch_interval(FLAGS.gil_switch_interval_ms)
  for w in workers:
    w.start()
  await server.start()
  await common.set_live(health)
  await common.set_serving(health, [], True)   # "": ready
  await control.start()                        # each pool's name, joins
  metrics_port = metrics.serve(FLAGS.metrics_port, FLAGS.host)
  log.info("%s worker serving %s on %s (transport %s, metrics %s)%s%s",
           role, cfg.name, address, transport, metrics_port,
           f"; pools {'/'.join(sorted(active))}" if len(roles) == 2 else "",
           memory_note())
  F.write_port_file(port, metrics_port)
  await _run_until_signal(server, health, health_names, workers, sessions,
                          control)


def _block_pulls(transport: str, mesh, pool):
  """Shared KV in a ``device`` transport deployment: peers' blocks move
  device to device instead of host-staged: by CUDA IPC between workers of
  one host (--kv_fast_path, as hand-offs), else by
  jax.experimental.transfer."""
  if pool.kv_fetch == "off" or transport != "device":
    return None
  from pdjax.service import common
  from pdjax.transfer.block_pulls import make_block_pulls
  from pdjax.transfer.device import BlockPulls
  return make_block_pulls(
      BlockPulls(mesh.devices.flat[0], host=FLAGS.host,
                 advertise_host=advertised_host(FLAGS.advertise_address),
                 ttl_s=max(2 * pool.kv_fetch_timeout_s, 1.0)),
      fast_path=FLAGS.kv_fast_path, process_id=common.PROCESS_ID,
      landing_bytes=pool.kv_pull_landing_mib << 20,
      # A peer may write until the fetch's deadline, and its writer stops a
      # second (its margin) before the lease ends.
      lease_s=pool.kv_fetch_timeout_s + 2.0)


def _remote_tier(cfg, dep, pool, cache_pages: int, sec, address: str,
                 metrics, pulls=None):
  """The shared-KV tier of a prefill worker's cache ([prefill] kv_fetch,
  --kv_store), or None when off."""
  if pool.kv_fetch == "off":
    if FLAGS.kv_store:
      raise app.UsageError("--kv_store needs [prefill] kv_fetch auto or "
                           "always (--kv_fetch; a worker that uses a store "
                           "also shares its cache)")
    return None
  if not cache_pages:
    raise app.UsageError("[prefill] kv_fetch shares the prefix cache: give "
                         "the prefill worker one (--prefix_cache_pages)")
  from pdjax.engine.remote_tier import RemoteTier, layout_of
  from pdjax.service.kvstore import GrpcBlockSource
  return RemoteTier(
      layout_of(cfg, dep.page_size), dep.page_size,
      lambda a: GrpcBlockSource(a, sec, pulls=pulls), store=FLAGS.kv_store,
      policy=pool.kv_fetch, timeout_s=pool.kv_fetch_timeout_s,
      self_address=address, write=pool.kv_store_write, pulls=pulls,
      on_fetch=lambda kind, blocks, nbytes, s: (
          metrics.kv_fetch_time.labels(kind).observe(s)))


def advertised_host(advertise: str | None) -> str | None:
  """The host of ``--advertise_address`` (None: unset). The KV transfer
  server a ``device`` sender starts is reached at the same host as the
  worker: bound to 0.0.0.0 in a Kubernetes pod, it would otherwise tell
  decode workers to pull from 0.0.0.0."""
  if not advertise:
    return None
  return advertise.rsplit(":", 1)[0]


def _sender(transport, mesh, sec, exchange, ttl_s: float):
  from pdjax.service import common
  if transport == "local":
    from pdjax.transfer.local import LocalSender
    return LocalSender(exchange)
  if transport == "device":
    from pdjax.transfer.cuda_ipc import make_sender
    from pdjax.transfer.device import DeviceSender
    # Picks same-process / CUDA IPC / jax.experimental.transfer per hand-off.
    return make_sender(
        DeviceSender(mesh.devices.flat[0], host=FLAGS.host,
                     advertise_host=advertised_host(FLAGS.advertise_address),
                     ttl_s=ttl_s),
        fast_path=FLAGS.kv_fast_path, process_id=common.PROCESS_ID)
  from pdjax.transfer.grpc_stream import (DEFAULT_CHUNK_BYTES,
                                          GrpcStreamSender)
  # A chunk is one gRPC message: keep it well under --max_message_bytes, or
  # a deployment that lowers the limit could not push KV at all.
  chunk = min(DEFAULT_CHUNK_BYTES, max(sec.max_message_bytes // 2, 1 << 12))
  return GrpcStreamSender(lambda a: common.make_channel(a, sec),
                          chunk_bytes=chunk)


def _receiver(transport, mesh, exchange, cfg, page_size, max_payload_pages,
              pool, kv_dtype, prefill_buckets=None):
  from pdjax.engine.kv_dtype import kv_dtype_name
  geometry = (cfg.num_layers, page_size, cfg.num_kv_heads, cfg.head_dim,
              kv_dtype_name(kv_dtype, cfg.dtype), max_payload_pages)
  if transport == "local":
    from pdjax.transfer.local import LocalReceiver
    return LocalReceiver(exchange)
  if transport == "device":
    from pdjax.transfer.cuda_ipc import make_receiver
    from pdjax.transfer.device import DeviceReceiver
    # Lends CUDA IPC landing buffers at Reserve when the fast path is on.
    return make_receiver(
        DeviceReceiver(mesh.devices.flat[0], host=FLAGS.host),
        mesh.devices.flat[0], geometry=geometry,
        fast_path=FLAGS.kv_fast_path,
        landing_buffers=pool.ipc_landing_buffers,
        landing_bytes=pool.ipc_landing_bytes,
        prefill_buckets=prefill_buckets, lease_s=pool.kv_ttl_s)
  from pdjax.transfer.grpc_stream import GrpcStreamReceiver
  return GrpcStreamReceiver(ttl_s=pool.kv_ttl_s, geometry=geometry)


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


async def _run_until_signal(server, health, names, workers, sessions,
                            control=None) -> None:
  """Serves until SIGINT/SIGTERM, then drains: leaves the router's pools
  (deregisters), health NOT_SERVING, no new requests, running ones finish
  (bounded), the routers' sessions end, then exit."""
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
  deadline = loop.time() + FLAGS.drain_timeout_s
  while any(w.active() for w in workers) and loop.time() < deadline:
    await asyncio.sleep(0.05)
  left = sum(w.active() for w in workers)
  if left:
    log.warning("drain timeout: cancelling %d requests", left)
  await sessions.end()
  await server.stop(grace=1.0)
  for w in workers:
    w.stop()
  log.info("stopped")


def run(role: str, cfg_flags: config_flags.ConfigFlags) -> None:
  """The worker process: resolve its configuration, serve, drain, exit."""
  F.setup_logging()
  dep = worker_config(role, cfg_flags)
  # Not asyncio.run: its teardown joins the default executor's threads
  # without a bound, and one still blocked there (a hand-off waiting on a
  # peer) would hold the exit; the process leaves by os._exit below anyway,
  # once serve() has drained and stopped.
  loop = asyncio.new_event_loop()
  asyncio.set_event_loop(loop)
  loop.run_until_complete(serve(role, dep))
  if FLAGS.coordinator_address:
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
  _CONFIG = F.define_for_main(define_flags)
  app.run(lambda argv: run(FLAGS.role, _CONFIG))
