"""Python client for a pdjax router's ``pdjax.v1.Generation`` service.

Two clients with the same surface: ``Client`` (blocking, ``grpc`` channels)
and ``AsyncClient`` (``grpc.aio``; create it inside the running event loop).

  with Client("127.0.0.1:50051") as c:
    c.wait_ready(30)
    print(c.generate("Hello", max_tokens=32, temperature=0).text)
    for delta in c.stream(prompt_token_ids=[1, 15043], max_tokens=8):
      print(delta.text, end="", flush=True)

  async with AsyncClient("127.0.0.1:50051", sessions=True) as c:
    async for delta in c.stream("Hello"):
      ...

``AsyncClient(sessions=True)`` sends its requests as messages on one
long-lived ``GenerateSession`` stream to the router (``pdjax.client.
sessions``) rather than as a new call each: the same responses and errors,
less set-up on each request's way to its first token; a router without
sessions is sent calls of their own.

Streams cancel their RPC when closed early (``close()`` on the sync
iterator, which ``break`` triggers once the iterator is dropped;
``await aclose()`` on the async one, or ``contextlib.aclosing``), so the
router frees the request's decode slot at once instead of generating tokens
nobody reads. Every RPC failure is raised as ``GenerationError`` carrying the
gRPC status code. Auth is a bearer token sent as ``authorization: Bearer
<token>`` metadata on every call, over TLS or mTLS when ``tls`` is given.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdjax.client.sessions import CallSession
from pdjax.client.types import (AUTHORIZATION_METADATA_KEY,
                                DEFAULT_MAX_MESSAGE_BYTES, GenerateOptions,
                                GenerationError, GenerationResult,
                                ResultBuilder, StreamDelta, TlsConfig, Usage,
                                build_request, call_metadata, channel_options,
                                delta_from_response, model_info_to_dict)
from pdjax.v1 import generate_pb2, generate_pb2_grpc

__all__ = [
    "AUTHORIZATION_METADATA_KEY",
    "AsyncClient",
    "Client",
    "GENERATION_SERVICE",
    "GenerateOptions",
    "GenerationError",
    "GenerationResult",
    "StreamDelta",
    "TlsConfig",
    "Usage",
    "build_request",
]

# What wait_ready waits for by default: the router marks it SERVING while it
# can serve (a decode worker is ready) and NOT_SERVING otherwise and while
# draining; "" says the same. Its "liveness" service is SERVING while it runs.
GENERATION_SERVICE = "pdjax.v1.Generation"
# wait_ready: gaps between health probes that answered but not SERVING.
_BACKOFF_INITIAL_S = 0.05
_BACKOFF_MAX_S = 1.0
# One probe's limit. Probes wait for the connection (wait_for_ready), so this
# bounds how long a hung server can hold one.
_PROBE_TIMEOUT_S = 2.0
# Answers that waiting will not change.
_FATAL_HEALTH_CODES = frozenset({
    grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT})
# gRPC's default reconnect backoff grows to 120 s, so a client that started
# before its router could sit out two minutes after the router came up.
# ``grpc.min_reconnect_backoff_ms`` is deliberately absent: despite its name
# gRPC takes it as the connect *timeout* (default 20 s), and at 100 ms a
# loaded host or a far network fails calls with "tcp handshaker shutdown".
_RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


class _ClientBase:
  """What both clients hold: channel settings, auth metadata, default limit."""

  def __init__(self, address: str, *, timeout_s: float | None,
               tls: TlsConfig | None, token: str | None,
               max_message_bytes: int,
               options: Sequence[tuple[str, Any]]):
    self.address = address
    self.timeout_s = timeout_s
    self._tls = tls
    self._metadata = call_metadata(token)
    self._options = channel_options(
        max_message_bytes, tls, (*_RECONNECT_OPTIONS, *options))

  def _timeout(self, timeout_s: float | None) -> float | None:
    return self.timeout_s if timeout_s is None else timeout_s

  def _make_channel(self, grpc_module: Any) -> Any:
    """A channel from ``grpc`` or ``grpc.aio`` (same factory names)."""
    if self._tls is None:
      return grpc_module.insecure_channel(self.address, options=self._options)
    return grpc_module.secure_channel(self.address, self._tls.credentials(),
                                      options=self._options)

  def _init_stubs(self, channel: Any) -> None:
    self._channel = channel
    self._stub = generate_pb2_grpc.GenerationStub(channel)
    self._health = health_pb2_grpc.HealthStub(channel)


def _health_status(resp: health_pb2.HealthCheckResponse) -> str:
  return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def _probe_failure(e: GenerationError) -> str:
  """What a failed ``wait_ready`` probe says; raises if retrying is futile."""
  if e.code() in _FATAL_HEALTH_CODES:
    raise e
  if e.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
    # Probes wait for a connection, so this is how "unreachable" looks.
    return "no answer: unreachable or not accepting connections"
  return str(e)


def _not_ready_error(address: str, timeout_s: float, last: str) -> TimeoutError:
  return TimeoutError(f"{address} not SERVING after {timeout_s:g} s "
                      f"(last: {last})")


class Client(_ClientBase):
  """Blocking client. Thread-safe: calls may run concurrently.

  Args:
    address: the router, ``host:port``.
    timeout_s: default deadline of every call (a whole stream included);
      None waits indefinitely. Each method's ``timeout_s`` overrides it.
    tls: TLS/mTLS settings; None dials in plaintext.
    token: bearer token sent on every call.
    max_message_bytes: send and receive message size limit.
    options: extra gRPC channel options, appended to the client's own.
  """

  def __init__(self, address: str, *, timeout_s: float | None = None,
               tls: TlsConfig | None = None, token: str | None = None,
               max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
               options: Sequence[tuple[str, Any]] = ()):
    super().__init__(address, timeout_s=timeout_s, tls=tls, token=token,
                     max_message_bytes=max_message_bytes, options=options)
    self._init_stubs(self._make_channel(grpc))

  def generate(self, prompt: str | None = None, *,
               timeout_s: float | None = None,
               **options: Unpack[GenerateOptions]) -> GenerationResult:
    """Runs one completion to the end (arguments: ``build_request``).

    Raises:
      ValueError, TypeError: a malformed request (before any RPC).
      GenerationError: the RPC failed, or the stream ended unfinished.
    """
    req = build_request(prompt, **options)
    builder = ResultBuilder()
    for delta in self._stream(req, self._timeout(timeout_s)):
      builder.add(delta)
    return builder.result()

  def stream(self, prompt: str | None = None, *,
             timeout_s: float | None = None,
             **options: Unpack[GenerateOptions]) -> Iterator[StreamDelta]:
    """The completion's deltas as they arrive (arguments: ``build_request``).

    The request is checked now; the RPC starts at the first ``next()``.
    Closing the iterator before the end cancels the RPC.
    """
    return self._stream(build_request(prompt, **options),
                        self._timeout(timeout_s))

  def _stream(self, req: generate_pb2.GenerateRequest,
              timeout: float | None) -> Iterator[StreamDelta]:
    call = self._stub.Generate(req, timeout=timeout, metadata=self._metadata)
    try:
      for resp in call:
        yield delta_from_response(resp)
    except grpc.RpcError as e:
      raise GenerationError.from_rpc_error(e) from e
    finally:
      # No-op after a normal end; on early close it tells the router now.
      call.cancel()

  def model_info(self, *, timeout_s: float | None = None) -> dict[str, Any]:
    """The served model (``pdjax.v1.ModelInfo`` fields by name)."""
    try:
      info = self._stub.GetModelInfo(generate_pb2.ModelInfoRequest(),
                                     timeout=self._timeout(timeout_s),
                                     metadata=self._metadata)
    except grpc.RpcError as e:
      raise GenerationError.from_rpc_error(e) from e
    return model_info_to_dict(info)

  def health(self, service: str = "", *,
             timeout_s: float | None = None) -> str:
    """The health service's status name, e.g. "SERVING" or "NOT_SERVING".

    Fails fast (GenerationError UNAVAILABLE) when the server is unreachable;
    ``wait_ready`` is the call that waits.
    """
    return self._check(service, self._timeout(timeout_s), False)

  def _check(self, service: str, timeout: float | None,
             wait_for_ready: bool) -> str:
    try:
      resp = self._health.Check(
          health_pb2.HealthCheckRequest(service=service), timeout=timeout,
          metadata=self._metadata, wait_for_ready=wait_for_ready)
    except grpc.RpcError as e:
      raise GenerationError.from_rpc_error(e) from e
    return _health_status(resp)

  def wait_ready(self, timeout_s: float = 30.0,
                 service: str = GENERATION_SERVICE) -> None:
    """Blocks until ``service`` (the Generation service) reports SERVING.

    Unreachable, NOT_SERVING and unknown-service answers are retried with
    backoff (a router registers its services as it starts).

    Raises:
      TimeoutError: not SERVING within ``timeout_s``.
      GenerationError: an answer that retrying cannot change (UNIMPLEMENTED,
        UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT).
    """
    deadline = time.monotonic() + timeout_s
    delay, last = _BACKOFF_INITIAL_S, "no answer"
    while (remaining := deadline - time.monotonic()) > 0:
      try:
        last = self._check(service, min(remaining, _PROBE_TIMEOUT_S), True)
        if last == "SERVING":
          return
      except GenerationError as e:
        last = _probe_failure(e)
      time.sleep(max(0.0, min(delay, deadline - time.monotonic())))
      delay = min(2 * delay, _BACKOFF_MAX_S)
    raise _not_ready_error(self.address, timeout_s, last)

  def close(self) -> None:
    self._channel.close()

  def __enter__(self) -> Client:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


class AsyncClient(_ClientBase):
  """``Client`` over ``grpc.aio``; construct it inside the event loop.

  Same arguments and methods as ``Client``, as coroutines, except ``stream``,
  which returns an async generator (``async for``; ``await aclose()`` to
  stop early, which cancels the RPC). ``sessions``: requests go as
  messages on one ``GenerateSession`` stream (opened by the first,
  opened again after it ends) instead of a call each.
  """

  def __init__(self, address: str, *, timeout_s: float | None = None,
               tls: TlsConfig | None = None, token: str | None = None,
               max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
               options: Sequence[tuple[str, Any]] = (),
               sessions: bool = False):
    super().__init__(address, timeout_s=timeout_s, tls=tls, token=token,
                     max_message_bytes=max_message_bytes, options=options)
    self._init_stubs(self._make_channel(grpc.aio))
    self._session = (CallSession(self._stub, "Generate",
                                 generate_pb2.GenerateSessionRequest,
                                 address, metadata=self._metadata)
                     if sessions else None)

  async def generate(self, prompt: str | None = None, *,
                     timeout_s: float | None = None,
                     **options: Unpack[GenerateOptions]) -> GenerationResult:
    req = build_request(prompt, **options)
    builder = ResultBuilder()
    async for delta in self._stream(req, self._timeout(timeout_s)):
      builder.add(delta)
    return builder.result()

  def stream(self, prompt: str | None = None, *,
             timeout_s: float | None = None,
             **options: Unpack[GenerateOptions]) -> AsyncIterator[StreamDelta]:
    """Checks the request now; the RPC starts at the first ``__anext__``."""
    return self._stream(build_request(prompt, **options),
                        self._timeout(timeout_s))

  async def _stream(self, req: generate_pb2.GenerateRequest,
                    timeout: float | None) -> AsyncIterator[StreamDelta]:
    if self._session is not None:
      call = self._session.call(req, timeout)
    else:
      call = self._stub.Generate(req, timeout=timeout,
                                 metadata=self._metadata)
    try:
      async for resp in call:
        yield delta_from_response(resp)
    except grpc.RpcError as e:
      raise GenerationError.from_rpc_error(e) from e
    finally:
      # Also runs when the consuming task is cancelled mid-read.
      call.cancel()

  async def model_info(self, *,
                       timeout_s: float | None = None) -> dict[str, Any]:
    try:
      info = await self._stub.GetModelInfo(generate_pb2.ModelInfoRequest(),
                                           timeout=self._timeout(timeout_s),
                                           metadata=self._metadata)
    except grpc.RpcError as e:
      raise GenerationError.from_rpc_error(e) from e
    return model_info_to_dict(info)

  async def health(self, service: str = "", *,
                   timeout_s: float | None = None) -> str:
    return await self._check(service, self._timeout(timeout_s), False)

  async def _check(self, service: str, timeout: float | None,
                   wait_for_ready: bool) -> str:
    try:
      resp = await self._health.Check(
          health_pb2.HealthCheckRequest(service=service), timeout=timeout,
          metadata=self._metadata, wait_for_ready=wait_for_ready)
    except grpc.RpcError as e:
      raise GenerationError.from_rpc_error(e) from e
    return _health_status(resp)

  async def wait_ready(self, timeout_s: float = 30.0,
                       service: str = GENERATION_SERVICE) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delay, last = _BACKOFF_INITIAL_S, "no answer"
    while (remaining := deadline - loop.time()) > 0:
      try:
        last = await self._check(service, min(remaining, _PROBE_TIMEOUT_S),
                                 True)
        if last == "SERVING":
          return
      except GenerationError as e:
        last = _probe_failure(e)
      await asyncio.sleep(max(0.0, min(delay, deadline - loop.time())))
      delay = min(2 * delay, _BACKOFF_MAX_S)
    raise _not_ready_error(self.address, timeout_s, last)

  async def close(self) -> None:
    if self._session is not None:
      await self._session.close()
    await self._channel.close()

  async def __aenter__(self) -> AsyncClient:
    return self

  async def __aexit__(self, *exc: Any) -> None:
    await self.close()
