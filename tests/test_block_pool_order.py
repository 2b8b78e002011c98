"""Which free pages a KV pool hands out: the lowest-numbered, so that the
pages in use stay packed at the pool's start however traffic churns it (a
first-in-first-out free list spreads every later sequence over the whole
pool)."""

from __future__ import annotations

import random

import pytest

from pdjax.engine.block_pool import BlockPool


def _churn(pool: BlockPool, rounds: int, seed: int = 0) -> None:
  """Sequences of random lengths come and go, up to half the pool live."""
  rng = random.Random(seed)
  live: list[list[int]] = []
  for _ in range(rounds):
    if live and (rng.random() < 0.5 or pool.num_free < 40):
      pool.free(live.pop(rng.randrange(len(live))))
    else:
      live.append(pool.allocate(rng.randint(1, 30)))
  for pages in live:
    pool.free(pages)
  pool.check_invariants()


def test_after_churn_a_sequence_gets_the_lowest_free_pages():
  pool = BlockPool(1024)
  _churn(pool, 2000)
  assert pool.num_free == 1023
  assert pool.allocate(50) == list(range(1, 51))
  # With others live, the free pages below theirs come first.
  held = pool.allocate(10)
  pool.free(held[:5])
  assert pool.allocate(7) == held[:5] + [61, 62]


def test_fifo_order_spreads_sequences_over_the_pool():
  """The measured alternative: after the same churn a 50-page sequence
  lands far into the pool."""
  pool = BlockPool(1024, order="fifo")
  _churn(pool, 2000)
  pages = pool.allocate(50)
  assert max(pages) > 200
  with pytest.raises(ValueError, match="order"):
    BlockPool(8, order="random")


def test_decode_pages_stay_packed_after_churn(tiny_decode_params):
  """An engine after a churn of requests: a new request's pages are the
  pool's lowest ones (the probe the GPU churn tool times)."""
  from pdjax.engine.colocated import ColocatedEngine
  from pdjax.engine.decode_config import DecodeConfig
  from pdjax.engine.prefill import PrefillConfig
  from pdjax.engine.sampling import SamplingParams
  params, cfg, mesh, rules = tiny_decode_params
  engine = ColocatedEngine(
      params, cfg, mesh, rules,
      PrefillConfig(buckets=(16, 32), max_batch=4, page_size=16,
                    max_seq_len=128),
      DecodeConfig(max_seqs=8, page_size=16, num_pages=128, max_seq_len=128,
                   steps_per_call=4))
  rng = random.Random(1)
  for i in range(24):
    p = [rng.randrange(3, 300) for _ in range(rng.randint(5, 60))]
    engine.submit(f"c{i}", p, SamplingParams(
        max_tokens=rng.randint(2, 40), temperature=0.0, ignore_eos=True),
                  lambda ev: None)
    if i % 3 == 2:
      engine.step()
  engine.drain()
  seen = []
  engine.submit("probe", list(range(3, 70)), SamplingParams(
      max_tokens=20, temperature=0.0, ignore_eos=True), lambda ev: None)
  engine.step()
  rep = engine.decode.replicas[0]
  seen = next(r for r in rep.rows if r is not None).pages
  engine.drain()
  assert sorted(seen) == list(range(1, len(seen) + 1))
