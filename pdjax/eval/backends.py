"""The servers a workload can be offered to, as ``load.Backend``s.

Two adapters, the only code of ``pdjax.eval`` that knows how a request
reaches a server: ``RouterBackend`` streams from pdjax's router through
``pdjax.client.AsyncClient`` (gRPC, every field of the router's usage kept),
and ``pdjax.eval.openai_backend.OpenAIBackend`` from an OpenAI-compatible
server's ``/v1/completions`` (pdjax's gateway, vLLM, SGLang). Both send the
run's sampling with seed + the item's index, so the same workload is the
same requests on either.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import AsyncIterator
from typing import Any

from pdjax.eval.load import Backend, Delta
from pdjax.eval.workloads import WorkItem

KINDS = ("pdjax", "openai")


class RouterBackend:
  """``pdjax.client.AsyncClient`` (or anything with its ``stream``) as a
  ``Backend``."""

  def __init__(self, client: Any):
    self._client = client

  async def stream(self, item: WorkItem,
                   sampling: dict[str, Any]) -> AsyncIterator[Delta]:
    seed = sampling.get("seed")
    async for out in self._client.stream(
        prompt=item.prompt, prompt_token_ids=item.prompt_token_ids,
        max_tokens=item.max_tokens, temperature=sampling.get("temperature"),
        top_p=sampling.get("top_p"), top_k=sampling.get("top_k"),
        min_p=sampling.get("min_p") or None,
        min_tokens=sampling.get("min_tokens") or None,
        presence_penalty=sampling.get("presence_penalty") or None,
        frequency_penalty=sampling.get("frequency_penalty") or None,
        repetition_penalty=(None if sampling.get("repetition_penalty", 1)
                            == 1 else sampling["repetition_penalty"]),
        seed=None if seed is None else seed + item.index,
        stop_token_ids=sampling.get("stop_token_ids"),
        ignore_eos=sampling.get("ignore_eos"), request_id=item.request_id):
      usage = out.usage
      if usage is not None and not isinstance(usage, dict):
        # Every field the router reports (TTFT, prefill and KV hand-off
        # time, workers): the results file is where the share of TTFT the
        # hand-off takes is read from.
        usage = (dataclasses.asdict(usage) if dataclasses.is_dataclass(usage)
                 else {k: getattr(usage, k) for k in
                       ("prompt_tokens", "completion_tokens")
                       if hasattr(usage, k)})
      yield Delta(list(out.token_ids), out.text or "", out.finish_reason,
                  usage)

  async def aclose(self) -> None:
    close = getattr(self._client, "close", None)
    if close is not None:
      res = close()
      if inspect.isawaitable(res):
        await res


def make_backend(target: str, kind: str = "pdjax", *,
                 model: str | None = None,
                 api_key: str | None = None,
                 sessions: bool = False) -> Backend:
  """The server at ``target`` as a Backend (call inside the event loop):
  pdjax's router (``host:port``; ``sessions``: its requests on one
  ``GenerateSession`` stream), or an OpenAI-compatible server
  (``kind="openai"``, ``http://host:port``; ``model`` and ``api_key`` are
  its)."""
  if kind == "openai":
    from pdjax.eval.openai_backend import OpenAIBackend
    return OpenAIBackend(target, model=model, api_key=api_key)
  if kind != "pdjax":
    raise ValueError(f"backend must be one of {KINDS}, got {kind!r}")
  from pdjax import client
  return RouterBackend(client.AsyncClient(target, sessions=sessions))


__all__ = ["KINDS", "RouterBackend", "make_backend"]
