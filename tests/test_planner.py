"""The pool planner (pdjax.planner): fits recover the models that made the
records, the prefill simulation agrees with queueing theory where theory is
exact, plans and capacities are consistent with their own predictions, and
tools/plan_pools.py runs on a sweep directory."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pdjax.eval.stats import RequestRecord
from pdjax.planner import (Batching, DecodeModel, PrefillModel, Profile,
                           ProfileError, Slo, Traffic, capacity, fit_profile,
                           plan, predict)
from pdjax.planner.profile import (_nonnegative_lstsq, concurrency,
                                   fit_decode, fit_prefill)
from pdjax.planner.sizing import (predict_tpot, predict_ttft,
                                  simulate_prefill)

ROOT = Path(__file__).resolve().parents[1]


def _record(i, send, prompt, prefill_s, overhead, tpot, n_out, start=None):
  first = send + overhead + prefill_s if start is None else start
  return RequestRecord(
      request_id=f"r{i}", prompt_tokens=prompt, output_tokens=n_out,
      send_time=send, first_token_time=first,
      token_times=[first + k * tpot for k in range(n_out)],
      usage={"prompt_tokens": prompt, "prefill_s": prefill_s})


def _prefill_run(a=0.02, b=3e-5, c=1e-8, overhead=0.004, n=60, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(50, 2000, n)
  return [_record(i, 10.0 * i, int(L), a + b * L + c * L * L, overhead,
                  0.01, 5) for i, L in enumerate(lengths)], lengths


def test_fit_prefill_recovers_its_model():
  records, _ = _prefill_run()
  model, overhead = fit_prefill(records)
  assert model.a == pytest.approx(0.02, rel=1e-6)
  assert model.b == pytest.approx(3e-5, rel=1e-6)
  assert model.c == pytest.approx(1e-8, rel=1e-6)
  assert overhead == pytest.approx(0.004, abs=1e-9)


def test_decode_fit_from_streams_of_known_concurrency():
  """Groups of k streams decoding side by side (the same span) give
  concurrency k; TPOT = alpha + beta k is recovered across runs."""
  alpha, beta = 0.011, 2e-4
  runs = []
  for k in (1, 4, 16, 32):
    tpot = alpha + beta * k
    runs.append([_record(i, 0.0, 100, 0.01, 0.0, tpot, 20, start=1.0)
                 for i in range(k)])
  assert list(concurrency(runs[2])) == [16.0] * 16
  model = fit_decode(runs)
  assert model.alpha == pytest.approx(alpha, rel=1e-6)
  assert model.beta == pytest.approx(beta, rel=1e-6)
  # Two decode workers share the same streams: half the rows each.
  assert fit_decode(runs, decode_workers=2).beta == pytest.approx(
      2 * beta, rel=1e-6)


def test_fits_refuse_records_without_what_they_need():
  records, _ = _prefill_run(n=6)
  with pytest.raises(ProfileError, match="at least 8"):
    fit_prefill(records)
  for r in records:
    r.usage = None
  with pytest.raises(ProfileError, match="prefill_s"):
    fit_profile(records)


def test_nonnegative_least_squares_drops_a_negative_term():
  x = np.linspace(0, 1, 20)
  y = 1.0 - 0.5 * x          # a falling line: the slope is not allowed
  coef = _nonnegative_lstsq(np.stack([np.ones_like(x), x], 1), y)
  assert coef[1] == 0.0 and coef[0] == pytest.approx(y.mean())


def _profile(a=0.05, b=0.0, c=0.0, alpha=0.01, beta=1e-4, overhead=0.0,
             prompts=(100,), outputs=(100,)) -> Profile:
  return Profile(PrefillModel(a, b, c), DecodeModel(alpha, beta), overhead,
                 tuple(prompts), tuple(outputs), len(prompts))


def test_unbatched_prefill_simulation_is_the_md1_queue():
  """Fixed service S, Poisson arrivals: the mean wait is
  Pollaczek-Khinchine's lambda S^2 / (2 (1 - rho))."""
  prof, rate = _profile(a=0.05), 12.0
  rho = rate * 0.05
  waits = simulate_prefill(prof, Traffic.like(prof, rate), 1,
                           samples=40_000) - 0.05
  assert waits.min() >= -1e-12
  assert waits.mean() == pytest.approx(rate * 0.05 ** 2 / (2 * (1 - rho)),
                                       rel=0.08)
  # Two workers, each request to the shorter queue: less waiting than
  # either worker alone at half the rate (a split of the arrivals).
  two = simulate_prefill(prof, Traffic.like(prof, 2 * rate), 2,
                         samples=40_000) - 0.05
  assert two.mean() < waits.mean()


