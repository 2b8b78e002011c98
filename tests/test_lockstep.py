"""A prefill pool whose mesh spans two processes (multi-controller JAX over
jax.distributed, gloo collectives on CPU): the leader's batches are replayed
by the follower, and the results equal a one-process engine's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from pdjax.engine import lockstep
from pdjax.engine.requests import PrefillRequest
from pdjax.engine.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_requests_survive_the_broadcast_encoding():
  reqs = [PrefillRequest("a", [5, 6, 7], SamplingParams(
              max_tokens=3, temperature=0.5, top_p=0.8, top_k=4, seed=9,
              stop_token_ids=(11, 12), ignore_eos=True), seed_u32=77,
              cache_salt="t", skip_pages=1),
          PrefillRequest("b", list(range(40)), SamplingParams(),
                         prefix_pages=[3, 4])]
  assert lockstep.decode(lockstep.encode(reqs)) == reqs


def test_prefill_pool_across_two_processes(tmp_path):
  out = tmp_path / "report.jsonl"
  coordinator = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  procs = [subprocess.Popen(
      [sys.executable, str(ROOT / "tests" / "lockstep_process.py"),
       coordinator, "2", str(pid), str(out)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
      for pid in (0, 1)]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=240)[0].decode(errors="replace"))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  assert all(p.returncode == 0 for p in procs), "\n".join(
      log[-3000:] for log in logs)
  reports = {r["pid"]: r for r in map(json.loads,
                                      out.read_text().splitlines())}
  leader, follower = reports[0], reports[1]
  assert follower["replayed"] == 2              # both batches, then stop
  assert leader["requests"] == 3
  assert leader["tokens"] == leader["want_tokens"]
  # The KV handed on is whole, on the leader's own device.
  assert leader["kv_local"] and leader["ready_local"]
  assert leader["max_kv_diff"] <= 1e-4 * max(leader["kv_scale"], 1.0)


def test_what_may_span_processes_is_checked_at_start_up():
  from absl import app
  from pdjax.launch.worker import check_spanning_pool
  check_spanning_pool("prefill", "prefill", 0)
  for role, pool, pages, match in (("decode", "decode", 0, "decode pool"),
                                   ("both", "prefill", 0, "role=prefill"),
                                   ("prefill", "prefill", 64, "prefix cache")):
    try:
      check_spanning_pool(role, pool, pages)
    except app.UsageError as e:
      assert match in str(e)
    else:
      raise AssertionError(f"{role}/{pool}/{pages} was accepted")
