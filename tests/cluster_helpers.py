"""Shared helpers for the tests that run real deployments (processes on
loopback): start/stop, kill, metrics scraping, and reference tokens from the
in-process colocated engine."""

from __future__ import annotations

import functools
import json
import os
import signal
import urllib.request

import numpy as np

from pdjax.eval.chaos import metric  # noqa: F401  (the tests read metrics)
from pdjax.launch.cluster import LocalCluster, launch, tail

MAX_NEW = 12
# Lengths cover both prefill buckets (32, 128) of pdjax/configs/deployments/test
# and chunked prefill (> 128).
PROMPT_LENGTHS = (3, 17, 40, 100, 150, 200)


def make_prompts(lengths=PROMPT_LENGTHS, seed=0) -> list[list[int]]:
  rng = np.random.RandomState(seed)
  return [rng.randint(3, 512, size=n).tolist() for n in lengths]


def reference_tokens(tiny_dir, prompts, max_new=MAX_NEW,
                     overrides=None, **sampling) -> list[list[int]]:
  """Greedy continuations (ignore_eos; other ``SamplingParams`` fields from
  ``sampling``) from the in-process colocated engine with the test
  deployment's settings (``overrides`` on top)."""
  from pdjax.engine.sampling import SamplingParams
  engine = reference_engine(tiny_dir, overrides)
  out: dict[str, list[int]] = {}

  def cb(ev):
    out.setdefault(ev.request_id, []).extend(ev.token_ids)

  for i, p in enumerate(prompts):
    engine.submit(str(i), p, SamplingParams(max_tokens=max_new,
                                            temperature=0.0,
                                            ignore_eos=True, **sampling), cb)
  engine.drain()
  return [out[str(i)] for i in range(len(prompts))]


def reference_engine(tiny_dir, overrides=None):
  """The in-process colocated engine of the test deployment's settings
  (``overrides`` on top), idle: made and compiled once per test process
  and settings, for tests that submit their own requests (drain it)."""
  return _reference_engine(str(tiny_dir), json.dumps(
      overrides, sort_keys=True) if overrides else "")


@functools.lru_cache(maxsize=4)
def _reference_engine(tiny_dir: str, overrides: str):
  """The reference's colocated engine, one per test process and settings
  (``overrides`` as JSON; ""): built and compiled once, drained between
  uses."""
  import jax
  from pdjax.config import DeploymentConfig, resolve
  from pdjax.engine.colocated import ColocatedEngine
  from pdjax.engine.setup import load_sharded
  from pdjax.sharding import ShardingRules, make_mesh
  dep = (resolve("test", json.loads(overrides)) if overrides
         else DeploymentConfig.load("test"))
  rules = ShardingRules.load("decode_dp")
  mesh = make_mesh({"dp": 1}, jax.devices()[:1])
  # As a decode worker of the deployment loads them (its programs, and
  # the compiled ones the worker processes find in the cache, the same).
  params, cfg = load_sharded(tiny_dir, rules, mesh,
                             fuse_projections=dep.decode.fuse_projections)
  return ColocatedEngine(params, cfg, mesh, rules,
                         dep.prefill_engine_config(dep.decode),
                         dep.decode_engine_config())


def check_ttft_stages(usage) -> None:
  """A response's TTFT breakdown: every stage >= 0, together ttft_s; a
  remote prefill reserved KV (its first token waited for some of it: the
  Reserve call, or the part the prefill beside it did not hide, at least
  the picks) and was timed, a local one was timed and reserved nothing."""
  st = usage.ttft_stages
  assert set(st) == {"prepare", "reserve", "queue", "prefill", "kv_handoff",
                     "return"}, st
  assert all(v >= 0 for v in st.values()), st
  # Each stage is a sub-interval of the router's TTFT, measured by the
  # process it runs in: the router attributes the rest to "return", so the
  # sum is TTFT up to float64 rounding of a few additions.
  assert abs(sum(st.values()) - usage.ttft_s) <= 1e-9 * max(usage.ttft_s, 1)
  assert st["prefill"] > 0 and st["prepare"] > 0, st
  if usage.prefill_worker:
    assert st["reserve"] > 0, st
  else:
    assert st["reserve"] == 0 and st["kv_handoff"] == 0, st


class Cluster:
  """A deployment of ``pdjax/configs/deployments/test.toml`` on loopback.

  ``warmup=False`` starts the workers with ``--nowarmup``: they compile a
  program when a request first needs it instead of every serving program
  up front (on a cold compilation cache, a worker's warm-up is most of its
  start). For tests that check what a deployment answers, not that it
  never compiles while serving: the warm-up itself is tested on the
  engines (tests/test_engines.py) and by the deployments left warming up.
  """

  def __init__(self, tmp_dir, *, worker_flags=(), router_flags=(),
               warmup: bool = True, **kw):
    self.cluster = LocalCluster(tmp_dir)
    if not warmup:
      worker_flags = ["--nowarmup", *worker_flags]
    self.address = launch(self.cluster, config="test", ready_timeout_s=600,
                          worker_flags=["--metrics_port=0", *worker_flags],
                          router_flags=["--metrics_port=0", *router_flags],
                          **kw)

  def proc(self, name):
    return next(p for p in self.cluster.procs if p.name == name)

  def worker_names(self, role: str) -> list[str]:
    return [p.name for p in self.cluster.procs if p.name.startswith(role)
            and p.popen.poll() is None]

  def kill(self, name, sig=signal.SIGKILL, wait=True):
    p = self.proc(name)
    os.killpg(p.popen.pid, sig)
    if wait:
      p.popen.wait()

  def add_router(self, name: str, router_flags=()) -> str:
    """Starts another router over this deployment's prefill and decode
    workers (grpc or device transport), as ``launch`` starts its own, with
    the deployment's configuration and ``router_flags``; returns its
    address once it serves. A case that differs from another in router
    flags only runs behind one on the same workers instead of starting a
    deployment of its own; ``stop`` stops it with the rest."""
    host = self.cluster.host
    workers = {role: ",".join(f"{host}:{self.proc(n).port()}"
                              for n in self.worker_names(role))
               for role in ("prefill", "decode")}
    r = self.cluster.start(name, "pdjax.launch.router", [
        f"--config={self.cluster.config_path}",
        f"--prefill_workers={workers['prefill']}",
        f"--decode_workers={workers['decode']}", "--port=0",
        "--wait_workers_s=60", "--metrics_port=0", *router_flags],
                           devices=0)
    self.cluster.wait_ready([r], 120)
    return f"{host}:{r.port()}"

  def metrics(self, name) -> str:
    port = self.proc(name).metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                timeout=10) as r:
      return r.read().decode()

  def rss_bytes(self, name) -> int:
    pid = self.proc(name).popen.pid
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) * 1024
    return 0

  def stop(self):
    """Stops every process and prints the end of each one's log: pytest
    shows a test's output only when it fails, which is when they matter
    (CI keeps no other trace of the services)."""
    self.cluster.stop()
    for p in self.cluster.procs:
      print(f"----- {p.name} (exit {p.popen.returncode}): {p.log}\n"
            f"{tail(p.log, 25)}")
