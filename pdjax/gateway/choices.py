"""The router calls behind one OpenAI request: one per choice, merged.

Lifecycle of a request with ``n`` choices:

  1. choice i is one ``RouterConnection.stream`` call (its own request id and,
     with a seed, seed + i), started together with the others;
  2. each call's deltas go through that choice's ``StopMatcher``; a stop
     string ends the choice at once and closes its stream, which cancels
     the router call so the decode slot is freed;
  3. the choices' deltas are merged in arrival order into one stream of
     ``ChoiceDelta``; the last delta of each choice carries its finish
     reason;
  4. a failed call fails the whole request (``GenerationError``), and
     closing the merged stream early (the HTTP client went away) cancels
     every call still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from pdjax.client import GenerationError, Usage
from pdjax.gateway.router_connection import RouterConnection
from pdjax.gateway.stops import StopMatcher


@dataclasses.dataclass
class ChoiceDelta:
  """New output of one choice.

  ``finish_reason`` ("stop" or "length") is set on the choice's last delta.
  ``usage`` is the router's accounting where a message carried it: the
  prompt's with the first tokens, all of it on the last delta of a choice
  the router finished itself.
  """
  index: int
  text: str
  token_ids: list[int]
  logprobs: list[float]
  finish_reason: str | None = None
  usage: Usage | None = None


@dataclasses.dataclass(frozen=True)
class RouterCall:
  """One choice's router call: ``RouterConnection.stream`` arguments."""
  index: int
  prompt: str | None
  options: dict[str, Any]


async def run_choice(client: RouterConnection, call: RouterCall,
                     stops: Sequence[str], include_stop: bool = False
                     ) -> AsyncIterator[ChoiceDelta]:
  """Streams one choice, ending it at the first stop string (its text
  included with ``include_stop``). As vLLM, none is matched before the
  output holds ``min_tokens`` tokens (a message is matched whole once its
  last token reaches that count)."""
  matcher = StopMatcher(stops, include_stop)
  min_tokens = call.options.get("min_tokens") or 0
  received = 0
  stream = client.stream(call.prompt, **call.options)
  async with contextlib.aclosing(stream):
    async for d in stream:
      received += len(d.token_ids)
      text = matcher.push(d.text, match=received >= min_tokens)
      if matcher.stopped:
        # Cancel the router call before telling anyone: the slot is free
        # by the time the client sees the end.
        await stream.aclose()
        yield ChoiceDelta(call.index, text, d.token_ids, d.logprobs, "stop",
                          d.usage)
        return
      if d.finish_reason is None:
        yield ChoiceDelta(call.index, text, d.token_ids, d.logprobs,
                          usage=d.usage)
        continue
      if d.finish_reason not in ("stop", "length"):
        raise GenerationError(
            grpc.StatusCode.ABORTED if d.finish_reason == "abort"
            else grpc.StatusCode.INTERNAL,
            f"request {d.request_id} ended with finish reason "
            f"{d.finish_reason!r}")
      yield ChoiceDelta(call.index, text + matcher.flush(), d.token_ids,
                        d.logprobs, d.finish_reason, d.usage)
      return
  raise GenerationError(grpc.StatusCode.INTERNAL,
                        f"the router's stream for choice {call.index} ended "
                        "without a finish reason")


_END = object()


async def merge(streams: Sequence[AsyncIterator[ChoiceDelta]]
                ) -> AsyncIterator[ChoiceDelta]:
  """Items of every stream as they arrive; the first failure is raised and
  cancels the rest, as does closing this generator."""
  if len(streams) == 1:
    async with contextlib.aclosing(streams[0]) as only:
      async for item in only:
        yield item
    return
  queue: asyncio.Queue = asyncio.Queue()

  async def pump(stream):
    try:
      async with contextlib.aclosing(stream):
        async for item in stream:
          queue.put_nowait((item, None))
    except Exception as e:  # handed to the consumer, which raises it
      queue.put_nowait((None, e))
      return
    queue.put_nowait((_END, None))

  tasks = [asyncio.create_task(pump(s)) for s in streams]
  try:
    live = len(tasks)
    while live:
      item, error = await queue.get()
      if error is not None:
        raise error
      if item is _END:
        live -= 1
      else:
        yield item
  finally:
    for t in tasks:
      t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def run_choices(client: RouterConnection, calls: Sequence[RouterCall],
                stops: Sequence[str], include_stop: bool = False
                ) -> AsyncIterator[ChoiceDelta]:
  """Every choice's deltas, merged (see the module docstring)."""
  return merge([run_choice(client, c, stops, include_stop) for c in calls])


__all__ = ["ChoiceDelta", "RouterCall", "merge", "run_choice", "run_choices"]
