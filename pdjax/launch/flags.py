"""Flag groups several launchers share, and the helpers that read them.

Each launcher defines exactly the flags it reads, in its
``define_flags(flag_values)``: its own, the configuration's
(``pdjax.launch.config_flags``) and the groups here it needs (where it
listens and logs, its TLS and tokens, its place in a multi-process pool).
``define_flags`` runs on absl's global flags only when the launcher runs;
``pdjax.launch.cluster`` calls it on a throwaway ``FlagValues`` to learn
which flags a launcher takes. The readers below take the ``FlagValues``
the group was defined in (absl's global one in a running launcher) and
treat a flag the launcher did not define as unset.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import flags

# Imported by programs that run no service (pdjax bench, pdjax plan) for
# ``define_for_main``: the service modules are imported where used.

FLAGS = flags.FLAGS


def _value(fv: flags.FlagValues, name: str, default=None):
  return fv[name].value if name in fv else default


# ----------------------------------------------------------------- process
def define_process(fv: flags.FlagValues = FLAGS, *, port_default: int = 0,
                   metrics: bool = True, advertise: bool = False,
                   drain: bool = True) -> None:
  """Where a service listens, how it reports ready and logs, and how long
  it drains on SIGTERM."""
  flags.DEFINE_string(
      "host", "127.0.0.1", "Address to bind; 0.0.0.0 exposes the service "
      "beyond this machine (use TLS then).", flag_values=fv)
  flags.DEFINE_integer("port", port_default, "Port to serve on (0: pick a "
                       "free one).", flag_values=fv)
  flags.DEFINE_string("port_file", None, "Write the bound port here once "
                      "serving (launchers).", flag_values=fv)
  flags.DEFINE_enum("log_level", "INFO", ["DEBUG", "INFO", "WARNING",
                                          "ERROR"],
                    "Python logging level.", flag_values=fv)
  if metrics:
    flags.DEFINE_integer("metrics_port", -1, "Prometheus /metrics port (0: "
                         "any free port, -1: off).", flag_values=fv)
  if advertise:
    flags.DEFINE_string(
        "advertise_address", None, "host:port peers use to reach this "
        "service (default: --host:--port).", flag_values=fv)
  if drain:
    flags.DEFINE_float(
        "drain_timeout_s", 60.0, "On SIGTERM, how long running requests may "
        "take to finish before they are cancelled.", flag_values=fv)


def setup_logging(fv: flags.FlagValues = FLAGS) -> None:
  """Every launcher's log lines: --log_level, one format."""
  logging.basicConfig(level=_value(fv, "log_level", "INFO"),
                      format="%(asctime)s %(name)s %(levelname)s %(message)s")


def write_port_file(port: int, metrics_port: int,
                    fv: flags.FlagValues = FLAGS, *,
                    http_port: int | None = None) -> None:
  """Tells a launcher (``pdjax.launch.local``) this process is serving:
  written atomically, last thing before serving (``http_port``: where it
  also serves HTTP, if it does)."""
  path = _value(fv, "port_file")
  if not path:
    return
  import json
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    ports = {"port": port, "metrics_port": metrics_port}
    if http_port is not None:
      ports["http_port"] = http_port
    json.dump(ports, f)
  os.replace(tmp, path)


# ---------------------------------------------------------------- security
# Who a process is to the deployment's security: a worker (internal API,
# service token), the router (client API and internal calls), a client of
# the router (the OpenAI gateway), or an internal caller that serves
# nothing (the planner: the router's registry and the workers' SetRole,
# with the service token).
SECURITY_ROLES = ("worker", "router", "client", "internal")


