"""How many prefill and decode workers a traffic needs to meet its SLOs.

The two pools are sized apart, which is what disaggregation allows: TTFT
depends on the prefill pool only, TPOT on the decode pool only.

Prefill: simulated, as DistServe places its pools. Requests arrive as a
Poisson process at the traffic's rate with the traffic's prompt lengths;
the router sends each to the worker with the fewest requests waiting or
running; a worker that comes free runs everything waiting, up to
``max_batch`` prompts and ``max_batch_tokens`` tokens, as one program whose
time is the profile's fixed cost ``a`` once plus ``b L + c L^2`` per prompt
(so batching amortises ``a`` under load). TTFT = the profile's fixed cost
around the prefill + wait + the batch's run, its quantile over the
simulated requests (a seeded draw, the first tenth left out as warm-up).
With one worker and ``max_batch=1`` this is the M/G/1 queue (its mean
wait is Pollaczek-Khinchine's, as the tests check).

Decode: a worker with B requests decoding spends ``alpha + beta B`` per
token, and by Little's law B is the tokens it must produce per second
(``rate E[output] / n_d``) times that time, so the mean TPOT solves
``T = alpha + beta rate E[output] T / n_d``:
``T = alpha / (1 - beta rate E[output] / n_d)``; its quantile is the
profile's p90/mean spread times T. More rows than the worker has
(``max_rows``) means requests wait for a row: not feasible.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np

from pdjax.planner.profile import Profile

_SAMPLES = 4_000


@dataclasses.dataclass(frozen=True)
class Traffic:
  """Requests per second and the lengths they come with."""
  rate: float
  prompt_tokens: tuple[int, ...]
  output_tokens: tuple[int, ...]

  def __post_init__(self):
    if not self.rate > 0:
      raise ValueError(f"rate must be > 0, got {self.rate}")
    if not self.prompt_tokens or not self.output_tokens:
      raise ValueError("traffic needs prompt and output lengths")

  @classmethod
  def like(cls, profile: Profile, rate: float) -> Traffic:
    """The profiled run's lengths at another rate."""
    return cls(rate, profile.prompt_tokens, profile.output_tokens)


@dataclasses.dataclass(frozen=True)
class Slo:
  """Latency targets met by a share ``attainment`` of requests (the
  quantile the prediction is checked at)."""
  ttft_s: float
  tpot_s: float
  attainment: float = 0.9


@dataclasses.dataclass(frozen=True)
class Prediction:
  """A deployment's predicted latency under a traffic (seconds; inf where
  a pool cannot keep up)."""
  num_prefill: int
  num_decode: int
  rate: float
  prefill_utilization: float
  ttft_s: float           # at the SLO's quantile
  tpot_s: float           # at the SLO's quantile
  decode_rows: float      # mean requests decoding per decode worker

  def meets(self, slo: Slo) -> bool:
    return self.ttft_s <= slo.ttft_s and self.tpot_s <= slo.tpot_s


@dataclasses.dataclass(frozen=True)
class Batching:
  """How a prefill worker batches prompts (its pool's ``max_batch`` and
  ``max_batch_tokens``; None: no token cap)."""
  max_batch: int = 1
  max_batch_tokens: int | None = None


