"""The OpenAI-compatible gateway (pdjax.gateway) against a fake router, plus
one end-to-end run on a real local deployment of the tiny model.

The fake ``Generation`` servicer answers according to the prompt (see
``_FakeRouter``) and records every request it received, its metadata and
whether the caller cancelled it, so each test checks both what the gateway
sent the router and what it told the HTTP client. The gateway runs in
aiohttp's test server, one per test, inside ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from aiohttp import ClientSession, ClientTimeout, web
from aiohttp.test_utils import TestClient, TestServer
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from hypothesis import given
from hypothesis import strategies as st

from pdjax.gateway import GatewayConfig, create_app
from pdjax.gateway.chat_template import (ChatTemplate, ChatTemplateError,
                                         load_chat_template)
from pdjax.gateway.server import make_runner
from pdjax.gateway.stops import StopMatcher
from pdjax.v1 import common_pb2, generate_pb2, generate_pb2_grpc

_ROOT = Path(__file__).resolve().parents[1]
_PLAIN = _ROOT / "pdjax" / "configs" / "chat_templates" / "plain.jinja"
_CACHED = 3       # the fake's cached_prompt_tokens
_MODEL = "fake-model"


class _FakeRouter(generate_pb2_grpc.GenerationServicer):
  """Answers by prompt text.

  "abort:CODE": fails with that status ("boom (retry after ~1500 ms)" for
  RESOURCE_EXHAUSTED, as the router's retry hint reads; "boom" otherwise).
  "invalid:DETAILS": fails with INVALID_ARGUMENT and those details.
  "tokens:[[id, text], ...]": one message per pair, the last finishing
  with "length".
  "midfail": two messages, then RESOURCE_EXHAUSTED "out of KV pages".
  "hang": one token, then waits until the caller cancels.
  "finish:ABORT" / "finish:ERROR": one token with that finish reason.
  "nofinish": one token, then ends OK with no finish reason.
  "script:[json pieces]": one token (200, 201, ...) per piece, text the
  piece, then waits until the caller cancels; "script-end:" finishes with
  "length" on the last piece instead. As the router, the first message
  carries the prompt's usage (prompt and cached tokens).
  anything else, text or token ids: tokens 100, 101, ... up to max_tokens
  (16 unset), two per message, text "<id>" each, logprob -id/1000; an id
  in stop_token_ids ends it with "stop". A text "spec:D,A" is answered so
  too, its last usage reporting D tokens drafted and A accepted, as a
  speculating decode pool's.

  Records every request by id (in ``order`` too), its metadata, and sets
  ``cancelled[id]`` when the call ended before the servicer finished it
  (the caller cancelled it).
  """

  def __init__(self):
    self.requests: dict[str, generate_pb2.GenerateRequest] = {}
    self.metadata: dict[str, dict[str, str]] = {}
    self.cancelled: dict[str, threading.Event] = {}
    self.order: list[str] = []
    self._finished: set[str] = set()
    self._lock = threading.Lock()

  def _ended(self, rid):
    if rid not in self._finished:
      self.cancelled[rid].set()

  def _wait_for_cancel(self, context):
    while context.is_active():
      time.sleep(0.005)

  def Generate(self, request, context):
    rid = request.request_id
    with self._lock:
      self.requests[rid] = request
      self.metadata[rid] = dict(context.invocation_metadata())
      self.cancelled[rid] = threading.Event()
      self.order.append(rid)
    context.add_callback(lambda: self._ended(rid))  # on any termination
    text = request.text if request.WhichOneof("prompt") == "text" else None
    prompt_len = (len(text) if text is not None
                  else len(request.token_ids.ids))
    usage = common_pb2.Usage(prompt_tokens=prompt_len,
                             cached_prompt_tokens=_CACHED)

    def msg(ids, text=None, **kw):
      if text is None:
        text = "".join(f"<{t}>" for t in ids)
      return generate_pb2.GenerateResponse(
          request_id=rid, token_ids=ids, text=text,
          logprobs=[-t / 1000 for t in ids], **kw)

    if text and text.startswith("invalid:"):
      context.abort(grpc.StatusCode.INVALID_ARGUMENT, text.split(":", 1)[1])
    if text and text.startswith("tokens:"):
      pairs = json.loads(text.split(":", 1)[1])
      for k, (tid, piece) in enumerate(pairs):
        if k == len(pairs) - 1:
          self._finished.add(rid)
          usage.completion_tokens = len(pairs)
          yield msg([tid], piece, finish_reason=common_pb2.FINISH_REASON_LENGTH,
                    usage=usage)
          return
        yield msg([tid], piece)
    if text and text.startswith("abort:"):
      code = grpc.StatusCode[text.split(":", 1)[1]]
      context.abort(code, "boom (retry after ~1500 ms)"
                    if code is grpc.StatusCode.RESOURCE_EXHAUSTED else "boom")
    if text == "midfail":
      yield msg([100])
      yield msg([101])
      context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "out of KV pages")
    if text == "hang":
      yield msg([100])
      self._wait_for_cancel(context)
      return
    if text and text.startswith("finish:"):
      reason = common_pb2.FinishReason.Value(
          "FINISH_REASON_" + text.split(":", 1)[1])
      self._finished.add(rid)
      yield msg([100], finish_reason=reason, usage=usage)
      return
    if text == "nofinish":
      self._finished.add(rid)
      yield msg([100])
      return
    if text and text.startswith(("script:", "script-end:")):
      kind, pieces = text.split(":", 1)
      pieces = json.loads(pieces)
      for k, piece in enumerate(pieces):
        last = kind == "script-end" and k == len(pieces) - 1
        if last:
          self._finished.add(rid)
          usage.completion_tokens = len(pieces)
          yield msg([200 + k], piece,
                    finish_reason=common_pb2.FINISH_REASON_LENGTH,
                    usage=usage)
          return
        yield msg([200 + k], piece,
                  usage=common_pb2.Usage(prompt_tokens=prompt_len,
                                         cached_prompt_tokens=_CACHED)
                  if k == 0 else None)
      self._wait_for_cancel(context)
      return

    s = request.sampling
    n = s.max_tokens if s.HasField("max_tokens") else 16
    ids, reason = [], common_pb2.FINISH_REASON_LENGTH
    for i in range(n):
      ids.append(100 + i)
      if ids[-1] in s.stop_token_ids:
        reason = common_pb2.FINISH_REASON_STOP
        break
    chunks = [ids[i:i + 2] for i in range(0, len(ids), 2)]
    for chunk in chunks[:-1]:
      yield msg(chunk)
    usage.completion_tokens = len(ids)
    if text and text.startswith("spec:"):
      usage.spec_draft_tokens, usage.spec_accepted_tokens = map(
          int, text.split(":", 1)[1].split(","))
    self._finished.add(rid)
    yield msg(chunks[-1], finish_reason=reason, usage=usage)

  def GetModelInfo(self, request, context):
    return common_pb2.ModelInfo(name=_MODEL, vocab_size=320, max_seq_len=1024)


@pytest.fixture(scope="module")
def router():
  server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
  fake = _FakeRouter()
  generate_pb2_grpc.add_GenerationServicer_to_server(fake, server)
  health_servicer = health.HealthServicer()
  health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
  health_servicer.set("pdjax.v1.Generation",
                      health_pb2.HealthCheckResponse.SERVING)
  port = server.add_insecure_port("127.0.0.1:0")
  server.start()
  yield fake, health_servicer, f"127.0.0.1:{port}"
  server.stop(0)


def _serve(address, test, **config):
  """Runs ``await test(client)`` against a gateway in front of ``address``
  (aiohttp's test server, which cancels handlers of departed clients)."""
  config.setdefault("chat_template", ChatTemplate(
      _PLAIN.read_text(), {"bos_token": "<s>"}))

  async def go():
    app = create_app(GatewayConfig(address, **config))
    async with TestClient(TestServer(app),
                          timeout=ClientTimeout(total=20)) as client:
      return await test(client)
  return asyncio.run(go())


def _post(router, path, body, headers=None, **config):
  """(status, parsed JSON body) of one POST."""
  async def test(client):
    r = await client.post(path, json=body, headers=headers)
    return r.status, await r.json(), r.headers
  status, data, _ = _serve(router[2], test, **config)
  return status, data


def _events(text: str) -> list:
  """The data of each server-sent event; checks the framing: every event
  is one "data: " line, the last one is [DONE]."""
  assert text.endswith("\n\n"), text[-50:]
  events = text[:-2].split("\n\n")
  out = []
  for e in events:
    assert e.startswith("data: ") and "\n" not in e, e
    out.append(e[len("data: "):])
  assert out[-1] == "[DONE]" and "[DONE]" not in out[:-1]
  return [json.loads(e) for e in out[:-1]]


def _stream(router, path, body, **config):
  async def test(client):
    r = await client.post(path, json=body)
    assert r.status == 200, await r.text()
    assert r.headers["Content-Type"].startswith("text/event-stream")
    return _events(await r.text())
  return _serve(router[2], test, **config)


def _rid(response_id: str) -> str:
  return response_id.split("-", 1)[1]


# ------------------------------------------------------------- stop strings
def _feed(stops, deltas, include_stop=False):
  m = StopMatcher(stops, include_stop)
  out = [m.push(d) for d in deltas]
  if not m.stopped:
    out.append(m.flush())
  return out, m.stopped


def test_stop_string_split_across_deltas_never_leaks():
  out, stopped = _feed(["STOP"], ["Hel", "lo S", "TO", "P and more"])
  assert stopped and "".join(out) == "Hello "
  assert not any("S" in piece for piece in out)
  # Text that only looked like the start of a stop string is released.
  out, stopped = _feed(["STOP"], ["a ST", "AR", "T"])
  assert not stopped and "".join(out) == "a START"
  assert out[0] == "a"     # "ST" held back until the next delta


def test_the_stop_string_completed_first_wins_and_ends_the_output():
  out, stopped = _feed(["world", "lo"], ["hello world"])
  assert stopped and out == ["hel"]
  # "bc" completes before "abcd" does, however the text was split.
  for deltas in (["abcd"], ["abc", "d"], ["a", "b", "c", "d"]):
    assert "".join(_feed(["abcd", "bc"], deltas)[0]) == "a"
  m = StopMatcher(["x"])
  assert m.push("axb") == "a" and m.stopped
  assert m.push("more") == "" and m.flush() == ""
  # Without stop strings nothing is held back.
  assert _feed([], ["ab", "c"]) == (["ab", "c", ""], False)


@given(text=st.text(alphabet="abc", max_size=30),
       cuts=st.lists(st.integers(0, 30), max_size=6),
       stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4),
                      min_size=1, max_size=3),
       include_stop=st.booleans())
