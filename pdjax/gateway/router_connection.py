"""What the gateway needs of the router: its ``Generation`` service.

Two things provide it: ``pdjax.client.AsyncClient`` (the router in another
process, over gRPC: ``pdjax.launch.gateway``) and ``pdjax.service.
router_in_process.InProcessRouterClient`` (the router in the gateway's own
process: ``pdjax.launch.router --http_port``). Both raise
``pdjax.client.GenerationError`` with the gRPC status the router gave.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from pdjax.client import StreamDelta


class RouterConnection(Protocol):

  def stream(self, prompt: str | None = None, *,
             timeout_s: float | None = None,
             **options: Any) -> AsyncIterator[StreamDelta]:
    """One request's deltas (``pdjax.client.build_request``'s options)."""

  async def model_info(self, *,
                       timeout_s: float | None = None) -> dict[str, Any]:
    """The served model (``pdjax.client.types.model_info_to_dict``)."""

  async def health(self, service: str = "", *,
                   timeout_s: float | None = None) -> str:
    """The router's health status of ``service`` ("SERVING", ...)."""

  async def wait_ready(self, timeout_s: float = 30.0) -> None:
    """Returns once the router can serve; TimeoutError otherwise."""

  async def close(self) -> None:
    """Ends what the connection holds."""


__all__ = ["RouterConnection"]
