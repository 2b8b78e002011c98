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

``observe`` reports every collection's pause, by generation, to the
histograms of the services of this process (``pdjax_gc_pause_seconds``).
"""

from __future__ import annotations

import gc
import logging
import time
import weakref

log = logging.getLogger(__name__)

# The histograms fed (one per service's metrics); held weakly, so a
# service that is gone stops being fed without being unregistered.
_histograms: weakref.WeakSet = weakref.WeakSet()
_started: dict[int, float] = {}


def _on_gc(phase: str, info: dict) -> None:
  generation = info.get("generation", -1)
  if phase == "start":
    _started[generation] = time.perf_counter()
    return
  began = _started.pop(generation, None)
  if began is None:
    return
  pause = time.perf_counter() - began
  for histogram in list(_histograms):
    histogram.labels(str(generation)).observe(pause)


def observe(histogram) -> None:
  """Feeds ``histogram`` (labelled by ``generation``) every collection's
  pause from now on."""
  if _on_gc not in gc.callbacks:
    gc.callbacks.append(_on_gc)
  _histograms.add(histogram)


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


__all__ = ["observe", "freeze_startup_heap"]