def test_stop_strings_any_split_gives_the_text_before_the_first_stop(
    text, cuts, stops, include_stop):
  """Cut before the first stop string to complete, or after it where the
  request includes it (``include_stop_str_in_output``)."""
  bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
  deltas = [text[a:b] for a, b in zip(bounds, bounds[1:])]
  # (end, start) of each stop string's first occurrence: the one that ends
  # first is what a character-by-character scan finds.
  hits = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
  out, stopped = _feed(stops, deltas, include_stop)
  assert stopped == bool(hits)
  want = text
  if hits:
    end, start = min(hits)
    want = text[:end if include_stop else start]
  assert "".join(out) == want


# --------------------------------------------------------- request mapping
def test_every_completion_field_reaches_the_router_exactly(router):
  fake = router[0]
  status, data = _post(router, "/v1/completions", {
      "model": _MODEL, "prompt": "hello", "max_tokens": 7,
      "temperature": 0.5, "top_p": 0.25, "top_k": 5, "min_p": 0.125,
      "min_tokens": 3, "seed": 42, "stop_token_ids": [9, 10],
      "ignore_eos": True, "presence_penalty": 0.5, "frequency_penalty": -1.5,
      "repetition_penalty": 1.25,
      "skip_special_tokens": False, "add_special_tokens": False,
      "cache_salt": "tenant-a", "user": "u1", "some_future_field": 1})
  assert status == 200, data
  req = fake.requests[_rid(data["id"])]
  assert req.WhichOneof("prompt") == "text" and req.text == "hello"
  s = req.sampling
  assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.min_p,
          s.min_tokens, s.seed) == (7, 0.5, 0.25, 5, 0.125, 3, 42)
  assert (s.presence_penalty, s.frequency_penalty,
          s.repetition_penalty) == (0.5, -1.5, 1.25)
  assert list(s.stop_token_ids) == [9, 10] and s.ignore_eos
  assert not req.skip_special_tokens
  assert req.HasField("add_special_tokens") and not req.add_special_tokens
  assert req.cache_salt == "tenant-a"


def test_unset_fields_stay_unset(router):
  fake = router[0]
  status, data = _post(router, "/v1/completions",
                       {"prompt": [5, 6, 7], "temperature": 0})
  assert status == 200, data
  req = fake.requests[_rid(data["id"])]
  assert list(req.token_ids.ids) == [5, 6, 7]
  s = req.sampling
  # temperature 0 (greedy) is a value, not "unset".
  assert s.HasField("temperature") and s.temperature == 0
  for name in ("max_tokens", "top_p", "top_k", "min_p", "min_tokens", "seed",
               "presence_penalty", "frequency_penalty",
               "repetition_penalty"):
    assert not s.HasField(name), name
  assert list(s.stop_token_ids) == [] and not s.ignore_eos
  assert not req.HasField("add_special_tokens")
  assert req.skip_special_tokens   # vLLM's default for the OpenAI API
  assert req.cache_salt == ""
  # The router's default of 16 tokens applied.
  assert data["usage"]["completion_tokens"] == 16


def test_chat_sends_the_rendered_template_without_special_tokens(router):
  fake = router[0]
  status, data = _post(router, "/v1/chat/completions", {
      "messages": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": [
                       {"type": "text", "text": "Hi"},
                       {"type": "text", "text": "there"}]}],
      "temperature": 0.25, "top_k": 3, "seed": 1, "max_tokens": 4})
  assert status == 200, data
  req = fake.requests[_rid(data["id"])]
  assert req.text == "<s>System: Be brief.\nUser: Hi\nthere\nAssistant:"
  assert req.HasField("add_special_tokens") and not req.add_special_tokens
  assert (req.sampling.temperature, req.sampling.top_k,
          req.sampling.seed) == (0.25, 3, 1)
  # max_completion_tokens wins over the older max_tokens.
  status, data = _post(router, "/v1/chat/completions", {
      "messages": [{"role": "user", "content": "x"}],
      "max_completion_tokens": 3, "max_tokens": 9})
  assert fake.requests[_rid(data["id"])].sampling.max_tokens == 3


def test_chat_without_max_tokens_runs_to_the_end_of_the_context(
    router, tiny_model_dir):
  """As vLLM: max_tokens = context - prompt, the prompt counted by the
  gateway's tokenizer as the router will count it (no BOS added: the
  template renders it)."""
  from pdjax.tokenizer import Tokenizer
  tok = Tokenizer.from_dir(tiny_model_dir)
  fake = router[0]
  status, data = _post(router, "/v1/chat/completions",
                       {"messages": _CHAT, "temperature": 0}, tokenizer=tok)
  assert status == 200, data
  req = fake.requests[_rid(data["id"])]
  prompt_len = len(tok.encode(req.text, add_bos=False))
  assert req.sampling.max_tokens == 1024 - prompt_len
  # A prompt that leaves no room is the messages' fault.
  status, data = _post(router, "/v1/chat/completions", {"messages": [
      {"role": "user", "content": "word " * 1100}]}, tokenizer=tok)
  assert status == 400 and data["error"]["param"] == "messages", data
  assert "maximum context length is 1024 tokens" in data["error"]["message"]
  # Without a tokenizer the gateway cannot count: it asks for max_tokens
  # rather than guess.
  before = len(fake.order)
  status, data = _post(router, "/v1/chat/completions", {"messages": _CHAT})
  assert status == 400 and data["error"]["param"] == "max_tokens", data
  assert len(fake.order) == before


def test_max_tokens_past_the_context_is_a_400(router):
  """prompt + max_tokens > the model's context (1024 here): a 400 naming
  max_tokens with vLLM's message, not a silently shortened completion.
  Token-id prompts are counted by the gateway; text prompts by the router,
  whose refusal keeps its field."""
  fake = router[0]
  before = len(fake.order)
  for max_tokens, batch in ((100, False), (10**9, False), (25, True)):
    prompt = [7] * 1000
    status, data = _post(router, "/v1/completions", {
        "prompt": [[5], prompt] if batch else prompt,
        "max_tokens": max_tokens})
    assert status == 400, data
    err = data["error"]
    assert err["param"] == "max_tokens" and err["type"] == \
        "invalid_request_error", err
    assert ("This model's maximum context length is 1024 tokens. However, "
            f"you requested {1000 + max_tokens} tokens (1000 in the "
            f"messages, {max_tokens} in the completion)") in err["message"]
  assert len(fake.order) == before          # no router call
  status, data = _post(router, "/v1/completions",
                       {"prompt": [7] * 1000, "max_tokens": 24})
  assert status == 200 and data["usage"]["completion_tokens"] == 24
  # The router's refusal of a text prompt names the field as the gateway's
  # own does.
  status, data = _post(router, "/v1/completions", {
      "prompt": "invalid:sampling.max_tokens: This model's maximum context "
      "length is 1024 tokens.", "max_tokens": 2000})
  assert status == 400, data
  assert data["error"]["param"] == "max_tokens"
  assert data["error"]["message"] == ("max_tokens: This model's maximum "
                                      "context length is 1024 tokens.")
  # min_tokens past max_tokens (the router's default of 16 here): the
  # router's refusal, named as the gateway names it.
  status, data = _post(router, "/v1/completions", {
      "prompt": "invalid:sampling.min_tokens: must be in [0, max_tokens = "
      "16], got 20", "min_tokens": 20})
  assert status == 400 and data["error"]["param"] == "min_tokens", data


