"""The decode pool's generate programs by row count: a call advances only
the rows that still want steps, in the smallest program that holds them,
and no call is launched for rows whose length limit the calls in flight
already reach."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from pdjax.engine.colocated import ColocatedEngine
from pdjax.engine.decode_config import MIN_PROGRAM_ROWS, DecodeConfig
from pdjax.engine.prefill import COLUMNS_PAST_PROMPT, PrefillConfig
from pdjax.engine.sampling import SamplingParams

PCFG = PrefillConfig(buckets=(16, 32), max_batch=4, page_size=16,
                     max_seq_len=128)
DCFG = DecodeConfig(max_seqs=16, page_size=16, num_pages=64, max_seq_len=128,
                    steps_per_call=4)


def _engine(tiny_decode_params, dcfg=DCFG):
  params, cfg, mesh, rules = tiny_decode_params
  return ColocatedEngine(params, cfg, mesh, rules, PCFG, dcfg)


class _Recorder:
  """Wraps a pool's programs: the row count of every generate call."""

  def __init__(self, engine):
    self.programs = engine.decode.programs
    self.real = self.programs.generate
    self.rows: list[int] = []
    self.programs.generate = self

  def __call__(self, all_greedy, rows):
    self.rows.append(rows)
    return self.real(all_greedy, rows)

  def close(self):
    del self.programs.generate


def _run(engine, requests):
  """Submits (rid, prompt, sampling) requests at once; their tokens."""
  out = collections.defaultdict(list)
  reasons = {}

  def callback(ev):
    out[ev.request_id].extend(ev.token_ids)
    if ev.finish_reason is not None:
      reasons[ev.request_id] = ev.finish_reason
  for rid, p, s in requests:
    engine.submit(rid, p, s, callback, seed_u32=s.seed_u32(0))
  engine.drain()
  assert set(reasons) == {rid for rid, _, _ in requests}
  return dict(out)


