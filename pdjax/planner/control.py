"""The planner that acts: a control loop that resizes the pools on live
traffic.

Every ``interval_s`` the loop

  1. scrapes the router's metrics and measures the traffic of the last
     ``window_s``: the arrival rate (``pdjax_request_arrivals_total``), and
     the prompt and output lengths of the requests finished in it (the
     lengths last seen, or the profile's, when none finished);
  2. predicts the next interval's rate (``RatePredictor``: the last rate,
     an exponentially weighted mean, or Holt's linear trend);
  3. sizes each pool for it with ``pdjax.planner.plan`` (the worker
     profile fitted from batch-eval sweeps, the SLOs), within each pool's
     bounds;
  4. acts, through a ``Scaler`` (``pdjax.planner.scaler``): where one pool
     is short and the other has a worker of both pools to spare, that
     worker is moved (``WorkerControl.SetRole``: no process starts);
     otherwise workers are added or removed. A removed worker drains
     first (its requests finish; none fails).

Pools are sized for the predicted rate times ``1 + headroom``. Against
flapping (``Policy``): a pool grows at once (then waits
``up_cooldown_s`` before growing again), but shrinks only when the pool
sized for the predicted rate plus ``down_margin`` is still smaller than it
is, and has been for ``down_after_s``, at most one worker at a time and
``down_cooldown_s`` after its last change. A noisy rate around a sizing
boundary therefore grows the pool once and keeps it.

``PoolPlanner`` is the decision alone (no I/O, a clock passed in), so the
hysteresis can be tested step by step; ``ControlLoop`` does the I/O.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import math
import time
from typing import Callable

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from pdjax.planner.profile import Profile
from pdjax.planner.sizing import (Batching, Slo, Traffic, plan,
                                  predict_tpot, predict_ttft)
from pdjax.planner.traffic import scrape, traffic_between

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode")
ARRIVALS_METRIC = "pdjax_request_arrivals"


def arrivals(text: str) -> float:
  """The router's arrivals counter in a metrics exposition."""
  for family in text_string_to_metric_families(text):
    if family.name == ARRIVALS_METRIC:
      return sum(s.value for s in family.samples
                 if s.name == f"{ARRIVALS_METRIC}_total")
  raise ValueError(f"no {ARRIVALS_METRIC}_total in these metrics (is this "
                   "a pdjax router's /metrics?)")


class RatePredictor:
  """The next interval's request rate from the rates measured so far.

  ``constant``: the last measured rate (reacts within one interval);
  ``ewma``: an exponentially weighted mean (``alpha``); ``holt``: Holt's
  linear trend (level ``alpha``, trend ``beta``), never below zero.
  """

  KINDS = ("constant", "ewma", "holt")

  def __init__(self, kind: str = "constant", alpha: float = 0.5,
               beta: float = 0.3):
    if kind not in self.KINDS:
      raise ValueError(f"predictor must be one of {self.KINDS}, got {kind!r}")
    if not (0 < alpha <= 1 and 0 <= beta <= 1):
      raise ValueError("alpha in (0, 1], beta in [0, 1]")
    self.kind, self.alpha, self.beta = kind, alpha, beta
    self.level: float | None = None
    self.trend = 0.0

  def observe(self, rate: float) -> None:
    if self.level is None or self.kind == "constant":
      self.level = rate
      return
    if self.kind == "ewma":
      self.level += self.alpha * (rate - self.level)
      return
    previous = self.level
    self.level = self.alpha * rate + (1 - self.alpha) * (self.level
                                                         + self.trend)
    self.trend = self.beta * (self.level - previous) + (
        1 - self.beta) * self.trend

  def predict(self) -> float:
    if self.level is None:
      return 0.0
    return max(0.0, self.level + (self.trend if self.kind == "holt" else 0))


@dataclasses.dataclass
class Policy:
  """Bounds per pool, and the hysteresis (see the module docstring)."""
  min_workers: dict = dataclasses.field(
      default_factory=lambda: {"prefill": 1, "decode": 1})
  max_workers: dict = dataclasses.field(
      default_factory=lambda: {"prefill": 4, "decode": 4})
  down_margin: float = 0.25
  # Pools are sized for the predicted rate times (1 + headroom): the
  # profile's model leaves out what it did not measure (a busy host, a
  # worker starting beside the others), and a plan at the SLO's edge
  # misses it by half of its requests' luck.
  headroom: float = 0.0
  up_cooldown_s: float = 10.0
  down_cooldown_s: float = 30.0
  down_after_s: float = 20.0

  def __post_init__(self):
    for role in ROLES:
      lo, hi = self.min_workers[role], self.max_workers[role]
      if not 0 <= lo <= hi:
        raise ValueError(f"{role}: need 0 <= min ({lo}) <= max ({hi})")
    if self.min_workers["decode"] < 1:
      raise ValueError("the decode pool needs at least one worker")
    if self.down_margin < 0 or self.headroom < 0:
      raise ValueError("down_margin and headroom must be >= 0")