def define_security(fv: flags.FlagValues = FLAGS, *, role: str) -> None:
  """TLS and tokens of a process in ``role`` (``SECURITY_ROLES``)."""
  if role not in SECURITY_ROLES:
    raise ValueError(f"security role {role!r} is not one of "
                     f"{SECURITY_ROLES}")
  serves = role in ("worker", "router")
  flags.DEFINE_string("tls_cert", None, "PEM certificate: enables TLS on "
                      "this service." if serves else "PEM certificate "
                      "presented to the services that ask for one (mutual "
                      "TLS).", flag_values=fv)
  flags.DEFINE_string("tls_key", None, "PEM private key.", flag_values=fv)
  flags.DEFINE_string("tls_ca", None, "PEM CA bundle: verifies peers"
                      + (" (and, with --tls_mtls, clients)." if serves
                         else "."), flag_values=fv)
  if serves:
    flags.DEFINE_bool(
        "tls_mtls", False, "Require callers of this service to present a "
        "certificate signed by --tls_ca (mutual TLS). Outgoing channels "
        "present --tls_cert to any server that asks, with or without this "
        "flag.", flag_values=fv)
  flags.DEFINE_string(
      "tls_server_name", None, "Name to verify peer server certificates "
      "against instead of the dialed host (when advertised addresses are "
      "not names in the certificates).", flag_values=fv)
  if role in ("router", "client"):
    flags.DEFINE_string(
        "auth_token", os.environ.get("PDJAX_AUTH_TOKEN"),
        "Bearer token required on the client-facing API (router)" if serves
        else "Bearer token presented to the router", flag_values=fv)
  if role != "client":
    flags.DEFINE_string(
        "service_token", os.environ.get("PDJAX_SERVICE_TOKEN"),
        "Credential of the deployment's internal RPCs (router -> workers, "
        "worker -> worker): every process of a deployment gets the same "
        "one, no client ever does. Workers refuse calls without it; it must "
        "differ from --auth_token. Default: $PDJAX_SERVICE_TOKEN "
        "(pdjax.launch.local makes one per deployment).", flag_values=fv)
  if serves:
    from pdjax.service.common import DEFAULT_MAX_MESSAGE_BYTES
    flags.DEFINE_integer("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES,
                         "gRPC message size limit.", flag_values=fv)


def security(fv: flags.FlagValues = FLAGS):
  """The security flags (``pdjax.service.common.Security``); a combination
  that defeats itself (the same client and service token) is a one-line
  exit."""
  from pdjax.service.common import DEFAULT_MAX_MESSAGE_BYTES, Security
  sec = Security(cert=_value(fv, "tls_cert"), key=_value(fv, "tls_key"),
                 ca=_value(fv, "tls_ca"), mtls=_value(fv, "tls_mtls", False),
                 token=_value(fv, "auth_token"),
                 max_message_bytes=_value(fv, "max_message_bytes",
                                          DEFAULT_MAX_MESSAGE_BYTES),
                 server_name=_value(fv, "tls_server_name"),
                 service_token=_value(fv, "service_token") or None)
  try:
    sec.check()
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  return sec


def router_client_settings(fv: flags.FlagValues = FLAGS):
  """(``pdjax.client.TlsConfig`` or None, token) for a process that calls
  the router as a client (the OpenAI gateway): the same channel security
  as every pdjax channel (``Security.channel_credentials``: TLS when
  --tls_ca or a certificate is given, presenting --tls_cert to a router
  that asks for one) and --auth_token as the bearer token."""
  from pdjax.client import TlsConfig
  sec = security(fv)
  if not (sec.ca or sec.tls):
    return None, sec.token
  return TlsConfig(root_ca=sec.ca, cert=sec.cert if sec.tls else None,
                   key=sec.key if sec.tls else None,
                   server_name=sec.server_name), sec.token


# ------------------------------------------------- multi-process pools
def define_distributed(fv: flags.FlagValues = FLAGS) -> None:
  """A worker's place in a pool spanning processes (jax.distributed)."""
  flags.DEFINE_string(
      "coordinator_address", None, "jax.distributed coordinator host:port "
      "(multi-host pools; Kubernetes JobSet sets it up automatically when "
      "'auto').", flag_values=fv)
  flags.DEFINE_integer("num_processes", None,
                       "jax.distributed process count.", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "jax.distributed process index.",
                       flag_values=fv)
  flags.DEFINE_integer(
      "distributed_shutdown_timeout_s", 10, "How long the processes of a "
      "pool spanning processes wait for each other when they leave the "
      "jax.distributed job (then each exits anyway, inside a Kubernetes "
      "termination grace period).", flag_values=fv)


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


def define_for_main(define, *args, fv: flags.FlagValues = FLAGS, **kwargs):
  """Runs ``define(fv, *args, **kwargs)`` for the program about to run and
  makes the flags it defined the program's own, the ones ``--help`` lists
  (absl lists the main module's, and a launcher's groups are defined in
  other modules). Returns what ``define`` returns."""
  before = set(fv)
  out = define(fv, *args, **kwargs)
  for name in sorted(set(fv) - before):
    fv.register_key_flag_for_module(sys.argv[0], fv[name])
  return out


def names(define, *args, **kwargs) -> frozenset[str]:
  """The flags ``define(flag_values, *args, **kwargs)`` defines (aliases
  included), found on a throwaway ``FlagValues``."""
  fv = flags.FlagValues()
  define(fv, *args, **kwargs)
  return frozenset(fv)


__all__ = ["SECURITY_ROLES", "define_distributed", "define_for_main",
           "define_process", "define_security", "names", "parse_devices",
           "router_client_settings", "security", "setup_logging",
           "write_port_file"]
