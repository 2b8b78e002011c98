"""What one prefill worker and one decode worker can do, fitted from a
measured run of the batch-eval driver (its ``results.jsonl``).

Sizing pools needs two curves, as Dynamo's planner and DistServe's
simulator take them from profiling:

* a prefill worker's service time per request against its prompt length:
  ``a + b L + c L^2`` (the quadratic term is attention), least squares on
  the router's per-request ``usage.prefill_s``;
* a decode worker's time per output token against the requests it decodes
  at once: ``alpha + beta B`` (memory-bound: every step reads the weights,
  alpha, and each row's KV, beta), least squares on each request's TPOT
  against the number of requests that were decoding beside it (their
  streams' overlap with its own, averaged over its stream).

Fit the prefill on a run at a low rate: there the worker rarely batches
prompts or queues them, so ``prefill_s`` is one request's service time and
TTFT less ``prefill_s`` is the fixed cost around it (routing, the KV
hand-off, the first decode step), ``overhead_s``. That run's requests are
also the traffic's length distribution unless another one is given. Fit
the decode over runs at several rates: only together do they span the
rows a decode worker holds under load.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from pdjax.eval.stats import COMPLETED, RequestRecord


@dataclasses.dataclass(frozen=True)
class PrefillModel:
  """A prefill worker: service seconds ``a + b L + c L^2`` for L tokens."""
  a: float
  b: float
  c: float = 0.0

  def service_s(self, prompt_tokens) -> np.ndarray:
    L = np.asarray(prompt_tokens, dtype=np.float64)
    return self.a + self.b * L + self.c * L * L


@dataclasses.dataclass(frozen=True)
class DecodeModel:
  """A decode worker: seconds per output token ``alpha + beta B`` with B
  requests decoding at once; ``tpot_spread`` is p90 / mean of TPOT at a
  given load (the steps a request shares with prefills, other lengths)."""
  alpha: float
  beta: float
  tpot_spread: float = 1.0

  def tpot_s(self, rows) -> np.ndarray:
    return self.alpha + self.beta * np.asarray(rows, dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class Profile:
  """Both workers' models, the fixed TTFT cost around the prefill, and the
  lengths of the requests they were fitted on."""
  prefill: PrefillModel
  decode: DecodeModel
  overhead_s: float
  prompt_tokens: tuple[int, ...]
  output_tokens: tuple[int, ...]
  requests: int


def profile_to_dict(profile: Profile) -> dict:
  """A profile as JSON-able data (``tools/plan_pools.py --out`` writes it;
  the planner loop reads it back with ``profile_from_dict``)."""
  return {"prefill": dataclasses.asdict(profile.prefill),
          "decode": dataclasses.asdict(profile.decode),
          "overhead_s": profile.overhead_s, "requests": profile.requests,
          "prompt_tokens": list(profile.prompt_tokens),
          "output_tokens": list(profile.output_tokens)}


def profile_from_dict(d: dict) -> Profile:
  try:
    return Profile(prefill=PrefillModel(**d["prefill"]),
                   decode=DecodeModel(**d["decode"]),
                   overhead_s=float(d["overhead_s"]),
                   prompt_tokens=tuple(int(v) for v in d["prompt_tokens"]),
                   output_tokens=tuple(int(v) for v in d["output_tokens"]),
                   requests=int(d.get("requests", 0)))
  except (KeyError, TypeError) as e:
    raise ProfileError(f"not a profile (tools/plan_pools.py --out writes "
                       f"one under 'profile'): {type(e).__name__}: {e}"
                       ) from None


class ProfileError(ValueError):
  """Records that cannot give a model; the message says what is missing."""


def _completed(records: Sequence[RequestRecord]) -> list[RequestRecord]:
  return [r for r in records if r.status == COMPLETED and r.token_times]


def concurrency(records: Sequence[RequestRecord]) -> np.ndarray:
  """Per request: how many streams (its own included) were decoding, on
  average over its own stream (first token to last)."""
  start = np.array([r.token_times[0] for r in records])
  end = np.array([r.token_times[-1] for r in records])
  out = np.empty(len(records))
  for i, (s, e) in enumerate(zip(start, end)):
    span = e - s
    if span <= 0:
      out[i] = np.sum((start <= s) & (end >= s))
      continue
    overlap = np.clip(np.minimum(end, e) - np.maximum(start, s), 0, None)
    out[i] = overlap.sum() / span
  return out


def _nonnegative_lstsq(A: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Least squares with every coefficient >= 0 (a service time does not
  shrink as a prompt grows): drop negative terms one at a time."""
  keep = list(range(A.shape[1]))
  while True:
    coef, *_ = np.linalg.lstsq(A[:, keep], y, rcond=None)
    if (coef >= 0).all() or len(keep) == 1:
      out = np.zeros(A.shape[1])
      out[keep] = np.clip(coef, 0, None)
      return out
    keep.pop(int(np.argmin(coef)))


