"""The gateway's HTTP app (aiohttp): OpenAI's endpoints over the router,
and vLLM's /tokenize, /detokenize and /version beside them.

One request, in order:

  1. auth (``Authorization: Bearer <api key>`` when the gateway has one)
     on the API's paths (``/v1/``, /tokenize, /detokenize); the probes
     (/health and /readyz: readiness, /livez: liveness), /metrics and
     /version are open, as load balancers, Kubernetes and Prometheus call
     them;
  2. parse and check the body (``protocol``), the model name, and for chat
     render the messages (``chat_template``): every refusal is a 400/404
     before any router call;
  3. start one router call per choice (``choices``), through the app's
     ``RouterConnection`` (its deadline: ``request_timeout_s``);
  4. non-streaming: wait for every choice and answer once. Streaming: wait
     for the first delta, so a router refusal still gets its own HTTP
     status; then send server-sent events, one chunk per delta, a usage
     chunk if asked, and ``data: [DONE]``. A failure after the first byte
     goes out as a last ``data: {"error": ...}`` event before ``[DONE]``.

The app is run with aiohttp's handler cancellation on (``make_runner``), so
a client that disconnects cancels its handler, which closes the merged
stream and with it every router call of the request (the router then
frees the decode slots).

Hostile or broken clients are bounded: ``make_runner`` limits open
connections and the time a request head may take (``guard``); a body must
arrive within ``body_timeout_s`` (408) and fit ``max_body_bytes`` (413);
JSON nested deeper than ``MAX_JSON_DEPTH`` or holding a lone UTF-16
surrogate (which no valid text has) is a 400 naming where.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from pdjax.client import (GENERATION_SERVICE, AsyncClient, GenerationError,
                          TlsConfig)
from pdjax.gateway import protocol
from pdjax.gateway.chat_template import ChatTemplate, ChatTemplateError
from pdjax.gateway.choices import RouterCall, run_choices
from pdjax.gateway.errors import ApiError, bad_request, from_generation_error
from pdjax.gateway.guard import (DEFAULT_HEADER_TIMEOUT_S, ConnectionGuard,
                                 default_max_connections)
from pdjax.gateway.metrics import CLIENT_CLOSED, GatewayMetrics
from pdjax.gateway.responses import (ChatFormatter, CompletionFormatter,
                                     Formatter, UsageTally)
from pdjax.gateway.router_connection import RouterConnection
from pdjax.service.common import bearer_credential
from pdjax.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Token-id prompts of a long context are a few MB of JSON; aiohttp's 1 MiB
# default would refuse them.
MAX_BODY_BYTES = 64 << 20
# OpenAI request bodies nest a few levels (messages[i].content[j].text);
# anything much deeper is not a request but an attack on the parser.
MAX_JSON_DEPTH = 64
_HEALTH_TIMEOUT_S = 5.0
_MODEL_INFO_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class GatewayConfig:
  """What the gateway serves and how it reaches the router.

  Attributes:
    router: the router's ``host:port`` (None: ``create_app`` is given the
      router itself, as in the router's own process).
    served_model_name: the name clients use (default: the router's model).
    api_key: required as ``Authorization: Bearer`` on every endpoint but
      /health; None: no auth.
    chat_template: renders chat messages; None: chat requests get a 400.
    tokenizer: optional; counts prompt tokens for usage when a stop string
      ended every choice early, and names tokens in logprobs.
    request_timeout_s: deadline of each router call (None: none).
    tls, router_token: how to dial the router (its TLS and bearer token).
    router_sessions: send the requests to the router as messages on one
      ``GenerateSession`` stream, not a new call each (less set-up on each
      request's way to its first token; a router without sessions is sent
      calls).
    max_body_bytes: larger request bodies are a 413.
    body_timeout_s: a body must arrive within this long of its head (408).
    header_timeout_s: a connection's first request head must arrive within
      this long of its opening, a later one within this long of the previous
      response (the connection is closed otherwise).
    max_connections: open connections beyond it are refused with a 503
      (None: the descriptor limit, less a reserve).
  """
  router: str | None = None
  served_model_name: str | None = None
  api_key: str | None = None
  chat_template: ChatTemplate | None = None
  tokenizer: Tokenizer | None = None
  request_timeout_s: float | None = None
  tls: TlsConfig | None = None
  router_token: str | None = None
  router_sessions: bool = True
  max_body_bytes: int = MAX_BODY_BYTES
  body_timeout_s: float = 60.0
  header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
  max_connections: int | None = None


@dataclasses.dataclass(frozen=True)
class ModelCard:
  """The served model, from the router's ``GetModelInfo``."""
  name: str
  root: str
  max_model_len: int


CLIENT = web.AppKey("pdjax_router_client", RouterConnection)


class _State:
  """Per-app state: config, and the model card fetched once."""

  def __init__(self, config: GatewayConfig):
    self.config = config
    self.metrics = GatewayMetrics()
    self.created = int(time.time())
    self._card: ModelCard | None = None
    self._lock = asyncio.Lock()
    self.guard: ConnectionGuard | None = None   # set by make_runner's runner

  async def card(self, client: RouterConnection) -> ModelCard:
    async with self._lock:
      if self._card is None:
        try:
          info = await client.model_info(timeout_s=_MODEL_INFO_TIMEOUT_S)
        except GenerationError as e:
          raise from_generation_error(e) from e
        self._card = ModelCard(
            name=self.config.served_model_name or info["name"],
            root=info["name"], max_model_len=int(info["max_seq_len"]))
      return self._card


_STATE = web.AppKey("pdjax_gateway_state", _State)


# ------------------------------------------------------------- middlewares
_ARRIVAL = web.RequestKey("pdjax_arrival", float)


def _endpoint(request: web.Request) -> str:
  """The route's path, a bounded label set ("other" for unknown paths)."""
  resource = request.match_info.route.resource
  return resource.canonical if resource is not None else "other"


@web.middleware
async def _measure(request: web.Request, handler):
  """Counts every request by endpoint and final status, and times it."""
  state = request.app[_STATE]
  if state.guard is not None:       # the head arrived: no header timeout
    state.guard.mark_started(request.transport)
  metrics = state.metrics
  endpoint = _endpoint(request)
  request[_ARRIVAL] = time.perf_counter()
  metrics.running.inc()
  status = CLIENT_CLOSED       # unless an answer says otherwise
  try:
    response = await handler(request)
    status = str(response.status)
    return response
  except web.HTTPException as e:
    status = str(e.status)
    raise
  finally:
    metrics.running.dec()
    metrics.requests.labels(endpoint, status).inc()
    metrics.latency.labels(endpoint).observe(
        time.perf_counter() - request[_ARRIVAL])


def _internal_error() -> ApiError:
  return ApiError(500, "internal error in the gateway (its log has the "
                  "details)", code="internal_error")


def _error_response(e: ApiError) -> web.Response:
  resp = web.json_response(e.body(), status=e.status, headers=e.headers())
  if e.status == 408:   # the rest of the body may still come: not reusable
    resp.force_close()
  return resp


@web.middleware
async def _errors(request: web.Request, handler):
  """Every failure as an OpenAI error body."""
  try:
    return await handler(request)
  except ApiError as e:
    return _error_response(e)
  except web.HTTPException as e:    # unknown path, wrong method, too large
    if e.status < 400:
      raise
    return _error_response(ApiError(
        e.status, f"{e.reason}: {request.method} {request.path}"
        + (f" ({e.text})" if e.status == 413 and e.text else "")))
  except ConnectionResetError:      # the client left; nobody to answer
    raise
  except Exception:                 # a gateway bug: still an OpenAI error
    # (streams never get here: _stream_events answers in-band once the
    # headers are out).
    log.exception("%s %s failed", request.method, request.path)
    return _error_response(_internal_error())


# What --api_key guards: the API, not the probes, /metrics or /version.
_GUARDED = ("/v1/", "/tokenize", "/detokenize")


def _auth(api_key: str | None):
  expected = (api_key or "").encode()

  @web.middleware
  async def auth(request: web.Request, handler):
    if api_key and request.path.startswith(_GUARDED):
      # The scheme is case-insensitive (RFC 7235): "bearer" is "Bearer".
      got = bearer_credential(request.headers.get("Authorization", ""))
      if got is None or not hmac.compare_digest(got, expected):
        raise ApiError(401, "missing or invalid API key (send "
                       "'Authorization: Bearer <key>')",
                       code="invalid_api_key")
    return await handler(request)
  return auth


# ------------------------------------------------------------------ helpers
async def _json_body(request: web.Request) -> Any:
  timeout = request.app[_STATE].config.body_timeout_s
  try:
    async with asyncio.timeout(timeout):
      raw = await request.read()
  except TimeoutError as e:
    raise ApiError(408, f"the request body did not arrive within "
                   f"{timeout:g} s", code="request_timeout") from e
  try:
    body = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise bad_request(None, f"the body is not valid JSON: {e}") from e
  except RecursionError as e:
    raise bad_request(None, f"the body is nested more than "
                      f"{MAX_JSON_DEPTH} levels deep") from e
  _check_json(body)
  return body


def _path(parts: tuple) -> str:
  out = ""
  for p in parts:
    out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
  return out


def _check_json(body: Any) -> None:
  """400s for what JSON allows but no request may hold: nesting deeper than
  MAX_JSON_DEPTH, and strings with a lone UTF-16 surrogate (JSON escapes
  them, "\\ud800"; the tokenizer and protobuf cannot encode them). The
  message names where (``messages[0].content``). Iterative: a deep body
  must not exhaust the stack here either."""
  stack: list[tuple[Any, tuple, int]] = [(body, (), 1)]
  while stack:
    value, where, depth = stack.pop()
    if isinstance(value, str):
      try:
        value.encode("utf-8")
      except UnicodeEncodeError as e:
        raise bad_request(_path(where) or None, f"contains a lone UTF-16 "
                          f"surrogate (U+{ord(value[e.start]):04X}) at "
                          f"character {e.start}; strings must be valid "
                          "Unicode") from e
      continue
    if not isinstance(value, (dict, list)):
      continue
    if depth > MAX_JSON_DEPTH:
      raise bad_request(None, f"the body is nested more than "
                        f"{MAX_JSON_DEPTH} levels deep (at {_path(where)})")
    if isinstance(value, dict):
      for k, v in value.items():
        stack.append((k, where, depth))   # a key: named by its object
        stack.append((v, (*where, k), depth + 1))
    elif not protocol.all_ints(value):   # token ids: nothing to do
      stack.extend((v, (*where, i), depth + 1) for i, v in enumerate(value))


def _check_model(model: str | None, card: ModelCard) -> None:
  if model is not None and model != card.name:
    raise ApiError(404, f"the model {model!r} does not exist; this "
                   f"gateway serves {card.name!r}", param="model",
                   code="model_not_found")


def _sse(obj: Any) -> bytes:
  return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def _calls(base_id: str, params: protocol.Params,
           prompts: list[tuple[str | None, dict[str, Any]]]
           ) -> list[RouterCall]:
  """One router call per choice of each prompt (a text, or None with the
  token ids among its call options): prompt i's choice j is choice
  ``i * n + j`` and samples with seed + j. Request ids: ``base``, or
  ``base-k`` for choice k when there are several."""
  calls = []
  total = len(prompts) * params.n
  for i, (text, extra) in enumerate(prompts):
    for j in range(params.n):
      k = i * params.n + j
      rid = base_id if total == 1 else f"{base_id}-{k}"
      calls.append(RouterCall(k, text, {**params.router_options(j, rid),
                                        **extra}))
  return calls


def _context_error(max_model_len: int, prompt_len: int,
                   max_tokens: int | None) -> str:
  """vLLM's words for a request the context cannot hold."""
  if max_tokens is None:
    return (f"This model's maximum context length is {max_model_len} "
            f"tokens. However, you requested {prompt_len} tokens in the "
            "messages. Please reduce the length of the messages.")
  return (f"This model's maximum context length is {max_model_len} tokens. "
          f"However, you requested {prompt_len + max_tokens} tokens "
          f"({prompt_len} in the messages, {max_tokens} in the completion). "
          "Please reduce the length of the messages or completion.")


def _check_context(card: ModelCard, prompt_len: int,
                   max_tokens: int | None) -> None:
  """A 400 naming max_tokens when prompt + max_tokens exceeds the context
  (the router refuses it too; prompts counted here fail before any call)."""
  if max_tokens is not None and prompt_len + max_tokens > card.max_model_len:
    raise bad_request("max_tokens", _context_error(card.max_model_len,
                                                   prompt_len, max_tokens))


async def _respond(request: web.Request, params: protocol.Params,
                   calls: list[RouterCall], fmt: Formatter,
                   usage: UsageTally, prompt_param: str = "prompt"
                   ) -> web.StreamResponse:
  client = request.app[CLIENT]
  stream = run_choices(client, calls, params.stop,
                       params.include_stop_str_in_output)
  async with contextlib.aclosing(stream):
    try:
      if not params.stream:
        deltas = [d async for d in stream]
        for d in deltas:
          usage.add(d)
        return web.json_response(fmt.response(deltas, usage))
      first = await anext(stream)
    except GenerationError as e:
      raise from_generation_error(e, prompt_param=prompt_param) from e
    return await _stream_events(request, stream, first, fmt, usage,
                                params.include_usage)


async def _stream_events(request: web.Request, stream: AsyncIterator,
                         first, fmt: Formatter, usage: UsageTally,
                         include_usage: bool) -> web.StreamResponse:
  # X-Accel-Buffering: proxies such as nginx would otherwise hold events.
  resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                     "Cache-Control": "no-cache",
                                     "X-Accel-Buffering": "no"})
  await resp.prepare(request)
  metrics, endpoint = request.app[_STATE].metrics, _endpoint(request)
  sent_any = False
  try:
    delta = first
    while delta is not None:
      usage.add(delta)
      # A delta's events (a chat's first: the role's, then the text's) in
      # one write.
      events = b"".join(_sse(chunk) for chunk in fmt.chunks(delta))
      if events:
        await resp.write(events)
        if not sent_any:
          sent_any = True
          metrics.ttft.labels(endpoint).observe(
              time.perf_counter() - request[_ARRIVAL])
      delta = await anext(stream, None)
    if include_usage:
      await resp.write(_sse(fmt.usage_chunk(usage)))
  except GenerationError as e:
    log.info("%s failed mid-stream: %s", fmt.request_id, e)
    metrics.stream_errors.labels(endpoint).inc()
    await resp.write(_sse(from_generation_error(e).body()))
  except ConnectionResetError:
    raise
  except Exception:
    log.exception("%s failed mid-stream", fmt.request_id)
    metrics.stream_errors.labels(endpoint).inc()
    await resp.write(_sse(_internal_error().body()))
  await resp.write(b"data: [DONE]\n\n")
  await resp.write_eof()
  return resp


