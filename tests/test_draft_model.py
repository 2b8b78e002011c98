"""Speculative decoding with a draft model (``speculative = "draft"``,
``pdjax.engine.draft_model``), on CPU with the tiny model.

Whatever the draft, greedy tokens are plain decoding's. With the target
as its own draft, its drafts are the target's own greedy tokens, so nearly
all are kept: that shows the draft's KV (computed by the decode engine
itself, caught up after insert and after calls that kept every draft)
follows each row's sequence. A one-layer draft (another model of the same
vocabulary) drafts worse and changes no token; a draft of another
vocabulary is refused.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest

from pdjax.engine.colocated import ColocatedEngine
from pdjax.engine.decode_config import DecodeConfig
from pdjax.engine.prefill import PrefillConfig
from pdjax.engine.sampling import SamplingParams

PCFG = PrefillConfig(buckets=(16, 32), max_batch=4, page_size=16,
                     max_seq_len=128)
DCFG = DecodeConfig(max_seqs=4, page_size=16, num_pages=64, max_seq_len=128,
                    steps_per_call=4, row_buckets=(4,))
SPEC = dataclasses.replace(DCFG, speculative="draft", spec_tokens=3)


def _requests():
  """Six greedy requests (more than the pool's 4 rows: rows are reused),
  of different prompt and output lengths, one with a stop token, one that
  opts out of speculation."""
  rng = np.random.default_rng(11)
  out = []
  for i, (n, t) in enumerate([(9, 30), (17, 12), (30, 25), (5, 40), (12, 7),
                              (20, 18)]):
    s = SamplingParams(max_tokens=t, temperature=0.0, ignore_eos=True,
                       speculative=(i != 4))
    out.append((f"r{i}", rng.integers(3, 300, n).tolist(), s))
  return out


def _run(engine):
  out = collections.defaultdict(list)
  for rid, p, s in _requests():
    engine.submit(rid, p, s, lambda ev: out[ev.request_id].extend(
        ev.token_ids), seed_u32=s.seed_u32(0))
  engine.drain()
  u = engine.decode.kv_usage()
  assert u["pages_used"] == u["rows_live"] == 0, u
  return dict(out)


@pytest.fixture(scope="module")
def plain(tiny_decode_params):
  params, cfg, mesh, rules = tiny_decode_params
  return _run(ColocatedEngine(params, cfg, mesh, rules, PCFG, DCFG))


def test_the_target_as_its_own_draft(tiny_decode_params, plain):
  params, cfg, mesh, rules = tiny_decode_params
  engine = ColocatedEngine(params, cfg, mesh, rules, PCFG, SPEC,
                           draft=(params, cfg))
  assert _run(engine) == plain
  stats = engine.decode.stats
  # Its drafts are the target's greedy tokens: all kept but where the
  # draft's one-token steps and the target's verify pass round a near tie
  # differently.
  assert stats["spec_drafted"] > 50
  assert stats["spec_accepted"] >= 0.9 * stats["spec_drafted"], stats


def test_a_smaller_draft_changes_no_token(tiny_decode_params, plain):
  import jax

  params, cfg, mesh, rules = tiny_decode_params
  small_cfg = dataclasses.replace(cfg, num_layers=1)
  small = {**params, "layers": jax.tree.map(lambda x: x[:1],
                                            params["layers"])}
  engine = ColocatedEngine(params, cfg, mesh, rules, PCFG, SPEC,
                           draft=(small, small_cfg))
  assert _run(engine) == plain
  assert engine.decode.stats["spec_drafted"] > 0


def test_a_draft_of_another_vocabulary_is_refused(tiny_decode_params):
  params, cfg, mesh, rules = tiny_decode_params
  other = dataclasses.replace(cfg, vocab_size=cfg.vocab_size + 1)
  with pytest.raises(ValueError, match="tokenizer"):
    ColocatedEngine(params, cfg, mesh, rules, PCFG, SPEC,
                    draft=(params, other))
  with pytest.raises(ValueError, match="draft model's weights"):
    ColocatedEngine(params, cfg, mesh, rules, PCFG, SPEC)
