"""End to end through real processes: router + prefill + decode workers on
loopback, started by ``pdjax.launch.local`` (CPU devices split per process).

Checks the services issue: every transport gives the greedy tokens of the
colocated engine and of transformers; 64 concurrent streams; cancellation
frees decode capacity (seen in the worker's Prometheus metrics); killing a
decode worker mid-stream ends only its streams with UNAVAILABLE; killing a
prefill worker makes the router retry elsewhere; invalid requests get
INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import concurrent.futures
import signal
import threading
import time

import grpc
import numpy as np
import pytest

from cluster_helpers import (MAX_NEW, Cluster, check_ttft_stages,
                             make_prompts, metric, reference_tokens)
from pdjax.client import Client, GenerationError

pytestmark = pytest.mark.timeout(900)

ROUTER_DRAIN_S = 2.0


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
  prompts = make_prompts()
  return prompts, reference_tokens(tiny_model_dir, prompts)


def test_colocated_reference_matches_transformers(tiny_model_dir, reference):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model = transformers.LlamaForCausalLM.from_pretrained(
      tiny_model_dir, dtype=torch.float32).eval()
  prompts, expected = reference
  for p, want in zip(prompts, expected):
    with torch.no_grad():
      got = model.generate(torch.tensor([p]), do_sample=False,
                           max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                           eos_token_id=None, pad_token_id=0)
    assert got[0, len(p):].tolist() == want


@pytest.fixture(scope="module")
def grpc_cluster(tmp_path_factory):
  # Decode steps are slowed (50 ms each, 4 tokens a step) so that a stream
  # of 200 tokens is still being generated seconds after its first token:
  # the decode-death test can then kill a worker mid-stream on a loaded
  # 2-core machine, where the router may relay tokens late. The router's
  # drain is short, for the last test. Without warm-up (Cluster's
  # warmup=False): these tests check what the services answer, and four
  # workers warming up at once on a cold cache each compiled every serving
  # program, two of a kind at the same time (13 of these tests' 44 CPU-s);
  # worker warm-up is run by the spanning prefill pool's deployment below
  # and by tests/test_prefix_cache_services.py's, which checks that its
  # prefill worker then compiles nothing while serving.
  c = Cluster(tmp_path_factory.mktemp("grpc"), kv_transport="grpc",
              num_prefill=2, num_decode=2, warmup=False,
              worker_flags=["--fault_injection_decode_step_delay_s=0.05"],
              router_flags=[f"--drain_timeout_s={ROUTER_DRAIN_S}"])
  yield c
  c.stop()


def _generate_all(address, prompts, **kw):
  with Client(address, timeout_s=120) as client:
    return [client.generate(prompt_token_ids=p, max_tokens=MAX_NEW,
                            temperature=0.0, ignore_eos=True, **kw)
            for p in prompts]


def test_grpc_transport_matches_reference(grpc_cluster, reference):
  prompts, expected = reference
  results = _generate_all(grpc_cluster.address, prompts)
  for r, want in zip(results, expected):
    assert r.token_ids == want
    assert r.finish_reason == "length"
    assert r.usage.completion_tokens == MAX_NEW
    assert r.usage.prefill_worker  # went through a prefill worker
    assert r.usage.kv_transfer_s > 0
    check_ttft_stages(r.usage)
  text = grpc_cluster.metrics("router")
  for stage in ("prepare", "reserve", "queue", "prefill", "return"):
    assert metric(text, "pdjax_ttft_stage_seconds_count",
                  f'stage="{stage}"') >= len(prompts), stage
  # The router's Prefill and Decode calls went as messages on one session
  # with each worker it used (here or in an earlier test: sessions stay).
  used = ({r.usage.prefill_worker for r in results}
          | {r.usage.decode_worker for r in results})
  for n in ("prefill0", "prefill1", "decode0", "decode1"):
    open_ = metric(grpc_cluster.metrics(n), "pdjax_sessions")
    address = f"127.0.0.1:{grpc_cluster.proc(n).port()}"
    assert open_ == 1 if address in used else open_ <= 1, (n, open_)


def test_prefill_pool_spanning_two_processes_matches_reference(
    tmp_path_factory, reference):
  """One prefill worker made of two processes over jax.distributed (its
  TP=2 mesh half in each, as two hosts of a multi-host pool would hold it):
  the leader serves and hands off, the follower replays its batches; the
  tokens are the reference's, and both leave cleanly on SIGTERM."""
  c = Cluster(tmp_path_factory.mktemp("spanning"), kv_transport="grpc",
              num_prefill=1, num_decode=1, prefill_mesh="tp=2",
              prefill_processes=2)
  try:
    prompts, expected = reference
    results = _generate_all(c.address, prompts)
    assert [r.token_ids for r in results] == expected
    assert all(r.usage.prefill_worker for r in results)
    assert c.proc("prefill0p1").popen.poll() is None     # still following
  finally:
    c.stop()
  # On failure, the processes' last lines say which exit step hung.
  tails = "\n".join(f"--- {n}\n" + "\n".join(
      c.proc(n).log.read_text().splitlines()[-12:])
                    for n in ("prefill0", "prefill0p1"))
  assert c.proc("prefill0").popen.returncode == 0, tails
  assert c.proc("prefill0p1").popen.returncode == 0, tails
  log = c.proc("prefill0p1").log.read_text()
  # Signalled first (the cluster stops in reverse start order), it kept
  # following until the leader's stop.
  assert "SIGTERM: following until the leader stops the pool" in log
  assert "stopped by the leader after" in log


