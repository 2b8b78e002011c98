"""An OpenAI-compatible completions server as a batch-eval ``Backend``.

The same workload, arrival process and metric definitions can then be
offered to pdjax's gateway (``pdjax.launch.gateway``) and to other servers
that speak OpenAI's API (vLLM, SGLang), so their numbers compare, and to
pdjax's router directly, which tells the gateway's own cost.

Each request is one streamed ``POST /v1/completions`` with the prompt as
token ids (or text), ``stream_options.include_usage`` for the server's token
counts, and vLLM's extensions where the run sets them (``top_k``,
``min_p``, ``min_tokens``, the penalties, ``ignore_eos``, ``stop_token_ids``,
``return_token_ids``). Token times come
from the chunks: a chunk that carries ``token_ids`` (pdjax's gateway, vLLM
with ``return_token_ids``) counts those; one without counts as one token per
non-empty chunk, as vLLM's own serving benchmark counts, with -1 as the id.
An HTTP error, or an error event inside the stream, fails the request with
the server's message; ``code()`` gives the HTTP status (``"HTTP 429"``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from pdjax.eval.load import Delta
from pdjax.eval.workloads import WorkItem

# A chunk without token ids stands for one token of unknown id.
UNKNOWN_TOKEN_ID = -1


class OpenAIError(Exception):
  """A request the server refused or failed; ``code()`` and ``details()``
  as the batch-eval runner reads them from gRPC errors."""

  def __init__(self, status: int | None, message: str):
    super().__init__(message)
    self.status = status
    self.message = message

  def code(self) -> str:
    return "STREAM_ERROR" if self.status is None else f"HTTP {self.status}"

  def details(self) -> str:
    return self.message


def _error_message(body: Any, fallback: str) -> str:
  if isinstance(body, dict) and isinstance(body.get("error"), dict):
    return str(body["error"].get("message") or fallback)
  return fallback


def base_url(target: str) -> str:
  """``host:port``, ``http://host:port`` or ``.../v1`` -> the API's base."""
  url = target if "://" in target else f"http://{target}"
  url = url.rstrip("/")
  return url if url.endswith("/v1") else f"{url}/v1"


class OpenAIBackend:
  """Streams ``/v1/completions``; create it inside the event loop."""

  def __init__(self, target: str, *, model: str | None = None,
               api_key: str | None = None, timeout_s: float | None = None):
    self.url = base_url(target)
    self.model = model
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    self._session = aiohttp.ClientSession(
        headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s),
        # No pool cap: a rate sweep keeps many requests in flight at once.
        # Idle connections are dropped before servers drop them (uvicorn
        # after 5 s, the pdjax gateway after its header timeout): a request
        # sent on a connection the server is closing fails.
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=2.0))

  async def _model(self) -> str:
    """The served model: --model, else the first of ``/v1/models``."""
    if self.model is None:
      async with self._session.get(f"{self.url}/models") as r:
        body = await r.json(content_type=None)
        if r.status != 200:
          raise OpenAIError(r.status, _error_message(body, r.reason or ""))
        self.model = body["data"][0]["id"]
    return self.model

  def body(self, item: WorkItem, sampling: dict[str, Any],
           model: str) -> dict[str, Any]:
    """The request for ``item``: unset sampling fields stay unsent, so the
    server's defaults apply; the seed is the run's seed + the item's index,
    as the pdjax backend sends it."""
    body: dict[str, Any] = {
        "model": model, "max_tokens": item.max_tokens, "stream": True,
        "stream_options": {"include_usage": True}, "return_token_ids": True,
        "prompt": (item.prompt_token_ids if item.prompt_token_ids is not None
                   else item.prompt)}
    for name in ("temperature", "top_p"):
      if sampling.get(name) is not None:
        body[name] = sampling[name]
    # vLLM's extensions, where set.
    for name in ("top_k", "min_p", "min_tokens", "presence_penalty",
                 "frequency_penalty"):
      if sampling.get(name):
        body[name] = sampling[name]
    if sampling.get("repetition_penalty", 1) != 1:
      body["repetition_penalty"] = sampling["repetition_penalty"]
    if sampling.get("seed") is not None:
      body["seed"] = sampling["seed"] + item.index
    if sampling.get("ignore_eos"):
      body["ignore_eos"] = True
    if sampling.get("stop_token_ids"):
      body["stop_token_ids"] = list(sampling["stop_token_ids"])
    return body

  async def stream(self, item: WorkItem,
                   sampling: dict[str, Any]) -> AsyncIterator[Delta]:
    body = self.body(item, sampling, await self._model())
    async with self._session.post(f"{self.url}/completions",
                                  json=body) as r:
      if r.status != 200:
        text = await r.text()
        try:
          parsed = json.loads(text)
        except json.JSONDecodeError:
          parsed = None
        raise OpenAIError(r.status, _error_message(parsed, text or r.reason))
      async for raw in r.content:
        line = raw.decode().strip()
        if not line.startswith("data:"):
          continue              # blank separators, comments, keep-alives
        data = line[len("data:"):].strip()
        if data == "[DONE]":
          return
        delta = self._delta(json.loads(data))
        if delta is not None:
          yield delta
    raise OpenAIError(None, "the stream ended without data: [DONE]")

  @staticmethod
  def _delta(chunk: dict[str, Any]) -> Delta | None:
    if "error" in chunk:
      raise OpenAIError(None, _error_message(chunk, json.dumps(chunk)))
    usage = chunk.get("usage")
    if usage is not None:
      usage = dict(usage)
      details = usage.pop("prompt_tokens_details", None) or {}
      if details.get("cached_tokens") is not None:
        usage["cached_prompt_tokens"] = details["cached_tokens"]
      # Speculative decoding's drafts (pdjax's gateway reports them as
      # OpenAI's prediction tokens): as the router's usage names them.
      details = usage.pop("completion_tokens_details", None) or {}
      accepted = details.get("accepted_prediction_tokens")
      if accepted is not None:
        usage["spec_accepted_tokens"] = accepted
        usage["spec_draft_tokens"] = accepted + (
            details.get("rejected_prediction_tokens") or 0)
    choices = chunk.get("choices") or []
    if not choices:
      return None if usage is None else Delta([], usage=usage)
    choice = choices[0]
    text = choice.get("text") or ""
    ids = choice.get("token_ids")
    if ids is None:
      ids = [UNKNOWN_TOKEN_ID] if text else []
    return Delta(list(ids), text, choice.get("finish_reason"), usage)

  async def aclose(self) -> None:
    await self._session.close()


__all__ = ["OpenAIBackend", "OpenAIError", "UNKNOWN_TOKEN_ID", "base_url"]
