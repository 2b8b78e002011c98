"""The traffic a running deployment serves, read off its router's metrics.

The router counts every finished request's prompt and generated tokens in
two histograms (``pdjax_request_prompt_tokens``,
``pdjax_request_generation_tokens``). Two scrapes some seconds apart give
the requests finished in between, so the rate, and the lengths' histogram
over that window: each bucket's requests are placed at the bucket's
geometric middle, then all scaled so their mean is the exact one the
histogram's sum gives. That is the ``Traffic`` a plan sizes the pools for.
"""

from __future__ import annotations

import math
import urllib.request

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from pdjax.planner.sizing import Traffic

PROMPT_METRIC = "pdjax_request_prompt_tokens"
OUTPUT_METRIC = "pdjax_request_generation_tokens"
# At most this many lengths stand for a window's requests.
_MAX_LENGTHS = 2000


def scrape(url: str, timeout_s: float = 10.0) -> str:
  """A Prometheus text exposition (``http://host:port/metrics``)."""
  with urllib.request.urlopen(url, timeout=timeout_s) as r:
    return r.read().decode()


_Histogram = tuple[list[tuple[float, float]], float, float]


def _histograms(text: str) -> dict[str, _Histogram]:
  """The two length histograms of an exposition, parsed once: (cumulative
  (upper bound, count) pairs, count, sum) by name."""
  found: dict[str, dict] = {}
  for family in text_string_to_metric_families(text):
    if family.name not in (PROMPT_METRIC, OUTPUT_METRIC):
      continue
    h = found.setdefault(family.name, {"buckets": []})
    for s in family.samples:
      if s.name == f"{family.name}_bucket":
        h["buckets"].append((float(s.labels["le"]), s.value))
      elif s.name == f"{family.name}_count":
        h["count"] = s.value
      elif s.name == f"{family.name}_sum":
        h["sum"] = s.value
  out = {}
  for name in (PROMPT_METRIC, OUTPUT_METRIC):
    h = found.get(name, {})
    if "count" not in h or "sum" not in h:
      raise ValueError(f"no {name} histogram in these metrics (is this a "
                       "pdjax router's /metrics?)")
    out[name] = (sorted(h["buckets"]), h["count"], h["sum"])
  return out


def _window(before: _Histogram, after: _Histogram
            ) -> tuple[float, tuple[int, ...]]:
  """(requests, their lengths) between two scrapes of one histogram: bucket
  middles, scaled to the exact mean."""
  (b0, n0, s0), (b1, n1, s1) = before, after
  n = n1 - n0
  if n <= 0:
    return n, ()
  previous = dict(b0)
  lengths, counts, lower, below = [], [], 0.0, 0.0
  for upper, cumulative in b1:
    in_bucket = (cumulative - previous.get(upper, 0.0)) - below
    below += in_bucket
    if in_bucket > 0:
      top = upper if math.isfinite(upper) else 2 * max(lower, 1.0)
      lengths.append(math.sqrt(max(lower, 1.0) * top))
      counts.append(in_bucket)
    lower = upper
  weights = np.asarray(counts) / sum(counts)
  reps = np.maximum(1, np.round(weights * min(n, _MAX_LENGTHS))).astype(int)
  sample = np.repeat(np.asarray(lengths), reps)
  sample *= ((s1 - s0) / n) / sample.mean()
  return n, tuple(int(max(1, round(v))) for v in sample)


def traffic_between(before: str, after: str, window_s: float) -> Traffic:
  """The traffic the router finished between two scrapes ``window_s``
  apart (see the module docstring)."""
  h0, h1 = _histograms(before), _histograms(after)
  n, prompts = _window(h0[PROMPT_METRIC], h1[PROMPT_METRIC])
  if n <= 0:
    raise ValueError(f"no request finished in the {window_s:g} s window: "
                     "measure while the deployment serves traffic")
  _, outputs = _window(h0[OUTPUT_METRIC], h1[OUTPUT_METRIC])
  return Traffic(rate=n / window_s, prompt_tokens=prompts,
                 output_tokens=outputs)


__all__ = ["OUTPUT_METRIC", "PROMPT_METRIC", "scrape", "traffic_between"]