def test_text_prompt_and_streaming(grpc_cluster):
  with Client(grpc_cluster.address, timeout_s=60) as client:
    full = client.generate("Once upon a time", max_tokens=MAX_NEW,
                           temperature=0.0, ignore_eos=True)
    deltas = list(client.stream("Once upon a time", max_tokens=MAX_NEW,
                                temperature=0.0, ignore_eos=True))
  assert [t for d in deltas for t in d.token_ids] == full.token_ids
  assert "".join(d.text for d in deltas) == full.text
  assert deltas[-1].finish_reason == "length" and deltas[-1].usage
  assert full.usage.prompt_tokens > 0 and full.usage.ttft_s > 0


def test_64_concurrent_streams(grpc_cluster, reference):
  """More streams than decode rows (2 workers x 16): the rest queue for
  capacity at the router and all finish with the right tokens."""
  prompts, expected = reference
  jobs = [(i % len(prompts)) for i in range(64)]

  def one(i):
    with Client(grpc_cluster.address, timeout_s=300) as client:
      toks = []
      for d in client.stream(prompt_token_ids=prompts[i], max_tokens=MAX_NEW,
                             temperature=0.0, ignore_eos=True):
        toks.extend(d.token_ids)
      return i, toks

  with concurrent.futures.ThreadPoolExecutor(64) as pool:
    results = list(pool.map(one, jobs))
  for i, toks in results:
    assert toks == expected[i]


def test_min_p_reaches_both_pools(grpc_cluster, reference):
  """min_p = 1 leaves only the likeliest token: sampled at temperature 1.5
  with any seed, a request's tokens are the greedy ones, its first drawn by
  a prefill worker and the rest by a decode worker, so the setting crossed
  the router, the hand-off and both pools' programs. The same seeds
  without min_p draw other tokens (what makes the first half mean
  anything)."""
  prompts, expected = reference
  with Client(grpc_cluster.address, timeout_s=120) as client:
    def run(**kw):
      return [client.generate(prompt_token_ids=p, max_tokens=MAX_NEW,
                              temperature=1.5, seed=100 + i, ignore_eos=True,
                              **kw)
              for i, p in enumerate(prompts[:3])]
    with_min_p = run(min_p=1.0)
    without = run()
  for r, want in zip(with_min_p, expected):
    assert r.token_ids == want
    assert r.usage.prefill_worker
  assert any(r.token_ids != want for r, want in zip(without, expected))


