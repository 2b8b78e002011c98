"""What every pdjax gRPC service shares: server and channel construction
(message size limits, TLS / mutual TLS), bearer-token auth, the standard
health service, and the mapping from pdjax errors to gRPC status codes.
"""

from __future__ import annotations

import dataclasses
import errno
import hmac
import logging
import os
import socket
from pathlib import Path
from typing import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pdjax.engine.sampling import InvalidRequest

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
PROCESS_ID = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"


@dataclasses.dataclass(frozen=True)
class Security:
  """TLS material (PEM file paths) and the client API's bearer token.

  ``cert``/``key``: this process's identity, served to peers and presented
  to servers under mutual TLS. ``ca``: the roots it trusts; when set on a
  server together with ``mtls``, clients must present a certificate it
  signed.
  ``server_name``: the name this process's channels check server
  certificates against instead of the dialed host (gRPC's
  ``grpc.ssl_target_name_override``), for deployments whose advertised
  addresses are not names in the certificates (e.g. pod IPs behind one DNS
  name). Unset, gRPC verifies the dialed host: ``127.0.0.1:port`` needs an IP
  subjectAltName.
  """
  cert: str | None = None
  key: str | None = None
  ca: str | None = None
  mtls: bool = False
  token: str | None = None
  max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
  server_name: str | None = None

  @property
  def tls(self) -> bool:
    return bool(self.cert and self.key)

  def _read(self, path: str | None) -> bytes | None:
    return None if not path else Path(path).read_bytes()

  def server_credentials(self) -> grpc.ServerCredentials | None:
    if not self.tls:
      if self.mtls:
        raise ValueError("--tls_mtls needs --tls_cert and --tls_key")
      return None
    if self.mtls and not self.ca:
      raise ValueError("--tls_mtls needs --tls_ca (the CA clients must be "
                       "signed by)")
    return grpc.ssl_server_credentials(
        [(self._read(self.key), self._read(self.cert))],
        root_certificates=self._read(self.ca),
        require_client_auth=self.mtls)

  def channel_credentials(self) -> grpc.ChannelCredentials | None:
    if not (self.ca or self.tls):
      return None
    # Our certificate is offered whenever we have one, not only under
    # ``mtls`` (which is about *our* server): a TLS client sends it only if
    # the server asks, so a router serving clients with TLS + token can
    # still dial workers that require mutual TLS.
    return grpc.ssl_channel_credentials(
        root_certificates=self._read(self.ca),
        private_key=self._read(self.key) if self.tls else None,
        certificate_chain=self._read(self.cert) if self.tls else None)

  def options(self) -> list[tuple[str, int]]:
    n = self.max_message_bytes
    return [("grpc.max_receive_message_length", n),
            ("grpc.max_send_message_length", n),
            ("grpc.keepalive_time_ms", 20000),
            ("grpc.keepalive_timeout_ms", 10000)]


def make_channel(address: str, security: Security = Security(), *,
                 aio: bool = False):
  """A channel to another pdjax service with this deployment's security."""
  creds = security.channel_credentials()
  mod = grpc.aio if aio else grpc
  if creds is None:
    return mod.insecure_channel(address, options=security.options())
  options: list[tuple[str, int | str]] = list(security.options())
  if security.server_name:
    options.append(("grpc.ssl_target_name_override", security.server_name))
  return mod.secure_channel(address, creds, options=options)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
  """Refuses calls without ``authorization: Bearer <token>`` metadata, except
  the health service (load balancers and Kubernetes probes speak it)."""

  def __init__(self, token: str, exempt: Sequence[str] = (
      "/grpc.health.v1.Health/",)):
    self._expected = f"Bearer {token}".encode()
    self._exempt = tuple(exempt)

    async def deny(request, context):
      await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or invalid bearer token (send "
                          "'authorization: Bearer <token>' metadata)")
    self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
    self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

  async def intercept_service(self, continuation, details):
    if details.method.startswith(self._exempt):
      return await continuation(details)
    for key, value in details.invocation_metadata or ():
      if key == "authorization":
        got = value.encode() if isinstance(value, str) else value
        if hmac.compare_digest(got, self._expected):
          return await continuation(details)
    handler = await continuation(details)
    if handler is not None and handler.response_streaming:
      return self._deny_stream
    return self._deny_unary