def simulate_prefill(profile: Profile, traffic: Traffic, num_prefill: int,
                     batching: Batching = Batching(), *,
                     samples: int = _SAMPLES, seed: int = 0) -> np.ndarray:
  """Simulated waits + runs (seconds, TTFT less the fixed cost) of
  ``samples`` requests, warm-up left out (see the module docstring)."""
  if num_prefill < 1:
    raise ValueError(f"num_prefill must be >= 1, got {num_prefill}")
  rng = np.random.default_rng(seed)
  arrive_np = np.cumsum(rng.exponential(1.0 / traffic.rate, samples))
  lengths_np = rng.choice(np.asarray(traffic.prompt_tokens), samples)
  own_np = profile.prefill.service_s(lengths_np) - profile.prefill.a
  # The event loop reads one element at a time: Python floats and ints,
  # not numpy scalars (a fifth of the time of indexing the arrays).
  arrive, lengths = arrive_np.tolist(), lengths_np.tolist()
  own = own_np.tolist()
  fixed = profile.prefill.a
  cap = batching.max_batch_tokens or math.inf
  free = [0.0] * num_prefill
  queues: list[collections.deque] = [collections.deque()
                                     for _ in range(num_prefill)]
  done = [0.0] * samples

  def run(w: int, until: float) -> None:
    q = queues[w]
    while q and max(free[w], arrive[q[0]]) <= until:
      start = max(free[w], arrive[q[0]])
      batch, tokens = [], 0
      while (q and len(batch) < batching.max_batch
             and arrive[q[0]] <= start
             and (not batch or tokens + lengths[q[0]] <= cap)):
        i = q.popleft()
        batch.append(i)
        tokens += lengths[i]
      free[w] = start + fixed + _batch_time(own, own_np, batch)
      for i in batch:
        done[i] = free[w]

  for i in range(samples):
    for w in range(num_prefill):
      run(w, arrive[i])
    w = min(range(num_prefill),
            key=lambda k: len(queues[k]) + (free[k] > arrive[i]))
    queues[w].append(i)
    run(w, arrive[i])
  for w in range(num_prefill):
    run(w, math.inf)
  return (np.asarray(done) - arrive_np)[samples // 10:]


def _batch_time(own: list[float], own_np: np.ndarray, batch: list[int]
                ) -> float:
  """``own[batch].sum()`` of the numpy array, to the bit: numpy adds fewer
  than 8 values one after another, as this loop does; more in 8 running
  sums (its pairwise summation), left to numpy."""
  if len(batch) >= 8:
    return float(own_np[batch].sum())
  total = 0.0
  for i in batch:
    total += own[i]
  return total


def _stable_prefill(profile: Profile, traffic: Traffic,
                    batching: Batching) -> int:
  """The fewest prefill workers whose queues do not grow without bound:
  full batches amortise the fixed cost, and past that nothing helps. A
  batch is full at ``max_batch`` prompts or at the token cap."""
  full = batching.max_batch
  if batching.max_batch_tokens is not None:
    mean_len = float(np.mean(traffic.prompt_tokens))
    full = min(full, max(1, int(batching.max_batch_tokens // mean_len)))
  per_request = float(profile.prefill.service_s(
      traffic.prompt_tokens).mean()) - profile.prefill.a * (1 - 1 / full)
  return max(1, math.floor(traffic.rate * per_request) + 1)


def predict_ttft(profile: Profile, traffic: Traffic, num_prefill: int,
                 quantile: float = 0.9, batching: Batching = Batching(),
                 seed: int = 0) -> tuple[float, float]:
  """(TTFT at ``quantile``, prefill utilisation if unbatched) with
  ``num_prefill`` workers; inf when even full batches cannot keep up."""
  service = profile.prefill.service_s(traffic.prompt_tokens)
  rho = traffic.rate * float(service.mean()) / num_prefill
  if num_prefill < _stable_prefill(profile, traffic, batching):
    return math.inf, rho
  waited = simulate_prefill(profile, traffic, num_prefill, batching,
                            seed=seed)
  return profile.overhead_s + float(np.quantile(waited, quantile)), rho


def predict_tpot(profile: Profile, traffic: Traffic, num_decode: int,
                 max_rows: int | None = None) -> tuple[float, float]:
  """(TPOT at the profile's p90 spread, mean rows per worker) with
  ``num_decode`` workers."""
  if num_decode < 1:
    raise ValueError(f"num_decode must be >= 1, got {num_decode}")
  d = profile.decode
  tokens_per_s = traffic.rate * float(np.mean(traffic.output_tokens))
  load = d.beta * tokens_per_s / num_decode
  if load >= 1.0:
    return math.inf, math.inf
  tpot = d.alpha / (1.0 - load)
  rows = tokens_per_s * tpot / num_decode
  if max_rows is not None and rows > max_rows:
    return math.inf, rows
  return tpot * d.tpot_spread, rows


def predict(profile: Profile, traffic: Traffic, num_prefill: int,
            num_decode: int, *, quantile: float = 0.9,
            max_rows: int | None = None,
            batching: Batching = Batching()) -> Prediction:
  ttft, rho = predict_ttft(profile, traffic, num_prefill, quantile,
                           batching)
  tpot, rows = predict_tpot(profile, traffic, num_decode, max_rows)
  return Prediction(num_prefill, num_decode, traffic.rate, rho, ttft, tpot,
                    rows)


def plan(profile: Profile, traffic: Traffic, slo: Slo, *,
         max_workers: int = 64, max_rows: int | None = None,
         batching: Batching = Batching()) -> Prediction | None:
  """The fewest prefill and the fewest decode workers that meet ``slo``
  (each pool on its own), or None if ``max_workers`` of one are not
  enough (e.g. one prompt's own prefill is longer than the TTFT SLO)."""
  # Unloaded, a request still takes the fixed cost and its own prefill:
  # if that misses the SLO, no number of workers helps.
  alone = profile.overhead_s + float(np.quantile(
      profile.prefill.service_s(traffic.prompt_tokens), slo.attainment))
  num_prefill = None if alone > slo.ttft_s else next(
      (n for n in range(_stable_prefill(profile, traffic, batching),
                        max_workers + 1)
       if predict_ttft(profile, traffic, n, slo.attainment, batching)[0]
       <= slo.ttft_s), None)
  num_decode = next(
      (n for n in range(1, max_workers + 1)
       if predict_tpot(profile, traffic, n, max_rows)[0] <= slo.tpot_s),
      None)
  if num_prefill is None or num_decode is None:
    return None
  return predict(profile, traffic, num_prefill, num_decode,
                 quantile=slo.attainment, max_rows=max_rows,
                 batching=batching)


def capacity(profile: Profile, slo: Slo, num_prefill: int, num_decode: int,
             *, max_rows: int | None = None,
             batching: Batching = Batching(), hi: float = 1e4,
             tolerance: float = 0.01) -> float:
  """The highest rate (req/s) of the profiled traffic that ``num_prefill``
  + ``num_decode`` workers serve within ``slo`` (0 if none): both
  predictions only grow with the rate, so a bisection finds it."""
  def ok(rate: float) -> bool:
    return predict(profile, Traffic.like(profile, rate), num_prefill,
                   num_decode, quantile=slo.attainment, max_rows=max_rows,
                   batching=batching).meets(slo)
  if not ok(tolerance):
    return 0.0
  lo = tolerance
  while hi - lo > tolerance * max(lo, 1.0):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if ok(mid) else (lo, mid)
  return lo


__all__ = ["Batching", "Prediction", "Slo", "Traffic", "capacity", "plan",
           "predict", "predict_tpot", "predict_ttft", "simulate_prefill"]