def test_min_tokens_holds_back_a_stop_in_both_pools(grpc_cluster, reference):
  """A stop id that is the greedy first token ends a request at once; with
  min_tokens = 3 the prefill worker samples another first token. One that
  is the greedy second token: the decode worker holds it back at its first
  two steps instead."""
  prompts, expected = reference
  p, want = next((p, w) for p, w in zip(prompts, expected) if w[0] != w[1])
  with Client(grpc_cluster.address, timeout_s=120) as client:
    def run(stop, **kw):
      return client.generate(prompt_token_ids=p, max_tokens=MAX_NEW,
                             temperature=0.0, stop_token_ids=[stop],
                             ignore_eos=True, **kw)
    r = run(want[0])
    assert (r.token_ids, r.finish_reason) == ([want[0]], "stop")
    r = run(want[0], min_tokens=3)
    assert len(r.token_ids) >= 3 and want[0] not in r.token_ids[:3], r
    assert r.usage.prefill_worker
    r = run(want[1])
    assert (r.token_ids, r.finish_reason) == (want[:2], "stop")
    r = run(want[1], min_tokens=3)
    assert r.token_ids[0] == want[0] and want[1] not in r.token_ids[:3], r
    assert len(r.token_ids) >= 3


def test_penalties_reach_both_pools(grpc_cluster, tiny_model_dir):
  """A penalized request through the router, a prefill worker (its first
  token), the KV hand-off and a decode worker (its penalty state armed at
  insert) gives the in-process engine's tokens (which tests/
  test_penalties.py holds to transformers), not the plain ones."""
  # Prompts of few distinct ids (the penalties have tokens to act on; the
  # chunked prefill's are tests/test_penalties.py's).
  rng = np.random.default_rng(8)
  prompts = [rng.integers(3, 40, n).tolist() for n in (9, 20)]
  penalties = dict(presence_penalty=1.5, frequency_penalty=1.0,
                   repetition_penalty=1.8)
  new = 32   # long enough for the output to repeat itself
  want = reference_tokens(tiny_model_dir, prompts, new, **penalties)
  plain = reference_tokens(tiny_model_dir, prompts, new)
  with Client(grpc_cluster.address, timeout_s=120) as client:
    got = [client.generate(prompt_token_ids=p, max_tokens=new,
                           temperature=0.0, ignore_eos=True, **penalties)
           for p in prompts]
  assert [r.token_ids for r in got] == want
  assert all(r.usage.prefill_worker for r in got)
  assert all(w != p for w, p in zip(want, plain)), (want, plain)


def test_invalid_requests_name_the_field(grpc_cluster):
  cases = [
      (dict(prompt_token_ids=[5], max_tokens=0), "max_tokens"),
      (dict(prompt_token_ids=[5], temperature=-1.0), "temperature"),
      (dict(prompt_token_ids=[5], top_p=0.0), "top_p"),
      (dict(prompt_token_ids=[5], top_p=1.5), "top_p"),
      (dict(prompt_token_ids=[5], min_p=1.5), "min_p"),
      (dict(prompt_token_ids=[5], min_p=-0.25), "min_p"),
      (dict(prompt_token_ids=[5], max_tokens=4, min_tokens=5), "min_tokens"),
      (dict(prompt_token_ids=[5], presence_penalty=2.5), "presence_penalty"),
      (dict(prompt_token_ids=[5], repetition_penalty=0.0),
       "repetition_penalty"),
      (dict(prompt_token_ids=[5, 100000]), "token_ids"),
      (dict(prompt_token_ids=[7] * 300), "token_ids"),
      (dict(prompt=""), "text"),
      # 200 + 57 > the 256 positions of the test deployment: refused, not
      # cut to 56 tokens.
      (dict(prompt_token_ids=[7] * 200, max_tokens=57), "max_tokens"),
  ]
  with Client(grpc_cluster.address, timeout_s=30) as client:
    for kw, field in cases:
      with pytest.raises((GenerationError, ValueError)) as info:
        client.generate(**kw)
      if isinstance(info.value, GenerationError):
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kw
        assert field in info.value.details(), (kw, info.value.details())
    assert info.value.details() == (
        "sampling.max_tokens: This model's maximum context length is 256 "
        "tokens. However, you requested 257 tokens (200 in the messages, 57 "
        "in the completion). Please reduce the length of the messages or "
        "completion.")
    # The default max_tokens (16) is what the context leaves, as vLLM's.
    r = client.generate(prompt_token_ids=[7] * 250, temperature=0.0,
                        ignore_eos=True)
    assert len(r.token_ids) == 6 and r.finish_reason == "length"