@dataclasses.dataclass
class Sizing:
  """What the traffic needs (``plan``'s answer, clamped to the bounds)."""
  rate: float
  need: dict           # role -> workers at the predicted rate
  need_down: dict      # role -> workers at the rate plus the down margin
  feasible: bool       # False: no pool size meets the SLOs (max used)


class PoolPlanner:
  """Targets per pool from a predicted rate, with the hysteresis."""

  def __init__(self, profile: Profile, slo: Slo, policy: Policy = Policy(),
               *, batching: Batching = Batching(),
               max_rows: int | None = None):
    self.profile = profile
    self.slo = slo
    self.policy = policy
    self.batching = batching
    self.max_rows = max_rows
    self.last_change: dict[str, float] = {r: -math.inf for r in ROLES}
    self.below_since: dict[str, float | None] = {r: None for r in ROLES}
    self._cache: dict = {}

  def _size(self, rate: float, lengths) -> tuple[dict, bool]:
    if rate <= 0:
      return dict(self.policy.min_workers), True
    # A plan simulates the prefill queue (tens of ms per pool size): rates
    # are rounded up to 3 significant digits and their plans kept.
    digits = 2 - math.floor(math.log10(rate))
    rate = math.ceil(rate * 10 ** digits) / 10 ** digits
    key = (rate, hash(lengths))
    if key not in self._cache:
      if len(self._cache) > 512:
        self._cache.clear()
      self._cache[key] = self._plan(rate, lengths)
    need, ok = self._cache[key]
    return dict(need), ok

  def _plan(self, rate: float, lengths) -> tuple[dict, bool]:
    lo, hi = self.policy.min_workers, self.policy.max_workers
    traffic = Traffic(rate, *lengths)
    pl = plan(self.profile, traffic, self.slo,
              max_workers=max(hi.values()), max_rows=self.max_rows,
              batching=self.batching)
    if pl is not None:
      need = {"prefill": pl.num_prefill, "decode": pl.num_decode}
      return ({r: min(max(need[r], lo[r]), hi[r]) for r in ROLES},
              all(need[r] <= hi[r] for r in ROLES))
    # One pool cannot meet its SLO within its bound: that pool goes to its
    # bound, the other is sized on its own (the pools are independent).
    q = self.slo.attainment
    ttft = lambda n: predict_ttft(self.profile, traffic, n, q,
                                  self.batching)[0]
    tpot = lambda n: predict_tpot(self.profile, traffic, n,
                                  self.max_rows)[0]
    need = {"prefill": next((n for n in range(max(lo["prefill"], 1),
                                              hi["prefill"] + 1)
                             if ttft(n) <= self.slo.ttft_s), hi["prefill"]),
            "decode": next((n for n in range(lo["decode"], hi["decode"] + 1)
                            if tpot(n) <= self.slo.tpot_s), hi["decode"])}
    return {r: min(max(need[r], lo[r]), hi[r]) for r in ROLES}, False

  def size(self, rate: float, lengths=None) -> Sizing:
    lengths = lengths or (self.profile.prompt_tokens,
                          self.profile.output_tokens)
    up = rate * (1 + self.policy.headroom)
    need, ok = self._size(up, lengths)
    down, _ = self._size(up * (1 + self.policy.down_margin), lengths)
    return Sizing(rate, need, down, ok)

  def targets(self, now: float, sizing: Sizing, current: dict) -> dict:
    """The size each pool should have now: ``current`` changed only as
    the hysteresis allows (``note_change`` when it was acted on)."""
    out = {}
    p = self.policy
    for role in ROLES:
      cur = current[role]
      lo, hi = p.min_workers[role], p.max_workers[role]
      want = cur
      if cur < lo:
        want = lo
      elif cur > hi:
        want = hi
      elif sizing.need[role] > cur:
        self.below_since[role] = None
        if now - self.last_change[role] >= p.up_cooldown_s:
          want = sizing.need[role]
      elif sizing.need_down[role] < cur:
        if self.below_since[role] is None:
          self.below_since[role] = now
        if (now - self.below_since[role] >= p.down_after_s
            and now - self.last_change[role] >= p.down_cooldown_s):
          want = cur - 1
      else:
        self.below_since[role] = None
      out[role] = want
    return out

  def note_change(self, role: str, now: float) -> None:
    self.last_change[role] = now
    self.below_since[role] = None


