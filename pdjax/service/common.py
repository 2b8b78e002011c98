"""What every pdjax gRPC service shares: server and channel construction
(message size limits, TLS / mutual TLS), bearer-token auth, the standard
health service, and the mapping from pdjax errors to gRPC status codes.
"""

from __future__ import annotations

import collections
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

from pdjax.engine.sampling_params import InvalidRequest

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
PROCESS_ID = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"


@dataclasses.dataclass(frozen=True)
class Security:
  """TLS material (PEM file paths), the client API's bearer token and the
  deployment's service token.

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
  ``service_token``: the credential of pdjax's internal RPCs (router ->
  workers, worker -> worker), shared by the deployment's processes and never
  by its clients. Workers refuse calls without it (``make_server``); every
  channel ``make_channel`` makes presents it. ``token`` is the client-facing
  one, which only the router checks; the two must differ.
  """
  cert: str | None = None
  key: str | None = None
  ca: str | None = None
  mtls: bool = False
  token: str | None = None
  max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
  server_name: str | None = None
  service_token: str | None = None

  def check(self) -> None:
    """Raises ValueError for settings that would defeat each other."""
    if self.token and self.service_token and (
        hmac.compare_digest(self.token.encode(), self.service_token.encode())):
      raise ValueError("--service_token must differ from --auth_token: the "
                       "client token would otherwise open the workers' "
                       "internal API to every client")

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


SERVICE_TOKEN_KEY = "authorization"