def _live_rows(cluster, names) -> float:
  return sum(metric(cluster.metrics(n), "pdjax_kv_live_allocations",
                     'owner="decode_rows"') for n in names)


def _cancelled(cluster, names) -> float:
  return sum(metric(cluster.metrics(n), "pdjax_requests_total",
                    'outcome="cancelled"') for n in names)


def test_cancel_frees_decode_capacity(grpc_cluster):
  """Closing a stream frees its decode row by cancelling it, not by letting
  it run out: the bound on the wait is loose (a loaded CI host), so the
  decode workers' cancelled count is what tells the two apart."""
  decoders = ["decode0", "decode1"]
  cancelled = _cancelled(grpc_cluster, decoders)
  with Client(grpc_cluster.address, timeout_s=60) as client:
    stream = client.stream(prompt_token_ids=[5, 6, 7], max_tokens=200,
                           temperature=0.0, ignore_eos=True)
    next(stream)
    next(stream)
    deadline = time.monotonic() + 5
    while _live_rows(grpc_cluster, decoders) < 1:
      assert time.monotonic() < deadline, "stream never occupied a row"
      time.sleep(0.05)
    stream.close()
    t0 = time.monotonic()
    while _live_rows(grpc_cluster, decoders) > 0:
      assert time.monotonic() - t0 < 20, "cancel did not free the row"
      time.sleep(0.05)
  assert _cancelled(grpc_cluster, decoders) == cancelled + 1


def test_zz_prefill_death_is_routed_around(grpc_cluster, reference):
  """Runs late in the module: it kills a worker. The router does not know
  yet (its next poll is up to 0.5 s away) and retries on the other."""
  prompts, expected = reference
  grpc_cluster.kill("prefill0")
  results = _generate_all(grpc_cluster.address, prompts[:3])
  assert [r.token_ids for r in results] == expected[:3]
  assert all(r.usage.prefill_worker for r in results)


def test_zzz_decode_death_ends_only_its_streams(grpc_cluster, reference):
  """Kills a decode worker while it is serving streams: exactly its streams
  end with UNAVAILABLE; the other worker's streams complete, correct, and it
  keeps serving. Both decode workers are frozen (SIGSTOP) before the victim
  is chosen from the router's per-worker in-flight gauge, so no stream can
  finish between the choice and the kill; their steps are slowed (the
  fixture) so that streams are still mid-generation when they are frozen.
  Every stream has had decode tokens by then: a decode worker that fails
  before streaming is the KV-loss case, which the router recovers by
  recomputing the request on another worker."""
  prompts, expected = reference
  outcomes = []
  long = 200   # + a prompt of <= 40 tokens stays within max_seq_len 256
  started = threading.Barrier(9)

  def one(i):
    with Client(grpc_cluster.address, timeout_s=120) as client:
      toks, worker = [], None
      try:
        it = client.stream(prompt_token_ids=prompts[i % 3], max_tokens=long,
                           temperature=0.0, ignore_eos=True)
        for n, d in enumerate(it):
          toks.extend(d.token_ids)
          # Message 0 is the prefill's first token; from message 1 on the
          # decode worker is streaming. (Killed before that, the router
          # would recompute the request elsewhere: the KV-loss path.)
          if n == 2:
            started.wait(timeout=60)
          if d.usage:
            worker = d.usage.decode_worker
        outcomes.append(("ok", i, toks, worker))
      except GenerationError as e:
        outcomes.append((e.code(), i, toks, e.details()))

  threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
  for t in threads:
    t.start()
  started.wait(timeout=60)
  decoders = ("decode0", "decode1")
  for n in decoders:
    grpc_cluster.kill(n, signal.SIGSTOP, wait=False)
  time.sleep(0.3)   # tokens already on the wire reach the router
  router = grpc_cluster.metrics("router")
  live = {n: metric(router, "pdjax_worker_inflight",
                    f'role="decode",worker="127.0.0.1:'
                    f'{grpc_cluster.proc(n).port()}"') for n in decoders}
  victim = max(live, key=live.get)
  assert live[victim] > 0, live
  victim_port = grpc_cluster.proc(victim).port()
  grpc_cluster.kill(victim)
  for n in decoders:
    if n != victim:
      grpc_cluster.kill(n, signal.SIGCONT, wait=False)
  for t in threads:
    t.join(timeout=300)
  assert len(outcomes) == 8
  failed = [o for o in outcomes if o[0] != "ok"]
  ok = [o for o in outcomes if o[0] == "ok"]
  assert 0 < len(failed) <= live[victim], (live, outcomes)
  assert all(o[0] == grpc.StatusCode.UNAVAILABLE for o in failed), failed
  # The surviving worker's streams are complete and correct.
  for _, i, toks, worker in ok:
    assert worker != f"127.0.0.1:{victim_port}"
    assert len(toks) == long
    assert toks[:MAX_NEW] == expected[i % 3]
  # And it keeps serving new requests.
  results = _generate_all(grpc_cluster.address, prompts[:2])
  assert [r.token_ids for r in results] == expected[:2]