def _requests(n, max_tokens=9, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    p = rng.integers(3, 300, int(rng.integers(5, 30))).tolist()
    s = (SamplingParams(max_tokens=max_tokens, temperature=0.0,
                        ignore_eos=True) if i % 2 == 0 else
         SamplingParams(max_tokens=max_tokens, temperature=0.9, top_p=0.9,
                        seed=100 + i, ignore_eos=True))
    out.append((f"r{i}", p, s))
  return out


def test_row_counts():
  assert DCFG.row_counts == (MIN_PROGRAM_ROWS, 16) == (8, 16)
  assert [DCFG.rows_for(n) for n in (1, 2, 3, 8, 9, 16)] == [8, 8, 8, 8, 16,
                                                            16]
  assert DecodeConfig(max_seqs=1).row_counts == (1,)
  assert DecodeConfig(max_seqs=4).row_counts == (4,)
  assert DecodeConfig(max_seqs=128).row_counts == (8, 32, 128)
  assert DecodeConfig(max_seqs=16, row_buckets=(4,)).row_counts == (4, 16)
  with pytest.raises(ValueError, match="row bucket"):
    DecodeConfig(max_seqs=8, row_buckets=(16,))


def test_calls_use_the_smallest_program_and_tokens_do_not_change(
    tiny_decode_params):
  """One stream and three run the 8-row program, not the pool's 16 rows;
  tokens (greedy and seeded) equal a pool whose every call runs all 16
  rows."""
  small = _engine(tiny_decode_params)
  full = _engine(tiny_decode_params,
                 DecodeConfig(**{**DCFG.__dict__, "row_buckets": (16,)}))
  rec = _Recorder(small)
  try:
    one = _requests(1)
    assert _run(small, one) == _run(full, one)
    assert set(rec.rows) == {8}
    rec.rows.clear()
    three = _requests(3, seed=1)
    assert _run(small, three) == _run(full, three)
    assert set(rec.rows) == {8}
  finally:
    rec.close()


def test_rows_at_their_length_limit_are_in_no_further_call(tiny_decode_params):
  """max_tokens - 1 steps after the first token: with 4 steps per call,
  max_tokens 9 takes exactly 2 calls, 10 takes 3; a row near the end of
  the context stops at the context. No call is launched only to find its
  rows already finished (that call would hold up the next prefill)."""
  engine = _engine(tiny_decode_params)
  rec = _Recorder(engine)
  try:
    for max_tokens, calls in ((9, 2), (10, 3), (2, 1)):
      rec.rows.clear()
      toks = _run(engine, _requests(1, max_tokens=max_tokens))
      assert len(toks["r0"]) == max_tokens
      assert len(rec.rows) == calls, (max_tokens, rec.rows)
    # 120-token prompt, max_seq_len 128: 7 more tokens fit (8 with the
    # first), two calls, whatever max_tokens says.
    rec.rows.clear()
    p = list(range(3, 123))
    s = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    toks = _run(engine, [("long", p, s)])
    assert len(toks["long"]) == 128 - 120
    assert len(rec.rows) == 2
    # Two rows of different budgets: the longer one's last call runs
    # without the shorter one.
    rec.rows.clear()
    reqs = [("a", list(range(3, 10)), SamplingParams(
        max_tokens=5, temperature=0.0, ignore_eos=True)),
            ("b", list(range(3, 12)), SamplingParams(
                max_tokens=13, temperature=0.0, ignore_eos=True))]
    toks = _run(engine, reqs)
    assert (len(toks["a"]), len(toks["b"])) == (5, 13)
    assert len(rec.rows) == 3
  finally:
    rec.close()
  u = engine.decode.kv_usage()
  assert u["rows_live"] == 0 and u["pages_used"] == 0 and u["reservations"] == 0


def _prompt_tokens_per_iteration(engine, requests, running):
  """Runs ``running`` (already decoding) and then ``requests``; per engine
  iteration, the prompt tokens of compute its prefill programs took (chunk
  and batch programs, by their bucket lengths)."""
  pre = engine.prefill[0]
  seen = []
  real_chunk, real_prefill = pre._chunk, pre._prefill

  def chunk(params, tokens, *a):
    seen.append(tokens.shape[0] * tokens.shape[1])
    return real_chunk(params, tokens, *a)

  def batch(params, packed, *a):
    # One array: the prompts, then their lengths and sampling settings.
    seen.append(packed.shape[0] * (packed.shape[1] - COLUMNS_PAST_PROMPT))
    return real_prefill(params, packed, *a)
  pre._chunk, pre._prefill = chunk, batch
  out = collections.defaultdict(list)
  per_iteration = []
  try:
    for rid, p, s in running + requests:
      engine.submit(rid, p, s, lambda ev: out[ev.request_id].extend(
          ev.token_ids), seed_u32=s.seed_u32(0))
      if (rid, p, s) in running:
        engine.step()   # prefilled and decoding before the others come
    while engine.has_work:
      seen.clear()
      engine.step()
      per_iteration.append(sum(seen))
  finally:
    pre._chunk, pre._prefill = real_chunk, real_prefill
  return dict(out), per_iteration


def test_prefill_token_budget_bounds_each_iteration(tiny_decode_params):
  """With a per-iteration budget of 32 prompt tokens, a 100-token prompt
  arriving while a row decodes is prefilled 32 tokens at a time between
  generate calls (so the running row's next tokens wait for 32 tokens of
  prefill, not 100), and every token is the same as without a budget."""
  import dataclasses
  greedy = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
  running = [("run", list(range(5, 25)), greedy)]
  late = [("long", list(range(3, 103)), greedy),
          ("short", list(range(7, 17)), greedy)]
  free = _engine(tiny_decode_params)
  want, free_iters = _prompt_tokens_per_iteration(free, late, running)
  assert max(free_iters) >= 100        # the whole prompt in one iteration
  bounded = _engine(tiny_decode_params,
                    dataclasses.replace(DCFG, prefill_token_budget=32))
  got, iters = _prompt_tokens_per_iteration(bounded, late, running)
  assert got == want
  assert max(iters) <= 32
  assert sum(1 for n in iters if n) >= 4    # 100 tokens: 4 chunks
  u = bounded.decode.kv_usage()
  assert u["rows_live"] == 0 and u["reservations"] == 0
  with pytest.raises(ValueError, match="prefill_token_budget"):
    DecodeConfig(prefill_token_budget=-1)


def test_cancel_during_a_chunked_prefill(tiny_decode_params):
  """A request cancelled part-way through its chunked prefill ends with
  ABORT and returns its reservation; the next request runs."""
  import dataclasses
  from pdjax.engine.requests import FinishReason
  engine = _engine(tiny_decode_params,
                   dataclasses.replace(DCFG, prefill_token_budget=16))
  events = collections.defaultdict(list)
  greedy = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
  engine.submit("long", list(range(3, 103)), greedy,
                lambda ev: events[ev.request_id].append(ev))
  engine.step()
  assert engine.num_waiting == 1 and engine.decode.kv_usage()[
      "reservations"] == 1
  engine.cancel("long")
  engine.submit("next", list(range(3, 20)), greedy,
                lambda ev: events[ev.request_id].append(ev))
  engine.drain()
  assert events["long"][-1].finish_reason == FinishReason.ABORT
  assert sum(len(e.token_ids) for e in events["next"]) == 5
  u = engine.decode.kv_usage()
  assert u["reservations"] == 0 and u["pages_used"] == 0


def _spec_engine(tiny_decode_params, **kw):
  import dataclasses
  return _engine(tiny_decode_params, dataclasses.replace(
      DCFG, speculative="ngram", spec_tokens=4, **kw))


def _repetitive_requests():
  """Prompts that repeat themselves (what prompt lookup drafts from), and
  one that does not; greedy and seeded; one with a stop token."""
  rng = np.random.default_rng(7)
  out = []
  for i in range(4):
    unit = rng.integers(3, 300, 6).tolist()
    p = unit * 4 + rng.integers(3, 300, 3).tolist()
    s = (SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
         if i % 2 == 0 else
         SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True,
                        stop_token_ids=(unit[2],)))
    out.append((f"rep{i}", p, s))
  out.append(("plain", rng.integers(3, 300, 17).tolist(),
              SamplingParams(max_tokens=15, temperature=0.0,
                             ignore_eos=True)))
  out.append(("optout", list(range(5, 12)) * 3, SamplingParams(
      max_tokens=12, temperature=0.0, ignore_eos=True, speculative=False)))
  return out


