"""vLLM's penalties (presence, frequency, repetition): the arithmetic
against a NumPy transcription of vLLM's, and generation against
transformers on the tiny model (its own repetition penalty; presence and
frequency applied to its logits by that transcription), through the
prefill's first token (bucketed and chunked) and the decode pool's steps;
a penalized request in a speculating pool is not drafted."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest

from pdjax.engine.colocated import ColocatedEngine
from pdjax.engine.decode_config import DecodeConfig
from pdjax.engine.prefill import PrefillConfig
from pdjax.engine.sampling import InvalidRequest, SamplingParams

# tests/test_draft_model.py's pools (the programs compile once for both).
# Prompts of 9 and 40 ids: the first prefills in a bucket, the second (past
# the largest bucket) in chunks.
PCFG = PrefillConfig(buckets=(16, 32), max_batch=4, page_size=16,
                     max_seq_len=128)
DCFG = DecodeConfig(max_seqs=4, page_size=16, num_pages=64, max_seq_len=128,
                    steps_per_call=4, row_buckets=(4,))
NEW = 24


def reference_penalties(logits, output, prompt, presence, frequency,
                        repetition):
  """vLLM's ``apply_penalties`` for one row, in NumPy float32: the
  repetition penalty over the prompt's and the output's tokens, then
  frequency per occurrence and presence once over the output's."""
  logits = np.array(logits, np.float32)
  counts = np.bincount(np.asarray(output, np.int64),
                       minlength=logits.shape[-1])[:logits.shape[-1]]
  seen = counts > 0
  seen[np.asarray(prompt, np.int64)] = True
  rep = np.float32(repetition)
  logits = np.where(seen, np.where(logits > 0, logits / rep, logits * rep),
                    logits)
  return (logits - np.float32(frequency) * counts.astype(np.float32)
          - np.float32(presence) * (counts > 0).astype(np.float32))


def test_apply_penalties_is_vllms_arithmetic():
  import jax.numpy as jnp

  from pdjax.engine.sampling import apply_penalties
  rng = np.random.default_rng(3)
  B, V = 5, 64
  logits = rng.normal(0, 3, (B, V)).astype(np.float32)
  logits[0, :3] = [-np.inf, 0.0, -0.0]
  outputs = [rng.integers(0, V, n) for n in (0, 1, 7, 30, 12)]
  prompts = [rng.integers(0, V, n) for n in (5, 1, 3, 9, 1)]
  counts = np.stack([np.bincount(o, minlength=V) for o in outputs])
  seen = np.zeros((B, V), bool)
  for b, p in enumerate(prompts):
    seen[b, p] = True
  presence = np.array([0.0, 1.5, -0.5, 2.0, 0.3], np.float32)
  frequency = np.array([0.0, -2.0, 0.7, 0.1, 0.0], np.float32)
  repetition = np.array([1.0, 1.3, 0.6, 2.0, 1.0], np.float32)
  got = np.asarray(apply_penalties(jnp.asarray(logits), jnp.asarray(counts),
                                   jnp.asarray(seen), jnp.asarray(presence),
                                   jnp.asarray(frequency),
                                   jnp.asarray(repetition)))
  for b in range(B):
    _assert_penalized(got[b], logits[b], outputs[b], prompts[b],
                      presence[b], frequency[b], repetition[b])
  # Off (0, 0, 1): every logit as it was, -0.0 and -inf included (x / 1,
  # x * 1 and x - 0 are exact, fused or not).
  assert got[0].view(np.int32).tolist() == logits[0].view(np.int32).tolist()
  # A first token: no output yet, the prompt's tokens only (one rounding:
  # a division or a product, exact to the bit).
  first = np.asarray(apply_penalties(
      jnp.asarray(logits), None, jnp.asarray(seen), jnp.asarray(presence),
      jnp.asarray(frequency), jnp.asarray(repetition)))
  for b in range(B):
    np.testing.assert_array_equal(
        first[b], reference_penalties(logits[b], [], prompts[b],
                                      presence[b], frequency[b],
                                      repetition[b]))


def _assert_penalized(got, logits, output, prompt, presence, frequency,
                      repetition):
  """``got`` is vLLM's penalties of ``logits`` up to the rounding of its two
  subtractions: XLA may fuse a product into its subtraction (one rounding,
  not two), which moves each by at most an ulp of the terms, so
  ``2 eps (|l| + |f c| + |p|)`` bounds the difference."""
  want = reference_penalties(logits, output, prompt, presence, frequency,
                             repetition)
  repeated = reference_penalties(logits, output, prompt, 0.0, 0.0,
                                 repetition)
  counts = np.bincount(np.asarray(output, np.int64),
                       minlength=logits.shape[-1])[:logits.shape[-1]]
  eps = np.finfo(np.float32).eps
  finite = np.isfinite(want)
  np.testing.assert_array_equal(got[~finite], want[~finite])
  bound = 2 * eps * (np.abs(repeated) + abs(frequency) * counts
                     + abs(presence) * (counts > 0))
  diff = np.abs(got[finite] - want[finite])
  assert np.all(diff <= bound[finite]), diff.max()