@dataclasses.dataclass
class Step:
  """One pass of the loop (a line of its log)."""
  t: float
  rate: float | None
  predicted: float
  current: dict
  targets: dict
  need: dict
  actions: list
  mean_prompt: float | None = None
  mean_output: float | None = None
  error: str | None = None


class TrafficMeter:
  """The traffic of the last ``window_s`` from successive scrapes of the
  router's metrics (``fetch()`` returns one exposition)."""

  def __init__(self, fetch: Callable[[], str], window_s: float = 10.0):
    self.fetch = fetch
    self.window_s = window_s
    self._scrapes: collections.deque = collections.deque()

  def sample(self, now: float):
    """(rate or None, (prompt lengths, output lengths) or None): None
    until the scrapes span a whole window (a rate over a moment is noise);
    no lengths when nothing finished."""
    text = self.fetch()
    self._scrapes.append((now, text))
    while (len(self._scrapes) > 2
           and now - self._scrapes[1][0] >= self.window_s):
      self._scrapes.popleft()
    t0, first = self._scrapes[0]
    if now - t0 < self.window_s * 0.999:   # not a whole window yet
      return None, None
    rate = max(0.0, (arrivals(text) - arrivals(first)) / (now - t0))
    try:
      tr = traffic_between(first, text, now - t0)
      lengths = (tr.prompt_tokens, tr.output_tokens)
    except ValueError:      # nothing finished in the window
      lengths = None
    return rate, lengths