def test_speculative_greedy_tokens_equal_plain_decoding(tiny_decode_params):
  """A pool that drafts by prompt lookup and verifies: greedy tokens (and
  stops, and max_tokens) exactly as plain decoding's; drafts were made and
  some kept; a request that opted out drafts nothing."""
  reqs = _repetitive_requests()
  plain = _run(_engine(tiny_decode_params), reqs)
  spec_engine = _spec_engine(tiny_decode_params)
  events = {}
  out = collections.defaultdict(list)

  def callback(ev):
    out[ev.request_id].extend(ev.token_ids)
    if ev.finish_reason is not None:
      events[ev.request_id] = ev
  for rid, p, s in reqs:
    spec_engine.submit(rid, p, s, callback, seed_u32=s.seed_u32(0))
  spec_engine.drain()
  assert dict(out) == plain
  stats = spec_engine.decode.stats
  assert stats["spec_drafted"] > 0 and 0 < stats["spec_accepted"] <= \
      stats["spec_drafted"]
  assert events["optout"].spec_drafted == 0
  assert sum(ev.spec_accepted for ev in events.values()) == \
      stats["spec_accepted"]
  u = spec_engine.decode.kv_usage()
  assert u["rows_live"] == 0 and u["pages_used"] == 0


def test_a_call_without_drafts_runs_one_plain_step(tiny_decode_params):
  """A prompt-lookup pool runs a call in which no row found a draft as one
  plain step, not a verify pass of k + 1 positions per row (the tokens are
  the same: the test above); a call with drafts verifies them."""
  engine = _spec_engine(tiny_decode_params)
  programs = engine.decode.programs
  calls = collections.Counter()

  def counted(kind, get):
    def program(all_greedy, rows, *steps):
      real = get(all_greedy, rows, *steps)
      if real is None:
        return None

      def run(*args):
        calls[kind] += 1
        return real(*args)
      return run
    return program
  programs.plain = counted("plain", programs.plain)
  programs.generate = counted("verify", programs.generate)
  reqs = {rid: (rid, p, s) for rid, p, s in _repetitive_requests()}
  # Opted out: it never drafts, so every call is one plain step.
  _run(engine, [reqs["optout"]])
  assert calls == {"plain": 12 - 1}
  calls.clear()
  _run(engine, list(reqs.values()))   # rows that draft (the test above)
  assert calls["verify"] > 0 and calls["plain"] > 0


def test_speculative_sampled_requests_finish_with_their_budget(
    tiny_decode_params):
  """Sampled rows in a speculating pool: every request ends with exactly
  max_tokens tokens (the distribution is checked in test_speculative),
  near the end of the context too."""
  engine = _spec_engine(tiny_decode_params)
  reqs = [(f"s{i}", (list(range(3, 9)) * 5)[:25 + i], SamplingParams(
      max_tokens=13, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True))
          for i in range(3)]
  reqs.append(("edge", list(range(3, 9)) * 20, SamplingParams(
      max_tokens=50, temperature=0.0, ignore_eos=True)))
  toks = _run(engine, reqs)
  assert [len(toks[f"s{i}"]) for i in range(3)] == [13, 13, 13]
  assert len(toks["edge"]) == 128 - 120


