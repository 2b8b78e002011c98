"""The caller's side of a session: a service's calls as messages on one stream.

A new gRPC call costs a request its own HTTP/2 stream, a handler task and
the call's set-up on both ends; a message on a stream already open costs
less. ``CallSession`` keeps one long-lived session stream open to a server
(``<method>Session``: the router's ``GenerateSession`` for a client's
``Generate`` calls, a worker's ``DecodeSession`` and ``PrefillSession`` for
the router's; opened by the first call, opened again by the next call after
it ends) and multiplexes calls over it; ``call`` returns a ``SessionCall``
with the part of ``grpc.aio``'s server-streaming call its callers use:
async iteration and ``read`` over the responses, failures as
``grpc.aio.AioRpcError`` with the code, details and trailing metadata the
server's end carried, ``cancel`` (a read waiting then raises
``asyncio.CancelledError``, as gRPC's does), and the call's own deadline
(``pdjax.service.call_sessions`` is the server's side).

A caller that gives up never takes the stream with it: a start or cancel
being written is written to its end (grpc.aio cancels the whole stream
when a write is cancelled), and a call's cancel follows its start.

A session that breaks (the server gone, the channel closed) ends every call
still on it with the session's status (UNAVAILABLE where the stream ended
without one), as each call of its own would have ended. A server that does
not serve sessions (an older one, through a rolling upgrade) answers the
first with UNIMPLEMENTED: its calls then go as calls of their own, that
first one included.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time

import grpc

log = logging.getLogger(__name__)

# In a session's headers: the server serves it (one without sessions
# answers UNIMPLEMENTED, with no headers of its own).
SESSION_HEADER = "pdjax-session"

_CODES = {c.value[0]: c for c in grpc.StatusCode}

# How long a new session may wait for the server's headers: past it, the
# server is taken for gone (its calls end UNAVAILABLE: the router retries
# them on another worker), not waited for while every call queues.
_OPEN_TIMEOUT_S = 10.0


async def _run_to_end(aw):
  """Awaits ``aw`` to its end even where the caller is cancelled meanwhile,
  then raises the caller's cancellation. For writes on a session's
  stream: grpc.aio cancels the whole RPC when a write is cancelled, which
  would end every call on the session for one caller giving up."""
  task = asyncio.ensure_future(aw)
  cancelled = False
  while not task.done():
    try:
      await asyncio.shield(task)
    except asyncio.CancelledError:
      if task.cancelled():
        raise
      cancelled = True
  if cancelled:
    if not task.cancelled():
      task.exception()          # retrieved: the caller's cancellation wins
    raise asyncio.CancelledError()
  return task.result()


def _rpc_error(code: grpc.StatusCode, details: str,
               trailing=()) -> grpc.aio.AioRpcError:
  return grpc.aio.AioRpcError(code, grpc.aio.Metadata(),
                              grpc.aio.Metadata(*trailing), details)


class CallSession:
  """``method`` calls (``"Generate"``, ``"Decode"``, ``"Prefill"``) to one
  server over one ``<method>Session`` stream (``stub``: the server's
  service stub, ``request_type``: the session's request message,
  ``metadata``: sent with the stream and with calls of their own).
  ``close`` ends the stream and the calls on it."""

  def __init__(self, stub, method: str, request_type: type,
               address: str = "", metadata=None):
    self._stub = stub
    self._method = method
    self._request_type = request_type
    self._metadata = metadata
    self.address = address
    self._stream = None
    self._reader: asyncio.Task | None = None
    self._calls: dict[int, SessionCall] = {}
    self._ids = itertools.count(1)
    self._write_lock = asyncio.Lock()
    self._closed = False
    # False once the server answered UNIMPLEMENTED: calls of their own.
    self.supported = True
    self._last_end = (grpc.StatusCode.UNAVAILABLE, "no session", ())

  @property
  def calls(self) -> int:
    """Calls running on the session now."""
    return len(self._calls)

  def call(self, request, timeout: float | None = None) -> "SessionCall":
    """A call on the session (sent when first read, as gRPC sends its
    calls)."""
    if self._closed:
      raise grpc.aio.UsageError("the session is closed")
    if not self.supported:
      return self._own_call(request, timeout)
    c = SessionCall(self, next(self._ids), request, timeout)
    self._calls[c.id] = c
    return c

  def _own_call(self, request, timeout: float | None):
    return getattr(self._stub, self._method)(request, timeout=timeout,
                                             metadata=self._metadata)

  async def _open(self):
    """The session's stream, opened if there is none and answered: the
    server's headers say it serves sessions. None where it does not (a
    server without sessions answers UNIMPLEMENTED, and ``supported`` turns
    False) or the stream ended at once. Nothing is written before the
    answer: a write racing a stream's end makes its status INTERNAL,
    hiding the server's."""
    if self._stream is None:
      stream = self._stream = getattr(self._stub, f"{self._method}Session")(
          metadata=self._metadata)
      reader = self._reader = asyncio.ensure_future(self._read(stream))
      try:
        headers = dict(await asyncio.wait_for(stream.initial_metadata(),
                                              _OPEN_TIMEOUT_S) or ())
      except grpc.aio.AioRpcError:
        headers = {}
      except asyncio.TimeoutError:
        stream.cancel()
        await asyncio.wait([reader])
        self._last_end = (grpc.StatusCode.UNAVAILABLE,
                          f"{self._method} session: no answer from "
                          f"{self.address or 'the server'} in "
                          f"{_OPEN_TIMEOUT_S:g} s", ())
        return None
      except asyncio.CancelledError:
        # The caller gave up (its deadline): no stream left half-opened;
        # the next call opens another.
        self._stream = None
        stream.cancel()
        raise
      if headers.get(SESSION_HEADER) != "1":
        await asyncio.wait([reader], timeout=5.0)   # its end, and status
        if self._stream is stream:
          stream.cancel()
          await asyncio.wait([reader])
        return None
    return self._stream

  async def _read(self, stream) -> None:
    code, details, trailing = (grpc.StatusCode.UNAVAILABLE,
                               "the server ended the session", ())
    try:
      async for resp in stream:
        for ev in resp.events:
          c = self._calls.get(ev.call)
          if c is None:
            continue            # cancelled here; its end is not wanted
          if ev.HasField("end"):
            del self._calls[ev.call]
            c._finish(ev.end)
          else:
            c._queue.put_nowait(ev.message)
    except grpc.aio.AioRpcError as e:
      code, details = e.code(), e.details() or e.code().name
      trailing = tuple(e.trailing_metadata() or ())
      if code == grpc.StatusCode.INTERNAL:
        # The transport's, not the server's (which ends a session OK or
        # not at all): a write that raced the stream's end. The calls on
        # it end as calls to a server gone do.
        code, details = grpc.StatusCode.UNAVAILABLE, f"{details} (INTERNAL)"
      if code == grpc.StatusCode.UNIMPLEMENTED:
        log.warning("%s serves no %s sessions (%s): a call per request",
                    self.address or "the server", self._method, details)
        self.supported = False
    except asyncio.CancelledError:
      code, details = grpc.StatusCode.CANCELLED, "the session was closed"
    except Exception as e:  # noqa: BLE001 - every call still must end
      log.exception("%s session to %s", self._method, self.address)
      code, details = grpc.StatusCode.UNKNOWN, repr(e)
    finally:
      self._last_end = (code, f"{self._method} session: {details}", trailing)
      if self._stream is stream:
        self._stream = None
        self._reader = None
      # Calls started on this stream end with it; those registered but not
      # sent yet start on the next one.
      for cid, c in list(self._calls.items()):
        if c._stream is stream:
          del self._calls[cid]
          c._fail(code, f"{self._method} session: {details}", trailing)
      stream.cancel()

  def _forget(self, c: "SessionCall", cancel_sent: bool) -> None:
    if self._calls.pop(c.id, None) is not None and cancel_sent:
      asyncio.ensure_future(self._send_cancel(c))

  async def _send_cancel(self, c: "SessionCall") -> None:
    async with self._write_lock:
      # Only on the stream the call went out on: a new one knows nothing
      # of it (and an ended one cancelled it already).
      if c._stream is not None and c._stream is self._stream:
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError,
                                 asyncio.InvalidStateError):
          await _run_to_end(c._stream.write(
              self._request_type(call=c.id, cancel=True)))

  async def close(self) -> None:
    """Ends the stream: calls still on it end CANCELLED."""
    self._closed = True
    reader, stream = self._reader, self._stream
    if stream is not None:
      stream.cancel()
    if reader is not None:
      reader.cancel()
      await asyncio.wait([reader])
    for c in list(self._calls.values()):
      c._fail(grpc.StatusCode.CANCELLED, "the session was closed")
    self._calls.clear()