# -------------------------------------------------------------- responses
def test_completion_response(router):
  status, data = _post(router, "/v1/completions",
                       {"model": _MODEL, "prompt": "hello", "max_tokens": 5,
                        "return_token_ids": True})
  assert status == 200, data
  assert data["id"].startswith("cmpl-") and data["object"] == "text_completion"
  assert data["model"] == _MODEL and abs(data["created"] - time.time()) < 60
  assert data["choices"] == [{
      "index": 0, "text": "<100><101><102><103><104>", "logprobs": None,
      "finish_reason": "length", "token_ids": [100, 101, 102, 103, 104]}]
  assert data["usage"] == {"prompt_tokens": 5, "completion_tokens": 5,
                           "total_tokens": 10,
                           "prompt_tokens_details": {"cached_tokens": _CACHED}}
  status, data = _post(router, "/v1/completions",
                       {"prompt": [[1, 2]], "stop_token_ids": [101]})
  assert data["choices"][0]["finish_reason"] == "stop"
  assert data["choices"][0]["text"] == "<100><101>"
  assert data["usage"]["prompt_tokens"] == 2


def test_completion_stream_with_usage(router):
  events = _stream(router, "/v1/completions", {
      "prompt": "hello", "max_tokens": 5, "stream": True,
      "stream_options": {"include_usage": True}})
  *chunks, last = events
  assert {c["id"] for c in events} == {events[0]["id"]}
  assert all(c["object"] == "text_completion" for c in events)
  assert "".join(c["choices"][0]["text"] for c in chunks) == \
      "<100><101><102><103><104>"
  assert [c["choices"][0]["finish_reason"] for c in chunks] == [
      None, None, "length"]
  assert all(c["usage"] is None for c in chunks)
  # A delta whose text is still held back (here by a possible stop string)
  # sends no empty chunk.
  events = _stream(router, "/v1/completions", {
      "prompt": "script-end:" + json.dumps(["a", "b", "c"]), "stream": True,
      "stop": "abcd"})
  assert [e["choices"][0]["text"] for e in events] == ["abc"]
  assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5
  assert last["usage"]["prompt_tokens_details"] == {"cached_tokens": _CACHED}
  # Without include_usage: no usage anywhere.
  events = _stream(router, "/v1/completions",
                   {"prompt": "hello", "max_tokens": 2, "stream": True})
  assert len(events) == 1 and "usage" not in events[0]


def test_chat_response_and_stream(router):
  body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
  status, data = _post(router, "/v1/chat/completions", body)
  assert status == 200, data
  assert data["id"].startswith("chatcmpl-")
  assert data["object"] == "chat.completion"
  assert data["choices"] == [{
      "index": 0, "message": {"role": "assistant",
                              "content": "<100><101><102>"},
      "logprobs": None, "finish_reason": "length"}]
  assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + 3

  events = _stream(router, "/v1/chat/completions", {
      **body, "stream": True, "stream_options": {"include_usage": True}})
  assert all(e["object"] == "chat.completion.chunk" for e in events)
  first, *content, usage = events
  assert first["choices"] == [{"index": 0, "delta": {
      "role": "assistant", "content": ""}, "logprobs": None,
      "finish_reason": None}]
  assert all("role" not in c["choices"][0]["delta"] for c in content)
  assert all(c["choices"][0]["delta"] for c in content)   # none empty
  assert "".join(c["choices"][0]["delta"].get("content", "")
                 for c in content) == "<100><101><102>"
  assert content[-1]["choices"][0]["finish_reason"] == "length"
  assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3


def test_speculative_counts_are_the_prediction_token_details(router):
  """A request the decode pool speculated for reports its drafts as
  OpenAI's completion_tokens_details: accepted, and drafted - accepted
  rejected, summed over the choices; streamed, in the usage chunk."""
  status, data = _post(router, "/v1/completions",
                       {"prompt": "spec:12,5", "max_tokens": 4})
  assert status == 200, data
  assert data["usage"]["completion_tokens_details"] == {
      "accepted_prediction_tokens": 5, "rejected_prediction_tokens": 7}
  assert data["usage"]["completion_tokens"] == 4
  status, data = _post(router, "/v1/completions",
                       {"prompt": "spec:12,5", "max_tokens": 4, "n": 2})
  assert data["usage"]["completion_tokens_details"] == {
      "accepted_prediction_tokens": 10, "rejected_prediction_tokens": 14}
  events = _stream(router, "/v1/completions", {
      "prompt": "spec:3,3", "max_tokens": 2, "stream": True,
      "stream_options": {"include_usage": True}})
  assert events[-1]["usage"]["completion_tokens_details"] == {
      "accepted_prediction_tokens": 3, "rejected_prediction_tokens": 0}
  # Nothing drafted: no details (test_completion_response has the rest).
  status, data = _post(router, "/v1/completions",
                       {"prompt": "spec:0,0", "max_tokens": 2})
  assert "completion_tokens_details" not in data["usage"]


def test_speculative_field_reaches_the_router(router):
  """``speculative`` (a vLLM-style extra field): false opts the request
  out, true is sent as given, absent stays absent (the pool decides)."""
  fake = router[0]
  for value in (False, True, None):
    body = {"prompt": "hello", "max_tokens": 1}
    if value is not None:
      body["speculative"] = value
    status, data = _post(router, "/v1/completions", body)
    assert status == 200, data
    s = fake.requests[_rid(data["id"])].sampling
    assert s.HasField("speculative") == (value is not None)
    assert s.speculative == bool(value)
  status, data = _post(router, "/v1/chat/completions", {
      "messages": [{"role": "user", "content": "x"}], "max_tokens": 1,
      "n": 2, "speculative": False})
  assert status == 200, data
  base = _rid(data["id"])
  assert all(fake.requests[f"{base}-{i}"].sampling.HasField("speculative")
             and not fake.requests[f"{base}-{i}"].sampling.speculative
             for i in range(2))
  status, data = _post(router, "/v1/completions",
                       {"prompt": "hello", "speculative": "false"})
  assert status == 400 and data["error"]["param"] == "speculative"
  assert data["error"]["message"] == (
      "speculative: must be true or false, got 'false'")


def test_n_choices_with_seed_use_seed_plus_i(router):
  fake = router[0]
  status, data = _post(router, "/v1/completions",
                       {"prompt": "hello", "max_tokens": 2, "n": 3,
                        "seed": 10})
  assert status == 200, data
  assert [c["index"] for c in data["choices"]] == [0, 1, 2]
  base = _rid(data["id"])
  seeds = [fake.requests[f"{base}-{i}"].sampling.seed for i in range(3)]
  assert seeds == [10, 11, 12]
  assert data["usage"]["completion_tokens"] == 6
  assert data["usage"]["prompt_tokens"] == 5     # the prompt, once
  # Without a seed every choice is unseeded.
  status, data = _post(router, "/v1/chat/completions", {
      "messages": [{"role": "user", "content": "x"}], "n": 2,
      "max_tokens": 1})
  base = _rid(data["id"])
  assert not any(fake.requests[f"{base}-{i}"].sampling.HasField("seed")
                 for i in range(2))
  # Streaming: each choice gets its role chunk, then its content.
  events = _stream(router, "/v1/chat/completions", {
      "messages": [{"role": "user", "content": "x"}], "n": 2,
      "max_tokens": 3, "stream": True})
  for i in range(2):
    mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
    assert mine[0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["delta"].get("content", "") for c in mine) == \
        "<100><101><102>"
    assert mine[-1]["finish_reason"] == "length"


def test_a_batch_of_prompts_numbers_choices_as_vllm(router):
  """Prompt i's choice j is choice i * n + j; each prompt's choices sample
  with seed + j; usage counts each prompt once and every choice's tokens."""
  fake = router[0]
  status, data = _post(router, "/v1/completions", {
      "prompt": ["batch-a", [7, 8, 9]], "n": 2, "max_tokens": 3,
      "seed": 5})
  assert status == 200, data
  assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
  base = _rid(data["id"])
  sent = [fake.requests[f"{base}-{k}"] for k in range(4)]
  assert [r.text for r in sent[:2]] == ["batch-a", "batch-a"]
  assert [list(r.token_ids.ids) for r in sent[2:]] == [[7, 8, 9]] * 2
  assert [r.sampling.seed for r in sent] == [5, 6, 5, 6]
  assert data["usage"] == {
      "prompt_tokens": len("batch-a") + 3, "completion_tokens": 12,
      "total_tokens": len("batch-a") + 3 + 12,
      "prompt_tokens_details": {"cached_tokens": 2 * _CACHED}}
  # Streamed, each choice's chunks carry its own index.
  events = _stream(router, "/v1/completions", {
      "prompt": ["batch-b", "batch-c"], "max_tokens": 2, "stream": True})
  texts = {}
  for e in events:
    for c in e["choices"]:
      texts[c["index"]] = texts.get(c["index"], "") + c["text"]
  assert texts == {0: "<100><101>", 1: "<100><101>"}


