"""Flags shared by the pdjax launchers (absl, as JAX projects use them).

Values left unset fall back to the deployment file (``--config``), whose
defaults live in ``pdjax.config``.
"""

from __future__ import annotations

import logging
import os

from absl import flags

from pdjax.service.common import DEFAULT_MAX_MESSAGE_BYTES, Security

CONFIG = flags.DEFINE_string(
    "config", "local", "Deployment config: a TOML path or a name under "
    "configs/deployments/.")
CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "pdjax orbax checkpoint or Hugging Face directory, or "
    "'tiny' (default: the deployment file's).")
DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                          "Weight and KV dtype (default: the deployment's).")
HOST = flags.DEFINE_string(
    "host", "127.0.0.1", "Address to bind; 0.0.0.0 exposes the service beyond"
    " this machine (use TLS then).")
PORT = flags.DEFINE_integer("port", 0, "Port to serve on (0: pick a free one).")
ADVERTISE = flags.DEFINE_string(
    "advertise_address", None, "host:port peers use to reach this service "
    "(default: --host:--port).")
PORT_FILE = flags.DEFINE_string(
    "port_file", None, "Write the bound port here once serving (launchers).")
METRICS_PORT = flags.DEFINE_integer(
    "metrics_port", -1, "Prometheus /metrics port (0: any free port, "
    "-1: off).")
MESH = flags.DEFINE_string("mesh", None, "Mesh, e.g. 'tp=2' or 'dp=2,tp=1'.")
SHARDING = flags.DEFINE_string(
    "sharding", None, "Sharding rule set under shardings/ (prefill_tp, "
    "decode_dp, decode_dp_tp) or a TOML path.")
KV_TRANSPORT = flags.DEFINE_enum(
    "kv_transport", None, ["grpc", "device", "local"],
    "KV hand-off between pools (default: the deployment's).")
# --- device transport fast paths (pdjax.transfer.cuda_ipc) -----------------
KV_FAST_PATH = flags.DEFINE_enum(
    "kv_fast_path", "auto", ["auto", "off"],
    "--kv_transport=device: hand KV to a decode worker in this process by "
    "device_put, and to one on this host by CUDA IPC into a landing buffer "
    "it lends (NVLink), else by jax.experimental.transfer. auto: on when the "
    "backend is GPU (cuda-bindings and CuPy importable); off: always "
    "jax.experimental.transfer.")
IPC_LANDING_BUFFERS = flags.DEFINE_integer(
    "ipc_landing_buffers", 2, "Decode workers, --kv_transport=device on GPU: "
    "CUDA IPC landing buffers to allocate once and lend (in regions, one per "
    "request) to same-host prefill workers; 0 turns CUDA IPC off.")
IPC_LANDING_BYTES = flags.DEFINE_integer(
    "ipc_landing_bytes", 0, "Bytes of each CUDA IPC landing buffer (0: the "
    "largest KV payload this worker accepts, so every request fits one).")
PREFILL_LAYER_GROUPS = flags.DEFINE_integer(
    "prefill_layer_groups", None, "Prefill workers: run each bucketed "
    "prompt's layers as this many programs, so the CUDA IPC hand-off copies "
    "each group's KV while later layers compute (1: one fused program; 0: "
    "auto, 4 when hand-offs can take the CUDA IPC path; default: the "
    "deployment's [prefill] layer_groups).")
# --- end fast paths ----------------------------------------------------------
DEVICES = flags.DEFINE_string(
    "devices", "", "Local device ids for this worker's mesh, e.g. '0-3' or "
    "'4,5' (default: the first ones the mesh needs).")
WARMUP = flags.DEFINE_bool(
    "warmup", True, "Compile every serving program before reporting ready.")
MAX_QUEUE = flags.DEFINE_integer(
    "max_queue", 256, "Requests a worker queues before RESOURCE_EXHAUSTED.")
QUEUE_DEADLINE = flags.DEFINE_float(
    "queue_deadline_s", 30.0, "Decode workers: how long a request prefilled "
    "there may wait in the admission queue for KV pages and a row before "
    "RESOURCE_EXHAUSTED (0: no deadline).")