def fit_prefill(records: Sequence[RequestRecord]
                ) -> tuple[PrefillModel, float]:
  """(the prefill worker's model, the fixed TTFT cost around it) from a
  run at a low rate (see the module docstring)."""
  done = [r for r in _completed(records) if r.usage and
          r.usage.get("prefill_s") is not None and r.ttft is not None]
  if len(done) < 8:
    raise ProfileError(
        f"{len(done)} completed requests report usage.prefill_s; "
        "fitting needs at least 8 (a run of the batch-eval driver against "
        "a pdjax router, --backend=pdjax)")
  L = np.array([r.prompt_tokens for r in done], dtype=np.float64)
  p = np.array([r.usage["prefill_s"] for r in done])
  scale = max(L.max(), 1.0)      # conditions the L^2 column
  a, b, c = _nonnegative_lstsq(
      np.stack([np.ones_like(L), L / scale, (L / scale) ** 2], axis=1), p)
  overhead = float(np.median([r.ttft - r.usage["prefill_s"] for r in done]))
  return PrefillModel(a=a, b=b / scale, c=c / scale ** 2), max(overhead, 0.0)


def fit_decode(runs: Sequence[Sequence[RequestRecord]], *,
               decode_workers: int = 1) -> DecodeModel:
  """The decode worker's model from runs (each a list of records, its
  overlaps measured within it) of a deployment with ``decode_workers``
  decode workers, which share the requests decoding at once. Give it runs
  at several rates: one low rate alone spans too few rows to tell the
  slope."""
  rows, tpots = [], []
  for run in runs:
    decoding = [r for r in _completed(run) if r.tpot is not None]
    if decoding:
      rows.append(concurrency(decoding) / decode_workers)
      tpots.append(np.array([r.tpot for r in decoding]))
  n = sum(len(t) for t in tpots)
  if n < 8:
    raise ProfileError(f"{n} completed requests have 2+ output tokens; "
                       "fitting the decode worker needs at least 8")
  rows_all, tpot = np.concatenate(rows), np.concatenate(tpots)
  alpha, beta = _nonnegative_lstsq(
      np.stack([np.ones_like(rows_all), rows_all], axis=1), tpot)
  spread = float(np.percentile(tpot, 90) / max(tpot.mean(), 1e-12))
  return DecodeModel(alpha=alpha, beta=beta, tpot_spread=spread)


def fit_profile(records: Sequence[RequestRecord],
                decode_runs: Sequence[Sequence[RequestRecord]] | None = None,
                *, decode_workers: int = 1) -> Profile:
  """Both models: the prefill's (and the traffic's lengths) from
  ``records``, a run at a low rate; the decode's from ``decode_runs``,
  by default that run alone."""
  prefill, overhead = fit_prefill(records)
  decode = fit_decode(decode_runs if decode_runs is not None else [records],
                      decode_workers=decode_workers)
  done = _completed(records)
  return Profile(
      prefill=prefill, decode=decode, overhead_s=overhead,
      prompt_tokens=tuple(int(r.prompt_tokens) for r in done),
      output_tokens=tuple(len(r.token_times) for r in done),
      requests=len(done))


__all__ = ["DecodeModel", "PrefillModel", "Profile", "ProfileError",
           "profile_from_dict", "profile_to_dict",
           "concurrency", "fit_decode", "fit_prefill", "fit_profile"]