def _prompt_counter(state: _State, text: str | None,
                    ids: tuple[int, ...] | None, add_bos: bool):
  """Prompt tokens for usage when the router's count never arrived (None
  without a tokenizer)."""
  def count() -> int | None:
    if ids is not None:
      return len(ids)
    tok = state.config.tokenizer
    return None if tok is None else len(tok.encode(text, add_bos=add_bos))
  return count


# ----------------------------------------------------------------- handlers
async def health(request: web.Request) -> web.Response:
  """Readiness (/health, /readyz): 200 while the router's Generation
  service is SERVING (it is while a decode worker is ready), else 503."""
  try:
    status = await request.app[CLIENT].health(GENERATION_SERVICE,
                                              timeout_s=_HEALTH_TIMEOUT_S)
  except GenerationError as e:
    status = f"router unreachable: {e}"
  return web.json_response({"status": status},
                           status=200 if status == "SERVING" else 503)


async def live(request: web.Request) -> web.Response:
  """Liveness (/livez): 200 while the gateway's process serves HTTP,
  whatever the router's state (a livenessProbe must not restart gateways
  because the workers are down)."""
  return web.json_response({"status": "alive"})


async def prometheus(request: web.Request) -> web.Response:
  body, content_type = request.app[_STATE].metrics.exposition()
  return web.Response(body=body, headers={"Content-Type": content_type})