def test_logprobs_are_the_chosen_tokens(router):
  status, data = _post(router, "/v1/completions",
                       {"prompt": "hello", "max_tokens": 3, "logprobs": 0})
  assert status == 200, data
  lp = data["choices"][0]["logprobs"]
  assert lp["token_logprobs"] == pytest.approx([-0.1, -0.101, -0.102])
  assert lp["tokens"] == ["token_id:100", "token_id:101", "token_id:102"]
  assert lp["top_logprobs"][1] == {"token_id:101": pytest.approx(-0.101)}
  # Without a tokenizer a message's text cannot be split between its
  # tokens (the fake sends two a message): each starts where its message's
  # text does, never past the text.
  assert data["choices"][0]["text"] == "<100><101><102>"
  assert lp["text_offset"] == [0, 0, 10]
  status, data = _post(router, "/v1/chat/completions", {
      "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
      "logprobs": True, "top_logprobs": 0})
  content = data["choices"][0]["logprobs"]["content"]
  assert [c["token"] for c in content] == ["token_id:100", "token_id:101"]
  assert content[0]["logprob"] == pytest.approx(-0.1)
  assert content[0]["bytes"] == list(b"token_id:100")
  assert content[0]["top_logprobs"] == []


def test_logprobs_of_tokens_inside_a_character(router, tiny_model_dir):
  """A byte-level token that ends inside a UTF-8 character: its logprob
  entry's bytes are the token's own bytes (not U+FFFD's), and the
  completion's text_offset counts the text as it was released, never past
  it. "é" is two tokens (bytes C3, A9) in the tiny tokenizer."""
  from pdjax.tokenizer import Tokenizer
  tok = Tokenizer.from_dir(tiny_model_dir)
  ids = tok.encode("é€ b", add_bos=False)
  assert len(ids) == 6 and tok.decode(ids[:1]) == "\ufffd"
  # What the router streams: no text until a character completes.
  pieces = ["", "é", "", "", "€", " b"]
  script = "tokens:" + json.dumps([list(p) for p in zip(ids, pieces)])
  status, data = _post(router, "/v1/chat/completions", {
      "messages": [{"role": "user", "content": script}], "logprobs": True,
      "max_tokens": 6}, tokenizer=tok,
      chat_template=ChatTemplate("{{ messages[-1]['content'] }}"))
  assert status == 200, data
  content = data["choices"][0]["logprobs"]["content"]
  assert [bytes(c["bytes"]) for c in content] == [
      b"\xc3", b"\xa9", b"\xe2", b"\x82", b"\xac", b" b"]
  assert b"".join(bytes(c["bytes"]) for c in content) == "é€ b".encode()
  for stream in (False, True):
    body = {"prompt": script, "logprobs": 1, "max_tokens": 6,
            "stream": stream}
    if stream:
      events = _stream(router, "/v1/completions", body, tokenizer=tok)
      text = "".join(e["choices"][0]["text"] for e in events)
      offsets = [o for e in events
                 for o in e["choices"][0]["logprobs"]["text_offset"]]
    else:
      status, data = _post(router, "/v1/completions", body, tokenizer=tok)
      choice = data["choices"][0]
      text, offsets = choice["text"], choice["logprobs"]["text_offset"]
    assert text == "é€ b"
    # Each token starts where the text stood when it arrived.
    assert offsets == [0, 0, 1, 1, 1, 2], (stream, offsets)


# ------------------------------------------------------- stop strings (HTTP)
def test_stop_string_cuts_the_output_and_cancels_the_router_call(router):
  fake = router[0]
  pieces = ["Hel", "lo, wor", "ld! The", " end", " never sent"]
  status, data = _post(router, "/v1/completions", {
      "prompt": "script:" + json.dumps(pieces), "stop": ["! T", "zzz"]})
  assert status == 200, data
  assert data["choices"][0]["text"] == "Hello, world"
  assert data["choices"][0]["finish_reason"] == "stop"
  # The three tokens that reached the gateway; the prompt's usage came with
  # the first of them (the router's last message never did).
  assert data["usage"]["completion_tokens"] == 3
  assert data["usage"]["prompt_tokens_details"] == {"cached_tokens": _CACHED}
  assert data["usage"]["prompt_tokens"] == len("script:" + json.dumps(pieces))
  # The router call was cancelled (the fake never ends one by itself).
  assert fake.cancelled[_rid(data["id"])].wait(5)


def test_stop_string_kept_where_the_request_includes_it(router):
  """``include_stop_str_in_output``: the output ends with the stop string
  (split across deltas here), the call cancelled as without it."""
  fake = router[0]
  pieces = ["Hel", "lo, wor", "ld! T", "he end", " never sent"]
  for include, want in ((True, "Hello, world! T"), (False, "Hello, world")):
    status, data = _post(router, "/v1/completions", {
        "prompt": "script:" + json.dumps(pieces), "stop": ["! T", "zzz"],
        "include_stop_str_in_output": include})
    assert status == 200, data
    assert data["choices"][0]["text"] == want
    assert data["choices"][0]["finish_reason"] == "stop"
    assert fake.cancelled[_rid(data["id"])].wait(5)
  status, data = _post(router, "/v1/completions", {
      "prompt": "a", "stop": "x", "include_stop_str_in_output": "yes"})
  assert status == 400 and data["error"]["param"] == (
      "include_stop_str_in_output"), data


def test_no_stop_string_before_min_tokens(router):
  """As vLLM: stop strings end a choice only once it holds min_tokens
  tokens; the text before is output whole, stop strings and all."""
  fake = router[0]
  pieces = ["a STOP", "b", "STOP", "more", " never sent"]
  for min_tokens, want in ((2, "a STOPb"), (0, "a ")):
    status, data = _post(router, "/v1/completions", {
        "prompt": "script:" + json.dumps(pieces), "stop": "STOP",
        "min_tokens": min_tokens})
    assert status == 200, data
    assert data["choices"][0]["text"] == want
    assert data["choices"][0]["finish_reason"] == "stop"
    assert fake.cancelled[_rid(data["id"])].wait(5)


def test_stop_string_split_across_stream_deltas(router):
  fake = router[0]
  pieces = ["Hi S", "T", "OP", "more"]
  # A template that sends the message as is, so the fake reads the script.
  events = _stream(router, "/v1/chat/completions", {
      "messages": [{"role": "user", "content": "script:" + json.dumps(
          pieces)}], "stop": "STOP", "stream": True, "max_tokens": 9,
      "stream_options": {"include_usage": True}},
      chat_template=ChatTemplate("{{ messages[-1]['content'] }}"))
  content = [e["choices"][0] for e in events[1:-1]]
  text = "".join(c["delta"].get("content", "") for c in content)
  assert text == "Hi "
  assert not any("S" in c["delta"].get("content", "") for c in content)
  assert content[-1]["finish_reason"] == "stop"
  assert events[-1]["usage"]["completion_tokens"] == 3
  assert fake.cancelled[_rid(events[0]["id"])].wait(5)
  # Deltas held back whole send nothing: the role chunk, then the text.
  events = _stream(router, "/v1/chat/completions", {
      "messages": [{"role": "user", "content": "script-end:" + json.dumps(
          ["a", "b", "c"])}], "stop": "abcd", "stream": True,
      "max_tokens": 9},
      chat_template=ChatTemplate("{{ messages[-1]['content'] }}"))
  assert [e["choices"][0]["delta"] for e in events] == [
      {"role": "assistant", "content": ""}, {"content": "abc"}]


def test_stop_string_prompt_tokens_from_the_gateways_tokenizer(
    router, tiny_model_dir):
  """A router that sends usage only on its last message (the fake's
  "tokens:" path), every choice ended early by a stop string: the prompt is
  counted with the gateway's tokenizer."""
  from pdjax.tokenizer import Tokenizer
  tok = Tokenizer.from_dir(tiny_model_dir)
  prompt = "tokens:" + json.dumps([[200, "a"], [201, "b"], [202, "STOP"],
                                   [203, "never"]])
  status, data = _post(router, "/v1/completions",
                       {"prompt": prompt, "stop": "STOP"}, tokenizer=tok)
  assert status == 200, data
  assert data["usage"]["prompt_tokens"] == len(tok.encode(prompt))
  assert data["choices"][0]["text"] == "ab"
  # ... and logprob tokens are named by the tokenizer.
  status, data = _post(router, "/v1/completions",
                       {"prompt": "x", "max_tokens": 1, "logprobs": 1},
                       tokenizer=tok)
  assert data["choices"][0]["logprobs"]["tokens"] == [tok.decode([100])]


def test_unmatched_stop_string_releases_everything(router):
  status, data = _post(router, "/v1/completions", {
      "prompt": "script-end:" + json.dumps(["ab", "c", "ST"]),
      "stop": ["STOP"]})
  assert data["choices"][0]["text"] == "abcST"
  assert data["choices"][0]["finish_reason"] == "length"
  assert data["usage"]["prompt_tokens_details"] == {"cached_tokens": _CACHED}


