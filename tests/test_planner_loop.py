"""The planner that acts (``pdjax.planner.control``) without processes: the
traffic it reads off a router's metrics, the hysteresis that keeps a noisy
rate from flapping the pools, moving a worker of both pools before starting
one, and the Kubernetes scaler against a fake API server."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pdjax.planner import Slo
from pdjax.planner.control import (ControlLoop, Policy, PoolPlanner,
                                   RatePredictor, TrafficMeter)
from pdjax.planner.profile import (DecodeModel, PrefillModel, Profile,
                                   profile_from_dict, profile_to_dict)
from pdjax.planner.scaler import StaticScaler
from pdjax.service.metrics import Metrics
from pdjax.v1 import registry_pb2

# One prefill worker serves a 100-token prompt in 50 ms; a decode worker
# spends 5 ms + 1 ms per row on each token.
PROFILE = Profile(prefill=PrefillModel(a=0.05, b=0.0), overhead_s=0.01,
                  decode=DecodeModel(alpha=0.005, beta=0.001,
                                     tpot_spread=1.2),
                  prompt_tokens=(100,) * 50, output_tokens=(20,) * 50,
                  requests=50)
SLO = Slo(ttft_s=0.25, tpot_s=0.05)


def test_profile_round_trips_through_json():
  assert profile_from_dict(json.loads(json.dumps(
      profile_to_dict(PROFILE)))) == PROFILE


def test_the_meter_reads_the_offered_rate_and_lengths():
  m = Metrics("router")
  ticks = iter([0.0, 10.0, 20.0])
  meter = TrafficMeter(m.text, window_s=10.0)
  assert meter.sample(next(ticks)) == (None, None)
  for _ in range(30):
    m.arrivals.inc()
  for _ in range(20):          # finished: 64-token prompts, 16 out
    m.request_prompt_tokens.observe(64)
    m.request_generation_tokens.observe(16)
  rate, (prompts, outputs) = meter.sample(next(ticks))
  assert rate == pytest.approx(3.0)
  assert sum(prompts) / len(prompts) == pytest.approx(64, rel=0.05)
  assert sum(outputs) / len(outputs) == pytest.approx(16, rel=0.05)
  rate, lengths = meter.sample(next(ticks))   # idle since
  assert rate == 0.0 and lengths is None


def test_predictors():
  holt = RatePredictor("holt", alpha=1.0, beta=1.0)
  for r in (2, 4, 6):
    holt.observe(r)
  assert holt.predict() == pytest.approx(8.0)
  const = RatePredictor()
  const.observe(5)
  const.observe(1)
  assert const.predict() == 1
  with pytest.raises(ValueError):
    RatePredictor("arima")


def _planner(**policy) -> PoolPlanner:
  return PoolPlanner(PROFILE, SLO, Policy(**policy))


def _edge(p: PoolPlanner, role: str, n: int) -> float:
  """The lowest rate (to 1%) at which ``role`` needs ``n`` workers."""
  lo, hi = 0.1, 200.0
  while hi / lo > 1.01:
    mid = (lo * hi) ** 0.5
    lo, hi = (mid, hi) if p.size(mid).need[role] < n else (lo, mid)
  return hi


def test_pools_grow_at_once_and_shrink_slowly_one_at_a_time():
  p = _planner(up_cooldown_s=5, down_cooldown_s=20, down_after_s=10)
  low, high = p.size(1.0), p.size(55.0)
  assert low.need == {"prefill": 1, "decode": 1}
  assert high.need["prefill"] >= 3 and high.need["decode"] >= 2
  cur = {"prefill": 1, "decode": 1}
  t = 0.0
  cur = p.targets(t, high, cur)
  assert cur == high.need                      # grows at once
  for r in cur:
    p.note_change(r, t)
  seen = []
  while t < 120:
    t += 2
    new = p.targets(t, low, cur)
    for r in new:
      if new[r] != cur[r]:
        assert new[r] == cur[r] - 1            # one at a time
        seen.append((t, r))
        p.note_change(r, t)
    cur = new
  assert cur == low.need
  first = {r: min(tt for tt, rr in seen if rr == r) for r in cur}
  assert all(tt >= 20 for tt in first.values())   # not before the cooldown
  per_role = [tt for tt, rr in seen if rr == "prefill"]
  assert all(b - a >= 20 for a, b in zip(per_role, per_role[1:]))


def test_a_pool_that_cannot_keep_up_does_not_size_the_other():
  """Past what the prefill pool's bound can serve, it is held at its
  bound; the decode pool is still sized for the rate on its own."""
  p = _planner(max_workers={"prefill": 1, "decode": 4})
  s = p.size(30.0)
  assert not s.feasible
  assert s.need == {"prefill": 1, "decode": 1}


def test_a_noisy_rate_does_not_flap_the_pools():
  """A rate that wanders +-20% around where the prefill pool goes from 1
  to 2 workers grows it once, and keeps it."""
  p = _planner(up_cooldown_s=4, down_cooldown_s=20, down_after_s=10,
               down_margin=0.3)
  edge = _edge(p, "prefill", 2)
  rng = random.Random(0)
  cur = {"prefill": 1, "decode": 1}
  changes = 0
  for k in range(100):
    t = 2.0 * k
    rate = edge * rng.choice((0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2))
    new = p.targets(t, p.size(rate), cur)
    for r in new:
      if new[r] != cur[r]:
        changes += 1
        p.note_change(r, t)
    cur = new
  assert cur["prefill"] == 2 and changes <= 2, (cur, changes)


def _status(address, role, roles, state="ready"):
  return registry_pb2.WorkerStatus(address=address, role=role, state=state,
                                   roles=roles)


class _Meter:
  def __init__(self, rate):
    self.rate = rate

  def sample(self, now):
    return self.rate, None


def test_the_loop_moves_a_worker_of_both_pools_before_starting_one():
  """The prefill pool is short and the decode pool has a worker of both
  pools to spare: it is moved (no process starts); what is still short
  after that is started."""
  async def run(rate):
    moved = []
    workers = [_status("d0", "decode", ["decode"]),
               _status("f0", "decode", ["prefill", "decode"]),
               _status("p0", "prefill", ["prefill"])]

    async def list_workers():
      return workers

    async def set_role(address, role):
      moved.append((address, role))

    scaler = StaticScaler({"prefill": 1, "decode": 1})
    loop = ControlLoop(_planner(), scaler, _Meter(rate),
                       workers=list_workers, set_role=set_role)
    step = await loop.step()
    return step, moved, scaler.asked

  p = _planner()
  rate = _edge(p, "prefill", 2)
  assert p.size(rate).need == {"prefill": 2, "decode": 1}
  step, moved, asked = asyncio.run(run(rate))
  assert moved == [("f0", "prefill")]
  assert step.actions == [["move", "f0", "decode", "prefill"]]
  assert asked == {"prefill": 1, "decode": 1}     # nothing started
  step, moved, asked = asyncio.run(run(_edge(p, "prefill", 3)))
  assert moved == [("f0", "prefill")] and asked["prefill"] == 2


# ------------------------------------------------------ Kubernetes scaler
class FakeScaleApi:
  """GET and PATCH of ``<workload>/scale``, as the API server serves
  them; records each PATCH's path, content type and body."""

  def __init__(self):
    self.replicas = {"statefulsets/pdjax-decode": 2,
                     "leaderworkersets/pdjax-prefill": 1}
    self.patches = []
    fake = self

    class Handler(BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *a):
        pass

      def _key(self):
        parts = self.path.split("?")[0].strip("/").split("/")
        assert parts[-1] == "scale", self.path
        return f"{parts[-3]}/{parts[-2]}"

      def _answer(self, key):
        body = json.dumps({"kind": "Scale", "apiVersion": "autoscaling/v1",
                           "metadata": {"name": key.split("/")[1]},
                           "spec": {"replicas": fake.replicas[key]},
                           "status": {"replicas": fake.replicas[key]}})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

      def do_GET(self):
        self._answer(self._key())

      def do_PATCH(self):
        key = self._key()
        body = json.loads(self.rfile.read(int(self.headers[
            "Content-Length"])))
        fake.patches.append((self.path, self.headers["Content-Type"], body))
        fake.replicas[key] = body["spec"]["replicas"]
        self._answer(key)

    self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=self.server.serve_forever, daemon=True).start()
    self.url = f"http://127.0.0.1:{self.server.server_port}"