async def models(request: web.Request) -> web.Response:
  state = request.app[_STATE]
  card = await state.card(request.app[CLIENT])
  return web.json_response({"object": "list", "data": [{
      "id": card.name, "object": "model", "created": state.created,
      "owned_by": "pdjax", "root": card.root,
      "max_model_len": card.max_model_len}]})


async def completions(request: web.Request) -> web.StreamResponse:
  state = request.app[_STATE]
  req = protocol.parse_completion(await _json_body(request))
  card = await state.card(request.app[CLIENT])
  _check_model(req.params.model, card)
  base = uuid.uuid4().hex
  prompts = []
  for p in req.prompts:
    extra: dict[str, Any] = {"add_special_tokens": req.add_special_tokens}
    if p.token_ids is not None:
      _check_context(card, len(p.token_ids), req.params.max_tokens)
      extra["prompt_token_ids"] = list(p.token_ids)
    prompts.append((p.text, extra))
  calls = _calls(base, req.params, prompts)
  fmt = CompletionFormatter(f"cmpl-{base}", card.name, int(time.time()),
                            req.params, state.config.tokenizer)
  usage = UsageTally(
      [_prompt_counter(state, p.text, p.token_ids,
                       req.add_special_tokens is not False)
       for p in req.prompts], choices_per_prompt=req.params.n)
  return await _respond(request, req.params, calls, fmt, usage)


