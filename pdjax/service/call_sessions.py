"""The server's side of a session: many streaming calls over one stream.

A new gRPC call costs a request its own HTTP/2 stream, a handler task and
the call's set-up on both ends: on one request's way to its first token,
more than a message on a stream already open. So the router keeps one
long-lived stream to each worker (``DecodeSession``, ``PrefillSession``),
a client may keep one to the router (``GenerateSession``), and each
request's call goes as a ``start`` message on it
(``pdjax.client.sessions`` is the caller's side); this module runs them:

* each ``start`` runs the same handler body a call of its own would run
  (``RouterServicer.generate_body``, ``DecodeServicer._decode``,
  ``PrefillServicer._prefill``), with a ``SessionCallContext`` standing in
  for gRPC's: ``abort`` ends the call with its status, ``time_remaining``
  counts down the deadline the start carried, trailing metadata goes out
  with the end;
* what the bodies yield goes back tagged with the caller's call id, the
  events ready together in one message (at a decode step's end, one per
  live row), each call closed by an ``end`` carrying its status;
* a ``cancel`` message, the call's deadline, or the session's end cancels
  the body as gRPC would cancel the call (its ``finally`` frees what it
  holds); a call that ``CallSessions.end`` cuts short ends UNAVAILABLE, as
  a call of its own on a server going away, never CANCELLED, which would
  tell its caller of a cancellation it never made.

``CallSessions`` owns a process's open sessions: ``end`` closes them once a
drain has nothing left running (an open stream would otherwise hold the
server's graceful stop for its whole grace period).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import AsyncIterator, Callable

import grpc

from pdjax.client.sessions import SESSION_HEADER
from pdjax.v1 import common_pb2

log = logging.getLogger(__name__)

_OK = common_pb2.CallStatus()


class CallAborted(Exception):
  """A session call's ``abort``: the status its end carries."""

  def __init__(self, code: grpc.StatusCode, details: str,
               trailing: tuple = ()):
    super().__init__(details)
    self.code = code
    self.details = details
    self.trailing = trailing


def call_status(code: grpc.StatusCode, details: str = "",
                trailing=()) -> common_pb2.CallStatus:
  return common_pb2.CallStatus(
      code=code.value[0], details=details,
      trailing_metadata=[common_pb2.MetadataEntry(key=k, value=str(v))
                         for k, v in trailing])


class SessionCallContext:
  """What a handler body uses of ``grpc.aio.ServicerContext``, for one call
  carried in a session (``session_context``: the session's own gRPC
  context), or for a call made in the handler's own process (None: no
  metadata, the peer ``in-process``)."""

  def __init__(self, session_context, timeout_ms: int):
    self._session = session_context
    self._deadline = (time.monotonic() + timeout_ms / 1000 if timeout_ms
                      else None)
    self._trailing: tuple = ()

  @property
  def deadline(self) -> float | None:
    """``time.monotonic()`` when the call's deadline passes (None: none)."""
    return self._deadline

  def time_remaining(self) -> float | None:
    if self._deadline is None:
      return None
    return max(0.0, self._deadline - time.monotonic())

  def set_trailing_metadata(self, metadata) -> None:
    self._trailing = tuple(metadata)

  def invocation_metadata(self):
    if self._session is None:
      return ()
    return self._session.invocation_metadata()

  def peer(self) -> str:
    if self._session is None:
      return "in-process"
    return self._session.peer()

  async def abort(self, code: grpc.StatusCode, details: str = "",
                  trailing_metadata=()) -> None:
    raise CallAborted(code, details,
                      tuple(trailing_metadata) or self._trailing)


Body = Callable[[object, SessionCallContext], AsyncIterator]


@dataclasses.dataclass(frozen=True)
class SessionMessages:
  """A session RPC's own messages: a call's event (one of its responses, or
  its end) and the message that carries the events ready together."""
  event: type
  response: type


class CallSessions:
  """The sessions this process serves: runs each one (``serve``) and ends
  them all at a drain's end (``end``)."""

  def __init__(self):
    self._sessions: set[asyncio.Task] = set()
    self._ending = asyncio.Event()

  @property
  def open(self) -> int:
    return len(self._sessions)

  async def serve(self, request_iterator, context, body: Body,
                  messages: SessionMessages) -> None:
    """Runs one session until the caller ends it, the stream breaks, or
    ``end``: each ``start`` through ``body(request, call_context)``."""
    session = _Session(context, body, messages)
    me = asyncio.current_task()
    self._sessions.add(me)
    try:
      # Headers at once, saying so: the caller waits for them before its
      # first start (its check that this worker serves sessions).
      await context.send_initial_metadata(((SESSION_HEADER, "1"),))
      await session.run(request_iterator, self._ending)
    finally:
      self._sessions.discard(me)

  async def end(self, timeout_s: float = 1.0) -> None:
    """Ends every session (and refuses new ones): each stops reading,
    cancels the calls it still runs, sends their ends and closes with OK."""
    self._ending.set()
    if self._sessions:
      await asyncio.wait(list(self._sessions), timeout=timeout_s)


