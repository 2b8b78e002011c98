"""Reliability under load, faults and overload, with real processes.

* soak: 400 requests of random lengths, 20% cancelled at random points,
  5% with tiny deadlines; afterwards every request is accounted for, every
  KV allocation on every worker is back to zero, and worker memory is flat;
* faults: kill -9 a decode and a prefill worker under load: the others'
  requests finish with correct tokens, the failed ones get UNAVAILABLE,
  nothing hangs; a dropped KV hand-off is recomputed (correct tokens);
* overload: 5x the router's admission bound at once: the excess is refused
  fast with RESOURCE_EXHAUSTED and a retry hint, the admitted ones finish;
* drain: SIGTERM lets a worker finish its streams, and a replacement on the
  same address rejoins.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time

import grpc
import pytest

from cluster_helpers import (MAX_NEW, Cluster, make_prompts, metric,
                             reference_tokens)
from pdjax.client import AsyncClient, Client, GenerationError

pytestmark = pytest.mark.timeout(1200)

LIVE_OWNERS = ("decode_rows", "reservations", "staged_transfers",
               "prefill_held")


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
  prompts = make_prompts()
  return prompts, reference_tokens(tiny_model_dir, prompts)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
  # Without warm-up (cluster_helpers.Cluster): the soak's first 100
  # requests, before its memory baseline, compile what serving needs.
  c = Cluster(tmp_path_factory.mktemp("rel"), kv_transport="grpc",
              num_prefill=2, num_decode=2, warmup=False,
              worker_flags=["--kv_ttl_s=5"])
  yield c
  c.stop()


def _live(cluster: Cluster) -> dict[str, float]:
  out = {}
  for name in cluster.worker_names("prefill") + cluster.worker_names(
      "decode"):
    text = cluster.metrics(name)
    for owner in LIVE_OWNERS:
      v = metric(text, "pdjax_kv_live_allocations", f'owner="{owner}"')
      if v:
        out[f"{name}/{owner}"] = v
    used = metric(text, "pdjax_kv_pages", 'state="used"')
    reserved = metric(text, "pdjax_kv_pages", 'state="reserved"')
    if used or reserved:
      out[f"{name}/pages"] = used + reserved
  return out


def _wait_idle(cluster: Cluster, timeout_s: float = 20.0) -> dict:
  deadline = time.monotonic() + timeout_s
  live = _live(cluster)
  while live and time.monotonic() < deadline:
    time.sleep(0.25)
    live = _live(cluster)
  return live


async def _one(client: AsyncClient, rng: random.Random, i: int):
  """One soak request; returns (outcome, tokens)."""
  plen = rng.choice((1, 5, 20, 60, 130, 200))
  prompt = [rng.randrange(3, 512) for _ in range(plen)]
  max_tokens = rng.randint(1, 24)
  roll = rng.random()
  cancel_after = rng.randint(0, 3) if roll < 0.20 else None
  timeout = rng.uniform(0.001, 0.02) if 0.20 <= roll < 0.25 else 120.0
  got = 0
  stream = client.stream(prompt_token_ids=prompt, max_tokens=max_tokens,
                         temperature=rng.choice((0.0, 0.8)), seed=i,
                         ignore_eos=True, timeout_s=timeout)
  try:
    async for delta in stream:
      got += len(delta.token_ids)
      if cancel_after is not None and got > cancel_after:
        await stream.aclose()
        return "cancelled", got
      if delta.finish_reason:
        assert delta.finish_reason == "length"
        assert got == max_tokens, (got, max_tokens)
        return "completed", got
    return "truncated", got
  except GenerationError as e:
    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and timeout < 1:
      return "deadline", got
    return f"error:{e.code().name}:{e.details()}", got


def _compilations(cluster: Cluster, name: str) -> int:
  """XLA compilations so far in worker ``name`` (its metrics)."""
  return int(metric(cluster.metrics(name), "pdjax_xla_compilations"))


def test_soak_400_requests_leave_nothing_behind(cluster):
  rng = random.Random(1234)
  decoders = cluster.worker_names("decode")

  async def run(n, concurrency=48):
    sem = asyncio.Semaphore(concurrency)
    async with AsyncClient(cluster.address) as client:
      async def guarded(i):
        async with sem:
          return await _one(client, rng, i)
      return await asyncio.gather(*(guarded(i) for i in range(n)))

  warm = asyncio.run(run(100))
  rss_before = {n: cluster.rss_bytes(n) for n in decoders}
  compiled_before = {n: _compilations(cluster, n) for n in decoders}
  assert all(compiled_before.values()), compiled_before   # it is counted
  results = warm + asyncio.run(run(300))
  outcomes = {}
  for o, _ in results:
    outcomes[o] = outcomes.get(o, 0) + 1
  assert sum(outcomes.values()) == 400
  unexpected = {k: v for k, v in outcomes.items()
                if k not in ("completed", "cancelled", "deadline")}
  assert not unexpected, outcomes
  # The seeded draws of these 400 ask for 305 to complete, 71 to be
  # cancelled (a cancel point at or past max_tokens completes instead) and
  # 24 to end past a deadline of 1-20 ms (a fast one may complete first);
  # the bounds are 88%, 85% and 29% of that.
  assert outcomes.get("completed", 0) > 270, outcomes
  assert outcomes.get("cancelled", 0) > 60, outcomes
  assert outcomes.get("deadline", 0) > 7, outcomes
  assert _wait_idle(cluster) == {}, "KV allocations left behind"
  for n in decoders:
    grown = cluster.rss_bytes(n) - rss_before[n]
    # 300 requests after the warm-up: a leak of 103 KiB a request (30.2
    # MiB) shows. Serving them grows a worker by a few MiB, and by about
    # 10 more for each program first compiled after the warm-up (which
    # programs the warm-up's 100 requests reach depends on their timing):
    # those are allowed for, 12 MiB each.
    compiled = _compilations(cluster, n) - compiled_before[n]
    bound = (30 + 12 * compiled) << 20
    assert grown < bound, (f"{n} grew {grown / 2**20:.0f} MiB, "
                           f"{compiled} programs compiled meanwhile")
    # The decode loop's iterations are in its metrics, both phases.
    text = cluster.metrics(n)
    count = "pdjax_decode_iteration_seconds_count"
    launched = metric(text, count, 'phase="launch"')
    assert launched > 50, (n, launched)
    assert metric(text, count, 'phase="deliver"') == launched


def test_dropped_kv_is_recomputed(tmp_path_factory, reference):
  """A prefill worker that loses 50% of its hand-offs: the decode side
  times out redeeming them and the router recomputes the prompt there,
  continuing from the first token the client already has."""
  prompts, expected = reference
  c = Cluster(tmp_path_factory.mktemp("drop"), kv_transport="grpc",
              num_prefill=1, num_decode=1, warmup=False,
              worker_flags=["--fault_injection_drop_kv=0.5",
                            "--transfer_timeout_s=0.5"])
  try:
    with Client(c.address, timeout_s=60) as client:
      for _ in range(2):
        for p, want in zip(prompts, expected):
          r = client.generate(prompt_token_ids=p, max_tokens=MAX_NEW,
                              temperature=0.0, ignore_eos=True)
          assert r.token_ids == want
    text = c.metrics("router")
    assert metric(text, "pdjax_requests_total", 'outcome="kv_recomputed"') > 0
    assert _wait_idle(c) == {}
  finally:
    c.stop()


def test_overload_is_refused_fast(cluster):
  """Runs before the kill test, on the soak's workers behind a router of
  its own: the admission bound is the router's (``--max_inflight``), what
  it fronts is any deployment's workers."""
  bound = 8
  address = cluster.add_router("router_over", [f"--max_inflight={bound}"])

  async def one(client, i):
    t0 = time.monotonic()
    try:
      r = await client.generate(prompt_token_ids=[5 + i % 50] * 20,
                                max_tokens=64, temperature=0.0,
                                ignore_eos=True)
      return "ok", time.monotonic() - t0, len(r.token_ids)
    except GenerationError as e:
      return e.code(), time.monotonic() - t0, e.details()

  async def run():
    async with AsyncClient(address, timeout_s=120) as client:
      return await asyncio.gather(*(one(client, i)
                                    for i in range(5 * bound)))

  results = asyncio.run(run())
  ok = [r for r in results if r[0] == "ok"]
  refused = [r for r in results if r[0] != "ok"]
  assert len(ok) >= bound and refused, results
  assert all(r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
  assert all("retry after" in r[2] for r in refused)
  assert max(r[1] for r in refused) < 2.0
  assert all(r[2] == 64 for r in ok)


def test_sigterm_drains_and_replacement_rejoins(cluster, reference):
  """Runs after the overload test and before the kill test, on the soak's
  workers (two decode workers; the soak compiled what serving needs): a
  decode worker told to stop finishes its streams and exits cleanly, and a
  replacement started on its address is routed to."""
  prompts, expected = reference
  c = cluster
  sent = []

  async def stream_all():
    async with AsyncClient(c.address, timeout_s=120) as client:
      async def one(i):
        toks = []
        async for d in client.stream(prompt_token_ids=prompts[i % 3],
                                     max_tokens=120, temperature=0.0,
                                     ignore_eos=True):
          toks.extend(d.token_ids)
          if len(toks) >= 2 and not sent:
            sent.append(time.monotonic())
            c.kill("decode0", sig=signal.SIGTERM, wait=False)
        return toks
      return await asyncio.gather(*(one(i) for i in range(6)))

  results = asyncio.run(stream_all())
  assert sent, "SIGTERM was never sent"
  assert all(len(t) == 120 for t in results)   # nobody was cut off
  for i, t in enumerate(results):
    assert t[:MAX_NEW] == expected[i % 3]
  assert c.proc("decode0").popen.wait(timeout=60) == 0
  # A replacement on the same address rejoins and is routed to.
  old = c.proc("decode0")
  port = old.port()
  new = c.cluster.start("decode0b", "pdjax.launch.decode",
                        ["--config=test", "--kv_transport=grpc",
                         "--mesh=dp=1", f"--port={port}", "--nowarmup"])
  c.cluster.wait_ready([new], 300)
  seen = set()
  with Client(c.address, timeout_s=60) as client:
    deadline = time.monotonic() + 30
    while f"127.0.0.1:{port}" not in seen:
      assert time.monotonic() < deadline, seen
      r = client.generate(prompt_token_ids=prompts[0], max_tokens=MAX_NEW,
                          temperature=0.0, ignore_eos=True)
      assert r.token_ids == expected[0]
      seen.add(r.usage.decode_worker)


def test_kill_workers_under_load(cluster, reference):
  """Runs after the soak (same cluster). Kills one decode worker mid-load
  and one prefill worker; the rest finishes correctly."""
  prompts, expected = reference
  n = 24
  # decode0 was stopped by the drain test; its replacement serves.
  victim = cluster.worker_names("decode")[0]

  async def one(client, i):
    p = i % len(prompts)
    toks = []
    try:
      async for d in client.stream(prompt_token_ids=prompts[p],
                                   max_tokens=MAX_NEW, temperature=0.0,
                                   ignore_eos=True):
        toks.extend(d.token_ids)
        await asyncio.sleep(0.01)
      return "ok", p, toks
    except GenerationError as e:
      return e.code(), p, toks

  async def run():
    async with AsyncClient(cluster.address, timeout_s=120) as client:
      tasks = [asyncio.create_task(one(client, i)) for i in range(n)]
      await asyncio.sleep(0.3)
      cluster.kill(victim, wait=False)
      cluster.kill("prefill0", wait=False)
      return await asyncio.wait_for(asyncio.gather(*tasks), 300)

  results = asyncio.run(run())
  for status, p, toks in results:
    if status == "ok":
      assert toks == expected[p]
    else:
      assert status == grpc.StatusCode.UNAVAILABLE, (status, toks)
  assert sum(r[0] == "ok" for r in results) >= n // 3
  # The survivors keep serving.
  with Client(cluster.address, timeout_s=60) as client:
    for p, want in zip(prompts[:3], expected[:3]):
      assert client.generate(prompt_token_ids=p, max_tokens=MAX_NEW,
                             temperature=0.0,
                             ignore_eos=True).token_ids == want
