"""OpenAI response JSON: whole responses, stream chunks, usage, logprobs.

One ``Formatter`` per request builds every object the client receives, so
the id, ``created`` and ``model`` of its chunks agree. The two endpoints
differ only in how a choice's text is wrapped (``text`` against a chat
``message``/``delta``) and in their logprobs layout.

Logprobs name tokens with the gateway's tokenizer when it has one
(``token_id:N`` otherwise, as vLLM's ``return_tokens_as_token_ids``); a
token's ``bytes`` are its own bytes, also where it ends inside a UTF-8
character. A completion's ``text_offset`` is where each token's text starts
in the text the client received: the router sends a message's text for all
its tokens at once, so the tokenizer splits it (a token that completes no
character adds nothing), and without one every token of a message starts
where the message's text does. Offsets never pass the text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from pdjax.client import Usage
from pdjax.gateway.choices import ChoiceDelta
from pdjax.gateway.protocol import Params
from pdjax.tokenizer import IncrementalDetokenizer, Tokenizer


def token_id_text(token_id: int) -> str:
  """A token's name when the gateway has no tokenizer (vLLM's
  ``return_tokens_as_token_ids`` form)."""
  return f"token_id:{token_id}"


class UsageTally:
  """Token counts over every choice of a request.

  Completion tokens are counted as received (so a choice a stop string
  ended counts the tokens that reached the gateway, not what the router
  would have generated). Each prompt's tokens count once, however many
  choices it has: from the router's usage of any of its choices (the
  router sends the prompt's with a choice's first tokens, and all of it
  with the last), or, when none came (a router that sends usage only at
  the end, and every choice ended early by a stop string), from that
  prompt's counter, the cached-token count then unknown.

  Speculative decoding's counts come with each choice's last router
  message; a choice that had drafts reports them in
  ``completion_tokens_details`` (OpenAI's accepted/rejected prediction
  tokens), summed over the choices, and the details are left out when
  nothing was drafted.
  """

  def __init__(self, prompt_tokens: Sequence[Callable[[], int | None]], *,
               choices_per_prompt: int = 1):
    self._prompt_tokens = list(prompt_tokens)
    self._n = choices_per_prompt
    self._completion = 0
    self._router: dict[int, Usage] = {}    # by prompt
    self._spec: dict[int, tuple[int, int]] = {}   # by choice

  def add(self, d: ChoiceDelta) -> None:
    self._completion += len(d.token_ids)
    if d.usage is not None:
      self._router.setdefault(d.index // self._n, d.usage)
      if d.usage.spec_draft_tokens:
        self._spec[d.index] = (d.usage.spec_draft_tokens,
                               d.usage.spec_accepted_tokens)

  def to_json(self) -> dict[str, Any]:
    prompt, cached = 0, 0
    for i, count in enumerate(self._prompt_tokens):
      usage = self._router.get(i)
      if usage is None:
        prompt += count() or 0
        cached = None
      else:
        prompt += usage.prompt_tokens
        if cached is not None:
          cached += usage.cached_prompt_tokens
    out: dict[str, Any] = {"prompt_tokens": prompt,
                           "completion_tokens": self._completion,
                           "total_tokens": prompt + self._completion}
    if cached is not None:
      out["prompt_tokens_details"] = {"cached_tokens": cached}
    drafted = sum(d for d, _ in self._spec.values())
    if drafted:
      accepted = sum(a for _, a in self._spec.values())
      out["completion_tokens_details"] = {
          "accepted_prediction_tokens": accepted,
          "rejected_prediction_tokens": drafted - accepted}
    return out


def collect(deltas: Iterable[ChoiceDelta]) -> list[ChoiceDelta]:
  """Each choice's deltas joined into one, ordered by index."""
  by_index: dict[int, ChoiceDelta] = {}
  for d in deltas:
    acc = by_index.setdefault(d.index, ChoiceDelta(d.index, "", [], []))
    acc.text += d.text
    acc.token_ids.extend(d.token_ids)
    acc.logprobs.extend(d.logprobs)
    acc.finish_reason = d.finish_reason or acc.finish_reason
  return [by_index[i] for i in sorted(by_index)]