TRANSFER_TIMEOUT = flags.DEFINE_float(
    "transfer_timeout_s", 30.0, "Longest a KV hand-off may take.")
KV_TTL = flags.DEFINE_float(
    "kv_ttl_s", 60.0, "Unclaimed KV (and unredeemed reservations) are freed "
    "after this long.")
DRAIN_TIMEOUT = flags.DEFINE_float(
    "drain_timeout_s", 60.0, "On SIGTERM, how long running requests may take "
    "to finish before they are cancelled.")
ALLOW_LONG_MAX_SEQ_LEN = flags.DEFINE_bool(
    "allow_long_max_seq_len",
    os.environ.get("PDJAX_ALLOW_LONG_MAX_SEQ_LEN", "") not in ("", "0"),
    "Workers: serve the deployment's max_seq_len even where it is longer "
    "than the model's trained context (config.json max_position_embeddings,"
    " stretched by linear rope scaling); outputs past it may be garbage. "
    "Without it such a worker refuses to start (as vLLM without "
    "VLLM_ALLOW_LONG_MAX_MODEL_LEN). Default: $PDJAX_ALLOW_LONG_MAX_SEQ_LEN.")
PREFIX_CACHE_PAGES = flags.DEFINE_integer(
    "prefix_cache_pages", None, "Prefill worker: pages of its prefix-cache "
    "block store (0: off; default: the deployment's [prefill] cache_pages).")
HOST_CACHE_BLOCKS = flags.DEFINE_integer(
    "host_cache_blocks", 0, "Prefill and decode workers: KV blocks evicted "
    "from the device prefix cache are kept in host memory (pinned where the "
    "backend has it), up to this many, and uploaded back on a later hit "
    "instead of recomputed (0: off). Decode needs --prefix_caching.")
PREFIX_CACHING = flags.DEFINE_bool(
    "prefix_caching", None, "Decode worker: keep finished sequences' KV "
    "blocks for requests sharing a prefix (default: the deployment's).")
FAULT_DROP_KV = flags.DEFINE_float(
    "fault_injection_drop_kv", 0.0, "TESTING ONLY: share of KV hand-offs a "
    "prefill worker silently drops (exercises the recovery path).")
FAULT_STEP_DELAY = flags.DEFINE_float(
    "fault_injection_decode_step_delay_s", 0.0, "TESTING ONLY: a decode "
    "worker sleeps this long before each engine step (a slow device), so "
    "tests can act on streams that are certainly mid-generation.")
COMPILE_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", os.environ.get("PDJAX_COMPILATION_CACHE"),
    "JAX persistent compilation cache directory (speeds up restarts).")
LOG_LEVEL = flags.DEFINE_enum("log_level", "INFO",
                              ["DEBUG", "INFO", "WARNING", "ERROR"],
                              "Python logging level.")
GPU_MEMORY_FRACTION = flags.DEFINE_float(
    "gpu_memory_fraction", None, "Share of each GPU's memory XLA may use "
    "(XLA_PYTHON_CLIENT_MEM_FRACTION; default: XLA's 0.75). An 8B decode "
    "worker on an 80 GB card holds 47 of XLA's 59.4 GiB after warm-up "
    "(docs/notes/2026-11-26-h100x4-steady-goodput.md); CUDA IPC landing "
    "buffers are allocated outside it.")
MAX_RECEIVE_MIB = flags.DEFINE_integer(
    "max_receive_mib", None, "Decode workers: device memory (MiB) that KV "
    "receives in flight may allocate at once; a receive past it waits, up "
    "to its deadline, then gets RESOURCE_EXHAUSTED (0: no bound; default: "
    "the deployment file's [decode] max_receive_mib).")
# Multi-host pools (jax.distributed): one process per host of the pool.
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "jax.distributed coordinator host:port "
    "(multi-host pools; Kubernetes JobSet sets it up automatically when "
    "'auto').")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                     "jax.distributed process count.")
PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                  "jax.distributed process index.")
DISTRIBUTED_SHUTDOWN_S = flags.DEFINE_integer(
    "distributed_shutdown_timeout_s", 10, "How long the processes of a "
    "pool spanning processes wait for each other when they leave the "
    "jax.distributed job (then each exits anyway, inside a Kubernetes "
    "termination grace period).")
# Security.
TLS_CERT = flags.DEFINE_string("tls_cert", None, "PEM certificate: enables "
                               "TLS on this service.")
TLS_KEY = flags.DEFINE_string("tls_key", None, "PEM private key.")
TLS_CA = flags.DEFINE_string("tls_ca", None, "PEM CA bundle: verifies peers "
                             "(and, with --tls_mtls, clients).")
TLS_MTLS = flags.DEFINE_bool(
    "tls_mtls", False, "Require callers of this service to present a "
    "certificate signed by --tls_ca (mutual TLS). Outgoing channels present "
    "--tls_cert to any server that asks, with or without this flag.")
TLS_SERVER_NAME = flags.DEFINE_string(
    "tls_server_name", None, "Name to verify peer server certificates "
    "against instead of the dialed host (when advertised addresses are not "
    "names in the certificates).")
AUTH_TOKEN = flags.DEFINE_string(
    "auth_token", os.environ.get("PDJAX_AUTH_TOKEN"),
    "Bearer token required on the client-facing API (router).")
SERVICE_TOKEN = flags.DEFINE_string(
    "service_token", os.environ.get("PDJAX_SERVICE_TOKEN"),
    "Credential of the deployment's internal RPCs (router -> workers, "
    "worker -> worker): every process of a deployment gets the same one, no "
    "client ever does. Workers refuse calls without it; it must differ "
    "from --auth_token. Default: $PDJAX_SERVICE_TOKEN (pdjax.launch.local "
    "makes one per deployment).")
MAX_MESSAGE = flags.DEFINE_integer(
    "max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES, "gRPC message size limit.")


def security() -> Security:
  """The security flags; a combination that defeats itself (the same
  client and service token) is a one-line exit."""
  sec = Security(cert=TLS_CERT.value, key=TLS_KEY.value, ca=TLS_CA.value,
                 mtls=TLS_MTLS.value, token=AUTH_TOKEN.value,
                 max_message_bytes=MAX_MESSAGE.value,
                 server_name=TLS_SERVER_NAME.value,
                 service_token=SERVICE_TOKEN.value or None)
  try:
    sec.check()
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  return sec


def router_client_settings():
  """(``pdjax.client.TlsConfig`` or None, token) for a process that calls
  the router as a client (the OpenAI gateway): the same channel security
  as every pdjax channel (``Security.channel_credentials``: TLS when
  --tls_ca or a certificate is given, presenting --tls_cert to a router
  that asks for one) and --auth_token as the bearer token."""
  from pdjax.client import TlsConfig
  sec = security()
  if not (sec.ca or sec.tls):
    return None, sec.token
  return TlsConfig(root_ca=sec.ca, cert=sec.cert if sec.tls else None,
                   key=sec.key if sec.tls else None,
                   server_name=sec.server_name), sec.token


def setup_logging() -> None:
  """Every launcher's log lines: --log_level, one format."""
  logging.basicConfig(level=LOG_LEVEL.value,
                      format="%(asctime)s %(name)s %(levelname)s %(message)s")


def write_port_file(port: int, metrics_port: int) -> None:
  """Tells a launcher (``pdjax.launch.local``) this process is serving:
  written atomically, last thing before serving."""
  if not PORT_FILE.value:
    return
  import json
  tmp = PORT_FILE.value + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"port": port, "metrics_port": metrics_port}, f)
  os.replace(tmp, PORT_FILE.value)


def parse_devices(spec: str) -> list[int] | None:
  if not spec:
    return None
  out: list[int] = []
  for part in spec.split(","):
    if "-" in part:
      a, b = part.split("-")
      out.extend(range(int(a), int(b) + 1))
    else:
      out.append(int(part))
  return out