def test_batching_amortises_the_fixed_cost():
  """A rate no unbatched worker sustains (rho 1.5) is served by batches of
  four, whose fixed cost is paid once per batch."""
  prof = _profile(a=0.05, b=1e-5, prompts=(100, 200, 300))
  traffic = Traffic.like(prof, 30.0)
  assert predict_ttft(prof, traffic, 1)[0] == math.inf
  ttft, rho = predict_ttft(prof, traffic, 1, batching=Batching(4))
  assert rho > 1 and math.isfinite(ttft)
  # A token cap of one prompt per program is no batching at all.
  assert predict_ttft(prof, traffic, 1,
                      batching=Batching(4, max_batch_tokens=150))[0] \
      == math.inf


def test_decode_tpot_is_littles_law_fixed_point():
  prof = _profile(alpha=0.01, beta=1e-4, outputs=(200,))
  traffic = Traffic.like(prof, 20.0)          # 4,000 tokens/s
  tpot, rows = predict_tpot(prof, traffic, 2)
  want = 0.01 / (1 - 1e-4 * 4000 / 2)
  assert tpot == pytest.approx(want)
  assert rows == pytest.approx(4000 * want / 2)
  assert rows == pytest.approx((0.01 + 1e-4 * rows) * 2000)   # consistent
  assert predict_tpot(prof, traffic, 1)[0] == pytest.approx(0.01 / 0.6)
  # 12,000 tokens/s on one worker: every row's KV read outgrows the step.
  assert predict_tpot(prof, Traffic.like(prof, 60.0), 1)[0] == math.inf
  assert predict_tpot(prof, traffic, 2, max_rows=10)[0] == math.inf


def test_plans_are_minimal_and_grow_with_the_rate():
  prof = _profile(a=0.03, b=2e-5, prompts=(200, 800, 1500),
                  outputs=(100, 300), overhead=0.005)
  slo = Slo(ttft_s=0.2, tpot_s=0.03)
  last = (0, 0)
  for rate in (2.0, 8.0, 20.0, 40.0):
    traffic = Traffic.like(prof, rate)
    p = plan(prof, traffic, slo, max_rows=256, batching=Batching(4))
    assert p is not None and p.meets(slo)
    for fewer in ((p.num_prefill - 1, p.num_decode),
                  (p.num_prefill, p.num_decode - 1)):
      if min(fewer) >= 1:
        assert not predict(prof, traffic, *fewer, max_rows=256,
                           batching=Batching(4)).meets(slo)
    assert (p.num_prefill, p.num_decode) >= last
    last = (p.num_prefill, p.num_decode)
  # A prompt whose own prefill takes longer than the SLO: no plan.
  assert plan(_profile(a=0.5), Traffic(1.0, (100,), (10,)), slo) is None


def test_capacity_is_where_predictions_cross_the_slo():
  prof = _profile(a=0.03, b=2e-5, prompts=(200, 800), outputs=(100, 300))
  slo = Slo(ttft_s=0.2, tpot_s=0.03)
  cap = capacity(prof, slo, 1, 1, max_rows=256)
  assert cap > 0
  ok = predict(prof, Traffic.like(prof, cap * 0.97), 1, 1, max_rows=256)
  over = predict(prof, Traffic.like(prof, cap * 1.05), 1, 1, max_rows=256)
  assert ok.meets(slo) and not over.meets(slo)
  assert capacity(prof, slo, 2, 2, max_rows=256) > cap


