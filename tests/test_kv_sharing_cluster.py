"""Shared KV in a real deployment: two prefill workers sharing their caches
(``--kv_fetch=always``), a KV store process, a load-only router (so a
conversation's turns alternate between the workers, as load balancing
sends them). Each turn fetches the previous turn's blocks from the other
worker instead of computing them; a worker restarted empty finds a prefix
in the store; with the store killed, requests are computed, correctly.
Every response's tokens equal a cache-free run."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest

from cluster_helpers import Cluster, metric, reference_tokens
from pdjax.client import Client

pytestmark = pytest.mark.timeout(900)
PAGE = 16
NEW = 6
POLL_S = 1.2       # the router polls every 0.5 s: time to see new blocks


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  c = Cluster(tmp_path_factory.mktemp("kv_sharing"), kv_transport="grpc",
              num_prefill=2, num_decode=1, kv_store=True, warmup=False,
              worker_flags=["--prefix_cache_pages=64", "--kv_fetch=always",
                            # every cached prefix: the test counts them
                            "--prefill_cached_prefix=always"],
              router_flags=["--kv_overlap_weight=0"])
  yield c
  c.stop()


def _proc(c, name):
  """The live process of ``name`` (a restarted one is listed again)."""
  return [p for p in c.cluster.procs if p.name == name][-1]


def _metrics(c, name) -> str:
  import urllib.request
  port = _proc(c, name).metrics_port
  with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                              timeout=10) as r:
    return r.read().decode()


def _remote(c, *stats) -> float | tuple[float, ...]:
  """Shared-KV counters, each summed over the live prefill workers (their
  gauges follow within 0.25 s: read after a wait of 0.6); one stat's
  value, or a tuple of them."""
  time.sleep(0.6)
  texts = [_metrics(c, n) for n in ("prefill0", "prefill1")]
  got = tuple(sum(metric(t, "pdjax_prefix_cache_blocks",
                         f'pool="prefill_remote",stat="{stat}"')
                  for t in texts) for stat in stats)
  return got[0] if len(stats) == 1 else got


def _published(c, name) -> float:
  """Blocks worker ``name`` has written through to the store."""
  return metric(_metrics(c, name), "pdjax_prefix_cache_blocks",
                'pool="prefill_remote",stat="published_blocks"')


def _generate(client, ids):
  return client.generate(prompt_token_ids=ids, max_tokens=NEW,
                         temperature=0.0, ignore_eos=True)


def test_alternating_turns_fetch_from_the_other_worker(shared,
                                                       tiny_model_dir):
  c = shared
  rng = np.random.RandomState(3)
  turns, history = [], []
  for _ in range(4):
    prompt = history + rng.randint(3, 500, size=30).tolist()
    turns.append(prompt)
    history = prompt + rng.randint(3, 500, size=10).tolist()
  want = reference_tokens(tiny_model_dir, turns, NEW)
  peer0, store0 = _remote(c, "peer_blocks", "store_blocks")
  served, cached = [], []
  with Client(c.address, timeout_s=120) as client:
    for ids in turns:
      if served:
        time.sleep(POLL_S)    # the router sees the previous turn's blocks
      r = _generate(client, ids)
      served.append(r.usage.prefill_worker)
      cached.append(r.usage.cached_prompt_tokens)
      assert r.token_ids == want[len(served) - 1]
  # Load-only routing: the turns alternate between the two workers.
  assert all(served) and served[0] != served[1], served
  assert served == [served[0], served[1]] * 2, served
  # Every later turn found the previous turn's blocks (held by the other
  # worker) and computed only the rest.
  assert cached[0] == 0
  for i in range(1, len(turns)):
    assert cached[i] == len(turns[i - 1]) // PAGE * PAGE, (i, cached)
  # What came over: turn i's worker held turn i-2's blocks itself and
  # fetched the rest of turn i-1's (from the peer the router named; from
  # the store, had the router not seen them yet).
  peer, store = _remote(c, "peer_blocks", "store_blocks")
  peer, store = peer - peer0, store - store0
  held = [0, 0] + [len(t) // PAGE for t in turns]
  assert peer + store == sum(len(turns[i - 1]) // PAGE - held[i]
                             for i in range(1, len(turns)))
  assert peer > 0
  assert metric(_metrics(c, "router"),
                "pdjax_router_kv_fetchable_blocks_total",
                'role="prefill"') > 0


def test_the_store_outlives_a_worker_restart(shared, tiny_model_dir):
  c = shared
  ids = np.random.RandomState(8).randint(3, 500, size=100).tolist()
  blocks = (len(ids) - 1) // PAGE
  want = reference_tokens(tiny_model_dir, [ids], NEW)[0]
  published = {n: _published(c, n) for n in ("prefill0", "prefill1")}
  with Client(c.address, timeout_s=120) as client:
    first = _generate(client, ids)
  assert first.token_ids == want and first.usage.cached_prompt_tokens == 0
  port = int(first.usage.prefill_worker.rsplit(":", 1)[1])
  name = next(n for n in ("prefill0", "prefill1")
              if _proc(c, n).port() == port)
  before = metric(_metrics(c, "kvstore0"), "pdjax_kvstore_blocks_total",
                  'event="fetched"')
  # Written through off the request's path: wait until the store has the
  # blocks before the worker that computed them dies.
  deadline = time.monotonic() + 60
  while _published(c, name) < published[name] + blocks:
    assert time.monotonic() < deadline, "the blocks never reached the store"
    time.sleep(0.1)
  # The worker that computed it (and wrote it through) dies and comes back
  # empty, on its port; the other never had the prompt.
  old = _proc(c, name)
  args = [a for a in old.args if not a.startswith("--port=")]
  c.kill(name)
  c.cluster.start(name, "pdjax.launch.prefill", [*args, f"--port={port}"],
                  devices=2)
  c.cluster.wait_ready([_proc(c, name)], 600)
  time.sleep(2 * POLL_S)             # the router sees it again
  with Client(c.address, timeout_s=120) as client:
    again = _generate(client, ids)
  assert again.token_ids == want
  assert again.usage.cached_prompt_tokens == blocks * PAGE
  after = metric(_metrics(c, "kvstore0"), "pdjax_kvstore_blocks_total",
                 'event="fetched"')
  assert after - before == blocks
  assert _remote(c, "store_blocks") >= blocks


def test_requests_are_computed_while_the_store_is_down(shared,
                                                       tiny_model_dir):
  c = shared
  c.kill("kvstore0", signal.SIGKILL)
  rng = np.random.RandomState(13)
  prompts = [rng.randint(3, 500, size=n).tolist() for n in (70, 90)]
  want = reference_tokens(tiny_model_dir, prompts, NEW)
  failures = _remote(c, "failures")
  with Client(c.address, timeout_s=120) as client:
    for ids, w in zip(prompts, want):
      r = _generate(client, ids)
      assert r.token_ids == w
      assert r.usage.cached_prompt_tokens == 0
  # The store was asked (and failed fast) or skipped while backing off;
  # write-through to it failed and was dropped, nothing else.
  failures_after, dropped = _remote(c, "failures", "publish_dropped")
  assert failures_after > failures
  assert dropped > 0
