"""The chaos soak (pdjax.eval.chaos, tools/chaos_soak.py) run small on one
deployment (1 prefill + 2 decode workers, grpc transport, a gateway): 120
greedy requests with 20% cancelled and a few past tiny deadlines, a decode
worker killed with SIGKILL and restarted by the supervisor, 5 clients
stalled in their request headers and a burst of 13 invalid requests.
Afterwards every request is accounted for (reference tokens, a clean
cancel or deadline, or UNAVAILABLE/ABORTED while the worker was down),
nothing is left allocated on any worker, the restarted worker serves and
the gateway answers /health."""

from __future__ import annotations

import pytest

from pdjax.eval.chaos import ChaosConfig, Deployment, format_table, run_chaos

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
  # --nowarmup: the soak checks what every request got, not that serving
  # never compiles (cluster_helpers.Cluster's warmup=False says why).
  d = Deployment(tmp_path_factory.mktemp("chaos"), num_prefill=1,
                 num_decode=2, header_timeout_s=1.0,
                 worker_flags=["--nowarmup"])
  yield d
  d.stop()


def test_chaos_soak_small(deployment):
  cfg = ChaosConfig(num_requests=120, concurrency=16, kill_at=0.3,
                    slow_clients=5, slow_at=0.1, bad_requests=13,
                    bad_at=0.5, num_prompts=6, max_tokens=12, seed=7)
  s = run_chaos(cfg, deployment)
  print(format_table(s))
  assert s["requests"] == 120
  assert not s["unacceptable"], s["unacceptable"]
  assert s["left_behind"] == {}, "KV allocations left behind"
  assert s["kill"]["worker"] == "decode0" and s["kill"]["restart_s"] > 0
  assert s["restarts"] == ["decode0"]
  assert s["restarted_worker_serves"]["served"], s["restarted_worker_serves"]
  assert s["slow_clients"]["closed_by_gateway"] == 5, s["slow_clients"]
  assert s["bad_requests"]["wrong"] == [], s["bad_requests"]
  # Every kind of invalid request was sent, each refused cleanly.
  assert len(s["bad_requests"]["by_case"]) == 13
  assert s["gateway_health"] == 200
  o = s["outcomes"]
  assert o.get("completed", 0) > 60 and o.get("cancelled", 0) > 5, o
  assert s["passed"], s["checks"]
