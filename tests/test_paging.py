"""KV pages on demand: admission promises what a request holds now, rows
grow their pages as they generate, and the newest rows are preempted when
the pool runs out (swapped to host memory and back, or recomputed); a
bounded queue with a deadline is in front (tiny model, one CPU device).

The pool holds four whole contexts (16 usable pages, 4 per max_seq_len), so
requests without max_tokens (the gateway's default: to the end of the
context) fill it: whole-budget admission runs four at a time, on-demand
admission all eight, preempting as they grow. Every token (greedy and
seeded) must equal the whole-budget run's, whichever way rows were
preempted, and every page, reservation, row and swapped page must come
back on every path (finish, cancel at any point, preemption, failure).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import types

import numpy as np
import pytest

from pdjax.engine.colocated import ColocatedEngine
from pdjax.engine.decode import DecodeConfig
from pdjax.engine.kv import reshard_kv
from pdjax.engine.prefill import PrefillConfig
from pdjax.engine.requests import (DecodeRequest, FinishReason,
                                   PrefillRequest, TokenEvent)
from pdjax.engine.sampling import InvalidRequest, SamplingParams
from test_engines import Collector, assert_clean

PAGE = 16
MAX_SEQ = 64
PCFG = PrefillConfig(buckets=(16, 32, 64), max_batch=4, page_size=PAGE,
                     max_seq_len=MAX_SEQ)
# 16 usable pages: four sequences of max_seq_len (4 pages each).
DCFG = DecodeConfig(max_seqs=8, page_size=PAGE, num_pages=17,
                    max_seq_len=MAX_SEQ, steps_per_call=4)
FULL = dataclasses.replace(DCFG, kv_admission="full")


def _engine(tiny_decode_params, dcfg=DCFG, **kw):
  params, cfg, mesh, rules = tiny_decode_params
  return ColocatedEngine(params, cfg, mesh, rules, PCFG, dcfg, **kw)


def _requests(n: int = 8, seed: int = 0, **penalties):
  """Short prompts without max_tokens (to the end of the context, as the
  gateway sets it), greedy and seeded alternately (with ``penalties``)."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    p = rng.integers(3, 512, int(rng.integers(5, 9))).tolist()
    s = SamplingParams(max_tokens=MAX_SEQ - len(p), ignore_eos=True,
                       **penalties,
                       **({"temperature": 0.0} if i % 2 == 0 else
                          {"temperature": 0.9, "top_p": 0.9,
                           "seed": 100 + i}))
    out.append((f"r{i}", p, s))
  return out


def _submit(engine, reqs, col):
  for rid, p, s in reqs:
    engine.submit(rid, p, s, col, seed_u32=s.seed_u32(0))


def _run(engine, reqs, on_step=None):
  """Submits ``reqs`` at once and drains; (collector, most rows live at
  once)."""
  col = Collector()
  _submit(engine, reqs, col)
  peak = 0
  for i in range(2000):
    if not engine.has_work:
      break
    engine.step()
    peak = max(peak, engine.kv_usage()["rows_live"])
    if on_step is not None:
      on_step(i, col)
  assert not engine.has_work
  return col, peak


@pytest.fixture(scope="module")
def reference(tiny_decode_params):
  """Tokens of the whole-budget run (no preemption ever)."""
  engine = _engine(tiny_decode_params, FULL)
  reqs = _requests()
  col, peak = _run(engine, reqs)
  assert peak == 4   # four whole contexts fill the pool
  assert engine.decode.preemption_stats()["preempted_swap"] == 0
  assert_clean(engine)
  out = {rid: col.tokens(rid) for rid, _, _ in reqs}
  for (rid, p, _), toks in zip(reqs, out.values()):
    assert len(p) + len(toks) == MAX_SEQ, rid
  return reqs, out


def test_config():
  assert DCFG.on_demand and not FULL.on_demand
  assert DCFG.swap_capacity == 16 and FULL.swap_capacity == 0
  assert dataclasses.replace(DCFG, swap_pages=5).swap_capacity == 5
  with pytest.raises(ValueError, match="kv_admission"):
    DecodeConfig(kv_admission="lazy")
  with pytest.raises(ValueError, match="swap_pages"):
    DecodeConfig(swap_pages=-2)
  with pytest.raises(ValueError, match="admission_watermark"):
    DecodeConfig(admission_watermark=1.0)