def test_plan_pools_tool_on_a_sweep(tmp_path):
  """The command line (tools/plan_pools.py, the checkout's name for
  ``pdjax plan``) on a sweep directory as ``pdjax bench`` writes it:
  profile, validation table and plans."""
  sweep = tmp_path / "sweep"
  for rate in (1, 4):
    records, _ = _prefill_run(seed=rate)
    d = sweep / f"rate_{rate}"
    d.mkdir(parents=True)
    (d / "results.jsonl").write_text("".join(
        json.dumps(r.to_dict()) + "\n" for r in records))
    (d / "summary.json").write_text(json.dumps(
        {"ttft": {"p90": 0.1}, "tpot": {"p90": 0.01},
         "slo_attainment": 1.0}))
  (sweep / "config.json").write_text(json.dumps(
      {"ttft_slo": 0.25, "tpot_slo": 0.1}))
  out = tmp_path / "plan.json"
  proc = subprocess.run(
      [sys.executable, str(ROOT / "tools" / "plan_pools.py"),
       f"--sweep={sweep}", "--validate", "--rates=2,20", "--max_batch=4",
       "--max_rows=64", f"--out={out}"],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "| 4 | " in proc.stdout and "1 prefill + 1 decode" in proc.stdout
  result = json.loads(out.read_text())
  assert result["profile"]["prefill"]["a"] == pytest.approx(0.02, rel=1e-3)
  assert [p["rate"] for p in result["plans"]] == [2.0, 20.0]
  assert result["plans"][0]["num_prefill"] >= 1
  assert len(result["validation"]) == 2


def test_traffic_from_two_scrapes_of_the_routers_histograms():
  """The window's rate and lengths: requests finished between the scrapes
  only, their mean exact, each length within its bucket's bounds."""
  from prometheus_client import generate_latest

  from pdjax.planner.traffic import traffic_between
  from pdjax.service.metrics import Metrics
  m = Metrics("router")

  def finish(prompt, output):
    m.request_prompt_tokens.observe(prompt)
    m.request_generation_tokens.observe(output)

  for _ in range(5):                      # before the window
    finish(10_000, 3)
  before = generate_latest(m.registry).decode()
  prompts = [100, 120, 300, 300, 900, 3000] * 5
  outputs = [20, 40, 60, 200, 250, 500] * 5
  for p, o in zip(prompts, outputs):
    finish(p, o)
  t = traffic_between(before, generate_latest(m.registry).decode(), 10.0)
  assert t.rate == pytest.approx(3.0)
  assert np.mean(t.prompt_tokens) == pytest.approx(np.mean(prompts), rel=0.01)
  assert np.mean(t.output_tokens) == pytest.approx(np.mean(outputs), rel=0.01)
  assert max(t.prompt_tokens) < 10_000    # the earlier requests left out
  assert min(t.prompt_tokens) >= 64 and max(t.prompt_tokens) <= 4096 * 1.5
  with pytest.raises(ValueError, match="no request finished"):
    traffic_between(before, before, 10.0)
  with pytest.raises(ValueError, match="pdjax router"):
    traffic_between("", "", 10.0)


def test_plan_pools_plans_for_a_routers_measured_traffic(tmp_path):
  """--router_metrics: two scrapes of a /metrics endpoint give the rate and
  lengths the plan is made for."""
  import http.server
  import threading

  from prometheus_client import generate_latest

  from pdjax.service.metrics import Metrics
  m = Metrics("router")
  pages = [generate_latest(m.registry)]
  for _ in range(40):
    m.request_prompt_tokens.observe(500)
    m.request_generation_tokens.observe(100)
  pages.append(generate_latest(m.registry))

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
      body = pages.pop(0) if len(pages) > 1 else pages[0]
      self.send_response(200)
      self.end_headers()
      self.wfile.write(body)

    def log_message(self, *args):
      pass

  server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  records, _ = _prefill_run()
  profile = tmp_path / "results.jsonl"
  profile.write_text("".join(json.dumps(r.to_dict()) + "\n"
                             for r in records))
  out = tmp_path / "plan.json"
  try:
    proc = subprocess.run(
        [sys.executable, "-m", "pdjax.cli", "plan",
         f"--profile={profile}", "--ttft_slo=0.5", "--tpot_slo=0.1",
         f"--router_metrics=http://127.0.0.1:{server.server_port}/metrics",
         "--window_s=2", f"--out={out}"],
        capture_output=True, text=True, timeout=120)
  finally:
    server.shutdown()
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(out.read_text())
  measured = result["measured_traffic"]
  assert measured["rate"] == pytest.approx(20.0)
  assert measured["mean_prompt_tokens"] == pytest.approx(500, rel=0.01)
  assert measured["mean_output_tokens"] == pytest.approx(100, rel=0.01)
  (planned,) = result["plans"]
  assert planned["rate"] == pytest.approx(20.0)
  assert planned["num_prefill"] >= 1 and planned["num_decode"] >= 1