# ------------------------------------------------------------ 400s, 404s
_CHAT = [{"role": "user", "content": "hi"}]
_BAD = [
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {"prompt": [1, -2]}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2 ** 31]}, "prompt"),
    ("/v1/completions", {"prompt": [1, True]}, "prompt"),
    ("/v1/completions", {"prompt": [[3, -1]]}, "prompt[0]"),
    ("/v1/completions", {"prompt": ["a", ""]}, "prompt[1]"),
    ("/v1/completions", {"prompt": ["a", [1, "x"]]}, "prompt[1]"),
    ("/v1/completions", {"prompt": ["a"] * 9, "n": 128}, "prompt"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1.5}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 2**31}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "temperature": -0.1}, "temperature"),
    ("/v1/completions", {"prompt": "a", "temperature": "hot"},
     "temperature"),
    ("/v1/completions", {"prompt": "a", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "a", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": "a", "top_k": -2}, "top_k"),
    ("/v1/completions", {"prompt": "a", "min_p": -0.5}, "min_p"),
    ("/v1/completions", {"prompt": "a", "min_tokens": -1}, "min_tokens"),
    ("/v1/completions", {"prompt": "a", "min_tokens": 1.5}, "min_tokens"),
    ("/v1/chat/completions", {"messages": _CHAT, "min_p": 1.5}, "min_p"),
    ("/v1/completions", {"prompt": "a", "seed": -1}, "seed"),
    ("/v1/completions", {"prompt": "a", "seed": 2**63 - 1, "n": 2}, "seed"),
    ("/v1/completions", {"prompt": "a", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "a", "n": 129}, "n"),
    ("/v1/completions", {"prompt": "a", "stop": ""}, "stop"),
    ("/v1/completions", {"prompt": "a", "stop": ["x", 1]}, "stop"),
    ("/v1/completions", {"prompt": "a", "stop_token_ids": [1.0]},
     "stop_token_ids"),
    ("/v1/completions", {"prompt": "a", "ignore_eos": 1}, "ignore_eos"),
    ("/v1/completions", {"prompt": "a", "speculative": "no"}, "speculative"),
    ("/v1/chat/completions", {"messages": _CHAT, "speculative": 0},
     "speculative"),
    ("/v1/completions", {"prompt": "a", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "a", "stream_options": {
        "include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "a", "stream": True, "stream_options": {
        "include_usage": 1}}, "stream_options.include_usage"),
    ("/v1/completions", {"prompt": "a", "logprobs": 2}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "echo": True}, "echo"),
    ("/v1/completions", {"prompt": "a", "best_of": 2}, "best_of"),
    ("/v1/completions", {"prompt": "a", "presence_penalty": 2.5},
     "presence_penalty"),
    ("/v1/completions", {"prompt": "a", "frequency_penalty": -2.1},
     "frequency_penalty"),
    ("/v1/completions", {"prompt": "a", "repetition_penalty": 0},
     "repetition_penalty"),
    ("/v1/completions", {"prompt": "a", "repetition_penalty": "x"},
     "repetition_penalty"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"5": 1}},
     "logit_bias"),
    ("/v1/completions", {"prompt": "a", "suffix": "end"}, "suffix"),
    ("/v1/completions", {"prompt": "a", "cache_salt": 3}, "cache_salt"),
    ("/v1/completions", {"prompt": "a", "model": 3}, "model"),
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": ["hi"]}, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]},
     "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]},
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ("/v1/chat/completions", {"messages": _CHAT, "top_logprobs": 2,
                              "logprobs": True}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": _CHAT, "logprobs": 1},
     "logprobs"),
    ("/v1/chat/completions", {"messages": _CHAT,
                              "max_completion_tokens": 0},
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": _CHAT, "tools": [
        {"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"messages": _CHAT, "response_format": {
        "type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"messages": _CHAT, "logit_bias": {"5": 1}},
     "logit_bias"),
]


def test_every_invalid_request_is_a_400_naming_its_param(router):
  fake = router[0]
  before = len(fake.order)

  async def test(client):
    out = []
    for path, body, _ in _BAD:
      r = await client.post(path, json=body)
      out.append((r.status, await r.json()))
    return out

  results = _serve(router[2], test)
  for (path, body, param), (status, data) in zip(_BAD, results):
    assert status == 400, (path, body, data)
    err = data["error"]
    assert err["param"] == param, (body, err)
    assert err["type"] == "invalid_request_error"
    assert err["message"].startswith(param), err
  assert len(fake.order) == before     # no router call for any of them
  # Documented defaults of the refused fields pass.
  status, data = _post(router, "/v1/completions", {
      "prompt": "a", "max_tokens": 1, "echo": False, "best_of": 1,
      "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
      "suffix": None, "logprobs": None, "stream": False})
  assert status == 200, data


def test_malformed_bodies_unknown_paths_and_models(router):
  async def test(client):
    out = []
    for body in (b"{not json", b"[1, 2]", b"\xff"):
      r = await client.post("/v1/completions", data=body)
      out.append((r.status, await r.json()))
    r = await client.get("/v1/nothing")
    out.append((r.status, await r.json()))
    r = await client.post("/v1/completions",
                          json={"prompt": "a", "model": "gpt-4"})
    out.append((r.status, await r.json()))
    return out

  *malformed, missing, model = _serve(router[2], test)
  for status, data in malformed:
    assert status == 400 and data["error"]["param"] is None, data
  assert missing[0] == 404 and "/v1/nothing" in missing[1]["error"]["message"]
  assert model[0] == 404
  assert model[1]["error"]["code"] == "model_not_found"
  assert model[1]["error"]["param"] == "model"
  assert _MODEL in model[1]["error"]["message"]


def test_served_model_name_and_models_endpoint(router):
  async def test(client):
    r = await client.get("/v1/models")
    models = await r.json()
    r = await client.post("/v1/completions",
                          json={"model": "mine", "prompt": "a",
                                "max_tokens": 1})
    ok = await r.json()
    r = await client.post("/v1/completions",
                          json={"model": _MODEL, "prompt": "a"})
    return models, ok, r.status

  models, ok, router_name_status = _serve(router[2], test,
                                          served_model_name="mine")
  assert models["object"] == "list"
  card, = models["data"]
  assert (card["id"], card["object"], card["root"], card["max_model_len"],
          card["owned_by"]) == ("mine", "model", _MODEL, 1024, "pdjax")
  assert ok["model"] == "mine"
  assert router_name_status == 404


def test_missing_or_refusing_chat_template(router):
  status, data = _post(router, "/v1/chat/completions", {"messages": _CHAT},
                       chat_template=None)
  assert status == 400 and "--chat_template" in data["error"]["message"]
  strict = ChatTemplate(
      "{% for m in messages %}{% if m['role'] == 'system' %}"
      "{{ raise_exception('System role not supported') }}{% endif %}"
      "{{ m['content'] }}{% endfor %}")
  status, data = _post(router, "/v1/chat/completions", {
      "messages": [{"role": "system", "content": "x"}]},
      chat_template=strict)
  assert status == 400 and data["error"]["param"] == "messages"
  assert "System role not supported" in data["error"]["message"]


# ------------------------------------------------------------ router errors
@pytest.mark.parametrize("code, status", [
    (grpc.StatusCode.INVALID_ARGUMENT, 400),
    (grpc.StatusCode.OUT_OF_RANGE, 400),
    (grpc.StatusCode.FAILED_PRECONDITION, 400),
    (grpc.StatusCode.UNAUTHENTICATED, 401),
    (grpc.StatusCode.PERMISSION_DENIED, 403),
    (grpc.StatusCode.NOT_FOUND, 404),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (grpc.StatusCode.CANCELLED, 503),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    (grpc.StatusCode.UNAVAILABLE, 503),
    (grpc.StatusCode.INTERNAL, 500),
    (grpc.StatusCode.UNKNOWN, 500),
])
def test_router_status_becomes_http_status(router, code, status):
  async def test(client):
    out = []
    for stream in (False, True):
      r = await client.post("/v1/completions", json={
          "prompt": f"abort:{code.name}", "stream": stream})
      out.append((r.status, await r.json(), r.headers))
    return out

  for got, data, headers in _serve(router[2], test):
    # Streaming too: the first delta is awaited before the headers go out.
    assert got == status, data
    err = data["error"]
    assert err["code"] == code.name.lower()
    assert err["message"].startswith("router: boom")
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
      assert err["type"] == "rate_limit_error"
      assert headers["Retry-After"] == "2"   # ~1500 ms, rounded up
    else:
      assert "Retry-After" not in headers


def test_failure_after_the_stream_started_is_a_final_error_event(router):
  events = _stream(router, "/v1/completions",
                   {"prompt": "midfail", "stream": True})
  assert [e["choices"][0]["text"] for e in events[:-1]] == ["<100>", "<101>"]
  err = events[-1]["error"]
  assert err["code"] == "resource_exhausted"
  assert "out of KV pages" in err["message"]


def test_abnormal_finishes_are_errors(router):
  for prompt, status in (("finish:ABORT", 500), ("finish:ERROR", 500),
                         ("nofinish", 500)):
    got, data = _post(router, "/v1/completions", {"prompt": prompt})
    assert got == status, (prompt, data)
    assert data["error"]["type"] == "server_error"


class _BrokenTokenizer:
  """Fails where the gateway names logprob tokens: a stand-in for a bug."""

  def decode(self, ids, skip_special_tokens=True):
    raise RuntimeError("broken")


