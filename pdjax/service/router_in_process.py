"""The router's Generation service, called from the router's own process.

A process that hosts the router and also serves its clients another way
(the OpenAI gateway's HTTP: ``pdjax.launch.router --http_port``, as
Dynamo's frontend holds its router) calls the router's request body
directly instead of dialing its own gRPC port: a first token's way then
crosses two gRPC hops (router to worker and back), not four, and each
streamed token one fewer serialization.

``InProcessRouterClient`` has the methods of ``pdjax.client.AsyncClient``
that the gateway uses (``stream``, ``generate``, ``model_info``,
``health``, ``wait_ready``, ``close``), with its errors
(``GenerationError`` and the status a gRPC caller would get). Each request
runs ``RouterServicer.generate_body`` in a task of its own, as a gRPC
handler runs: the router's drain can end it (UNAVAILABLE) without
cancelling the caller's task, a deadline ends it DEADLINE_EXCEEDED, and a
caller that stops reading early cancels it, which frees what it holds at
the workers. Its responses reach the caller through a queue, one
event-loop wake each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any, Unpack

import grpc

from pdjax.client.types import (GenerateOptions, GenerationError,
                                GenerationResult, ResultBuilder, StreamDelta,
                                build_request, delta_from_response,
                                model_info_to_dict)
from pdjax.service import common
from pdjax.service.call_sessions import CallAborted, SessionCallContext
from pdjax.service.router import GENERATION_SERVICE, RouterServicer
from pdjax.v1 import generate_pb2

log = logging.getLogger(__name__)

# wait_ready: the gap between looks at the router's readiness.
_READY_POLL_S = 0.05
# The body's end, on the queue after its last response.
_END = object()


class InProcessRouterClient:
  """``AsyncClient``'s surface over a ``RouterServicer`` in this process.

  Args:
    servicer: the router (its owner starts and drains it; ``close`` here
      only cancels the calls this client still runs).
    timeout_s: the default deadline of each call (None: none).
  """

  address = "in-process"

  def __init__(self, servicer: RouterServicer, *,
               timeout_s: float | None = None):
    self._servicer = servicer
    self._timeout_s = timeout_s
    self._bodies: set[asyncio.Task] = set()

  def _timeout(self, timeout_s: float | None) -> float | None:
    return self._timeout_s if timeout_s is None else timeout_s

  # ------------------------------------------------------------ generate
  async def generate(self, prompt: str | None = None, *,
                     timeout_s: float | None = None,
                     **options: Unpack[GenerateOptions]) -> GenerationResult:
    builder = ResultBuilder()
    async for delta in self._stream(build_request(prompt, **options),
                                    self._timeout(timeout_s)):
      builder.add(delta)
    return builder.result()

  def stream(self, prompt: str | None = None, *,
             timeout_s: float | None = None,
             **options: Unpack[GenerateOptions]) -> AsyncIterator[StreamDelta]:
    """Checks the request now; the router starts it at the first
    ``__anext__``."""
    return self._stream(build_request(prompt, **options),
                        self._timeout(timeout_s))

  async def _stream(self, req: generate_pb2.GenerateRequest,
                    timeout: float | None) -> AsyncIterator[StreamDelta]:
    queue: asyncio.Queue = asyncio.Queue()
    body = asyncio.ensure_future(self._run(req, timeout, queue))
    self._bodies.add(body)
    body.add_done_callback(self._bodies.discard)
    try:
      while True:
        item = await queue.get()
        if item is _END:
          return
        if isinstance(item, GenerationError):
          raise item
        yield delta_from_response(item)
    finally:
      # Also runs when the caller stops reading early or is cancelled: the
      # body's own cleanup (the workers' calls closed) runs in its task.
      body.cancel()

  async def _run(self, req: generate_pb2.GenerateRequest,
                 timeout: float | None, queue: asyncio.Queue) -> None:
    """One request's body, to its end on ``queue``: ``_END`` after its last
    response, or the ``GenerationError`` a gRPC caller would get."""
    # A deadline of its own in whole ms (0 means none there): at least 1.
    ctx = SessionCallContext(
        None, 0 if timeout is None else max(1, math.ceil(timeout * 1000)))
    expired = []
    timer = None
    if ctx.deadline is not None:
      me = asyncio.current_task()
      timer = asyncio.get_running_loop().call_later(
          max(0.0, ctx.deadline - time.monotonic()),
          lambda: (expired.append(True), me.cancel()))
    try:
      async with contextlib.aclosing(
          self._servicer.generate_body(req, ctx)) as responses:
        async for resp in responses:
          queue.put_nowait(resp)
      queue.put_nowait(_END)
    except CallAborted as e:
      queue.put_nowait(GenerationError(e.code, e.details))
    except asyncio.CancelledError:
      if expired:
        queue.put_nowait(GenerationError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                         "Deadline Exceeded"))
      else:
        # The caller stopped reading (nobody waits on the queue), or the
        # process is stopping.
        queue.put_nowait(GenerationError(grpc.StatusCode.CANCELLED,
                                         "Cancelled"))
    except Exception as e:  # noqa: BLE001 - the status a gRPC caller gets
      log.exception("in-process router call failed")
      queue.put_nowait(GenerationError(
          grpc.StatusCode.UNKNOWN, f"Unexpected {type(e).__name__}: {e}"))
    finally:
      if timer is not None:
        timer.cancel()

  # -------------------------------------------------------- info, health
  async def model_info(self, *,
                       timeout_s: float | None = None) -> dict[str, Any]:
    del timeout_s                  # answered at once
    if self._servicer.registry.expected is None:
      raise GenerationError(grpc.StatusCode.UNAVAILABLE,
                            "no worker has joined yet")
    return model_info_to_dict(self._servicer.model_info())

  async def health(self, service: str = "", *,
                   timeout_s: float | None = None) -> str:
    """As the router's health service answers: readiness for "" and the
    Generation service, liveness SERVING while this process runs."""
    del timeout_s
    if service == common.LIVENESS_SERVICE:
      return "SERVING"
    if service not in ("", GENERATION_SERVICE):
      raise GenerationError(grpc.StatusCode.NOT_FOUND,
                            f"unknown service {service!r}")
    return "SERVING" if self._servicer.ready() else "NOT_SERVING"

  async def wait_ready(self, timeout_s: float = 30.0,
                       service: str = GENERATION_SERVICE) -> None:
    deadline = time.monotonic() + timeout_s
    while (last := await self.health(service)) != "SERVING":
      if time.monotonic() >= deadline:
        raise TimeoutError(f"the router in this process is not ready after "
                           f"{timeout_s:.0f} s (health: {last})")
      await asyncio.sleep(_READY_POLL_S)

  async def close(self) -> None:
    """Cancels the calls still running (their callers get CANCELLED)."""
    bodies = list(self._bodies)
    for t in bodies:
      t.cancel()
    if bodies:
      await asyncio.wait(bodies)

  async def __aenter__(self) -> InProcessRouterClient:
    return self

  async def __aexit__(self, *exc: Any) -> None:
    await self.close()


__all__ = ["InProcessRouterClient"]