class SessionCall:
  """One call on a session: ``async for msg in call`` or ``await
  call.read()``; raises ``grpc.aio.AioRpcError`` as the call would have
  failed."""

  _END = object()

  def __init__(self, session: CallSession, cid: int, request,
               timeout: float | None):
    self._session = session
    self.id = cid
    self._request = request
    self._queue: asyncio.Queue = asyncio.Queue()
    self._stream = None          # the session stream it was sent on
    self._sent = False
    self._status: tuple | None = None   # (code, details, trailing) once done
    self._started = None         # the start message, once sent
    self._own = None             # a call of its own (no sessions)
    self._cancelled = False      # by ``cancel``, here
    self._deadline = (None if timeout is None else
                      time.monotonic() + timeout)
    # Its deadline, kept here too: a server that stops answering cannot
    # hold the call past it.
    self._timer = (None if timeout is None else
                   asyncio.get_running_loop().call_later(
                       max(0.0, timeout), self._cancel_with,
                       grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))

  def _remaining(self) -> float | None:
    """Seconds to the call's deadline (None: none)."""
    if self._deadline is None:
      return None
    return max(0.0, self._deadline - time.monotonic())

  def __aiter__(self):
    return self

  async def __anext__(self):
    msg = await self.read()
    if msg is grpc.aio.EOF:
      raise StopAsyncIteration
    return msg

  async def read(self):
    """The call's next response, or ``grpc.aio.EOF`` once it ended OK."""
    if self._own is not None:
      return await self._own.read()
    if not self._sent:
      if self._deadline is None:
        await self._start()
      else:
        # A server that does not take the start (a session still opening,
        # another call's write held up) cannot hold the call past its
        # deadline: its timer has ended it by then.
        with contextlib.suppress(asyncio.TimeoutError):
          await asyncio.wait_for(self._start(), self._remaining())
    item = await self._queue.get()
    if item is self._END:
      self._queue.put_nowait(item)      # every later read ends too
      code, details, trailing = self._status
      if code == grpc.StatusCode.OK:
        return grpc.aio.EOF
      if self._cancelled:
        raise asyncio.CancelledError()
      if (code == grpc.StatusCode.UNIMPLEMENTED and self._started is not None
          and not self._session.supported):
        # The server serves no sessions: this call as one of its own.
        remaining = self._remaining()
        self._own = self._session._own_call(
            self._started.start.request,
            None if remaining is None else max(0.001, remaining))
        return await self._own.read()
      raise _rpc_error(code, details, trailing)
    return item

  async def _start(self) -> None:
    self._sent = True
    if self._status is not None:
      return                            # cancelled (or past its deadline)
    s = self._session
    msg = s._request_type(call=self.id)
    msg.start.request.CopyFrom(self._request)
    remaining = self._remaining()
    if remaining is not None:   # the server's deadline is the caller's
      msg.start.timeout_ms = max(1, int(remaining * 1000))
    self._request = None
    self._started = msg
    reader = None
    try:
      async with s._write_lock:
        self._stream = await s._open()
        if self._stream is None:
          # No session there: this call as one of its own (``read``), or
          # ended as the stream did.
          if not s.supported:
            self._fail(grpc.StatusCode.UNIMPLEMENTED, f"no {s._method} "
                       "sessions on this server")
          else:
            self._fail(*s._last_end)
          s._calls.pop(self.id, None)
          return
        reader = s._reader
        # Written to the end whatever happens to this caller: a cancelled
        # write would cancel the session's stream, and every call on it.
        await _run_to_end(self._stream.write(msg))
    except (grpc.aio.AioRpcError, grpc.aio.UsageError,
            asyncio.InvalidStateError) as e:
      # The stream ended before the start went out: its reader ends the
      # call (it is on that stream) with the stream's status, which the
      # failed write does not tell (a server without sessions answers
      # UNIMPLEMENTED, a write racing that "RPC already finished").
      if reader is not None and self._status is None:
        await asyncio.wait([reader], timeout=5.0)
      if self._status is None:
        s._calls.pop(self.id, None)
        self._fail(grpc.StatusCode.UNAVAILABLE, f"{s._method} session: {e}")

  def _finish(self, end) -> None:
    self._fail(_CODES.get(end.code, grpc.StatusCode.UNKNOWN), end.details,
               tuple((m.key, m.value) for m in end.trailing_metadata))

  def _fail(self, code: grpc.StatusCode, details: str, trailing=()) -> bool:
    if self._status is not None:
      return False
    self._status = (code, details, tuple(trailing))
    self._queue.put_nowait(self._END)
    if self._timer is not None:
      self._timer.cancel()
    return True

  def _cancel_with(self, code: grpc.StatusCode, details: str) -> bool:
    if not self._fail(code, details):
      return False
    self._session._forget(self, cancel_sent=self._sent)
    return True

  def cancel(self) -> bool:
    """Cancels the call (the server frees what it holds at once); False when it
    had ended already."""
    if self._own is not None:
      return self._own.cancel()
    if self._status is not None:
      return False
    self._cancelled = True
    return self._cancel_with(grpc.StatusCode.CANCELLED, "Cancelled")


__all__ = ["CallSession", "SESSION_HEADER", "SessionCall"]
