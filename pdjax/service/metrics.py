"""Prometheus metrics of the pdjax services.

Each service owns a ``CollectorRegistry`` (no process-global registry, so
several services can live in one test process) and serves it on its own
``--metrics_port``. Names follow Prometheus conventions: ``pdjax_`` prefix,
base units (seconds, bytes), ``_total`` for counters.
"""

from __future__ import annotations

import sys
import threading

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest, start_http_server)

from pdjax.service import gc_pauses


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A decode iteration is a few to a few hundred ms: fine steps there.
_ITERATION_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03,
                      0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
# Stages of the time to first token: fractions of a ms to seconds.
_STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02,
                  0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Request lengths in tokens: powers of two to the longest contexts served.
TOKEN_BUCKETS = tuple(float(2 ** k) for k in range(18))
# What jax's Device.memory_stats() calls them -> this metric's stat label.
_MEMORY_STATS = {"bytes_in_use": "in_use", "peak_bytes_in_use": "peak",
                 "bytes_limit": "limit",
                 "largest_free_block_bytes": "largest_free_block"}


def _compile_count() -> int:
  """XLA compilations in this process (0 where JAX was never imported: a
  router or gateway, which compile nothing)."""
  if "pdjax.engine.compile_stats" not in sys.modules:
    return 0
  return sys.modules["pdjax.engine.compile_stats"].compile_count()