@dataclasses.dataclass
class Formatter:
  """Builds one request's JSON objects (subclasses: one per endpoint).
  ``tokenizer`` (optional) names logprob tokens and splits text between
  them."""
  request_id: str
  model: str
  created: int
  params: Params
  tokenizer: Tokenizer | None = None

  object_name = ""
  chunk_object = ""

  def __post_init__(self):
    self._started: set[int] = set()
    self._text_len: dict[int, int] = {}    # text sent so far, by choice
    self._detok: dict[int, IncrementalDetokenizer] = {}
    # A whole response's text offsets, by choice (``response``).
    self._whole_offsets: dict[int, list[int]] | None = None

  # ---- tokens
  def token_text(self, token_id: int) -> str:
    if self.tokenizer is None:
      return token_id_text(token_id)
    return self.tokenizer.decode([token_id], skip_special_tokens=False)

  def token_bytes(self, token_id: int) -> list[int]:
    if self.tokenizer is None:
      return list(token_id_text(token_id).encode())
    return list(self.tokenizer.token_bytes(token_id))

  def _text_offsets(self, c: ChoiceDelta) -> list[int]:
    """Where each of ``c``'s tokens starts in the choice's text (see the
    module docstring); advances the choice's position by ``c.text``."""
    start = self._text_len.get(c.index, 0)
    end = start + len(c.text)
    self._text_len[c.index] = end
    if self.tokenizer is None:
      return [start] * len(c.token_ids)
    detok = self._detok.get(c.index)
    if detok is None:
      detok = self._detok[c.index] = IncrementalDetokenizer(
          self.tokenizer, skip_special_tokens=self.params.skip_special_tokens)
    offsets, pos = [], start
    for t in c.token_ids:
      offsets.append(min(pos, end))
      pos += len(detok.push([t]))
    return offsets

  # ---- per endpoint
  def _choice(self, c: ChoiceDelta) -> dict[str, Any]:
    raise NotImplementedError

  def _chunk_choices(self, d: ChoiceDelta) -> list[dict[str, Any]]:
    """The choice objects of ``d``'s chunks (one chunk each; none when it
    carries nothing the client asked for, e.g. text still held back)."""
    raise NotImplementedError

  # ---- shared
  def _head(self, object_name: str) -> dict[str, Any]:
    return {"id": self.request_id, "object": object_name,
            "created": self.created, "model": self.model}

  def _extras(self, out: dict[str, Any], c: ChoiceDelta) -> dict[str, Any]:
    if self.params.return_token_ids:
      out["token_ids"] = list(c.token_ids)
    return out

  def response(self, deltas: list[ChoiceDelta],
               usage: UsageTally) -> dict[str, Any]:
    """The whole (non-streaming) response, from every choice's deltas in
    the order they arrived."""
    if self.params.logprobs:
      # Offsets by delta, as a stream would have them (a delta's text is
      # what its tokens are known to make).
      self._whole_offsets = {}
      for d in deltas:
        self._whole_offsets.setdefault(d.index, []).extend(
            self._text_offsets(d))
    return {**self._head(self.object_name),
            "choices": [self._extras(self._choice(c), c)
                        for c in collect(deltas)],
            "usage": usage.to_json()}

  def chunks(self, d: ChoiceDelta) -> list[dict[str, Any]]:
    """The stream chunks for one delta (maybe none)."""
    out = []
    for choice in self._chunk_choices(d):
      chunk = {**self._head(self.chunk_object), "choices": [choice]}
      if self.params.include_usage:
        chunk["usage"] = None   # as OpenAI: only the last chunk has usage
      out.append(chunk)
    self._started.add(d.index)
    return out

  def usage_chunk(self, usage: UsageTally) -> dict[str, Any]:
    """The last chunk with ``stream_options.include_usage``."""
    return {**self._head(self.chunk_object), "choices": [],
            "usage": usage.to_json()}

  def _carries(self, d: ChoiceDelta) -> bool:
    """Whether ``d`` has anything for the client: text, the end, or
    tokens when their logprobs or ids were asked for."""
    wants_tokens = self.params.logprobs or self.params.return_token_ids
    return bool(d.text or d.finish_reason is not None
                or (wants_tokens and d.token_ids))



class CompletionFormatter(Formatter):
  """``text_completion`` objects."""
  object_name = "text_completion"
  chunk_object = "text_completion"

  def _logprobs(self, c: ChoiceDelta) -> dict[str, Any] | None:
    if not self.params.logprobs:
      return None
    tokens = [self.token_text(t) for t in c.token_ids]
    offsets = (self._text_offsets(c) if self._whole_offsets is None
               else self._whole_offsets[c.index])
    return {"tokens": tokens, "token_logprobs": list(c.logprobs),
            # The chosen token only: pdjax returns no alternatives.
            "top_logprobs": [{t: lp} for t, lp in zip(tokens, c.logprobs)],
            "text_offset": offsets}

  def _choice(self, c: ChoiceDelta) -> dict[str, Any]:
    return {"index": c.index, "text": c.text, "logprobs": self._logprobs(c),
            "finish_reason": c.finish_reason}

  def _chunk_choices(self, d: ChoiceDelta) -> list[dict[str, Any]]:
    return [self._extras(self._choice(d), d)] if self._carries(d) else []


class ChatFormatter(Formatter):
  """``chat.completion`` objects; a stream opens each choice with a chunk
  whose delta carries the assistant role, as OpenAI's does."""
  object_name = "chat.completion"
  chunk_object = "chat.completion.chunk"

  def _logprobs(self, c: ChoiceDelta) -> dict[str, Any] | None:
    if not self.params.logprobs:
      return None
    content = []
    for t, lp in zip(c.token_ids, c.logprobs):
      text = self.token_text(t)
      content.append({"token": text, "logprob": lp,
                      "bytes": self.token_bytes(t), "top_logprobs": []})
    return {"content": content}

  def _choice(self, c: ChoiceDelta) -> dict[str, Any]:
    return {"index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": self._logprobs(c), "finish_reason": c.finish_reason}

  def _chunk_choices(self, d: ChoiceDelta) -> list[dict[str, Any]]:
    out = []
    if d.index not in self._started:
      out.append({"index": d.index,
                  "delta": {"role": "assistant", "content": ""},
                  "logprobs": None, "finish_reason": None})
    if not self._carries(d):
      return out
    delta = {"content": d.text} if d.text or d.finish_reason is None else {}
    out.append(self._extras({"index": d.index, "delta": delta,
                             "logprobs": self._logprobs(d),
                             "finish_reason": d.finish_reason}, d))
    return out


__all__ = ["ChatFormatter", "CompletionFormatter", "Formatter", "UsageTally",
           "collect", "token_id_text"]
