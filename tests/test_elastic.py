"""Elastic pools with real processes: a deployment whose workers register
with the router (``launch_elastic``: one prefill worker, one decode worker
and one worker of both pools), supervised as ``pdjax.launch.local``
supervises it.

* the launcher killed with SIGKILL leaves no process behind;
* a worker of both pools moves between the pools under load, and every
  greedy request's tokens are those of a fixed deployment;
* a short load ramp through ``pdjax.eval.ramp`` (tools/elastic_ramp.py's
  measuring) with the planner's loop on: finding the prefill pool short and
  the decode pool with a worker to spare, it moves that worker (no process
  starts), and no request fails;
* a worker that dies is restarted on its port and rejoins while the others
  serve; a restarted router gets its workers back by their registrations;
* scale-down under load drains the worker away: no request fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from cluster_helpers import MAX_NEW, make_prompts, reference_tokens
from pdjax.client import AsyncClient, Client
from pdjax.launch.cluster import (LocalCluster, Supervisor, launch_elastic,
                                  router_security, router_workers, tail)
from pdjax.planner.control import Policy, RouterClient, load_settings
from pdjax.planner.profile import (DecodeModel, PrefillModel, Profile,
                                   profile_to_dict)
from pdjax.planner.scaler import LocalScaler

pytestmark = pytest.mark.timeout(1200)
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------ the launcher's children
def _children(pid: int) -> set[int]:
  out = set()
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        stat = Path(f"/proc/{entry}/stat").read_text()
      except OSError:
        continue
      if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
        out.add(int(entry))
  return out


def _alive(pid: int) -> bool:
  try:
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except OSError:
    return False
  return state != "Z"


def test_no_process_outlives_a_launcher_killed_with_sigkill(tmp_path):
  """SIGKILL gives the launcher no chance to stop anything: its processes
  get their parent-death signal, drain (nothing runs) and exit. (Its
  --gateway_port is the router's own HTTP: no process of its own.)"""
  import urllib.request
  launcher = subprocess.Popen(
      [sys.executable, "-m", "pdjax.launch.local", "--config=test",
       "--num_prefill=0", "--num_decode=1", "--worker_flags=--nowarmup",
       "--gateway_port=0", f"--run_dir={tmp_path}"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      start_new_session=True)
  try:
    lines = []
    for line in launcher.stdout:
      lines.append(line)
      if line.startswith("serving"):
        break
    assert lines and lines[-1].startswith("serving"), "".join(lines)
    url, = [line.split(" at ")[1].strip() for line in lines
            if line.startswith("OpenAI-compatible API at ")]
    with urllib.request.urlopen(f"{url}/models", timeout=10) as r:
      assert r.status == 200
    kids = _children(launcher.pid)
    assert len(kids) == 2, kids           # the router and the worker
  finally:
    launcher.kill()
    launcher.wait()
  deadline = time.monotonic() + 60
  while any(_alive(k) for k in kids) and time.monotonic() < deadline:
    time.sleep(0.2)
  left = [k for k in kids if _alive(k)]
  for k in left:
    os.kill(k, signal.SIGKILL)
  assert not left, f"orphans: {left}"


# --------------------------------------------------- the elastic deployment
class Elastic:

  def __init__(self, run_dir: Path):
    self.cluster = LocalCluster(run_dir)
    self.address = launch_elastic(
        self.cluster, config="test", num_prefill=1, num_decode=1,
        num_flex=1, flex_role="decode", lease_s=2.0,
        router_flags=["--metrics_port=0"],
        # Programs compile when first used (cluster_helpers.Cluster's
        # warmup=False): these tests check pools, moves and restarts.
        worker_flags=["--metrics_port=0", "--nowarmup"],
        ready_timeout_s=600)
    self.supervisor = Supervisor(self.cluster, backoff_s=0.2)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._supervise, daemon=True)
    self._thread.start()

  def _supervise(self) -> None:
    while not self._stop.is_set():
      self.supervisor.check()
      time.sleep(0.1)

  def proc(self, name: str):
    return next(p for p in self.cluster.procs if p.name == name)

  def address_of(self, name: str) -> str:
    return f"127.0.0.1:{self.proc(name).port() or self.proc(name).last_port}"

  def pools(self) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {"prefill": set(), "decode": set()}
    for w in router_workers(self.cluster):
      if w.state == "ready":
        out[w.role].add(w.address)
    return out

  def wait_pools(self, want: dict[str, set[str]], timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while True:
      try:
        got = self.pools()
        if got == want:
          return
      except grpc.RpcError as e:
        got = e.code().name
      assert time.monotonic() < deadline, (got, want)
      time.sleep(0.2)

  async def set_role(self, name: str, role: str):
    client = RouterClient(self.address, router_security(self.cluster))
    try:
      return await client.set_role(self.address_of(name), role)
    finally:
      await client.close()

  def stop(self) -> None:
    self._stop.set()
    self._thread.join()
    self.cluster.stop()
    for p in self.cluster.procs:
      print(f"----- {p.name} (exit {p.popen.returncode}): {p.log}\n"
            f"{tail(p.log, 25)}")


@pytest.fixture(scope="module")
def elastic(tmp_path_factory):
  e = Elastic(tmp_path_factory.mktemp("elastic"))
  yield e
  e.stop()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
  prompts = make_prompts()
  return prompts, reference_tokens(tiny_model_dir, prompts)


class Load:
  """Greedy requests, ``streams`` at a time, until stopped; every answer
  checked against the fixed deployment's tokens."""

  def __init__(self, address, reference, streams: int = 2,
               max_tokens: int = MAX_NEW):
    self.address = address
    self.prompts, self.expected = reference
    self.streams = streams
    self.max_tokens = max_tokens
    self.ok = 0
    self.failures: list[str] = []
    self.prefill_workers: set[str] = set()
    self.decode_workers: set[str] = set()
    self._stop = asyncio.Event()

  async def _one(self, client, i):
    k = i % len(self.prompts)
    try:
      r = await client.generate(prompt_token_ids=self.prompts[k],
                                max_tokens=self.max_tokens, temperature=0.0,
                                ignore_eos=True)
    except Exception as e:  # noqa: BLE001 - counted, reported
      self.failures.append(f"{type(e).__name__}: {e}")
      return
    if r.token_ids[:MAX_NEW] != self.expected[k]:
      self.failures.append(f"tokens of prompt {k}: {r.token_ids} != "
                           f"{self.expected[k]}")
      return
    self.ok += 1
    self.prefill_workers.add(r.usage.prefill_worker)
    self.decode_workers.add(r.usage.decode_worker)

  async def run(self):
    async with AsyncClient(self.address, timeout_s=120) as client:
      async def stream(s):
        i = s
        while not self._stop.is_set():
          await self._one(client, i)
          i += self.streams
      await asyncio.gather(*(stream(s) for s in range(self.streams)))

  def stop(self):
    self._stop.set()

  async def answered(self, n: int, until=lambda: True,
                     timeout_s: float = 120) -> None:
    """Waits until ``n`` more requests have been answered and ``until()``
    holds, or until one has failed (the caller's checks report it)."""
    want = self.ok + n
    deadline = time.monotonic() + timeout_s
    while (self.ok < want or not until()) and not self.failures:
      assert time.monotonic() < deadline, (self.ok, want)
      await asyncio.sleep(0.05)


def test_a_worker_moves_between_pools_under_load(elastic, reference):
  """The moves are made under load (two streams of requests, back to
  back): the first once two requests are answered, the second once two
  more are and the moved worker has prefilled one; the load runs on until
  two more are answered after it."""
  flex = elastic.address_of("flex0")
  p0, d0 = elastic.address_of("prefill0"), elastic.address_of("decode0")

  async def run():
    load = Load(elastic.address, reference)
    task = asyncio.ensure_future(load.run())
    await load.answered(2)
    moved = await elastic.set_role("flex0", "prefill")
    assert elastic.pools() == {"prefill": {p0, flex}, "decode": {d0}}
    await load.answered(2, until=lambda: flex in load.prefill_workers)
    back = await elastic.set_role("flex0", "decode")
    assert elastic.pools() == {"prefill": {p0}, "decode": {d0, flex}}
    await load.answered(2)
    load.stop()
    await task
    return load, moved, back

  load, moved, back = asyncio.run(run())
  assert not load.failures, load.failures[:5]
  assert load.ok >= 6
  print(f"moves: to prefill {moved.drain_s + moved.join_s:.3f} s, back "
        f"{back.drain_s + back.join_s:.3f} s; {load.ok} requests")
  assert flex in load.prefill_workers, load.prefill_workers


def _profile_file(tmp_path: Path) -> Path:
  """A profile under which 1 req/s needs two prefill workers (a prompt
  takes 1.5 s) and one decode worker."""
  profile = Profile(prefill=PrefillModel(a=1.5, b=0.0), overhead_s=0.0,
                    decode=DecodeModel(alpha=0.001, beta=0.0),
                    prompt_tokens=(40,) * 20, output_tokens=(12,) * 20,
                    requests=20)
  path = tmp_path / "profile.json"
  path.write_text(json.dumps({
      "profile": profile_to_dict(profile),
      "slo": {"ttft_s": 3.0, "tpot_s": 1.0, "attainment": 0.9}}))
  return path


def test_a_short_ramp_with_the_planner_on(elastic, tmp_path):
  """tools/elastic_ramp.py's measuring (pdjax.eval.ramp) on this
  deployment: 1 then 3 req/s with the planner's loop acting. Under the
  profile the prefill pool is short and the decode pool has a worker of
  both pools to spare: the loop moves it (no process starts), no request
  fails, and the step table and chart are written."""
  from pdjax.eval import ramp
  p0, d0 = elastic.address_of("prefill0"), elastic.address_of("decode0")
  flex = elastic.address_of("flex0")
  router = elastic.proc("router")
  settings = load_settings(str(_profile_file(tmp_path)))
  policy = Policy(max_workers={"prefill": 2, "decode": 2}, up_cooldown_s=0)
  schedule = [(1.0, 4.0), (3.0, 6.0)]
  records, timeline, steps = asyncio.run(ramp.run_ramp(
      elastic.cluster, elastic.address, router.metrics_port, schedule,
      settings, policy, tmp_path, interval_s=1.0, window_s=3.0,
      workload=dict(length_scale=0.1)))
  summary = ramp.write_results(tmp_path, schedule, records, timeline, steps,
                               (settings[1].ttft_s, settings[1].tpot_s), {},
                               bin_s=2.0)
  assert summary["requests"] == len(records) > 10
  assert summary["failed"] == 0, [r.error for r in records if r.error][:3]
  moves = [a for st in steps for a in st["actions"]]
  assert moves == [["move", flex, "decode", "prefill"]], moves
  assert elastic.pools() == {"prefill": {p0, flex}, "decode": {d0}}
  assert [p.name for p in elastic.cluster.procs] == [
      "router", "prefill0", "decode0", "flex0"]       # nothing started
  assert max(r["prefill"] for r in timeline) == 2
  assert "| 4-10 s | 3 |" in (tmp_path / "ramp.md").read_text()
  assert (tmp_path / "ramp.png").stat().st_size > 10_000
  asyncio.run(elastic.set_role("flex0", "decode"))


def test_a_dead_worker_is_restarted_and_rejoins(elastic, reference):
  p0, d0 = elastic.address_of("prefill0"), elastic.address_of("decode0")
  flex = elastic.address_of("flex0")
  decode0 = elastic.proc("decode0")
  os.killpg(decode0.popen.pid, signal.SIGKILL)

  async def serve_meanwhile():
    # One stream shows the others serving; more would only slow the
    # restarted worker's start on a two-core machine.
    load = Load(elastic.address, reference, streams=1)
    task = asyncio.ensure_future(load.run())
    while not (elastic.supervisor.restarted and d0 in await
               asyncio.to_thread(lambda: elastic.pools()["decode"])):
      await asyncio.sleep(0.5)
    load.stop()
    await task
    return load

  load = asyncio.run(asyncio.wait_for(serve_meanwhile(), 300))
  assert not load.failures, load.failures[:5]   # the others kept serving
  assert load.ok > 0
  assert [n for n, _ in elastic.supervisor.restarted] == ["decode0"]
  elastic.wait_pools({"prefill": {p0}, "decode": {d0, flex}})
  with Client(elastic.address, timeout_s=60) as c:
    seen = set()
    deadline = time.monotonic() + 30
    while d0 not in seen:             # routed to again
      assert time.monotonic() < deadline, seen
      seen.add(c.generate(prompt_token_ids=[5, 6, 7], max_tokens=2,
                          temperature=0.0).usage.decode_worker)


def test_workers_come_back_to_a_restarted_router(elastic, reference):
  pools = elastic.pools()
  router = elastic.proc("router")
  port = router.port()
  os.killpg(router.popen.pid, signal.SIGKILL)
  router.popen.wait()
  elastic.wait_pools(pools, timeout_s=180)       # registered again
  assert router.port() == port
  prompts, expected = reference
  with Client(elastic.address, timeout_s=60) as c:
    r = c.generate(prompt_token_ids=prompts[1], max_tokens=MAX_NEW,
                   temperature=0.0, ignore_eos=True)
  assert r.token_ids == expected[1]


def test_scale_down_drains_the_worker_under_load(elastic, reference):
  flex = elastic.address_of("flex0")
  decode0 = elastic.proc("decode0")
  scaler = LocalScaler(elastic.cluster)

  async def run():
    assert await scaler.replicas("decode") == 1
    load = Load(elastic.address, reference, streams=3, max_tokens=40)
    task = asyncio.ensure_future(load.run())
    await load.answered(3)
    await scaler.scale("decode", 0)     # decode0 goes; flex0 stays
    assert await scaler.replicas("decode") == 0
    code = await asyncio.to_thread(decode0.popen.wait, 120)
    await load.answered(3)              # flex0 alone serves on
    load.stop()
    await task
    return load, code

  load, code = asyncio.run(run())
  assert code == 0                       # drained and exited by itself
  assert not load.failures, load.failures[:5]
  assert elastic.pools()["decode"] == {flex}