def test_zzzz_router_drain_ends_at_its_timeout(grpc_cluster):
  """Runs last: it stops the router. On SIGTERM the router drains:
  readiness NOT_SERVING (liveness still SERVING), new requests UNAVAILABLE,
  running streams may finish for --drain_timeout_s; streams still running
  then (their decode workers are frozen) end with UNAVAILABLE, and the
  router exits, after the drain timeout, not after a fixed grace period."""
  from pdjax.service.common import LIVENESS_SERVICE
  outcomes = []
  started = threading.Barrier(4)

  def one():
    with Client(grpc_cluster.address, timeout_s=120) as client:
      toks = []
      try:
        for n, d in enumerate(client.stream(prompt_token_ids=[5, 6, 7],
                                            max_tokens=200, temperature=0.0,
                                            ignore_eos=True)):
          toks.extend(d.token_ids)
          if n == 2:
            started.wait(timeout=60)
        outcomes.append(("ok", len(toks), ""))
      except GenerationError as e:
        outcomes.append((e.code(), len(toks), e.details()))

  threads = [threading.Thread(target=one) for _ in range(3)]
  for t in threads:
    t.start()
  started.wait(timeout=60)
  decoders = grpc_cluster.worker_names("decode")
  for n in decoders:
    grpc_cluster.kill(n, signal.SIGSTOP, wait=False)
  try:
    time.sleep(0.3)
    t0 = time.monotonic()
    grpc_cluster.kill("router", signal.SIGTERM, wait=False)
    with Client(grpc_cluster.address, timeout_s=10) as client:
      while client.health() != "NOT_SERVING":
        assert time.monotonic() - t0 < ROUTER_DRAIN_S, "still SERVING"
        time.sleep(0.05)
      assert client.health(LIVENESS_SERVICE) == "SERVING"
      with pytest.raises(GenerationError) as refused:
        client.generate(prompt_token_ids=[5, 6, 7], max_tokens=2)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "draining" in refused.value.details()
    for t in threads:
      t.join(timeout=60)
    exit_code = grpc_cluster.proc("router").popen.wait(timeout=60)
    took = time.monotonic() - t0
  finally:
    for n in decoders:
      grpc_cluster.kill(n, signal.SIGCONT, wait=False)
  assert len(outcomes) == 3
  for code, got, details in outcomes:
    assert code == grpc.StatusCode.UNAVAILABLE, (code, got, details)
    assert "drain deadline" in details and got < 200
  assert exit_code == 0
  # The drain timeout (2 s) and a second to stop; gRPC's old fixed grace
  # was 10 s.
  assert ROUTER_DRAIN_S <= took < ROUTER_DRAIN_S + 5, took


@pytest.mark.parametrize("transport,layer_groups,prefill_mesh",
                         [("grpc", 1, None), ("device", 2, None),
                          ("local", 1, "tp=1")])
