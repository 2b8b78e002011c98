"""Prometheus metrics of the gateway, served on its own ``GET /metrics``.

The router's metrics say what pdjax did with a request; these say what the
HTTP clients saw: the status each endpoint answered, how many requests are
open, the time to the first streamed event and to the end of the response,
all measured at the gateway, so their difference from the router's is the
gateway's own cost. A registry per app (no process-global one), as every
pdjax service keeps.
"""

from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pdjax.service.metrics import LATENCY_BUCKETS

# A client that went away before the answer: nginx's name for it, as the
# gateway's error mapping also uses it for a cancelled router call.
CLIENT_CLOSED = "499"


class GatewayMetrics:
  """The gateway's metric set; ``endpoint`` labels are route paths."""

  def __init__(self):
    r = self.registry = CollectorRegistry()
    self.requests = Counter(
        "pdjax_gateway_requests_total",
        "HTTP requests by endpoint and response status (499: the client "
        "went away first).", ["endpoint", "status"], registry=r)
    self.running = Gauge(
        "pdjax_gateway_running_requests", "HTTP requests being answered.",
        registry=r)
    self.ttft = Histogram(
        "pdjax_gateway_time_to_first_token_seconds",
        "Streaming requests: arrival to the first event sent.",
        ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
    self.latency = Histogram(
        "pdjax_gateway_request_latency_seconds",
        "Arrival to the end of the response.", ["endpoint"],
        buckets=LATENCY_BUCKETS, registry=r)
    self.stream_errors = Counter(
        "pdjax_gateway_stream_errors_total",
        "Streams that ended with an error event after their 200.",
        ["endpoint"], registry=r)

  def exposition(self) -> tuple[bytes, str]:
    """The text format and its content type."""
    return generate_latest(self.registry), CONTENT_TYPE_LATEST


__all__ = ["CLIENT_CLOSED", "GatewayMetrics"]
