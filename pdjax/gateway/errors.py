"""OpenAI-style errors: one exception type, its JSON body, and the HTTP
status each of the router's gRPC codes becomes.

OpenAI clients read ``{"error": {"message", "type", "param", "code"}}`` and
branch on the HTTP status (the official SDKs retry 429 and 5xx, and raise
``BadRequestError`` for 400 without retrying), so the status must say whose
fault a failure is. The mapping follows the one gRPC itself documents for
HTTP gateways (``google.rpc.Code``): a request the router refused as
malformed is a 400 the client must fix, an overloaded router a 429 worth
retrying, a deadline a 504.
"""

from __future__ import annotations

import math
import re
from typing import Any

import grpc

from pdjax.client import GenerationError

# gRPC code -> HTTP status, as google.rpc.Code documents it but for
# CANCELLED (its 499, "client closed request"): a cancellation that reaches
# an HTTP client still waiting for its answer was not that client's doing
# (had it gone, no answer would be sent), but the service giving the
# request up, as a server leaving does: a 503, which clients retry. Anything
# not listed (INTERNAL, UNKNOWN, ABORTED, DATA_LOSS, UNIMPLEMENTED...) is a
# 500.
GRPC_TO_HTTP: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAVAILABLE: 503,
}

# OpenAI's error types by status; other 4xx are invalid requests, 5xx
# server errors.
_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}

# The router's RESOURCE_EXHAUSTED messages end with its retry hint
# (pdjax.service.common.abort_exhausted); it becomes a Retry-After header.
_RETRY_HINT = re.compile(r"retry after ~(\d+) ms")


class ApiError(Exception):
  """A request that ends with an HTTP error and an OpenAI error body.

  Attributes:
    status: the HTTP status.
    message: what went wrong and, where the client can, what to fix.
    param: the request field at fault (None when no single field is).
    code: a short machine-readable code (OpenAI's ``code``), or None.
    retry_after_s: sent as ``Retry-After`` (429/503) when known.
  """

  def __init__(self, status: int, message: str, *, param: str | None = None,
               code: str | None = None, retry_after_s: int | None = None):
    super().__init__(message)
    self.status = status
    self.message = message
    self.param = param
    self.code = code
    self.retry_after_s = retry_after_s

  @property
  def type(self) -> str:
    if self.status in _TYPES:
      return _TYPES[self.status]
    return "server_error" if self.status >= 500 else "invalid_request_error"

  def body(self) -> dict[str, Any]:
    return {"error": {"message": self.message, "type": self.type,
                      "param": self.param, "code": self.code}}

  def headers(self) -> dict[str, str]:
    if self.retry_after_s is None:
      return {}
    return {"Retry-After": str(self.retry_after_s)}


def bad_request(param: str | None, message: str) -> ApiError:
  """A 400 naming the field at fault (its name leads the message too)."""
  text = f"{param}: {message}" if param else message
  return ApiError(400, text, param=param, code="invalid_request")


# Request fields as the router names them in INVALID_ARGUMENT messages
# ("sampling.max_tokens: ...") -> the OpenAI parameter.
_ROUTER_FIELDS = {
    "sampling.max_tokens": "max_tokens",
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.top_k": "top_k",
    "sampling.min_p": "min_p",
    "sampling.min_tokens": "min_tokens",
    "sampling.presence_penalty": "presence_penalty",
    "sampling.frequency_penalty": "frequency_penalty",
    "sampling.repetition_penalty": "repetition_penalty",
    "sampling.seed": "seed",
    "sampling.stop_token_ids": "stop_token_ids",
    "cache_salt": "cache_salt",
    "text": "prompt",
    "token_ids": "prompt",
}


def from_generation_error(e: GenerationError, *,
                          prompt_param: str = "prompt") -> ApiError:
  """The HTTP error for a failed router call; the router's message (which
  names what to fix) is passed through. A router refusal that names a
  request field is a 400 naming the OpenAI parameter, as the gateway's own
  checks are (the prompt's is ``prompt_param``: "messages" for chat)."""
  status = GRPC_TO_HTTP.get(e.code(), 500)
  details = e.details() or e.code().name
  if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
    field, sep, rest = details.partition(": ")
    param = _ROUTER_FIELDS.get(field) if sep else None
    if param is not None:
      return bad_request(prompt_param if param == "prompt" else param, rest)
  retry = None
  if (m := _RETRY_HINT.search(details)) is not None:
    retry = max(1, math.ceil(int(m.group(1)) / 1000))
  return ApiError(status, f"router: {details}", code=e.code().name.lower(),
                  retry_after_s=retry)


__all__ = ["ApiError", "GRPC_TO_HTTP", "bad_request",
           "from_generation_error"]