def make_server(security: Security = Security(), *, client_facing=False
                ) -> grpc.aio.Server:
  interceptors = []
  if client_facing and security.token:
    interceptors.append(BearerTokenInterceptor(security.token))
  # gRPC sets SO_REUSEPORT on its listeners by default: a second service
  # started on a port in use would then bind it too and silently take half
  # of its connections. Off, the second one fails to bind (``bind``).
  options = [*security.options(), ("grpc.so_reuseport", 0)]
  return grpc.aio.server(options=options, interceptors=interceptors)


class BindError(OSError):
  """A service could not listen where it was told to (the message says
  where and why, in one line for the launcher to print)."""


def port_in_use(host: str, port: int) -> bool:
  """Whether something listens on ``host:port`` now (a bind there without
  SO_REUSEPORT fails with EADDRINUSE); False for port 0 or a host that
  does not resolve (the real bind reports those)."""
  if not port:
    return False
  try:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
  except socket.gaierror:
    return False
  for family, kind, proto, _, addr in infos:
    with socket.socket(family, kind, proto) as probe:
      # As gRPC's listeners: connections in TIME_WAIT do not count.
      probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      try:
        probe.bind(addr)
      except OSError as e:
        if e.errno == errno.EADDRINUSE:
          return True
  return False


def in_use_message(host: str, port: int) -> str:
  return (f"cannot serve on {host}:{port}: the port is in use (another "
          "process listens there); stop it or choose another --port")


def bind(server: grpc.aio.Server, host: str, port: int,
         security: Security = Security()) -> int:
  """Binds and returns the port (``port=0`` picks a free one); raises
  ``BindError`` if the port is in use or cannot be bound."""
  address = f"{host}:{port}"
  if port_in_use(host, port):
    raise BindError(in_use_message(host, port))
  creds = security.server_credentials()
  try:
    if creds is None:
      bound = server.add_insecure_port(address)
    else:
      bound = server.add_secure_port(address, creds)
  except RuntimeError as e:   # grpcio raises on a failed bind
    if port_in_use(host, port):   # taken since the check above
      raise BindError(in_use_message(host, port)) from e
    raise BindError(f"cannot serve on {address}: {e}") from e
  if not bound:
    raise BindError(f"cannot serve on {address}")
  return bound


def add_health(server: grpc.aio.Server, services: Sequence[str]
               ) -> health.aio.HealthServicer:
  servicer = health.aio.HealthServicer()
  health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
  return servicer


async def set_serving(servicer, services: Sequence[str], serving: bool):
  status = (health_pb2.HealthCheckResponse.SERVING if serving else
            health_pb2.HealthCheckResponse.NOT_SERVING)
  for s in ("", *services):
    await servicer.set(s, status)


RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


async def abort_exhausted(context, details: str, retry_after_ms: int = 100):
  """RESOURCE_EXHAUSTED with a retry hint: the standard gRPC pushback
  trailer (honoured by gRPC's retry policy) and the delay in the message."""
  context.set_trailing_metadata(((RETRY_PUSHBACK_KEY, str(retry_after_ms)),))
  await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"{details} (retry after ~{retry_after_ms} ms)")


def status_for(exc: BaseException) -> grpc.StatusCode:
  """The gRPC code a pdjax exception means, as gRPC intends the codes."""
  from pdjax.transfer.base import (TransferDenied, TransferError,
                                   TransferExhausted, TransferTimeout)
  if isinstance(exc, InvalidRequest):
    return grpc.StatusCode.INVALID_ARGUMENT
  if isinstance(exc, TransferDenied):
    return grpc.StatusCode.PERMISSION_DENIED
  if isinstance(exc, TransferExhausted):
    return grpc.StatusCode.RESOURCE_EXHAUSTED
  if isinstance(exc, TransferTimeout):
    return grpc.StatusCode.DEADLINE_EXCEEDED
  if isinstance(exc, TransferError):
    return grpc.StatusCode.UNAVAILABLE
  if isinstance(exc, (OverflowError,)):
    return grpc.StatusCode.RESOURCE_EXHAUSTED
  return grpc.StatusCode.INTERNAL


__all__ = ["Security", "make_channel", "make_server", "bind", "BindError",
           "port_in_use", "in_use_message", "add_health",
           "set_serving", "status_for", "PROCESS_ID", "abort_exhausted",
           "BearerTokenInterceptor"]
