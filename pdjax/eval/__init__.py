"""Batch evaluation of a pdjax deployment: workloads, load, metrics, plots.

This package is the measuring side of the serving system. It lives apart from
the server so that the numbers it reports (TTFT, TPOT, ITL, SLO attainment,
goodput) are computed one way, from client-side timestamps only, whichever
deployment (disaggregated or colocated) is being measured. Nothing here
imports JAX: the driver must run on a machine that has no accelerator.

Modules:
  stats: per-request records and the summary statistics.
  workloads: seeded synthetic workloads (named presets) and JSONL datasets.
  load: arrival processes and the asyncio runner against a ``Backend``.
  plots: latency CDFs and rate-sweep charts (PNG, Agg).
"""

from pdjax.eval.stats import (  # noqa: F401
    Distribution,
    RequestRecord,
    Summary,
    format_table,
    max_goodput_rate,
    summarize,
    wall_duration,
)
from pdjax.eval.workloads import PRESETS, Preset, WorkItem  # noqa: F401
from pdjax.eval.load import Backend, Delta, run_workload  # noqa: F401