async def chat_completions(request: web.Request) -> web.StreamResponse:
  state = request.app[_STATE]
  req = protocol.parse_chat(await _json_body(request))
  template = state.config.chat_template
  if template is None:
    raise bad_request("messages", "this model has no chat template (its "
                      "tokenizer_config.json has none): start the gateway "
                      "with --chat_template=FILE (or a packaged one, "
                      "e.g. --chat_template=plain), or use "
                      "/v1/completions")
  card = await state.card(request.app[CLIENT])
  _check_model(req.params.model, card)
  try:
    prompt = template.render(req.messages)
  except ChatTemplateError as e:
    raise bad_request("messages", str(e)) from e
  params = req.params
  if params.max_tokens is None:
    # As vLLM: up to the end of the context, which takes the prompt's
    # length, counted as the router will count it.
    tok = state.config.tokenizer
    if tok is None:
      raise bad_request("max_tokens", "is required here: this gateway has "
                        "no tokenizer to count the prompt with, so it cannot "
                        "run the completion to the end of the context (start "
                        "it with the checkpoint's tokenizer.json)")
    prompt_len = len(tok.encode(prompt, add_bos=False))
    if prompt_len >= card.max_model_len:
      raise bad_request("messages", _context_error(card.max_model_len,
                                                   prompt_len, None))
    params = dataclasses.replace(params,
                                 max_tokens=card.max_model_len - prompt_len)
  base = uuid.uuid4().hex
  calls = _calls(base, params, [(prompt, {"add_special_tokens": False})])
  fmt = ChatFormatter(f"chatcmpl-{base}", card.name, int(time.time()),
                      params, state.config.tokenizer)
  usage = UsageTally([_prompt_counter(state, prompt, None, False)],
                     choices_per_prompt=params.n)
  return await _respond(request, params, calls, fmt, usage,
                        prompt_param="messages")