def test_on_demand_runs_twice_the_rows_and_swapping_keeps_tokens(
    tiny_decode_params, reference):
  """Eight requests without max_tokens on a pool of four whole contexts:
  all eight run at once (whole budgets: four); as they grow the newest are
  swapped out and back, and every token equals the whole-budget run's.
  While a row is swapped out its replica admits nothing new."""
  reqs, want = reference
  engine = _engine(tiny_decode_params)
  refused = []

  def probe(i, col):
    u = engine.kv_usage()
    assert u["pages_used"] <= 16
    if u["rows_swapped"]:
      assert u["pages_swapped"] > 0
      refused.append(engine.reserve(f"probe{i}", 5, 5) is None)
      # The newest rows were preempted (latest arrival first): every row
      # still advancing arrived before every swapped one.
      rows = [r for r in engine.decode.replicas[0].rows if r is not None]
      assert max((r.arrival for r in rows if r.wants_steps),
                 default=-1) < min(r.arrival for r in rows if r.swapped)

  col, peak = _run(engine, reqs, probe)
  assert peak == 8
  assert {rid: col.tokens(rid) for rid, _, _ in reqs} == want
  assert all(col.reason(rid) == FinishReason.LENGTH for rid, _, _ in reqs)
  stats = engine.decode.preemption_stats()
  assert stats["preempted_swap"] > 0
  assert stats["resumed_swap"] == stats["preempted_swap"]
  assert stats["preempted_recompute"] == 0
  assert refused and all(refused)
  assert_clean(engine)


@pytest.mark.parametrize("swap_pages", [0, 2])
def test_recompute_keeps_tokens(tiny_decode_params, reference, swap_pages):
  """No swap space (0), or one too small for most rows (2 pages): rows are
  evicted, the tokens their call in flight makes are dropped, and their
  prompt and delivered tokens are prefilled again; the stream continues
  with the same tokens (the sampler's key is the request's seed and token
  index)."""
  reqs, want = reference
  engine = _engine(tiny_decode_params,
                   dataclasses.replace(DCFG, swap_pages=swap_pages))
  col, peak = _run(engine, reqs)
  assert peak == 8
  assert {rid: col.tokens(rid) for rid, _, _ in reqs} == want
  stats = engine.decode.preemption_stats()
  assert stats["preempted_recompute"] > 0
  if swap_pages == 0:
    assert stats["preempted_swap"] == 0
  assert_clean(engine)


def test_penalized_rows_keep_their_tokens_swapped_or_recomputed(
    tiny_decode_params, reference):
  """A row's penalty state (its output's counts, its prompt's tokens)
  survives a swap (its row keeps it) and a recompute (armed again from the
  prompt and the tokens delivered: those count as output, not prompt):
  the tokens equal a run without preemption."""
  # A negative presence penalty favours the output's tokens: one that
  # counted a recomputed row's earlier output as prompt would lose it.
  reqs = _requests(presence_penalty=-1.5, frequency_penalty=0.3,
                   repetition_penalty=1.2)
  col, _ = _run(_engine(tiny_decode_params, FULL), reqs)
  want = {rid: col.tokens(rid) for rid, _, _ in reqs}
  assert all(want[rid] != toks for rid, toks in reference[1].items())
  for swap_pages in (16, 0):
    engine = _engine(tiny_decode_params,
                     dataclasses.replace(DCFG, swap_pages=swap_pages))
    col, _ = _run(engine, reqs)
    assert {rid: col.tokens(rid) for rid, _, _ in reqs} == want, swap_pages
    stats = engine.decode.preemption_stats()
    assert stats["preempted_swap" if swap_pages else
                 "preempted_recompute"] > 0, stats
    assert_clean(engine)