class ControlLoop:
  """Measures, predicts, sizes and acts every ``interval_s`` (see the
  module docstring).

  ``workers()``: the router's ``ListWorkers`` entries (``WorkerStatus``);
  ``set_role(address, role)``: moves a worker of both pools.
  ``on_step(step)``: called with each pass (the log line).
  """

  def __init__(self, planner: PoolPlanner, scaler, meter: TrafficMeter, *,
               workers, set_role, predictor: RatePredictor | None = None,
               interval_s: float = 5.0, on_step=None,
               clock: Callable[[], float] = time.monotonic):
    self.planner = planner
    self.scaler = scaler
    self.meter = meter
    self.workers = workers
    self.set_role = set_role
    self.predictor = predictor or RatePredictor()
    self.interval_s = interval_s
    self.on_step = on_step
    self.clock = clock
    self.lengths = None
    self.steps: list[Step] = []

  async def step(self) -> Step:
    now = self.clock()
    loop = asyncio.get_running_loop()
    rate, lengths = await loop.run_in_executor(None, self.meter.sample, now)
    if rate is not None:
      self.predictor.observe(rate)
    if lengths is not None:
      self.lengths = lengths
    predicted = self.predictor.predict()
    sizing = await loop.run_in_executor(None, self.planner.size, predicted,
                                        self.lengths)
    movable: dict[str, list] = {r: [] for r in ROLES}
    for w in await self.workers():
      if (set(ROLES) <= set(w.roles) and w.role in movable
          and w.state in ("ready", "joining")):
        movable[w.role].append(w)
    fixed = {r: await self.scaler.replicas(r) for r in ROLES}
    current = {r: fixed[r] + len(movable[r]) for r in ROLES}
    targets = self.planner.targets(now, sizing, current)
    actions: list = []
    # Move workers of both pools from a pool with one to spare to one that
    # is short: no process starts, the capacity serves at once.
    for a, b in (("prefill", "decode"), ("decode", "prefill")):
      short = targets[a] - current[a]
      spare = current[b] - max(sizing.need[b],
                               self.planner.policy.min_workers[b])
      k = max(0, min(short, spare, len(movable[b])))
      for w in movable[b][:k]:
        await self.set_role(w.address, a)
        movable[b].remove(w)
        movable[a].append(w)
        current[a] += 1
        current[b] -= 1
        targets[b] -= 1
        actions.append(["move", w.address, b, a])
      if k:
        self.planner.note_change(a, now)
        self.planner.note_change(b, now)
    for role in ROLES:
      want = max(0, targets[role] - len(movable[role]))
      if want != fixed[role]:
        await self.scaler.scale(role, want)
        self.planner.note_change(role, now)
        actions.append(["scale", role, fixed[role], want])
    st = Step(t=now, rate=rate, predicted=predicted, current=current,
              targets=targets, need=sizing.need, actions=actions,
              mean_prompt=(float(np.mean(self.lengths[0]))
                           if self.lengths else None),
              mean_output=(float(np.mean(self.lengths[1]))
                           if self.lengths else None))
    if actions:
      log.info("rate %.2f req/s (predicted %.2f): pools %s -> %s: %s",
               rate or 0.0, predicted, current, targets, actions)
    self.steps.append(st)
    if self.on_step is not None:
      self.on_step(st)
    return st

  async def run(self, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    while not stop.is_set():
      t0 = self.clock()
      try:
        await self.step()
      except Exception as e:  # noqa: BLE001 - the loop goes on
        log.warning("planner step failed: %s: %s", type(e).__name__, e)
        if self.on_step is not None:
          self.on_step(Step(t=t0, rate=None, predicted=0.0, current={},
                            targets={}, need={}, actions=[],
                            error=f"{type(e).__name__}: {e}"))
      wait = max(0.0, self.interval_s - (self.clock() - t0))
      try:
        await asyncio.wait_for(stop.wait(), wait)
      except asyncio.TimeoutError:
        pass


class RouterClient:
  """The planner's calls: the router's ``ListWorkers``, a worker's
  ``SetRole`` (both internal: the deployment's service token)."""

  def __init__(self, router: str, security):
    from pdjax.service import common
    self.router = router
    self.security = security
    self._common = common
    self._channels: dict = {}

  def _channel(self, address: str):
    ch = self._channels.get(address)
    if ch is None:
      ch = self._channels[address] = self._common.make_channel(
          address, self.security, aio=True)
    return ch

  async def workers(self) -> list:
    from pdjax.v1 import registry_pb2, registry_pb2_grpc
    stub = registry_pb2_grpc.RegistryStub(self._channel(self.router))
    got = await stub.ListWorkers(registry_pb2.ListWorkersRequest(),
                                 timeout=5.0)
    return list(got.workers)

  async def set_role(self, address: str, role: str,
                     drain_timeout_s: float = 60.0):
    from pdjax.v1 import registry_pb2, registry_pb2_grpc
    stub = registry_pb2_grpc.WorkerControlStub(self._channel(address))
    return await stub.SetRole(registry_pb2.SetRoleRequest(
        role=role, drain_timeout_s=drain_timeout_s),
        timeout=drain_timeout_s + 30.0)

  async def close(self) -> None:
    for ch in self._channels.values():
      await ch.close()
    self._channels.clear()


def load_settings(path: str, *, ttft_s: float | None = None,
                  tpot_s: float | None = None,
                  attainment: float | None = None,
                  max_batch: int | None = None,
                  max_batch_tokens: int | None = None,
                  max_rows: int | None = None):
  """(Profile, Slo, Batching, max_rows) from a profile file
  (``tools/plan_pools.py --out``: the profile, the SLOs and the batching it
  was planned with), each overridden by the arguments given. ValueError
  says what is missing."""
  from pdjax.planner.profile import profile_from_dict
  try:
    data = json.loads(open(path).read())
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: {e}") from None
  profile = profile_from_dict(data.get("profile", data))
  slo = data.get("slo", {})
  ttft = ttft_s or slo.get("ttft_s")
  tpot = tpot_s or slo.get("tpot_s")
  if not ttft or not tpot:
    raise ValueError("no SLOs: give the TTFT and TPOT SLOs (or a profile "
                     "file that has them)")
  batching = data.get("batching", {})
  return (profile, Slo(ttft, tpot, attainment or slo.get("attainment", 0.9)),
          Batching(max_batch or batching.get("max_batch", 1),
                   max_batch_tokens or batching.get("max_batch_tokens")),
          max_rows or data.get("max_rows"))


def build_loop(router: str, metrics_url: str, scaler, security,
               settings, policy: Policy, *, interval_s: float = 5.0,
               window_s: float = 15.0, predictor: str = "constant",
               on_step=None) -> tuple[ControlLoop, RouterClient]:
  """A control loop over a router (``settings``: ``load_settings``)."""
  profile, slo, batching, max_rows = settings
  planner = PoolPlanner(profile, slo, policy, batching=batching,
                        max_rows=max_rows)
  client = RouterClient(router, security)
  loop = ControlLoop(planner, scaler,
                     TrafficMeter(scraper(metrics_url), window_s),
                     workers=client.workers, set_role=client.set_role,
                     predictor=RatePredictor(predictor),
                     interval_s=interval_s, on_step=on_step)
  return loop, client


def step_writer(path: str | None):
  """An ``on_step`` that appends each pass to ``path`` as a JSON line."""
  if not path:
    return None

  def write(st: Step) -> None:
    with open(path, "a") as f:
      f.write(step_json(st) + "\n")
  return write


def step_json(st: Step) -> str:
  return json.dumps(dataclasses.asdict(st))


def scraper(url: str) -> Callable[[], str]:
  return lambda: scrape(url, timeout_s=5.0)


__all__ = ["ControlLoop", "Policy", "PoolPlanner", "RatePredictor",
           "RouterClient", "Sizing", "Step", "TrafficMeter", "arrivals",
           "build_loop", "load_settings", "scraper", "step_json",
           "step_writer"]