def test_a_gateway_bug_is_still_an_openai_error(router):
  body = {"prompt": "a", "max_tokens": 3, "logprobs": 0}
  status, data = _post(router, "/v1/completions", body,
                       tokenizer=_BrokenTokenizer())
  assert status == 500 and data["error"]["code"] == "internal_error"
  # Mid-stream: an error event, then [DONE], on the open stream.
  events = _stream(router, "/v1/completions", {**body, "stream": True},
                   tokenizer=_BrokenTokenizer())
  assert events == [{"error": {
      "message": "internal error in the gateway (its log has the details)",
      "type": "server_error", "param": None, "code": "internal_error"}}]


def test_request_timeout_is_a_504(router):
  status, data = _post(router, "/v1/completions", {"prompt": "hang"},
                       request_timeout_s=0.3)
  assert status == 504 and data["error"]["code"] == "deadline_exceeded"


# ------------------------------------------------------------ cancellation
def _serve_for_real(address, test, **config):
  """Runs ``await test(session, base_url)`` against the gateway served as
  the launcher serves it (``make_runner``), not through aiohttp's test
  server, which turns handler cancellation on by itself."""
  async def go():
    runner = make_runner(create_app(GatewayConfig(address, **config)),
                         shutdown_timeout_s=1)
    await runner.setup()
    try:
      site = web.TCPSite(runner, "127.0.0.1", 0)
      await site.start()
      port = runner.addresses[0][1]
      async with ClientSession(timeout=ClientTimeout(total=20)) as session:
        return await test(session, f"http://127.0.0.1:{port}")
    finally:
      await runner.cleanup()
  return asyncio.run(go())


async def _new_rids(fake, before, n):
  while len(rids := set(fake.order) - before) < n:
    await asyncio.sleep(0.01)
  return rids


def test_client_disconnect_cancels_the_router_calls(router):
  fake = router[0]

  async def test(session, url):
    before = set(fake.order)
    r = await session.post(f"{url}/v1/completions",
                           json={"prompt": "hang", "stream": True, "n": 2})
    assert r.status == 200
    await r.content.readuntil(b"\n\n")   # the first token arrived
    rids = await _new_rids(fake, before, 2)
    assert not any(fake.cancelled[rid].is_set() for rid in rids)
    r.close()                            # the client goes away
    for rid in rids:
      assert await asyncio.to_thread(fake.cancelled[rid].wait, 5), rid

  _serve_for_real(router[2], test)


def test_non_streaming_disconnect_cancels_too(router):
  fake = router[0]

  async def test(session, url):
    before = set(fake.order)
    task = asyncio.create_task(session.post(f"{url}/v1/completions",
                                            json={"prompt": "hang"}))
    rid, = await _new_rids(fake, before, 1)
    assert not fake.cancelled[rid].is_set()
    task.cancel()                        # drops the connection
    assert await asyncio.to_thread(fake.cancelled[rid].wait, 5)
    # Counted as the client's going away (499), the request no longer open.
    for _ in range(100):
      async with session.get(f"{url}/metrics") as r:
        text = await r.text()
      if _sample(text, "pdjax_gateway_requests_total",
                 endpoint="/v1/completions", status="499"):
        break
      await asyncio.sleep(0.05)
    assert _sample(text, "pdjax_gateway_requests_total",
                   endpoint="/v1/completions", status="499") == 1
    assert _sample(text, "pdjax_gateway_running_requests") == 1  # /metrics

  _serve_for_real(router[2], test)


# ---------------------------------------------------------- hostile clients
async def _raw(url: str, head: bytes):
  """A raw connection to the gateway that has sent ``head``."""
  host, port = url.removeprefix("http://").split(":")
  reader, writer = await asyncio.open_connection(host, int(port))
  writer.write(head)
  await writer.drain()
  return reader, writer


async def _closed_by_server(reader, within_s: float) -> bytes:
  """What the server sent before closing the connection (fails if it is
  still open after ``within_s``)."""
  return await asyncio.wait_for(reader.read(), within_s)


_PARTIAL_HEAD = (b"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\n"
                 b"Content-Type: application/json\r\n")


def test_slow_clients_cannot_exhaust_the_gateway(router):
  """Connections that never finish their headers are closed after the
  header timeout; beyond the connection limit new ones are refused with a
  503 at once (not left to exhaust file descriptors); a body that stops
  arriving is a 408 after the body timeout; and then normal requests are
  served again."""
  limit, timeout = 12, 0.5

  async def test(session, url):
    slow = [await _raw(url, _PARTIAL_HEAD) for _ in range(limit)]
    extra_reader, _ = await _raw(url, b"")
    refused = await _closed_by_server(extra_reader, 2)
    assert refused.startswith(b"HTTP/1.1 503"), refused
    assert b'"code": "too_many_connections"' in refused
    t0 = time.monotonic()
    for reader, _ in slow:
      assert await _closed_by_server(reader, 5) == b""
    assert time.monotonic() - t0 < 3
    # A body that never completes.
    reader, _ = await _raw(url, b"POST /v1/completions HTTP/1.1\r\n"
                           b"Host: gateway\r\nContent-Length: 100\r\n"
                           b"Content-Type: application/json\r\n\r\n"
                           b'{"prompt": ')
    answer = await _closed_by_server(reader, 5)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"request_timeout" in answer
    async with session.post(f"{url}/v1/completions",
                            json={"prompt": "a", "max_tokens": 1}) as r:
      assert r.status == 200, await r.text()

  _serve_for_real(router[2], test, max_connections=limit,
                  header_timeout_s=timeout, body_timeout_s=timeout)


def test_a_body_past_the_size_limit_is_a_413(router):
  status, data = _post(router, "/v1/completions",
                       {"prompt": "x" * 2000, "max_tokens": 1},
                       max_body_bytes=1000)
  assert status == 413 and "Request Entity Too Large" in data["error"][
      "message"], data


@pytest.mark.parametrize("body, param", [
    (b'{"prompt": "a\\ud800b"}', "prompt"),
    (b'{"prompt": ["ok", "\\udfff"]}', "prompt[1]"),
    (b'{"messages": [{"role": "user", "content": "x\\ud83d"}], '
     b'"max_tokens": 2}', "messages[0].content"),
    (b'{"prompt": "a", "cache_salt": "\\ud800"}', "cache_salt"),
])
def test_lone_surrogates_are_a_400_naming_the_field(router, body, param):
  """JSON may escape a lone UTF-16 surrogate; no valid Unicode text holds
  one, and the tokenizer and protobuf cannot encode it."""
  path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"

  async def test(client):
    r = await client.post(path, data=body,
                          headers={"Content-Type": "application/json"})
    return r.status, await r.json()

  status, data = _serve(router[2], test)
  assert status == 400, data
  assert data["error"]["param"] == param
  assert "surrogate" in data["error"]["message"]


def test_deeply_nested_json_is_a_400(router):
  async def test(client):
    out = []
    for depth in (1000, 100_000, 70):
      body = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
      r = await client.post("/v1/completions", data=body,
                            headers={"Content-Type": "application/json"})
      out.append((r.status, await r.json()))
    return out

  for status, data in _serve(router[2], test):
    assert status == 400, data
    assert "nested" in data["error"]["message"], data


# ------------------------------------------------------------ auth, health
def test_api_key(router):
  async def test(client):
    out = []
    for headers in ({}, {"Authorization": "Bearer wrong"},
                    {"Authorization": "sekret"},
                    {"Authorization": "Basic sekret"},
                    {"Authorization": "Bearersekret"},
                    {"Authorization": "Bearer sekret"},
                    # The scheme is case-insensitive (RFC 7235).
                    {"Authorization": "bearer sekret"},
                    {"Authorization": "BEARER  sekret"}):
      r = await client.post("/v1/completions", headers=headers,
                            json={"prompt": "a", "max_tokens": 1})
      out.append((r.status, await r.json()))
    r = await client.get("/v1/models")
    out.append((r.status, await r.json()))
    r = await client.get("/health")    # probes carry no key
    out.append((r.status, await r.json()))
    r = await client.get("/metrics")   # nor does Prometheus
    out.append((r.status, await r.text()))
    r = await client.post("/tokenize", json={"prompt": "a"})
    out.append((r.status, await r.json()))
    r = await client.get("/version")
    out.append((r.status, await r.json()))
    return out

  *denied, ok, ok_lower, ok_upper, models, health_, metrics_, tok, ver = (
      _serve(router[2], test, api_key="sekret"))
  assert tok[0] == 401, tok      # /tokenize is the API's
  assert ver[0] == 200 and ver[1]["version"], ver
  for got in (ok_lower, ok_upper):
    assert got[0] == 200 and got[1]["choices"][0]["text"] == "<100>", got
  assert metrics_[0] == 200 and "pdjax_gateway_requests_total" in metrics_[1]
  for status, data in denied:
    assert status == 401, data
    assert data["error"]["code"] == "invalid_api_key"
    assert data["error"]["type"] == "authentication_error"
  assert ok[0] == 200 and ok[1]["choices"][0]["text"] == "<100>"
  assert models[0] == 401
  assert health_ == (200, {"status": "SERVING"})