async def tokenize(request: web.Request) -> web.Response:
  """vLLM's ``POST /tokenize``: a prompt's token ids (or chat messages',
  rendered with the chat template), as the completions would count them."""
  state = request.app[_STATE]
  req = protocol.parse_tokenize(await _json_body(request))
  card = await state.card(request.app[CLIENT])
  _check_model(req.model, card)
  tok = _tokenizer(state, "prompt" if req.messages is None else "messages")
  text = req.prompt
  if req.messages is not None:
    template = state.config.chat_template
    if template is None:
      raise bad_request("messages", "this model has no chat template: send "
                        "prompt instead, or start the gateway with "
                        "--chat_template")
    try:
      text = template.render(
          req.messages, add_generation_prompt=req.add_generation_prompt)
    except ChatTemplateError as e:
      raise bad_request("messages", str(e)) from e
  ids = tok.encode(text, add_bos=req.add_special_tokens)
  return web.json_response({"count": len(ids),
                            "max_model_len": card.max_model_len,
                            "tokens": ids, "token_strs": None})


async def detokenize(request: web.Request) -> web.Response:
  """vLLM's ``POST /detokenize``: token ids back to text (special tokens
  kept)."""
  state = request.app[_STATE]
  req = protocol.parse_detokenize(await _json_body(request))
  card = await state.card(request.app[CLIENT])
  _check_model(req.model, card)
  tok = _tokenizer(state, "tokens")
  outside = [t for t in req.tokens if t >= tok.vocab_size]
  if outside:
    raise bad_request("tokens", f"token id {outside[0]} is outside the "
                      f"vocabulary [0, {tok.vocab_size})")
  return web.json_response(
      {"prompt": tok.decode(list(req.tokens), skip_special_tokens=False)})