def test_the_kubernetes_scaler_sets_the_pools_replicas():
  pytest.importorskip("kubernetes")
  from kubernetes import client
  from pdjax.planner.scaler import KubernetesScaler
  api = FakeScaleApi()
  cfg = client.Configuration()
  cfg.host = api.url
  scaler = KubernetesScaler({"prefill": "leaderworkerset/pdjax-prefill",
                             "decode": "statefulset/pdjax-decode"}, "ns",
                            client.ApiClient(cfg))

  async def run():
    assert await scaler.replicas("decode") == 2
    assert await scaler.replicas("prefill") == 1
    await scaler.scale("decode", 3)
    await scaler.scale("prefill", 2)
    assert await scaler.replicas("decode") == 3
    assert await scaler.replicas("prefill") == 2

  asyncio.run(run())
  paths = [p for p, _, _ in api.patches]
  assert paths == [
      "/apis/apps/v1/namespaces/ns/statefulsets/pdjax-decode/scale",
      "/apis/leaderworkerset.x-k8s.io/v1/namespaces/ns/leaderworkersets/"
      "pdjax-prefill/scale"]
  for _, ctype, body in api.patches:
    assert ctype == "application/merge-patch+json", ctype
    assert set(body) == {"spec"}
  with pytest.raises(ValueError, match="KIND/NAME"):
    KubernetesScaler({"decode": "pods/x"}, "ns", client.ApiClient(cfg))
  api.server.shutdown()
