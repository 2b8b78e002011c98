"""An OpenAI-compatible HTTP gateway in front of a pdjax router.

``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming or not),
``GET /v1/models`` and ``GET /health``, served by aiohttp and translated into
calls of the router's ``Generation`` service (``router_connection``:
``pdjax.client.AsyncClient`` over gRPC, or the router itself where the
router's process serves the HTTP). What the router cannot do (stop strings,
several choices, chat templates) the gateway does itself, as vLLM's
frontend does; what pdjax has no engine support for (penalties, top
alternatives in logprobs, tools, ...) is refused with a 400 naming the
field.

Modules, one job each: ``protocol`` (request bodies -> checked parameters),
``chat_template`` (messages -> prompt text), ``stops`` (stop strings on
streamed text), ``choices`` (the router calls of one request, merged),
``responses`` (OpenAI JSON), ``errors`` (error bodies and status codes),
``server`` (the aiohttp app). ``python -m pdjax.launch.gateway`` runs it in
front of a router; ``python -m pdjax.launch.router --http_port`` in the
router's own process (two gRPC hops fewer on each request's way).
"""

from pdjax.gateway.server import GatewayConfig, create_app

__all__ = ["GatewayConfig", "create_app"]