def _tokenizer(state: _State, param: str) -> Tokenizer:
  tok = state.config.tokenizer
  if tok is None:
    raise bad_request(param, "this gateway has no tokenizer (its checkpoint "
                      "has no tokenizer.json, or the model's weights are "
                      "random): it cannot tokenize")
  return tok


async def version(request: web.Request) -> web.Response:
  """vLLM's ``GET /version``: the serving software's version."""
  from importlib import metadata
  try:
    v = metadata.version("pdjax")
  except metadata.PackageNotFoundError:
    v = "unknown"
  return web.json_response({"version": v})


# ---------------------------------------------------------------------- app
def create_app(config: GatewayConfig,
               router: RouterConnection | None = None) -> web.Application:
  """The gateway app. Its connection to the router: ``router`` when given
  (its owner closes it), else a gRPC client of ``config.router`` that lives
  from the app's startup to its cleanup."""
  if (router is None) == (config.router is None):
    raise ValueError("give the gateway either config.router (an address) "
                     "or router (a connection), not both")
  app = web.Application(client_max_size=config.max_body_bytes,
                        middlewares=[_measure, _errors,
                                     _auth(config.api_key)])
  app[_STATE] = _State(config)

  async def router_client(app: web.Application):
    # grpc.aio channels belong to the loop that creates them: this one.
    app[CLIENT] = AsyncClient(config.router, tls=config.tls,
                              token=config.router_token,
                              timeout_s=config.request_timeout_s,
                              sessions=config.router_sessions)
    yield
    await app[CLIENT].close()

  if router is None:
    app.cleanup_ctx.append(router_client)
  else:
    app[CLIENT] = router
  app.router.add_get("/health", health)
  app.router.add_get("/readyz", health)
  app.router.add_get("/livez", live)
  app.router.add_get("/metrics", prometheus)
  app.router.add_get("/v1/models", models)
  app.router.add_post("/v1/completions", completions)
  app.router.add_post("/v1/chat/completions", chat_completions)
  app.router.add_post("/tokenize", tokenize)
  app.router.add_post("/detokenize", detokenize)
  app.router.add_get("/version", version)
  return app


class _Runner(web.AppRunner):
  """An AppRunner whose server (the protocol factory its sites listen
  with) is behind the app's connection limits (``guard``)."""

  async def _make_server(self):
    server = await super()._make_server()
    state = self.app[_STATE]
    config = state.config
    state.guard = ConnectionGuard(
        server, header_timeout_s=config.header_timeout_s,
        max_connections=(config.max_connections
                         or default_max_connections()))
    return state.guard


def make_runner(app: web.Application, *,
                shutdown_timeout_s: float = 60.0) -> web.AppRunner:
  """The runner to serve ``app`` with. Handler cancellation is on (aiohttp
  turned it off by default in 3.9): without it a client that disconnects
  while its router call is between tokens (or before the first) leaves the
  call running, holding a decode slot, until the next write fails. Its
  connections are bounded by the app's config (``guard``): their number,
  and the time a request head may take (the keep-alive timeout is that too:
  aiohttp closes a connection still waiting for a head that long after its
  previous response). After an error answered before its body was read
  (a 408, a 413), the rest of the body is drained for at most a second
  (aiohttp's lingering close; its default is 10 s), not left to hold the
  connection."""
  config = app[_STATE].config
  return _Runner(app, handler_cancellation=True,
                 shutdown_timeout=shutdown_timeout_s,
                 keepalive_timeout=config.header_timeout_s,
                 lingering_time=1.0)


__all__ = ["CLIENT", "GatewayConfig", "ModelCard", "create_app",
           "make_runner"]