class Metrics:
  """The metric set of one service (``role``: router, prefill, decode)."""

  def __init__(self, role: str):
    self.role = role
    r = self.registry = CollectorRegistry()
    self.requests = Counter(
        "pdjax_requests_total", "Requests by final outcome.",
        ["outcome"], registry=r)
    # Counted as requests arrive, whatever becomes of them: the offered
    # rate a planner sizes pools for (pdjax.planner.control).
    self.arrivals = Counter(
        "pdjax_request_arrivals_total", "Requests received.", registry=r)
    self.queue_length = Gauge(
        "pdjax_queue_length", "Requests waiting for this service.",
        registry=r)
    self.running = Gauge(
        "pdjax_running_requests", "Requests being served.", registry=r)
    self.ttft = Histogram(
        "pdjax_time_to_first_token_seconds", "Arrival to first token.",
        buckets=LATENCY_BUCKETS, registry=r)
    # Where the time to first token goes (the router: every stage of
    # TtftStages; a worker: the stages it runs).
    self.ttft_stage = Histogram(
        "pdjax_ttft_stage_seconds", "Time to first token by stage: "
        "prepare, reserve, queue, prefill, kv_handoff, return.",
        ["stage"], buckets=_STAGE_BUCKETS, registry=r)
    self.itl = Histogram(
        "pdjax_inter_token_latency_seconds",
        "Gap between consecutive token messages of a stream.",
        buckets=LATENCY_BUCKETS, registry=r)
    self.e2e = Histogram(
        "pdjax_request_latency_seconds", "Arrival to last token.",
        buckets=LATENCY_BUCKETS, registry=r)
    self.prefill_time = Histogram(
        "pdjax_prefill_seconds", "Prefill compute per batch.",
        buckets=LATENCY_BUCKETS, registry=r)
    self.transfer_bytes = Counter(
        "pdjax_kv_transfer_bytes_total", "KV bytes handed off.",
        ["transport", "direction"], registry=r)
    self.transfer_time = Histogram(
        "pdjax_kv_transfer_seconds", "KV hand-off time per request.",
        ["transport", "direction"], buckets=LATENCY_BUCKETS, registry=r)
    self.transfer_failures = Counter(
        "pdjax_kv_transfer_failures_total", "Failed KV hand-offs.",
        ["transport", "reason"], registry=r)
    self.kv_pages = Gauge(
        "pdjax_kv_pages", "KV cache pages by state.", ["state"], registry=r)
    self.kv_live = Gauge(
        "pdjax_kv_live_allocations",
        "KV allocations alive by owner (must return to 0 when idle).",
        ["owner"], registry=r)
    self.prefill_tokens = Counter(
        "pdjax_prefill_tokens_total",
        "Prompt tokens by where their KV came from: computed or a cache.",
        ["source"], registry=r)
    self.cache_blocks = Gauge(
        "pdjax_prefix_cache_blocks",
        "Prefix-cache block lookups and evictions (cumulative) by pool.",
        ["pool", "stat"], registry=r)
    self.kv_admission = Gauge(
        "pdjax_kv_admission_events",
        "Decode workers' KV admission (cumulative): rows preempted to host "
        "memory and back, evicted for recompute, calls a row sat out for "
        "want of pages; requests the queue refused, full or past its "
        "deadline.", ["event"], registry=r)
    # Shared KV (pdjax.engine.remote_tier): a prefill worker's fetches of
    # blocks from peers and the host's store.
    self.kv_fetch_time = Histogram(
        "pdjax_kv_fetch_seconds", "Time of a fetch of prefix blocks that "
        "brought some, by source kind: peer or store.", ["source"],
        buckets=_STAGE_BUCKETS, registry=r)
    # The reservation beside the prefill (pdjax.service.router): its whole
    # call on the router, by whether the prefill ran beside it or waited;
    # on a prefill worker, how long a computed KV waited for its
    # destination (the part of the reservation the prefill did not hide).
    self.reserve_time = Histogram(
        "pdjax_reserve_seconds", "Reserve calls on decode workers, by "
        "order to the prefill: beside, before.", ["order"],
        buckets=_STAGE_BUCKETS, registry=r)
    self.destination_wait = Histogram(
        "pdjax_kv_destination_wait_seconds", "Time a prefilled KV waited "
        "for its destination (the router's reservation) after its prefill "
        "ended.", buckets=_STAGE_BUCKETS, registry=r)
    self.kv_skipped_bytes = Counter(
        "pdjax_kv_transfer_skipped_bytes_total",
        "KV bytes not sent because the decode worker already held them.",
        ["transport"], registry=r)
    self.tokens = Counter(
        "pdjax_generated_tokens_total", "Tokens generated.", registry=r)
    # Speculative decoding (decode workers; vLLM's
    # spec_decode_num_draft_tokens / num_accepted_tokens), counted as
    # requests finish: accepted / drafted is the acceptance rate.
    self.spec_draft_tokens = Counter(
        "pdjax_spec_draft_tokens_total",
        "Tokens speculative decoding drafted, of finished requests.",
        registry=r)
    self.spec_accepted_tokens = Counter(
        "pdjax_spec_accepted_tokens_total",
        "Drafted tokens the target model accepted, of finished requests.",
        registry=r)
    # The traffic a planner sizes pools for: finished requests' lengths
    # (the router's; vLLM's request_prompt/generation_tokens).
    self.request_prompt_tokens = Histogram(
        "pdjax_request_prompt_tokens", "Prompt tokens of finished requests.",
        buckets=TOKEN_BUCKETS, registry=r)
    self.request_generation_tokens = Histogram(
        "pdjax_request_generation_tokens",
        "Generated tokens of finished requests.", buckets=TOKEN_BUCKETS,
        registry=r)
    self.compilations = Gauge(
        "pdjax_xla_compilations", "XLA compilations in this process.",
        registry=r)
    self.compilations.set_function(_compile_count)
    self.workers = Gauge(
        "pdjax_workers", "Workers known to the router by role and state.",
        ["role", "state"], registry=r)
    self.sessions = Gauge(
        "pdjax_sessions",
        "Sessions open on this process: the long-lived streams that carry "
        "calls as messages (on a worker the routers' Decode and Prefill "
        "calls, on the router its clients' Generate calls).", registry=r)
    self.worker_inflight = Gauge(
        "pdjax_worker_inflight",
        "Requests the router has on each worker now (set as they start and "
        "end, so it is current when scraped, unlike the polled load).",
        ["role", "worker"], registry=r)
    self.decode_iteration = Histogram(
        "pdjax_decode_iteration_seconds",
        "Host wall time of a decode engine iteration by phase: launch "
        "(admissions and dispatching the generate calls) and deliver "
        "(waiting for the previous calls' tokens and streaming them).",
        ["phase"], buckets=_ITERATION_BUCKETS, registry=r)
    # The process's garbage-collector pauses (pdjax_gc_pause_seconds).
    gc_pauses.install()
    r.register(gc_pauses.PauseCollector())
    self.device_memory = Gauge(
        "pdjax_device_memory_bytes",
        "Device memory of this process's devices as XLA's allocator "
        "reports it (none on CPU).", ["device", "stat"], registry=r)
    self._server = None
    self._lock = threading.Lock()

  def observe_iteration(self, timing) -> None:
    """Records a ``decode.IterationTiming``'s phases; an iteration that
    launched no call (it only delivered the last tokens) is left out."""
    if timing is not None and timing.calls:
      self.decode_iteration.labels("launch").observe(timing.launch_s)
      self.decode_iteration.labels("deliver").observe(timing.deliver_s)

  def observe_device_memory(self, devices) -> None:
    """Sets the device memory gauges from each device's allocator stats
    (devices that report none, as CPUs, are skipped)."""
    for d in devices:
      stats = d.memory_stats() or {}
      for key, stat in _MEMORY_STATS.items():
        if key in stats:
          self.device_memory.labels(str(d), stat).set(stats[key])

  def serve(self, port: int, host: str = "127.0.0.1") -> int:
    """Starts the /metrics HTTP endpoint; returns its port."""
    if port < 0:
      return -1
    with self._lock:
      if self._server is None:
        self._server, _ = start_http_server(port, addr=host,
                                            registry=self.registry)
      return self._server.server_port

  def text(self) -> str:
    return generate_latest(self.registry).decode()

  def close(self) -> None:
    with self._lock:
      if self._server is not None:
        self._server.shutdown()
        self._server = None


__all__ = ["Metrics"]