class _CallDetails(collections.namedtuple(
    "_CallDetails", ("method", "timeout", "metadata", "credentials",
                     "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
  """``grpc.ClientCallDetails`` for the sync interceptor below."""


def _with_token(metadata, token: str) -> list[tuple[str, str]]:
  return [*(metadata or ()), (SERVICE_TOKEN_KEY, f"Bearer {token}")]


class _ServiceToken(grpc.UnaryUnaryClientInterceptor,
                    grpc.UnaryStreamClientInterceptor,
                    grpc.StreamUnaryClientInterceptor,
                    grpc.StreamStreamClientInterceptor):
  """Adds the service token to every call of a (sync) channel."""

  def __init__(self, token: str):
    self._token = token

  def _details(self, d):
    return _CallDetails(d.method, d.timeout,
                        _with_token(d.metadata, self._token), d.credentials,
                        d.wait_for_ready, getattr(d, "compression", None))

  def intercept_unary_unary(self, continuation, details, request):
    return continuation(self._details(details), request)

  def intercept_unary_stream(self, continuation, details, request):
    return continuation(self._details(details), request)

  def intercept_stream_unary(self, continuation, details, requests):
    return continuation(self._details(details), requests)

  def intercept_stream_stream(self, continuation, details, requests):
    return continuation(self._details(details), requests)


class _AioToken:
  """Adds the service token to the calls of a ``grpc.aio`` channel. grpc.aio
  files each interceptor under one call type only, so there is one
  subclass per type (``_aio_token_interceptors``)."""

  def __init__(self, token: str):
    self._token = token

  def _details(self, d):
    return grpc.aio.ClientCallDetails(
        d.method, d.timeout,
        grpc.aio.Metadata(*_with_token(d.metadata, self._token)),
        d.credentials, d.wait_for_ready)


class _AioUnaryUnaryToken(_AioToken, grpc.aio.UnaryUnaryClientInterceptor):

  async def intercept_unary_unary(self, continuation, details, request):
    return await continuation(self._details(details), request)


class _AioUnaryStreamToken(_AioToken, grpc.aio.UnaryStreamClientInterceptor):

  async def intercept_unary_stream(self, continuation, details, request):
    return await continuation(self._details(details), request)


class _AioStreamUnaryToken(_AioToken, grpc.aio.StreamUnaryClientInterceptor):

  async def intercept_stream_unary(self, continuation, details, requests):
    return await continuation(self._details(details), requests)


class _AioStreamStreamToken(_AioToken,
                            grpc.aio.StreamStreamClientInterceptor):

  async def intercept_stream_stream(self, continuation, details, requests):
    return await continuation(self._details(details), requests)


def _aio_token_interceptors(token: str) -> list[_AioToken]:
  return [cls(token) for cls in (_AioUnaryUnaryToken, _AioUnaryStreamToken,
                                 _AioStreamUnaryToken, _AioStreamStreamToken)]


def make_channel(address: str, security: Security = Security(), *,
                 aio: bool = False):
  """A channel to another pdjax service with this deployment's security:
  its TLS, and its service token on every call."""
  creds = security.channel_credentials()
  options: list[tuple[str, int | str]] = list(security.options())
  if creds is not None and security.server_name:
    options.append(("grpc.ssl_target_name_override", security.server_name))
  token = security.service_token
  if aio:
    kw = {"interceptors": _aio_token_interceptors(token)} if token else {}
    if creds is None:
      return grpc.aio.insecure_channel(address, options=options, **kw)
    return grpc.aio.secure_channel(address, creds, options=options, **kw)
  if creds is None:
    channel = grpc.insecure_channel(address, options=options)
  else:
    channel = grpc.secure_channel(address, creds, options=options)
  if token:
    return grpc.intercept_channel(channel, _ServiceToken(token))
  return channel


def bearer_credential(value: str | bytes) -> bytes | None:
  """The credential of an ``Authorization: Bearer <credential>`` value, the
  scheme matched case-insensitively (RFC 7235); None for another scheme."""
  raw = value.encode() if isinstance(value, str) else value
  scheme, _, credential = raw.strip().partition(b" ")
  if scheme.lower() != b"bearer" or not credential.strip():
    return None
  return credential.strip()


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
  """Refuses calls without ``authorization: Bearer <token>`` metadata, except
  the health service (load balancers and Kubernetes probes speak it)."""

  def __init__(self, token: str, exempt: Sequence[str] = (
      "/grpc.health.v1.Health/",), *,
               refusal: str = "missing or invalid bearer token (send "
               "'authorization: Bearer <token>' metadata)",
               only: Sequence[str] | None = None):
    """``only``: method prefixes this token guards (None: every method but
    ``exempt``)."""
    self._expected = token.encode()
    self._exempt = tuple(exempt)
    self._only = None if only is None else tuple(only)

    async def deny(request_or_iterator, context):
      await context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)
    # One of the method's own shape: a refusal shaped as a unary request
    # would wait for a streaming caller's first message (a session sends
    # none before the server's headers) instead of refusing it at once.
    self._deny = {
        (False, False): grpc.unary_unary_rpc_method_handler(deny),
        (False, True): grpc.unary_stream_rpc_method_handler(deny),
        (True, False): grpc.stream_unary_rpc_method_handler(deny),
        (True, True): grpc.stream_stream_rpc_method_handler(deny)}

  async def intercept_service(self, continuation, details):
    if details.method.startswith(self._exempt) or (
        self._only is not None and not details.method.startswith(
            self._only)):
      return await continuation(details)
    for key, value in details.invocation_metadata or ():
      if key == "authorization":
        got = bearer_credential(value)
        if got is not None and hmac.compare_digest(got, self._expected):
          return await continuation(details)
    handler = await continuation(details)
    if handler is None:
      return self._deny[False, False]
    return self._deny[handler.request_streaming, handler.response_streaming]


_INTERNAL_REFUSAL = ("missing or invalid service token: this is an internal "
                     "pdjax API, for the deployment's router and workers "
                     "(their --service_token); clients call the router")


def make_server(security: Security = Security(), *, client_facing=False,
                internal: Sequence[str] = ()) -> grpc.aio.Server:
  """A server with the deployment's security: the client token on the
  client-facing API (the router), the service token on internal ones (the
  workers, and on a client-facing server the methods under the
  ``internal`` prefixes, e.g. the router's ``pdjax.v1.Registry``); the
  health service stays open on both."""
  security.check()
  interceptors = []
  if client_facing and security.token:
    interceptors.append(BearerTokenInterceptor(
        security.token, exempt=("/grpc.health.v1.Health/", *internal)))
  if client_facing and internal and security.service_token:
    interceptors.append(BearerTokenInterceptor(
        security.service_token, only=tuple(internal),
        refusal=_INTERNAL_REFUSAL))
  if not client_facing and security.service_token:
    interceptors.append(BearerTokenInterceptor(
        security.service_token, refusal=_INTERNAL_REFUSAL))
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


def bind_or_exit(server: grpc.aio.Server, host: str, port: int,
                 security: Security = Security()) -> int:
  """``bind`` for a launcher: a port it cannot take ends the process with
  one line (``error: ...``), not a traceback."""
  try:
    return bind(server, host, port, security)
  except BindError as e:
    raise SystemExit(f"error: {e}") from None


# The standard health service (grpc.health.v1.Health) of every pdjax
# server answers for three names:
#   ""                  readiness: SERVING while the process takes requests
#                       (a router: while a decode worker is ready), as
#                       Kubernetes' grpc probe without a service name asks;
#   the API's services  the same (e.g. "pdjax.v1.Generation");
#   LIVENESS_SERVICE    liveness: SERVING while the process runs, whether or
#                       not it can serve now (a livenessProbe's service).
LIVENESS_SERVICE = "liveness"


async def add_health(server: grpc.aio.Server, services: Sequence[str]
                     ) -> health.aio.HealthServicer:
  """The health service, every name NOT_SERVING until ``set_serving`` and
  ``set_live`` (the servicer alone would answer "" SERVING at once)."""
  servicer = health.aio.HealthServicer()
  health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
  for s in ("", *services, LIVENESS_SERVICE):
    await servicer.set(s, health_pb2.HealthCheckResponse.NOT_SERVING)
  return servicer


async def set_serving(servicer, services: Sequence[str], serving: bool):
  """Readiness: "" and ``services`` SERVING or NOT_SERVING."""
  status = (health_pb2.HealthCheckResponse.SERVING if serving else
            health_pb2.HealthCheckResponse.NOT_SERVING)
  for s in ("", *services):
    await servicer.set(s, status)


async def set_live(servicer) -> None:
  """Liveness: SERVING from now until the server stops."""
  await servicer.set(LIVENESS_SERVICE,
                     health_pb2.HealthCheckResponse.SERVING)


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
           "port_in_use", "in_use_message", "add_health", "set_live",
           "bearer_credential",
           "LIVENESS_SERVICE",
           "set_serving", "status_for", "PROCESS_ID", "abort_exhausted",
           "BearerTokenInterceptor"]