def test_penalties_are_checked_as_vllm_checks_them():
  for name, bad in (("presence_penalty", 2.5), ("frequency_penalty", -2.01),
                    ("repetition_penalty", 0.0),
                    ("repetition_penalty", 2.5)):
    with pytest.raises(InvalidRequest, match=name):
      SamplingParams(**{name: bad}).validate()
  s = SamplingParams(presence_penalty=-2, frequency_penalty=2,
                     repetition_penalty=2)
  s.validate()
  assert s.penalized and not s.drafted
  assert not SamplingParams().penalized and SamplingParams().drafted


def _generate(engine, requests):
  out = collections.defaultdict(list)
  for rid, prompt, s in requests:
    engine.submit(rid, prompt, s, lambda ev: out[ev.request_id].extend(
        ev.token_ids), seed_u32=s.seed_u32(0))
  engine.drain()
  u = engine.decode.kv_usage()
  assert u["pages_used"] == u["rows_live"] == 0, u
  return dict(out)


def _prompts():
  rng = np.random.default_rng(5)
  # Few distinct ids, so that the output repeats the prompt's and its own.
  return [rng.integers(3, 40, n).tolist() for n in (9, 40)]


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  return transformers.LlamaForCausalLM.from_pretrained(
      str(tiny_model_dir), dtype=torch.float32).eval()


def _transformers_tokens(hf, prompt, penalties):
  """Greedy tokens of transformers' model: its own repetition penalty
  (``generate``) where only that is on, else its logits step by step
  through ``reference_penalties``."""
  import torch
  presence, frequency, repetition = penalties
  with torch.no_grad():
    if presence == frequency == 0:
      got = hf.generate(torch.tensor([prompt]), do_sample=False,
                        max_new_tokens=NEW, min_new_tokens=NEW,
                        repetition_penalty=repetition, eos_token_id=None,
                        pad_token_id=0)
      return got[0, len(prompt):].tolist()
    out = []
    for _ in range(NEW):
      logits = hf(torch.tensor([prompt + out])).logits[0, -1].numpy()
      out.append(int(np.argmax(reference_penalties(
          logits, out, prompt, presence, frequency, repetition))))
    return out


@pytest.mark.parametrize("penalties", [(0.0, 0.0, 1.4), (0.8, 0.5, 1.2)],
                         ids=["repetition", "all"])
def test_greedy_tokens_match_transformers(tiny_decode_params, hf, penalties):
  params, cfg, mesh, rules = tiny_decode_params
  presence, frequency, repetition = penalties
  s = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True,
                     presence_penalty=presence, frequency_penalty=frequency,
                     repetition_penalty=repetition)
  plain = dataclasses.replace(s, presence_penalty=0.0,
                              frequency_penalty=0.0, repetition_penalty=1.0)
  prompts = _prompts()
  # With requests beside them that have no penalty (their rows share the
  # calls), and a row reused by a penalized request after a plain one.
  reqs = ([(f"p{i}", p, s) for i, p in enumerate(prompts)]
          + [(f"q{i}", p, plain) for i, p in enumerate(prompts)])
  engine = ColocatedEngine(params, cfg, mesh, rules, PCFG, DCFG)
  got = _generate(engine, reqs)
  got_again = _generate(engine, [(f"again{i}", p, s)
                                 for i, p in enumerate(prompts)])
  for i, prompt in enumerate(prompts):
    want = _transformers_tokens(hf, prompt, penalties)
    assert got[f"p{i}"] == want, (i, got[f"p{i}"], want)
    assert got_again[f"again{i}"] == want
    assert got[f"q{i}"] == _transformers_tokens(hf, prompt, (0.0, 0.0, 1.0))
    assert got[f"q{i}"] != want          # the penalties did something


def test_a_penalized_request_is_not_drafted(tiny_decode_params):
  """In a pool drafting with a draft model, a penalized request decodes
  plainly (its tokens as a plain pool's) while the others are drafted."""
  params, cfg, mesh, rules = tiny_decode_params
  s = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True,
                     repetition_penalty=1.4, frequency_penalty=0.3)
  prompts = _prompts()
  reqs = [(f"p{i}", p, s) for i, p in enumerate(prompts)]
  plain = _generate(ColocatedEngine(params, cfg, mesh, rules, PCFG, DCFG),
                    reqs)
  spec = ColocatedEngine(
      params, cfg, mesh, rules, PCFG,
      dataclasses.replace(DCFG, speculative="draft", spec_tokens=3),
      draft=(params, cfg))
  assert _generate(spec, reqs) == plain
  assert spec.decode.stats["spec_drafted"] == 0
  # A request without penalties in the same pool is drafted.
  unpenalized = dataclasses.replace(s, repetition_penalty=1.0,
                                    frequency_penalty=0.0)
  _generate(spec, [("u", prompts[0], unpenalized)])
  assert spec.decode.stats["spec_drafted"] > 0