def test_pipelined_decode_pool_matches_reference(transport, layer_groups,
                                                 prefill_mesh,
                                                 tmp_path_factory, reference):
  """A decode pool that is a pipeline of two stages (``dp=1,pp=2``,
  ``decode_dp_pp``) takes the prefill's hand-off over every transport:
  from the TP=2 prefill worker across processes (grpc, device), and in
  one process from a TP=1 prefill pool beside it (local); each stage lands
  its own layers' pages. The tokens are the reference's.

  The device transport's prefill worker runs its prompts in two layer
  groups: a hand-off that cannot write them one by one (no CUDA IPC on
  CPU) joins them (``DeviceSender.send``, before it looks at the
  destination), with the same tokens. The local transport's worker (both
  pools in one process, ``--role=both``) runs the prefill mesh it is
  given, TP=1 where the file says TP=2, on the devices the launcher gives
  it. (Both transports into a decode pool of one stage:
  tests/test_prefix_cache_services.py's deployments, against the same
  reference engine.)"""
  c = Cluster(tmp_path_factory.mktemp(f"pp-{transport}"), warmup=False,
              kv_transport=transport, num_prefill=1, num_decode=1,
              prefill_mesh=prefill_mesh,
              worker_flags=[f"--prefill_layer_groups={layer_groups}"],
              overrides={"decode": {"mesh": "dp=1,pp=2",
                                    "sharding": "decode_dp_pp"}})
  try:
    prompts, expected = reference
    results = _generate_all(c.address, prompts)
    assert [r.token_ids for r in results] == expected
    assert all(r.usage.prefill_worker for r in results)
    assert {r.usage.kv_path for r in results} == {transport}
  finally:
    c.stop()


def test_fp8_kv_is_handed_on_as_fp8(tmp_path_factory, tiny_model_dir):
  """A deployment storing its KV in FP8 hands it on in FP8 over the grpc
  stream, a byte per K/V value of each page sent (half of bf16's, a
  quarter of the tiny model's float32), and its tokens are the colocated
  FP8 engine's: the KV is rounded once, by the prefill, whatever the
  deployment's shape."""
  from pdjax.config import resolve
  from pdjax.engine.kv import pages_for
  from pdjax.model.config import ModelConfig
  # A pool of 32 pages (the 4 prompts need at most 14 at once), not the
  # deployment's 300: XLA:CPU has no float8 arithmetic and widens a whole
  # FP8 pool to update a page of it, every layer of every step, so the
  # decode calls take the time of the pool's size (0.9 s a request at 300
  # pages, 0.2 at 32). What is sent, and the tokens, do not depend on it.
  fp8 = {"kv_dtype": "fp8", "decode": {"num_pages": 32}}
  prompts = make_prompts()[:4]
  expected = reference_tokens(tiny_model_dir, prompts, overrides=fp8)
  # The stream sends the pages that hold a prompt's tokens.
  page = resolve("test", fp8).page_size
  cfg = ModelConfig.from_hf_dir(tiny_model_dir)
  page_values = cfg.num_layers * 2 * page * cfg.num_kv_heads * cfg.head_dim
  want_bytes = sum(pages_for(len(p), page) * page_values for p in prompts)
  c = Cluster(tmp_path_factory.mktemp("fp8"), kv_transport="grpc",
              warmup=False, num_prefill=1, num_decode=1, overrides=fp8)
  try:
    results = _generate_all(c.address, prompts)
    assert all(r.usage.prefill_worker for r in results)
    assert [r.token_ids for r in results] == expected
    (prefill,) = c.worker_names("prefill")
    sent = metric(c.metrics(prefill), "pdjax_kv_transfer_bytes_total",
                  'direction="sent",transport="grpc"')
  finally:
    c.stop()
  assert sent == want_bytes, (sent, want_bytes)


def test_draft_model_speculation_matches_reference(tmp_path_factory,
                                                   reference):
  """A decode worker that drafts with a draft model (``speculative =
  "draft"``, here the tiny model drafting for itself) behind a prefill
  worker: it computes the draft's KV itself after the hand-off, keeps the
  drafts it verifies, and streams the reference's tokens."""
  c = Cluster(tmp_path_factory.mktemp("draft"), kv_transport="grpc",
              warmup=False,
              num_prefill=1, num_decode=1,
              overrides={"decode": {"speculative": "draft",
                                    "draft_checkpoint": "tiny",
                                    "spec_tokens": 3}})
  try:
    prompts, expected = reference
    results = _generate_all(c.address, prompts)
    assert [r.token_ids for r in results] == expected
    drafted = sum(r.usage.spec_draft_tokens for r in results)
    accepted = sum(r.usage.spec_accepted_tokens for r in results)
    assert drafted > 0 and accepted >= 0.9 * drafted, (drafted, accepted)
  finally:
    c.stop()
