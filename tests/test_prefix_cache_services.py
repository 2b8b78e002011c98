"""Prefix caching through the services, for every transport and for the
decode worker's own prefills: tokens equal a cache-free run (greedy and
seeded) for prompts sharing 0, 1, many and all blocks with earlier ones;
the prefill worker computes fewer prompt tokens, the decode worker receives
fewer KV bytes, and each response's usage reports its cached prompt
tokens."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cluster_helpers import (Cluster, check_ttft_stages, metric,
                             reference_engine)
from pdjax.client import Client

pytestmark = pytest.mark.timeout(900)
NEW = 8
WORKER_FLAGS = ["--prefix_cache_pages=64", "--prefix_caching"]


def _family():
  rng = np.random.RandomState(11)
  base = rng.randint(3, 500, size=120).tolist()
  other = rng.randint(3, 500, size=60).tolist()
  return [base[:90], base[:90], base[:16] + other[:20], base[:64] + other[:9],
          base[:120], other[:50], base[:64]]


def _sampling(i, seeded):
  if seeded:
    return dict(temperature=0.9, top_p=0.9, top_k=40, seed=1000 + i)
  return dict(temperature=0.0)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
  """Tokens of the same requests from the in-process colocated engine,
  prefix caching off (the test deployment's reference engine, which the
  other deployment tests of this process share)."""
  from pdjax.engine.sampling import SamplingParams
  eng = reference_engine(tiny_model_dir)
  out = {}
  for seeded in (False, True):
    for i, p in enumerate(_family()):
      key = (seeded, i)
      eng.submit(str(key), p, SamplingParams(max_tokens=NEW, ignore_eos=True,
                                             **_sampling(i, seeded)),
                 lambda ev, key=key: out.setdefault(key, []).extend(
                     ev.token_ids),
                 seed_u32=1000 + i if seeded else 0)
  eng.drain()
  return out


@pytest.fixture(scope="module")
def grpc_cluster(tmp_path_factory):
  """The grpc deployment, warmed up, that both grpc cases share: they
  start the same workers and differ in the router's
  ``--local_prefill_threshold`` only, so the second case runs behind a
  router of its own over these workers (``Cluster.add_router``)."""
  c = Cluster(tmp_path_factory.mktemp("grpc"), kv_transport="grpc",
              num_prefill=1, num_decode=1, warmup=True,
              worker_flags=WORKER_FLAGS,
              router_flags=["--local_prefill_threshold=0"])
  yield c
  c.stop()


def _decode_cached(c) -> float:
  """Prompt tokens the decode worker's own prefills took from its cache."""
  return metric(c.metrics("decode0"), "pdjax_prefill_tokens_total",
                'source="cache"')


def _counts(c, pname: str, transport: str) -> dict[str, float]:
  """The counters the test checks, on the prefill side (``pname``) and
  the decode worker's own prefills."""
  text = c.metrics(pname)
  out = {
      "cached": metric(text, "pdjax_prefill_tokens_total", 'source="cache"'),
      "computed": metric(text, "pdjax_prefill_tokens_total",
                         'source="computed"'),
      "skipped": sum(
          metric(text, "pdjax_kv_transfer_skipped_bytes_total",
                 f'transport="{t}"') for t in ("grpc", "device", "local")),
      "compiled": metric(text, "pdjax_xla_compilations"),
  }
  if transport != "local":
    out["local"] = _decode_cached(c)
  return out


@pytest.mark.parametrize("transport,local_prefill", [
    ("grpc", 0), ("device", 0), ("local", 0), ("grpc", 70)])
def test_prefix_caching_end_to_end(transport, local_prefill, tmp_path,
                                   reference, request):
  """``local_prefill``: prompts shorter than this are prefilled on the
  decode worker, from its own cached blocks. Every response's usage says
  how many prompt tokens came from a cache; together they are what the
  workers counted.

  The grpc deployment warms up, and its prefill worker then compiles
  nothing while serving: the decode worker caches prefixes by a flag of
  its own (the deployment file says nothing of it), so the prefill's
  hand-offs leave out pages it holds, with programs warm-up must have made
  (they compiled on the first requests, 70 ms each, when the prefill worker
  warmed them only where the file said the decode pool caches).

  Both grpc cases run on that one deployment (the workers they start are
  the same), each behind a router with its threshold; the one behind the
  second router sends a cache salt, so that it finds none of the other's
  blocks, as on a fresh deployment. Counts are what the workers' counters
  advanced by during the case."""
  warm = transport == "grpc"
  if warm:
    c = request.getfixturevalue("grpc_cluster")
    address = c.address
    if local_prefill:
      address = c.add_router(
          "router_lp", [f"--local_prefill_threshold={local_prefill}"])
  else:
    c = Cluster(tmp_path / transport, kv_transport=transport, num_prefill=1,
                num_decode=1, warmup=False, worker_flags=WORKER_FLAGS,
                router_flags=[f"--local_prefill_threshold={local_prefill}"])
    address = c.address
  # The second router's case keeps its blocks apart from the first's.
  salt = f"threshold-{local_prefill}" if warm and local_prefill else None
  pname = "pd0" if transport == "local" else "prefill0"
  try:
    before = _counts(c, pname, transport)
    if warm:
      assert before["compiled"] > 0   # (counted)
    reported = []
    with Client(address, timeout_s=120) as client:
      for seeded in (False, True):
        for i, p in enumerate(_family()):
          r = client.generate(prompt_token_ids=p, max_tokens=NEW,
                              ignore_eos=True, cache_salt=salt,
                              **_sampling(i, seeded))
          assert r.token_ids == reference[(seeded, i)], (transport, seeded, i)
          assert bool(r.usage.prefill_worker) == (len(p) >= local_prefill)
          check_ttft_stages(r.usage)
          reported.append(r.usage.cached_prompt_tokens)
    assert reported[0] == 0 and reported[1] > 0   # the same prompt again
    after = _counts(c, pname, transport)
    cached = after["cached"] - before["cached"]
    assert cached > 0 and after["computed"] > before["computed"]
    assert after["skipped"] > before["skipped"]
    if warm:
      assert after["compiled"] == before["compiled"]
    if transport != "local":
      # The decode worker's own prefills: its counters advance on its loop's
      # tick (every 0.25 s), so the last request's may still be on the way.
      deadline = time.monotonic() + 10
      while True:
        local = _decode_cached(c) - before["local"]
        if sum(reported) == cached + local or time.monotonic() > deadline:
          break
        time.sleep(0.1)
      assert (local > 0) == bool(local_prefill)
      cached += local
    assert sum(reported) == cached
  finally:
    if not warm:
      c.stop()
