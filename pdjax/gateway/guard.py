"""Connection-level limits of the gateway's HTTP server: what aiohttp does
not bound by itself.

aiohttp reads a request's head for as long as the client takes and accepts
every connection the listening socket is offered, so clients that open
connections and never finish their headers (slowloris) hold a file
descriptor each until the process has none left. ``ConnectionGuard`` wraps
the server's protocol factory (``make_runner`` installs it) and

* refuses a connection beyond ``max_connections`` at once, with a 503 and
  ``Connection: close``, before reading anything from it;
* closes a connection whose first request head has not arrived within
  ``header_timeout_s`` of its opening (the middleware ``mark_started``
  tells it a head arrived). Later heads on a kept-alive connection are
  bounded by aiohttp's keep-alive timeout, which ``make_runner`` sets to
  the same value: it closes a connection still waiting for a complete head
  that long after its previous response.

Bodies are bounded in the request handlers (``body_timeout_s``, the
application's ``client_max_size``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_HEADER_TIMEOUT_S = 10.0
# Descriptors kept for everything but client connections: the router's
# channels, log files, the metrics server, imports.
_RESERVED_FDS = 128


def default_max_connections() -> int:
  """Client connections the process can hold: its descriptor limit
  (RLIMIT_NOFILE), less a reserve for everything else."""
  soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
  if soft == resource.RLIM_INFINITY:
    return 65536
  return max(soft - _RESERVED_FDS, 16)


def _busy_response() -> bytes:
  body = json.dumps({"error": {
      "message": "the gateway has too many open connections; retry later",
      "type": "server_error", "param": None,
      "code": "too_many_connections"}}).encode()
  return (b"HTTP/1.1 503 Service Unavailable\r\n"
          b"Content-Type: application/json; charset=utf-8\r\n"
          b"Retry-After: 1\r\nConnection: close\r\n"
          b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class _Guarded(asyncio.Protocol):
  """One connection: aiohttp's protocol behind the guard's checks."""

  def __init__(self, guard: "ConnectionGuard", inner: asyncio.Protocol):
    self._guard = guard
    self._inner = inner
    self._transport: asyncio.Transport | None = None
    self._timer: asyncio.TimerHandle | None = None
    self._admitted = False

  def connection_made(self, transport) -> None:
    guard = self._guard
    if guard.open >= guard.max_connections:
      guard.refused += 1
      if guard.refused == 1 or guard.refused % 1000 == 0:
        log.warning("refusing connections past --max_connections=%d (%d "
                    "so far)", guard.max_connections, guard.refused)
      transport.write(_busy_response())
      transport.close()
      return
    self._admitted = True
    self._transport = transport
    guard.open += 1
    guard.waiting[transport] = self
    self._timer = asyncio.get_running_loop().call_later(
        guard.header_timeout_s, self._header_timeout)
    self._inner.connection_made(transport)

  def started(self) -> None:
    """A request head arrived."""
    if self._timer is not None:
      self._timer.cancel()
      self._timer = None
    self._guard.waiting.pop(self._transport, None)

  def _header_timeout(self) -> None:
    self._timer = None
    if self._transport is not None and self._guard.waiting.pop(
        self._transport, None) is not None:
      self._guard.timed_out += 1
      self._transport.close()

  def data_received(self, data: bytes) -> None:
    self._inner.data_received(data)

  def eof_received(self) -> Any:
    return self._inner.eof_received()

  def pause_writing(self) -> None:
    self._inner.pause_writing()

  def resume_writing(self) -> None:
    self._inner.resume_writing()

  def connection_lost(self, exc: BaseException | None) -> None:
    if not self._admitted:
      return
    self._admitted = False
    self.started()
    self._guard.open -= 1
    self._inner.connection_lost(exc)


class ConnectionGuard:
  """Wraps aiohttp's ``web.Server`` (the protocol factory a site listens
  with); everything else is forwarded to it."""

  def __init__(self, server, *, max_connections: int,
               header_timeout_s: float):
    self._server = server
    self.max_connections = max_connections
    self.header_timeout_s = header_timeout_s
    self.open = 0
    self.refused = 0
    self.timed_out = 0
    # Connections whose first request head has not arrived, by transport.
    self.waiting: dict[Any, _Guarded] = {}

  def __call__(self) -> asyncio.Protocol:
    return _Guarded(self, self._server())

  def mark_started(self, transport) -> None:
    guarded = self.waiting.get(transport)
    if guarded is not None:
      guarded.started()

  def __getattr__(self, name: str) -> Any:
    return getattr(self._server, name)


__all__ = ["ConnectionGuard", "DEFAULT_HEADER_TIMEOUT_S",
           "default_max_connections"]
