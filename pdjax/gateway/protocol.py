"""OpenAI request bodies -> what the gateway asks the router for.

Every field is checked here, before any router call, and every refusal is a
400 whose ``param`` names the field. Three kinds of fields:

* supported: translated into ``pdjax.client.build_request`` arguments
  (sampling named as vLLM names it, so most pass straight through), plus
  the parts the gateway does itself (``n``, ``stop`` strings, streaming);
* supported only at their default value (``echo``, ``best_of``,
  ``logit_bias``, tools...): pdjax has no engine support for them, so a
  request that sets them is refused rather than silently served without;
* unknown: ignored, as vLLM and OpenAI ignore them (logged at debug).

A field sent as JSON ``null`` counts as not sent (OpenAI's SDKs send nulls).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

from pdjax.gateway.errors import bad_request

log = logging.getLogger(__name__)

MAX_N = 128                # choices per prompt (OpenAI's own limit)
MAX_CHOICES = 1024         # choices per request, over a batch of prompts
_INT32_MAX = 2**31 - 1     # max_tokens, top_k, token ids are int32 in the proto
_SEED_LIMIT = 2**63        # the engines take seeds in [0, 2**63)


@dataclasses.dataclass(frozen=True)
class Params:
  """The fields both endpoints share, checked.

  ``None`` sampling fields stay unset in the router request, so the router's
  defaults (vLLM's) apply.
  """
  model: str | None = None
  n: int = 1
  stream: bool = False
  include_usage: bool = False
  stop: tuple[str, ...] = ()
  # The matched stop string ends the output text instead of being cut.
  include_stop_str_in_output: bool = False
  logprobs: bool = False
  return_token_ids: bool = False
  max_tokens: int | None = None
  temperature: float | None = None
  top_p: float | None = None
  top_k: int | None = None
  min_p: float | None = None
  min_tokens: int | None = None
  presence_penalty: float | None = None
  frequency_penalty: float | None = None
  repetition_penalty: float | None = None
  seed: int | None = None
  stop_token_ids: tuple[int, ...] = ()
  ignore_eos: bool = False
  # False opts out of the decode pool's speculative decoding; None: the
  # pool's setting applies.
  speculative: bool | None = None
  skip_special_tokens: bool = True
  cache_salt: str | None = None

  def router_options(self, index: int, request_id: str) -> dict[str, Any]:
    """``build_request`` keyword arguments for choice ``index`` (no prompt).

    With a seed, choice i samples with ``seed + i``: the choices differ,
    and the same request reproduces every one of them.
    """
    seed = None if self.seed is None else self.seed + index
    return dict(max_tokens=self.max_tokens, temperature=self.temperature,
                top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                min_tokens=self.min_tokens,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty, seed=seed,
                stop_token_ids=list(self.stop_token_ids) or None,
                ignore_eos=self.ignore_eos, speculative=self.speculative,
                request_id=request_id,
                skip_special_tokens=self.skip_special_tokens,
                cache_salt=self.cache_salt)


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt, as text or as token ids (exactly one is set)."""
  text: str | None = None
  token_ids: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
  """``POST /v1/completions``: one prompt or a batch of them; prompt i's
  choice j is choice ``i * n + j`` of the response, as vLLM numbers them."""
  params: Params
  prompts: tuple[Prompt, ...]
  add_special_tokens: bool | None = None


@dataclasses.dataclass(frozen=True)
class ChatRequest:
  """``POST /v1/chat/completions``: messages for the chat template, their
  content flattened to strings. ``max_tokens`` None means "to the end of
  the context" (the server fills it in from the model's length)."""
  params: Params
  messages: tuple[dict[str, Any], ...]


# ------------------------------------------------------------ field reading
def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Body:
  """Typed reads from a JSON object; remembers which keys were read."""

  def __init__(self, body: Any):
    if not isinstance(body, dict):
      raise bad_request(None, "the request body must be a JSON object")
    self._body = body
    self._read: set[str] = set()

  def raw(self, name: str) -> Any:
    self._read.add(name)
    return self._body.get(name)

  def int(self, name: str, lo: int, hi: int = _INT32_MAX) -> int | None:
    v = self.raw(name)
    if v is None:
      return None
    if not _is_int(v):
      raise bad_request(name, f"must be an integer, got {v!r}")
    if not lo <= v <= hi:
      raise bad_request(name, f"must be in [{lo}, {hi}], got {v}")
    return v

  def number(self, name: str, check: Callable[[float], bool],
             rule: str) -> float | None:
    v = self.raw(name)
    if v is None:
      return None
    if not _is_number(v) or not math.isfinite(v):
      raise bad_request(name, f"must be a finite number, got {v!r}")
    if not check(v):
      raise bad_request(name, f"must be {rule}, got {v}")
    return float(v)

  def bool(self, name: str, default: bool | None) -> bool | None:
    v = self.raw(name)
    if v is None:
      return default
    if not isinstance(v, bool):
      raise bad_request(name, f"must be true or false, got {v!r}")
    return v

  def str(self, name: str) -> str | None:
    v = self.raw(name)
    if v is not None and not isinstance(v, str):
      raise bad_request(name, f"must be a string, got {v!r}")
    return v

  def unknown(self) -> list[str]:
    return sorted(set(self._body) - self._read)


def all_ints(v: list) -> bool:
  """Whether every item of the JSON list ``v`` is an integer (JSON gives
  ``int`` itself, never a subclass but ``bool``): one pass, a prompt of
  token ids being on its first token's way."""
  return all(type(t) is int for t in v)


def _in_range(v: list, name: str) -> tuple[int, ...]:
  """The integer list ``v`` as token ids, each in [0, INT32_MAX]. With
  ``all_ints`` the only passes over the ids (512 ids took 0.18 ms of a
  request parsed in four, on the development CPU; 0.07 ms since)."""
  if v and (min(v) < 0 or max(v) > _INT32_MAX):
    t = next(t for t in v if not 0 <= t <= _INT32_MAX)
    raise bad_request(name, f"token id {t} is out of range")
  return tuple(v)


def _token_ids(v: Any, name: str) -> tuple[int, ...]:
  if not isinstance(v, list) or not all_ints(v):
    raise bad_request(name, "must be a list of integer token ids")
  return _in_range(v, name)


# ---------------------------------------------------- unsupported fields
def _within_two(v: float) -> bool:
  return -2 <= v <= 2


def _falsy(v: Any) -> bool:
  return not v


def _one(v: Any) -> bool:
  return v == 1


def _text_format(v: Any) -> bool:
  return isinstance(v, dict) and v.get("type") == "text"


def _no_tool_choice(v: Any) -> bool:
  return v == "none"


# (field, is its value the default?, why it is refused). JSON null is always
# the default. Both endpoints.
_UNSUPPORTED_COMMON = (
    ("logit_bias", _falsy, "pdjax cannot bias logits"),
    ("best_of", _one, "pdjax samples each choice once (use n)"),
    ("use_beam_search", _falsy, "pdjax has no beam search"),
    ("prompt_logprobs", _falsy, "pdjax returns no prompt logprobs"),
    ("response_format", _text_format,
     "pdjax has no structured (JSON/grammar) output"),
    ("guided_json", _falsy, "pdjax has no structured output"),
    ("guided_regex", _falsy, "pdjax has no structured output"),
    ("guided_choice", _falsy, "pdjax has no structured output"),
    ("guided_grammar", _falsy, "pdjax has no structured output"),
)
_UNSUPPORTED_COMPLETION = (
    ("echo", _falsy, "the prompt is not echoed"),
    ("suffix", _falsy, "pdjax has no fill-in-the-middle"),
)
_UNSUPPORTED_CHAT = (
    ("tools", _falsy, "pdjax has no tool calling"),
    ("tool_choice", _no_tool_choice, "pdjax has no tool calling"),
    ("functions", _falsy, "pdjax has no function calling"),
    ("function_call", _no_tool_choice, "pdjax has no function calling"),
    ("echo", _falsy, "the last message is not echoed"),
    ("audio", _falsy, "pdjax generates text only"),
)


def _refuse_unsupported(body: _Body, table) -> None:
  for name, is_default, why in table:
    v = body.raw(name)
    if v is not None and not is_default(v):
      raise bad_request(name, f"not supported: {why} (got {v!r})")


# ---------------------------------------------------------- common params
def _stop(body: _Body) -> tuple[str, ...]:
  v = body.raw("stop")
  if v is None:
    return ()
  items = [v] if isinstance(v, str) else v
  if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
    raise bad_request("stop", "must be a string or a list of strings")
  if any(not s for s in items):
    raise bad_request("stop", "stop strings must not be empty")
  return tuple(dict.fromkeys(items))


def _stream(body: _Body) -> tuple[bool, bool]:
  stream = body.bool("stream", False)
  options = body.raw("stream_options")
  if options is None:
    return stream, False
  if not stream:
    raise bad_request("stream_options", "only allowed with \"stream\": true")
  if not isinstance(options, dict):
    raise bad_request("stream_options", "must be an object")
  usage = options.get("include_usage")
  if usage is not None and not isinstance(usage, bool):
    raise bad_request("stream_options.include_usage",
                      f"must be true or false, got {usage!r}")
  return stream, bool(usage)


def _params(body: _Body, *, max_tokens: int | None, logprobs: bool
            ) -> Params:
  model = body.str("model")
  n = body.int("n", 1, MAX_N)
  n = 1 if n is None else n
  seed = body.int("seed", 0, _SEED_LIMIT - 1)
  if seed is not None and seed + n - 1 >= _SEED_LIMIT:
    raise bad_request("seed", f"with n={n}, choices use seed..seed+{n - 1}, "
                      f"which must stay below 2**63")
  stop_ids = body.raw("stop_token_ids")
  stream, include_usage = _stream(body)
  body.str("user")   # accepted and unused, as OpenAI documents it
  return Params(
      model=model, n=n, stream=stream, include_usage=include_usage,
      stop=_stop(body),
      include_stop_str_in_output=body.bool("include_stop_str_in_output",
                                           False),
      logprobs=logprobs,
      return_token_ids=body.bool("return_token_ids", False),
      max_tokens=max_tokens,
      temperature=body.number("temperature", lambda v: v >= 0,
                              ">= 0 (0 is greedy)"),
      top_p=body.number("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
      top_k=body.int("top_k", -1),
      min_p=body.number("min_p", lambda v: 0 <= v <= 1, "in [0, 1]"),
      min_tokens=body.int("min_tokens", 0),
      presence_penalty=body.number("presence_penalty", _within_two,
                                   "in [-2, 2]"),
      frequency_penalty=body.number("frequency_penalty", _within_two,
                                    "in [-2, 2]"),
      repetition_penalty=body.number("repetition_penalty",
                                     lambda v: 0 < v <= 2, "in (0, 2]"),
      seed=seed,
      stop_token_ids=(() if stop_ids is None
                      else _token_ids(stop_ids, "stop_token_ids")),
      ignore_eos=body.bool("ignore_eos", False),
      speculative=body.bool("speculative", None),
      skip_special_tokens=body.bool("skip_special_tokens", True),
      cache_salt=body.str("cache_salt") or None)


def _log_unknown(body: _Body, endpoint: str) -> None:
  unknown = body.unknown()
  if unknown:
    log.debug("%s: ignoring unknown fields %s", endpoint, unknown)


_NO_TOP = ("pdjax returns the logprob of the chosen token only, not of "
           "alternatives")


# ------------------------------------------------------------- completions
def _one_prompt(v: Any, name: str) -> Prompt:
  if isinstance(v, str):
    if not v:
      raise bad_request(name, "is empty")
    return Prompt(text=v)
  if isinstance(v, list) and v and all_ints(v):
    return Prompt(token_ids=_in_range(v, name))
  raise bad_request(name, "must be a non-empty string or a non-empty "
                    "list of token ids")


def _prompts(v: Any, n: int) -> tuple[Prompt, ...]:
  """A text or token-id prompt, or a list of them (a batch)."""
  if v is None:
    raise bad_request("prompt", "is required")
  if isinstance(v, list) and v and all(isinstance(p, (str, list))
                                       for p in v):
    prompts = tuple(_one_prompt(p, f"prompt[{i}]") for i, p in enumerate(v))
  else:
    prompts = (_one_prompt(v, "prompt"),)
  if len(prompts) * n > MAX_CHOICES:
    raise bad_request("prompt", f"{len(prompts)} prompts x n={n} is more "
                      f"than {MAX_CHOICES} choices in one request; split it")
  return prompts


def parse_completion(raw: Any) -> CompletionRequest:
  body = _Body(raw)
  _refuse_unsupported(body, _UNSUPPORTED_COMMON + _UNSUPPORTED_COMPLETION)
  logprobs = body.int("logprobs", 0)
  if logprobs is not None and logprobs > 1:
    raise bad_request("logprobs", f"at most 1: {_NO_TOP} (got {logprobs})")
  params = _params(body, max_tokens=body.int("max_tokens", 1),
                   logprobs=logprobs is not None)
  prompts = _prompts(body.raw("prompt"), params.n)
  add_special = body.bool("add_special_tokens", None)
  _log_unknown(body, "completions")
  return CompletionRequest(params=params, prompts=prompts,
                           add_special_tokens=add_special)


# -------------------------------------------------------------------- chat
def _content(v: Any, where: str) -> str | None:
  """A message's content as a string: text parts are joined with newlines
  (as vLLM does for templates that expect strings); other parts refused."""
  if v is None or isinstance(v, str):
    return v
  if not isinstance(v, list):
    raise bad_request(where, "must be a string or a list of content parts")
  texts = []
  for i, part in enumerate(v):
    if not isinstance(part, dict) or part.get("type") != "text":
      kind = part.get("type") if isinstance(part, dict) else part
      raise bad_request(f"{where}[{i}]", f"only text content parts are "
                        f"supported (got {kind!r})")
    if not isinstance(part.get("text"), str):
      raise bad_request(f"{where}[{i}].text", "must be a string")
    texts.append(part["text"])
  return "\n".join(texts)


def _messages(v: Any) -> tuple[dict[str, Any], ...]:
  if not isinstance(v, list) or not v:
    raise bad_request("messages", "must be a non-empty list of messages")
  out = []
  for i, m in enumerate(v):
    where = f"messages[{i}]"
    if not isinstance(m, dict):
      raise bad_request(where, "must be an object with role and content")
    if not isinstance(m.get("role"), str) or not m["role"]:
      raise bad_request(f"{where}.role", "must be a non-empty string")
    out.append({**m, "content": _content(m.get("content"),
                                         f"{where}.content")})
  return tuple(out)


def parse_chat(raw: Any) -> ChatRequest:
  body = _Body(raw)
  _refuse_unsupported(body, _UNSUPPORTED_COMMON + _UNSUPPORTED_CHAT)
  messages = _messages(body.raw("messages"))
  logprobs = body.bool("logprobs", False)
  top = body.int("top_logprobs", 0)
  if top:
    raise bad_request("top_logprobs", f"must be 0: {_NO_TOP} (got {top})")
  max_completion = body.int("max_completion_tokens", 1)
  max_tokens = body.int("max_tokens", 1)
  params = _params(body, logprobs=logprobs, max_tokens=(
      max_completion if max_completion is not None else max_tokens))
  _log_unknown(body, "chat.completions")
  return ChatRequest(params=params, messages=messages)


# ------------------------------------------------------ tokenize, detokenize
@dataclasses.dataclass(frozen=True)
class TokenizeRequest:
  """``POST /tokenize`` (vLLM's): a prompt's text, or chat messages that the
  chat template renders first (``add_generation_prompt``). Special tokens
  are added to a prompt by default, not to rendered messages (the template
  writes its own)."""
  model: str | None
  prompt: str | None
  messages: tuple[dict[str, Any], ...] | None
  add_special_tokens: bool
  add_generation_prompt: bool


@dataclasses.dataclass(frozen=True)
class DetokenizeRequest:
  """``POST /detokenize`` (vLLM's): token ids back to text."""
  model: str | None
  tokens: tuple[int, ...]


def parse_tokenize(raw: Any) -> TokenizeRequest:
  body = _Body(raw)
  model = body.str("model")
  if (body.raw("prompt") is None) == (body.raw("messages") is None):
    raise bad_request("prompt", "send either prompt (a text) or messages "
                      "(a chat, rendered with the chat template)")
  prompt = body.str("prompt")
  messages = None if prompt is not None else _messages(body.raw("messages"))
  add_special = body.bool("add_special_tokens", prompt is not None)
  add_generation = body.bool("add_generation_prompt", True)
  _log_unknown(body, "tokenize")
  return TokenizeRequest(model=model, prompt=prompt, messages=messages,
                         add_special_tokens=add_special,
                         add_generation_prompt=add_generation)


def parse_detokenize(raw: Any) -> DetokenizeRequest:
  body = _Body(raw)
  model = body.str("model")
  tokens = body.raw("tokens")
  if tokens is None:
    raise bad_request("tokens", "is required: the token ids to decode")
  out = DetokenizeRequest(model=model, tokens=_token_ids(tokens, "tokens"))
  _log_unknown(body, "detokenize")
  return out


__all__ = ["ChatRequest", "CompletionRequest", "DetokenizeRequest",
           "MAX_CHOICES", "MAX_N", "Params", "Prompt", "TokenizeRequest",
           "parse_chat", "parse_completion", "parse_detokenize",
           "parse_tokenize"]