def _sample(text: str, name: str, **labels) -> float:
  """One sample of a Prometheus text exposition (0 when absent)."""
  from prometheus_client.parser import text_string_to_metric_families
  for family in text_string_to_metric_families(text):
    for sample in family.samples:
      if sample.name == name and all(sample.labels.get(k) == v
                                     for k, v in labels.items()):
        return sample.value
  return 0.0


def test_metrics_count_what_clients_saw(router):
  """Requests by endpoint and status (a 400, a 429, an unknown path, a
  stream whose router call failed after its 200), streaming TTFT, and no
  request left open."""
  async def test(client):
    await client.post("/v1/completions", json={"prompt": "a",
                                               "max_tokens": 2})
    await client.post("/v1/completions", json={"prompt": "a",
                                               "max_tokens": 2,
                                               "stream": True})
    await client.post("/v1/completions", json={"prompt": "a", "n": 0})
    await client.post("/v1/completions",
                      json={"prompt": "abort:RESOURCE_EXHAUSTED"})
    r = await client.post("/v1/completions", json={"prompt": "midfail",
                                                   "stream": True})
    await r.text()
    await client.get("/no/such/path")
    r = await client.get("/metrics")
    assert r.headers["Content-Type"].startswith("text/plain")
    return await r.text()

  text = _serve(router[2], test)
  total = "pdjax_gateway_requests_total"
  done = "/v1/completions"
  assert _sample(text, total, endpoint=done, status="200") == 3
  assert _sample(text, total, endpoint=done, status="400") == 1
  assert _sample(text, total, endpoint=done, status="429") == 1
  assert _sample(text, total, endpoint="other", status="404") == 1
  assert _sample(text, "pdjax_gateway_stream_errors_total",
                 endpoint=done) == 1
  assert _sample(text, "pdjax_gateway_time_to_first_token_seconds_count",
                 endpoint=done) == 2     # both streams sent a first event
  assert _sample(text, "pdjax_gateway_request_latency_seconds_count",
                 endpoint=done) == 5
  assert _sample(text, "pdjax_gateway_running_requests") == 1  # /metrics


def test_router_token_is_sent(router):
  fake = router[0]
  status, data = _post(router, "/v1/completions",
                       {"prompt": "a", "max_tokens": 1},
                       router_token="router-tok")
  assert fake.metadata[_rid(data["id"])]["authorization"] == \
      "Bearer router-tok"


def test_health_follows_the_router(router):
  health_servicer = router[1]

  async def probe(client):
    r = await client.get("/health")
    return r.status, await r.json()

  async def probes(client):
    out = {}
    for path in ("/health", "/readyz", "/livez"):
      r = await client.get(path)
      out[path] = (r.status, await r.json())
    return out

  assert _serve(router[2], probe) == (200, {"status": "SERVING"})
  assert _serve(router[2], probes)["/readyz"] == (200, {"status": "SERVING"})
  health_servicer.set("pdjax.v1.Generation",
                      health_pb2.HealthCheckResponse.NOT_SERVING)
  try:
    assert _serve(router[2], probe) == (503, {"status": "NOT_SERVING"})
    # Readiness (/health, /readyz) follows the router; liveness (/livez)
    # only says the gateway runs, so Kubernetes restarts nothing.
    got = _serve(router[2], probes)
    assert got["/readyz"] == got["/health"] == (503,
                                                {"status": "NOT_SERVING"})
    assert got["/livez"] == (200, {"status": "alive"})
  finally:
    health_servicer.set("pdjax.v1.Generation",
                        health_pb2.HealthCheckResponse.SERVING)
  # No router at all: 503, and the API says the router is unavailable.
  status, data = _serve("127.0.0.1:1", probe)
  assert status == 503 and "unreachable" in data["status"]
  assert _serve("127.0.0.1:1", probes)["/livez"][0] == 200
  status, data = _post(("", "", "127.0.0.1:1"), "/v1/completions",
                       {"prompt": "a"})
  assert status == 503 and data["error"]["code"] == "unavailable"