class _Session:

  def __init__(self, context, body: Body, messages: SessionMessages):
    self._context = context
    self._body = body
    self._messages = messages
    self._calls: dict[int, asyncio.Task] = {}
    self._pending: list = []
    self._wake = asyncio.Event()
    self._closed = False
    # The status of a call cancelled other than by its deadline: set once
    # the session itself ends.
    self._cancelled = call_status(grpc.StatusCode.CANCELLED, "Cancelled")

  async def run(self, request_iterator, ending: asyncio.Event) -> None:
    writer = asyncio.ensure_future(self._write())
    reader = asyncio.ensure_future(self._read(request_iterator))
    stop = asyncio.ensure_future(ending.wait())
    try:
      await asyncio.wait([reader, writer, stop],
                         return_when=asyncio.FIRST_COMPLETED)
    finally:
      if stop.done() and not stop.cancelled():
        self._cancelled = call_status(
            grpc.StatusCode.UNAVAILABLE,
            "the server is shutting down: the call was ended before it "
            "finished; try another server")
      reader.cancel()
      stop.cancel()
      calls = list(self._calls.values())
      for t in calls:
        t.cancel()
      if calls:
        # Their ends go out while the stream still stands.
        await asyncio.wait(calls)
      self._closed = True
      self._wake.set()
      with contextlib.suppress(asyncio.CancelledError, Exception):
        await writer
      if writer.done() and not writer.cancelled() and writer.exception():
        log.debug("session writer: %r", writer.exception())

  async def _read(self, request_iterator) -> None:
    async for req in request_iterator:
      kind = req.WhichOneof("kind")
      if kind == "start":
        if req.call in self._calls:
          self._emit(req.call, end=call_status(
              grpc.StatusCode.INVALID_ARGUMENT,
              f"call {req.call} is already running in this session"))
          continue
        task = asyncio.ensure_future(self._run_call(req.call, req.start))
        self._calls[req.call] = task
        task.add_done_callback(lambda t, c=req.call: self._calls.pop(c, None))
      elif kind == "cancel":
        task = self._calls.get(req.call)
        if task is not None:
          task.cancel()

  async def _run_call(self, call: int, start) -> None:
    ctx = SessionCallContext(self._context, start.timeout_ms)
    status = _OK
    timer = None
    if ctx.deadline is not None:
      loop = asyncio.get_running_loop()
      me = asyncio.current_task()
      expired = []
      timer = loop.call_later(max(0.0, ctx.deadline - time.monotonic()),
                              lambda: (expired.append(True), me.cancel()))
    try:
      async with contextlib.aclosing(self._body(start.request, ctx)) as body:
        async for msg in body:
          self._emit(call, message=msg)
    except CallAborted as e:
      status = call_status(e.code, e.details, e.trailing)
    except asyncio.CancelledError:
      if timer is not None and expired:
        status = call_status(grpc.StatusCode.DEADLINE_EXCEEDED,
                             "Deadline Exceeded")
      else:
        # Cancelled by the caller (no end wanted), by its stream's end, or
        # by the server's.
        status = self._cancelled
    except Exception as e:  # noqa: BLE001 - the call's status, as gRPC's
      log.exception("session call %d failed", call)
      status = call_status(grpc.StatusCode.UNKNOWN,
                           f"Unexpected {type(e).__name__}: {e}")
    finally:
      if timer is not None:
        timer.cancel()
    self._emit(call, end=status)

  def _emit(self, call: int, **kind) -> None:
    if self._closed:
      return
    self._pending.append(self._messages.event(call=call, **kind))
    self._wake.set()

  async def _write(self) -> None:
    while True:
      await self._wake.wait()
      self._wake.clear()
      if self._pending:
        batch, self._pending = self._pending, []
        await self._context.write(self._messages.response(events=batch))
      if self._closed and not self._pending:
        return


__all__ = ["CallAborted", "CallSessions",
           "SessionCallContext", "SessionMessages", "call_status"]
