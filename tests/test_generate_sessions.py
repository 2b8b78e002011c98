"""A client's Generate calls as messages on one ``GenerateSession`` stream:
``pdjax.client.AsyncClient(sessions=True)`` against the real
``RouterServicer`` over loopback gRPC, in front of a decode worker with a
fake engine (``test_worker_sessions.router_with_a_worker``). A request on
the session ends as the same request on a call of its own: the same
tokens, the same status and details; cancelling it frees the decode slot;
the client's token rides on the stream; a drain ends the sessions."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdjax.client import AsyncClient, GenerationError
from pdjax.service import common

from test_worker_sessions import router_with_a_worker


async def _outcome(client: AsyncClient, **request):
  """(token ids, None) or (token ids so far, (code, details))."""
  tokens = []
  try:
    async for d in client.stream(**request):
      tokens.extend(d.token_ids)
  except GenerationError as e:
    return tokens, (e.code(), e.details())
  return tokens, None


def test_requests_on_a_session_end_as_calls_of_their_own():
  """Six requests at once and one refused (a token id past the vocabulary)
  give the same tokens and the same status on the session as on calls;
  the session's requests shared one stream."""

  async def go():
    async with router_with_a_worker() as (w, servicer, address):
      requests = [dict(prompt_token_ids=[1, 2, 3 + i], max_tokens=3)
                  for i in range(6)]
      requests.append(dict(prompt_token_ids=[1, 99], max_tokens=3))
      results = {}
      for sessions in (False, True):
        async with AsyncClient(address, timeout_s=10,
                               sessions=sessions) as c:
          results[sessions] = await asyncio.gather(
              *[_outcome(c, **r) for r in requests])
          assert servicer.sessions.open == int(sessions)
          (gauge,) = servicer.metrics.sessions.collect()
          assert gauge.samples[0].value == int(sessions)   # pdjax_sessions
      assert results[True] == results[False]
      assert all(status is None and len(tokens) == 3
                 for tokens, status in results[True][:-1])
      assert results[True][-1][1][0] == grpc.StatusCode.INVALID_ARGUMENT
      assert servicer.inflight == 0 and w.worker.streams == 0

  asyncio.run(go())


def test_cancelling_a_request_on_a_session_frees_its_decode_slot():
  """A request the worker holds (no token yet), cancelled by its consumer:
  the router's handler ends and the worker's stream with it, while the
  session stays open for the next request."""

  async def go():
    async with router_with_a_worker() as (w, servicer, address):
      async with AsyncClient(address, timeout_s=10, sessions=True) as c:
        task = asyncio.ensure_future(_outcome(
            c, prompt_token_ids=[1, 2], max_tokens=3, request_id="held-1"))
        await asyncio.wait_for(w.engine.arrived.wait(), 5)
        assert servicer.inflight == 1 and w.worker.streams == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
          await task
        for _ in range(500):
          if servicer.inflight == 0 and w.worker.streams == 0:
            break
          await asyncio.sleep(0.01)
        assert servicer.inflight == 0 and w.worker.streams == 0
        tokens, status = await _outcome(c, prompt_token_ids=[1, 2],
                                        max_tokens=2)
        assert status is None and tokens
        assert servicer.sessions.open == 1

  asyncio.run(go())


def test_the_session_carries_the_clients_token():
  """A router that wants a bearer token checks it on the session's stream:
  with it the requests run, without it they fail UNAUTHENTICATED, as
  calls of their own would."""

  async def go():
    async with router_with_a_worker(
        security=common.Security(token="secret")) as (_, servicer, address):
      async with AsyncClient(address, timeout_s=10, token="secret",
                             sessions=True) as c:
        tokens, status = await _outcome(c, prompt_token_ids=[1, 2],
                                        max_tokens=2)
        assert status is None and tokens
        assert servicer.sessions.open == 1
      for sessions in (True, False):
        async with AsyncClient(address, timeout_s=10,
                               sessions=sessions) as c:
          tokens, status = await _outcome(c, prompt_token_ids=[1, 2],
                                          max_tokens=2)
          assert tokens == [] and status[0] == grpc.StatusCode.UNAUTHENTICATED

  asyncio.run(go())


def test_a_drain_ends_the_routers_sessions():
  """A draining router ends its open sessions once nothing runs (an open
  stream would hold its graceful stop); the client's next request finds
  the router draining: UNAVAILABLE, as a call of its own gets."""

  async def go():
    async with router_with_a_worker() as (_, servicer, address):
      async with AsyncClient(address, timeout_s=10, sessions=True) as c:
        tokens, status = await _outcome(c, prompt_token_ids=[1, 2],
                                        max_tokens=2)
        assert status is None and servicer.sessions.open == 1
        assert await servicer.drain(timeout_s=1.0) == 0
        assert servicer.sessions.open == 0
        tokens, status = await _outcome(c, prompt_token_ids=[1, 2],
                                        max_tokens=2)
        assert tokens == [] and status[0] == grpc.StatusCode.UNAVAILABLE
      async with AsyncClient(address, timeout_s=10) as c:
        _, status = await _outcome(c, prompt_token_ids=[1, 2], max_tokens=2)
        assert status[0] == grpc.StatusCode.UNAVAILABLE

  asyncio.run(go())