# ----------------------------------------------------------- chat templates
_LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Whitespace control, tojson, namespace, loop controls, the tools variable,
# strftime_now and a {% generation %} block: what real templates use.
_FANCY = """{%- set ns = namespace(n=0) -%}
{% if tools is not none %}TOOLS {{ tools | tojson }}{% endif %}
{% for m in messages %}
  {% if m['role'] == 'skip' %}{% continue %}{% endif %}
  {% set ns.n = ns.n + 1 %}
  [{{ ns.n }}] {{ m['role'] }} {{ m | tojson }}
  {% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}{% endif %}
{% endfor %}
{{ strftime_now('%Y') }}{% if add_generation_prompt %}<gen>{% endif %}
"""
_MESSAGES = [
    {"role": "system", "content": "  Be brief: «ünïcode» & <html>  "},
    {"role": "user", "content": "Hi"},
    {"role": "skip", "content": "nope"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir):
  from transformers import PreTrainedTokenizerFast
  return PreTrainedTokenizerFast(
      tokenizer_file=str(tiny_model_dir / "tokenizer.json"),
      bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")


@pytest.mark.parametrize("source", [_LLAMA3, _FANCY, _PLAIN.read_text()],
                         ids=["llama3", "fancy", "plain"])
def test_chat_template_renders_as_transformers_does(
    source, hf_tokenizer, tiny_model_dir, tmp_path):
  expected = hf_tokenizer.apply_chat_template(
      _MESSAGES, chat_template=source, tokenize=False,
      add_generation_prompt=True)
  (tmp_path / "t.jinja").write_text(source)
  # Special tokens from the tiny model's tokenizer_config.json.
  ours = load_chat_template(tmp_path / "t.jinja", tiny_model_dir)
  assert ours.render(_MESSAGES) == expected
  assert ours.special_tokens["bos_token"] == "<|bos|>"


def test_chat_template_from_tokenizer_config(tmp_path):
  assert load_chat_template(None, tmp_path) is None   # no config at all
  config = {"bos_token": {"content": "<s>", "lstrip": False},
            "eos_token": "</s>", "chat_template": [
                {"name": "tool_use", "template": "tools"},
                {"name": "default",
                 "template": "{{ bos_token }}{{ messages[0]['content'] }}"
                             "{{ eos_token }}"}]}
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  t = load_chat_template(None, tmp_path)
  assert t.render([{"role": "user", "content": "x"}]) == "<s>x</s>"
  config["chat_template"] = "{{ messages | length }}"
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  assert load_chat_template(None, tmp_path).render(_MESSAGES) == "5"
  config["chat_template"] = [{"name": "rag", "template": "x"}]
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  with pytest.raises(ChatTemplateError, match="default"):
    load_chat_template(None, tmp_path)
  with pytest.raises(ChatTemplateError, match="not a valid Jinja"):
    ChatTemplate("{% for %}")


def test_chat_template_is_sandboxed():
  t = ChatTemplate("{{ messages.__class__.__mro__ }}")
  with pytest.raises(ChatTemplateError):
    t.render(_MESSAGES)


# ------------------------------------------- the batch-eval driver's backend
def test_openai_backend_measures_through_the_gateway(router):
  """``tools/batch_eval.py --backend=openai``'s adapter, through the gateway:
  every token with its id, the server's usage, seed + index per request,
  and a refusal as its HTTP status with the router's message."""
  from pdjax.eval.load import run_workload
  from pdjax.eval.openai_backend import OpenAIBackend
  from pdjax.eval.workloads import WorkItem
  fake = router[0]
  items = [WorkItem(request_id="ob0", max_tokens=5,
                    prompt_token_ids=[7, 8, 77]),
           WorkItem(request_id="ob1", max_tokens=3, prompt="ob1 hello",
                    index=1),
           WorkItem(request_id="ob2", max_tokens=2,
                    prompt="abort:RESOURCE_EXHAUSTED", index=2)]

  async def test(client):
    backend = OpenAIBackend(str(client.server.make_url("/")))
    try:
      records = await run_workload(
          backend, items, sampling=dict(temperature=0.0, seed=7, top_k=5,
                                        min_p=0.5, ignore_eos=True,
                                        stop_token_ids=[9],
                                        presence_penalty=0.0,
                                        frequency_penalty=0.25,
                                        repetition_penalty=1.5),
          progress=False)
    finally:
      await backend.aclose()
    return records, backend.model

  records, model = _serve(router[2], test)
  assert model == _MODEL          # asked /v1/models
  ok, text, refused = records
  assert ok.error is None and ok.token_ids == [100, 101, 102, 103, 104]
  assert ok.finish_reason == "length" and len(ok.token_times) == 5
  assert ok.prompt_tokens == 3 and ok.usage["completion_tokens"] == 5
  assert ok.usage["cached_prompt_tokens"] == _CACHED
  assert text.text == "<100><101><102>"
  sent = {r.text if r.WhichOneof("prompt") == "text"
          else tuple(r.token_ids.ids): r for r in fake.requests.values()}
  assert sent[(7, 8, 77)].sampling.seed == 7
  assert sent["ob1 hello"].sampling.seed == 8
  s = sent["ob1 hello"].sampling
  assert (s.max_tokens, s.top_k, s.min_p, s.ignore_eos,
          list(s.stop_token_ids)) == (3, 5, 0.5, True, [9])
  assert (s.HasField("presence_penalty"), s.frequency_penalty,
          s.repetition_penalty) == (False, 0.25, 1.5)
  assert refused.status_code == "HTTP 429" and "boom" in refused.error


def test_openai_backend_counts_chunks_without_token_ids():
  """Servers that send no token ids: one token per non-empty chunk (as
  vLLM's serving benchmark counts), id unknown; the usage chunk's cached
  tokens under pdjax's name; an in-stream error fails the request."""
  from pdjax.eval.openai_backend import (UNKNOWN_TOKEN_ID, OpenAIBackend,
                                         OpenAIError, base_url)
  d = OpenAIBackend._delta({"choices": [{"text": "ab", "index": 0}]})
  assert d.token_ids == [UNKNOWN_TOKEN_ID] and d.text == "ab"
  assert OpenAIBackend._delta({"choices": [{"text": ""}]}).token_ids == []
  u = OpenAIBackend._delta({"choices": [], "usage": {
      "prompt_tokens": 4, "completion_tokens": 2,
      "prompt_tokens_details": {"cached_tokens": 2}}})
  assert u.token_ids == [] and u.usage == {
      "prompt_tokens": 4, "completion_tokens": 2, "cached_prompt_tokens": 2}
  # Speculative drafts (OpenAI's prediction tokens) under the router's names.
  u = OpenAIBackend._delta({"choices": [], "usage": {
      "prompt_tokens": 4, "completion_tokens": 9, "completion_tokens_details":
      {"accepted_prediction_tokens": 5, "rejected_prediction_tokens": 7}}})
  assert u.usage == {"prompt_tokens": 4, "completion_tokens": 9,
                     "spec_draft_tokens": 12, "spec_accepted_tokens": 5}
  with pytest.raises(OpenAIError, match="out of KV"):
    OpenAIBackend._delta({"error": {"message": "out of KV pages"}})
  assert base_url("h:1") == base_url("http://h:1/") == "http://h:1/v1"
  assert base_url("https://h/v1") == "https://h/v1"


# ---------------------------------------------------- tokenize, detokenize
def test_tokenize_and_detokenize_as_vllm(router, tiny_model_dir):
  """vLLM's /tokenize (a prompt, or chat messages rendered as the chat
  completions render them) and /detokenize, with the gateway's tokenizer;
  what cannot be served is a 400 naming its field."""
  from pdjax.tokenizer import Tokenizer
  tok = Tokenizer.from_dir(tiny_model_dir)
  template = ChatTemplate(_PLAIN.read_text(), {"bos_token": "<s>"})
  chat = [{"role": "user", "content": "Hello there"}]
  raw = tok.encode("hello world", add_bos=False)

  async def test(client):
    out = []
    for path, body in (
        ("/tokenize", {"prompt": "hello world"}),
        ("/tokenize", {"prompt": "hello world", "add_special_tokens": False,
                       "model": _MODEL}),
        ("/tokenize", {"messages": chat}),
        ("/tokenize", {"messages": chat, "add_generation_prompt": False}),
        ("/detokenize", {"tokens": raw}),
        ("/tokenize", {"prompt": "a", "messages": chat}),
        ("/tokenize", {}),
        ("/tokenize", {"prompt": 5}),
        ("/detokenize", {"tokens": [1, tok.vocab_size]}),
        ("/detokenize", {"tokens": [1, -1]}),
        ("/detokenize", {}),
        ("/detokenize", {"tokens": [1], "model": "other"})):
      r = await client.post(path, json=body)
      out.append((r.status, await r.json()))
    return out

  (prompt, prompt_raw, chat_gen, chat_plain, detok, *bad, other) = _serve(
      router[2], test, tokenizer=tok, chat_template=template)
  want = tok.encode("hello world", add_bos=True)
  assert want != raw                       # the BOS makes a difference
  assert prompt == (200, {"count": len(want), "max_model_len": 1024,
                          "tokens": want, "token_strs": None})
  assert prompt_raw[1]["tokens"] == raw
  for got, gen in ((chat_gen, True), (chat_plain, False)):
    ids = tok.encode(template.render(chat, add_generation_prompt=gen),
                     add_bos=False)
    assert got == (200, {"count": len(ids), "max_model_len": 1024,
                         "tokens": ids, "token_strs": None}), got
  assert chat_gen[1]["tokens"] != chat_plain[1]["tokens"]
  assert detok == (200, {"prompt": "hello world"})
  for (status, data), param in zip(bad, ("prompt", "prompt", "prompt",
                                         "tokens", "tokens", "tokens")):
    assert status == 400 and data["error"]["param"] == param, data
  assert other[0] == 404 and other[1]["error"]["param"] == "model"
  # No tokenizer: nothing to tokenize with.
  status, data = _post(router, "/tokenize", {"prompt": "a"})
  assert status == 400 and "no tokenizer" in data["error"]["message"]


# -------------------------------------------------------------- end to end
def _http(url, path, body):
  req = urllib.request.Request(
      f"{url}{path}", data=json.dumps(body).encode(),
      headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=60) as r:
    return r.read().decode()


def test_gateway_on_a_local_deployment(tmp_path):
  """The launcher in front of a real router on the tiny model, and the HTTP
  a router's own process serves (--http_port): greedy completions match
  pdjax.client's, and chat streams, with the chat template the
  checkpoint's tokenizer_config.json carries."""
  from cluster_helpers import Cluster

  from pdjax.client import Client
  from pdjax.launch.cluster import start_gateway
  cluster = Cluster(tmp_path, warmup=False)
  try:
    url = start_gateway(cluster.cluster, cluster.address, config="test")
    cluster.add_router("router_http", ["--http_port=0"])
    router_url = f"http://127.0.0.1:{cluster.proc('router_http').http_port}"
    prompt = "The quick brown fox"
    sampling = dict(max_tokens=8, temperature=0, ignore_eos=True)
    with Client(cluster.address, timeout_s=60) as c:
      ref = c.generate(prompt, skip_special_tokens=True, **sampling)
      chat_ref = c.generate("<|bos|>User: Hello\nAssistant:",
                            add_special_tokens=False,
                            skip_special_tokens=True, **sampling)
    with urllib.request.urlopen(
        f"{url}/v1/models", timeout=30) as r:
      model = json.loads(r.read())["data"][0]["id"]
    for base in (url, router_url):
      out = json.loads(_http(base, "/v1/completions", {
          "model": model, "prompt": prompt, "return_token_ids": True,
          **sampling}))
      choice, = out["choices"]
      assert choice["token_ids"] == ref.token_ids
      assert choice["text"] == ref.text
      assert choice["finish_reason"] == "length"
      assert out["usage"]["prompt_tokens"] == ref.usage.prompt_tokens

      events = _events(_http(base, "/v1/chat/completions", {
          "messages": [{"role": "user", "content": "Hello"}], "stream": True,
          "stream_options": {"include_usage": True}, **sampling}))
      assert events[0]["choices"][0]["delta"]["role"] == "assistant"
      text = "".join(e["choices"][0]["delta"].get("content", "")
                     for e in events[1:-1])
      assert text == chat_ref.text
      assert events[-2]["choices"][0]["finish_reason"] == "length"
      assert events[-1]["usage"]["completion_tokens"] == 8
      assert events[-1]["usage"]["prompt_tokens"] == \
          chat_ref.usage.prompt_tokens

    # The batch-eval driver measures through the gateway.
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, str(_ROOT / "tools" / "batch_eval.py"),
         "--backend=openai", f"--target={url}", "--preset=chat",
         "--length_scale=0.05", "--max_model_len=256", "--vocab_size=512",
         "--num_requests=8", "--rate=8", f"--out_dir={out}",
         "--noprogress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # And the gateway's cost against the router, same requests both ways.
    bench = subprocess.run(
        [sys.executable, str(_ROOT / "tools" / "bench_gateway.py"),
         f"--router={cluster.address}", f"--gateway={url}",
         f"--router_http={router_url}",
         "--num_requests=6", "--rounds=2", "--rate=16",
         f"--out={tmp_path / 'gw.json'}"],
        capture_output=True, text=True, timeout=300)
    assert bench.returncode == 0, bench.stdout[-2000:] + bench.stderr[-2000:]
  finally:
    cluster.stop()
  assert "| TTFT p50 (ms) |" in bench.stdout
  result = json.loads((tmp_path / "gw.json").read_text())
  assert result["identical_tokens"] == result["requests"] == 12
  assert result["summaries"]["gateway"]["completed"] == 12
  assert result["summaries"]["router_http"]["completed"] == 12
  records = [json.loads(line) for line in
             (out / "results.jsonl").read_text().splitlines()]
  assert len(records) == 8
  for r in records:
    assert r["status"] == "completed", r
    assert r["output_tokens"] == r["max_tokens"] == len(r["token_times"])
    assert min(r["token_ids"]) >= 0      # the gateway sent real ids
    assert r["usage"]["completion_tokens"] == r["output_tokens"]
    assert r["usage"]["prompt_tokens"] == r["prompt_tokens"] > 0
