"""Python's garbage collector in a serving process: its pauses measured,
and the heap built at start-up kept out of its full collections.

A worker holds hundreds of thousands of long-lived Python objects once it
has loaded its model and compiled its programs; a full (generation 2)
collection walks all of them, stopping every thread of the process for
tens of milliseconds, and lands on whichever request is in flight. So a
server, once started, collects once and freezes what is left
(``freeze_startup_heap``: ``gc.freeze``, as vLLM and Instagram's servers
do): later collections walk only what was allocated since. Objects frozen
are still freed by reference counting; only reference cycles among them
stay until the process ends.

Every collection's pause is counted, by generation, in the process's own
histogram (a ``gc.callbacks`` hook, installed once, that does a few
additions: it runs on every collection, thousands a second in a busy
loop); each service's metrics registry shows it as
``pdjax_gc_pause_seconds`` (``PauseCollector``).
"""

from __future__ import annotations

import bisect
import gc
import logging
import time

from prometheus_client.core import HistogramMetricFamily

log = logging.getLogger(__name__)

NAME = "pdjax_gc_pause_seconds"
# Pauses from a fraction of a ms (young generations) to whole seconds.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05,
           0.1, 0.25, 0.5, 1.0, 2.5)
_GENERATIONS = (0, 1, 2)
# Per generation: counts per bucket (the last: past every bound), the sum
# of the pauses, and when the collection under way started.
_counts = {g: [0] * (len(BUCKETS) + 1) for g in _GENERATIONS}
_sums = dict.fromkeys(_GENERATIONS, 0.0)
_started: dict[int, float] = {}


def _on_gc(phase: str, info: dict) -> None:
  generation = info.get("generation", -1)
  if phase == "start":
    _started[generation] = time.perf_counter()
    return
  began = _started.pop(generation, None)
  if began is None or generation not in _counts:
    return
  pause = time.perf_counter() - began
  _counts[generation][bisect.bisect_left(BUCKETS, pause)] += 1
  _sums[generation] += pause


def install() -> None:
  """Starts counting this process's collections (once; idempotent)."""
  if _on_gc not in gc.callbacks:
    gc.callbacks.append(_on_gc)


class PauseCollector:
  """The process's collector pauses as a Prometheus histogram, for a
  service's own registry (``registry.register(PauseCollector())``)."""

  def collect(self):
    family = HistogramMetricFamily(
        NAME, "Pauses of Python's garbage collector in this process, by "
        "generation (every thread stops for them).", labels=["generation"])
    for g in _GENERATIONS:
      counts, total = list(_counts[g]), _sums[g]
      running, buckets = 0, []
      for bound, n in zip(BUCKETS + (float("inf"),), counts):
        running += n
        buckets.append((str(bound) if bound != float("inf") else "+Inf",
                        running))
      family.add_metric([str(g)], buckets, total)
    yield family


def freeze_startup_heap() -> int:
  """Collects, then moves every object left into the collector's permanent
  generation, out of later collections' walks. Returns how many objects
  were frozen."""
  began = time.perf_counter()
  gc.collect()
  gc.freeze()
  frozen = gc.get_freeze_count()
  log.info("froze the start-up heap: %d objects (%.0f ms)", frozen,
           (time.perf_counter() - began) * 1e3)
  return frozen


__all__ = ["BUCKETS", "NAME", "PauseCollector", "install",
           "freeze_startup_heap"]