def test_rows_not_live_reach_the_model_as_a_fresh_pools():
  """What a free (or finished) row last held never reaches the model: the
  generate step feeds every row that is not live token 0 at position 0 of
  the null page, whatever its stale device state, as a fresh pool's free
  rows are. (Stale tokens in a 128-row program's free rows made every step
  3.1x slower on a GPU after a chat load.) A stand-in model encodes its
  inputs in the token it picks, so the call's outputs show what it saw."""
  import jax.numpy as jnp

  from pdjax.engine import decode_programs as dp
  from pdjax.model.llama import DecodeOut

  V = 64

  def spy(params, tokens, positions, k, v, table, *, cfg, paged_attention):
    code = tokens * 4 + (positions > 0) * 2 + (table[:, 0] > 0)
    return DecodeOut(jax.nn.one_hot(code, V) * 10.0, k, v)

  import jax
  b = 4
  pool = jnp.zeros((8, 16, 1, 2), jnp.float32)
  state = dp.DecodeState(
      k=pool, v=pool,
      tokens=jnp.asarray([3, 7, 9, 11], jnp.int32),       # stale past row 0
      positions=jnp.asarray([5, 40, 60, 80], jnp.int32),
      generated=jnp.asarray([1, 30, 50, 70], jnp.int32),
      done=jnp.asarray([False, True, False, False]),
      counts=jnp.zeros((b, V), jnp.int32), seen=jnp.zeros((b, V), bool))
  slots = dp.SlotInputs(
      rows=jnp.arange(b, dtype=jnp.int32),
      page_table=jnp.asarray([[1, 2], [3, 4], [5, 6], [7, 0]], jnp.int32),
      active=jnp.asarray([True, True, False, False]),   # row 1: done
      temperature=jnp.zeros((b,)), top_p=jnp.ones((b,)),
      top_k=jnp.zeros((b,), jnp.int32), min_p=jnp.zeros((b,)),
      min_tokens=jnp.zeros((b,), jnp.int32),
      seed=jnp.zeros((b,), jnp.uint32),
      max_tokens=jnp.full((b,), 100, jnp.int32),
      stop_ids=jnp.full((b, 1), -1, jnp.int32),
      use_eos=jnp.zeros((b,), bool), presence=jnp.zeros((b,)),
      frequency=jnp.zeros((b,)), repetition=jnp.ones((b,)))
  _, out = dp._scan_steps(None, state, slots, None, 2,
                          jnp.asarray([-1], jnp.int32), 1000,
                          all_greedy=True, forward=spy)
  tokens = np.asarray(out.tokens)          # [steps, rows]
  # The live row's inputs are its own: token 3 at position 5 of page 1,
  # then the token it picked (15) at position 6.
  assert tokens[:, 0].tolist() == [3 * 4 + 2 + 1, 15 * 4 + 2 + 1]
  # Every other row saw token 0 at position 0 of the null page.
  assert (tokens[:, 1:] == 0).all(), tokens
  assert np.asarray(out.valid)[:, 1:].sum() == 0


def test_every_prompt_a_budget_cuts_finds_its_buffer_warmed(
    tiny_decode_params):
  """A prompt whose bucket passes the per-iteration budget runs chunked
  however short it is, so a colocated engine with a budget warms the
  chunk buffers such prompts take (the store-less prefill engine alone
  would warm only those of prompts past every bucket)."""
  import dataclasses
  params, cfg, mesh, rules = tiny_decode_params
  pcfg = PrefillConfig(buckets=(16, 32, 256), max_batch=4, page_size=16,
                       max_seq_len=256)
  dcfg = dataclasses.replace(DCFG, max_seq_len=256, num_pages=32)
  assert pcfg.chunk_buffer_lens == [32, 128, 512]
  free = ColocatedEngine(params, cfg, mesh, rules, pcfg, dcfg)
  assert free.prefill[0].chunk_buffer_lens == [512]
  for budget in (16, 40):
    engine = ColocatedEngine(params, cfg, mesh, rules, pcfg,
                             dataclasses.replace(
                                 dcfg, prefill_token_budget=budget))
    pre = engine.prefill[0]
    chunked = [n for n in range(1, 256)
               if pcfg.bucket_for(n) > budget]   # what _cost sends there
    assert min(chunked) == pre.buffered_from
    assert {pcfg.buffer_len_for(n, 0) for n in chunked} <= set(
        pre.chunk_buffer_lens)
  assert pre.chunk_buffer_lens == [128, 512]