def test_cancels_at_any_point_return_everything(tiny_decode_params,
                                                reference):
  """Requests cancelled while queued, running, swapped out or queued
  again for recompute, and others finishing: each
  cancelled stream got a prefix of its tokens, the others all of them, and
  nothing stays held (pages, reservations, rows, swapped pages)."""
  reqs, want = reference
  engine = _engine(tiny_decode_params, dataclasses.replace(DCFG,
                                                           swap_pages=2))
  rng = np.random.default_rng(7)
  plan = {int(s): rid for s, (rid, _, _) in zip(
      rng.integers(0, 40, len(reqs) // 2), reqs[::2])}
  plan[0] = "r7"   # still queued (four are prefilled per iteration)
  states = set()

  def cancel(i, col):
    for row in engine.decode.replicas[0].rows:
      if row is not None:
        states.add("swapped" if row.swapped else "running")
    if engine.num_waiting and any(
        w.tokens_generated > 1 for w in engine._waiting):
      states.add("requeued")
    if i in plan:
      engine.cancel(plan[i])

  col, _ = _run(engine, reqs, cancel)
  cancelled = set(plan.values())
  for rid, _, _ in reqs:
    got = col.tokens(rid)
    if rid in cancelled and col.reason(rid) == FinishReason.ABORT:
      assert got == want[rid][:len(got)], rid
    else:
      assert got == want[rid], rid
  assert {"running", "swapped"} <= states
  assert engine.decode.preemption_stats()["preempted_recompute"] > 0
  assert_clean(engine)


def test_engine_failure_ends_preempted_requests_too(tiny_decode_params):
  """``fail_all`` (the loop's step raised) while rows are swapped out and
  an evicted request waits to be recomputed: every stream ends with an
  error and nothing stays held."""
  engine = _engine(tiny_decode_params, dataclasses.replace(DCFG,
                                                           swap_pages=2))
  col = Collector()
  reqs = _requests()
  _submit(engine, reqs, col)
  for _ in range(200):
    engine.step()
    u = engine.kv_usage()
    if u["rows_swapped"] and any(w.tokens_generated > 1
                                 for w in engine._waiting):
      break
  else:
    pytest.fail("no row was swapped out while another waited to be "
                "recomputed")
  engine.fail_all("decode engine failed: boom")
  for rid, _, _ in reqs:
    assert col.reason(rid) == FinishReason.ERROR, rid
  assert_clean(engine)


def test_reservations_promise_what_a_request_holds_now(tiny_decode_params):
  """The disaggregated path's Reserve: the prompt's pages and its first
  two calls', not the whole budget (whole-budget admission: all of it); a
  prompt or budget the pool can never hold is refused with an error."""
  engine = _engine(tiny_decode_params)
  full = _engine(tiny_decode_params, FULL)
  # 30 prompt tokens + 2 calls of 4 steps: 38 tokens, 3 pages; budget 4.
  assert engine.reserve("a", 30, 1000).pages == 3
  assert full.reserve("a", 30, 1000).pages == 4
  # Prompts of 56: 4 pages each (all of a context); the pool's 16 pages
  # hold four minus the running rows' headroom (none run yet).
  got = [engine.reserve(f"b{i}", 56, 1000) for i in range(5)]
  assert [g is not None for g in got] == [True, True, True, False, False]
  assert engine.kv_usage()["pages_reserved"] == 3 + 3 * 4
  for rid in ["a"] + [f"b{i}" for i in range(3)]:
    engine.unreserve(rid)
  full.unreserve("a")
  with pytest.raises(InvalidRequest, match="^prompt"):
    engine.reserve("c", MAX_SEQ, 1)
  small = _engine(tiny_decode_params,
                  dataclasses.replace(DCFG, num_pages=3))   # 2 pages
  with pytest.raises(InvalidRequest, match="^max_tokens"):
    small.reserve("d", 10, 1000)
  assert small.reserve("d", 10, 20) is not None   # 30 tokens, 2 pages
  small.unreserve("d")
  for e in (engine, full, small):
    assert_clean(e)


def test_requests_prefilled_elsewhere_are_preempted_and_resumed(
    tiny_decode_params, reference):
  """Half of the requests take the disaggregated path (Reserve, a prefill
  engine's KV, submit_decode), the rest prefill locally; preemption by
  swap and by recompute treats both alike."""
  reqs, want = reference
  engine = _engine(tiny_decode_params, dataclasses.replace(DCFG,
                                                           swap_pages=3))
  col = Collector()
  remote = reqs[1::2]
  _submit(engine, reqs[::2], col)
  prefill = engine.prefill[0]
  for (rid, p, s), r in zip(remote, prefill.prefill(
      [PrefillRequest(rid, p, s, s.seed_u32(0)) for rid, p, s in remote])):
    col(TokenEvent(rid, [r.first_token], [r.first_logprob]))
    while (res := engine.reserve(rid, len(p), s.max_tokens)) is None:
      engine.step()
    kv = reshard_kv(r.kv, engine.payload_sharding(res.replica,
                                                  r.kv.kv.shape[2]))
    engine.submit_decode(DecodeRequest(rid, p, r.first_token,
                                       r.first_logprob, kv, s,
                                       s.seed_u32(0), col, reservation=res))
  engine.drain()
  assert {rid: col.tokens(rid) for rid, _, _ in reqs} == want
  stats = engine.decode.preemption_stats()
  assert stats["preempted_swap"] > 0 and stats["preempted_recompute"] > 0
  assert_clean(engine)


def test_without_a_way_to_recompute_a_victim_ends_with_an_error(
    tiny_decode_params, reference):
  """A bare decode pool (nothing prefills) with no swap space: a preempted
  row ends with a clear error rather than hanging, the others finish with
  their tokens, and everything is returned."""
  reqs, want = reference
  engine = _engine(tiny_decode_params, dataclasses.replace(DCFG,
                                                           swap_pages=0))
  engine.decode.on_recompute = None
  col, _ = _run(engine, reqs)
  failed = [rid for rid, _, _ in reqs
            if col.reason(rid) == FinishReason.ERROR]
  assert failed
  for rid, _, _ in reqs:
    got = col.tokens(rid)
    if rid in failed:
      assert "preempted" in col.events[rid][-1].error
      assert got == want[rid][:len(got)]
    else:
      assert got == want[rid]
  assert_clean(engine)


def test_queue_is_bounded_and_has_a_deadline(tiny_decode_params):
  """Requests that do not fit wait in a queue of at most max_waiting; one
  still waiting at its deadline ends with an exhausted event (the service
  answers RESOURCE_EXHAUSTED); a cancelled one with ABORT."""
  engine = _engine(tiny_decode_params, dataclasses.replace(DCFG, max_seqs=2),
                   max_waiting=3, queue_timeout_s=0.5)
  col = Collector()
  long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
  for i in range(3):
    engine.submit(f"q{i}", [5 + i] * 6, long, col)
  engine.step()   # two rows: q2 waits
  for i in range(3, 5):
    engine.submit(f"q{i}", [5 + i] * 6, long, col)
  with pytest.raises(OverflowError):
    engine.submit("q5", [9] * 6, long, col)
  assert engine.kv_usage()["rows_live"] == 2 and engine.num_waiting == 3
  engine.cancel("q4")
  time.sleep(0.6)
  engine.drain()
  for rid in ("q0", "q1"):
    assert col.reason(rid) == FinishReason.LENGTH
  for rid in ("q2", "q3"):
    ev = col.events[rid][-1]
    assert ev.exhausted and ev.finish_reason == FinishReason.ABORT
    assert "not admitted within" in ev.error and not col.tokens(rid)
  assert col.reason("q4") == FinishReason.ABORT
  assert not col.events["q4"][-1].exhausted
  assert engine.stats["refused_timeout"] == 2
  assert engine.stats["refused_full"] == 1
  assert_clean(engine)


def test_decode_service_answers_an_expired_request_with_resource_exhausted():
  """The decode worker turns an exhausted event into RESOURCE_EXHAUSTED
  with the retry hint the router and the gateway (429 + Retry-After)
  read."""
  import grpc

  from pdjax.service import common
  from pdjax.service.decode_service import DecodeServicer
  from pdjax.service.room_waiters import RoomWaiters
  from pdjax.v1 import decode_pb2

  class Ctx:
    code = details = None
    trailing = ()

    def set_trailing_metadata(self, md):
      self.trailing = md

    async def abort(self, code, details):
      self.code, self.details = code, details
      raise RuntimeError("aborted")

  def submit(rid, ids, sampling, callback, seed, **kw):
    callback(TokenEvent(rid, [], [], FinishReason.ABORT, exhausted=True,
                        error="not admitted within 1 s"))

  cancelled = []
  engine = types.SimpleNamespace(
      cfg=types.SimpleNamespace(vocab_size=64), max_seq_len=64,
      submit=submit, cancel=cancelled.append)
  counter = types.SimpleNamespace(inc=lambda *a: None)
  worker = types.SimpleNamespace(
      draining=False, streams=0, max_streams=8, engine=engine,
      loop=types.SimpleNamespace(wake=lambda: None), room=RoomWaiters(),
      metrics=types.SimpleNamespace(
          requests=types.SimpleNamespace(labels=lambda *a: counter)))
  request = decode_pb2.DecodeRequest(request_id="r1", prompt_token_ids=[1, 2],
                                     local_prefill=True)
  request.sampling.max_tokens = 4
  ctx = Ctx()

  async def run():
    async for _ in DecodeServicer(worker, None).Decode(request, ctx):
      pass

  with pytest.raises(RuntimeError, match="aborted"):
    asyncio.run(run())
  assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED
  assert "not admitted" in ctx.details and "retry after" in ctx.details
  assert dict(ctx.trailing)[common.RETRY_PUSHBACK_KEY] == "1000"
  assert worker.streams == 0 and not cancelled
