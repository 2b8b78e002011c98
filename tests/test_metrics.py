"""The workers' own-performance metrics: decode iteration phases and
device memory, as a Prometheus scrape shows them."""

from __future__ import annotations

import jax

from cluster_helpers import metric
from pdjax.engine.decode import IterationTiming
from pdjax.service.metrics import Metrics


def test_iteration_phases_are_observed_only_when_calls_were_launched():
  m = Metrics("decode")
  m.observe_iteration(IterationTiming(0.002, 0.040, live_rows=3, calls=1))
  m.observe_iteration(IterationTiming(0.001, 0.030, live_rows=0, calls=0))
  m.observe_iteration(None)
  text = m.text()
  name = "pdjax_decode_iteration_seconds"
  assert metric(text, name + "_count", 'phase="launch"') == 1
  assert metric(text, name + "_sum", 'phase="launch"') == 0.002
  assert metric(text, name + "_sum", 'phase="deliver"') == 0.040
  # 40 ms falls in the 50 ms bucket, not the 30 ms one.
  assert metric(text, name + "_bucket", 'le="0.03",phase="deliver"') == 0
  assert metric(text, name + "_bucket", 'le="0.05",phase="deliver"') == 1


def test_device_memory_gauges_from_allocator_stats():
  """What the allocator reports becomes gauges per device; devices that
  report nothing (CPUs) add none."""
  class Gpu:
    def __str__(self):
      return "cuda:0"

    def memory_stats(self):
      return {"bytes_in_use": 5 << 30, "peak_bytes_in_use": 6 << 30,
              "bytes_limit": 60 << 30, "num_allocs": 7}

  cpu = jax.devices()[0]
  assert cpu.memory_stats() is None
  m = Metrics("decode")
  m.observe_device_memory([Gpu(), cpu])
  text = m.text()
  name = "pdjax_device_memory_bytes"
  assert metric(text, name, 'device="cuda:0",stat="in_use"') == 5 << 30
  assert metric(text, name, 'device="cuda:0",stat="peak"') == 6 << 30
  assert metric(text, name, 'device="cuda:0",stat="limit"') == 60 << 30
  assert f'device="{cpu}"' not in text
  assert "num_allocs" not in text
