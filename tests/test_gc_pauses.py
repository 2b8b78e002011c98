"""Python's garbage collector in the services: pauses in each service's
metrics, and the start-up heap frozen out of later collections."""

from __future__ import annotations

import gc

from pdjax.service import gc_pauses
from pdjax.service.metrics import Metrics
from pdjax.eval.chaos import metric


def _collections(m: Metrics, generation: int) -> float:
  return metric(m.text(), "pdjax_gc_pause_seconds_count",
                f'generation="{generation}"')


def test_every_service_shows_the_processes_pauses():
  """Each service's metrics show the process's collections by generation
  (full ones here) as a histogram: counts, a sum, cumulative buckets."""
  first, second = Metrics("router"), Metrics("decode")
  before = _collections(first, 2)
  gc.collect()
  gc.collect()
  # (at least: the process may collect on its own meanwhile)
  after = _collections(first, 2)
  assert after >= before + 2
  assert _collections(second, 2) >= after
  text = first.text()
  assert metric(text, "pdjax_gc_pause_seconds_sum", 'generation="2"') > 0
  assert metric(text, "pdjax_gc_pause_seconds_bucket",
                'generation="2",le="+Inf"') == metric(
                    text, "pdjax_gc_pause_seconds_count", 'generation="2"')


def test_the_start_up_heap_is_frozen_out_of_collections():
  """After ``freeze_startup_heap`` a full collection walks only what was
  allocated since: the objects of the heap so far are in the permanent
  generation, which collections skip."""
  assert gc.get_freeze_count() == 0
  kept = [object() for _ in range(1000)] + [[] for _ in range(1000)]
  try:
    frozen = gc_pauses.freeze_startup_heap()
    # A frozen object another thread frees since leaves the count (two did
    # in a full run, whose earlier tests left threads behind): at most
    # what was frozen, never fewer than what this test keeps.
    assert frozen >= gc.get_freeze_count() > len(kept)
    # (other threads of the test process may allocate meanwhile)
    assert len(gc.get_objects(generation=2)) < 100
  finally:
    gc.unfreeze()
  assert gc.get_freeze_count() == 0
  assert len(gc.get_objects(generation=2)) >= frozen - len(kept)
