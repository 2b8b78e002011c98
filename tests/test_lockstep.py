"""Prefill pools spanning processes (``pdjax.engine.lockstep``): the batch
encoding the leader broadcasts, and what may span processes. The pool
itself runs end to end in ``tests/test_services.py`` (a two-process TP=2
prefill worker behind the router, tokens against the reference)."""

from __future__ import annotations

import pytest

from pdjax.engine import lockstep
from pdjax.engine.requests import PrefillRequest
from pdjax.engine.sampling import SamplingParams


def test_requests_survive_the_broadcast_encoding():
  reqs = [PrefillRequest("a", [5, 6, 7], SamplingParams(
              max_tokens=3, temperature=0.5, top_p=0.8, top_k=4, seed=9,
              stop_token_ids=(11, 12), ignore_eos=True), seed_u32=77,
              cache_salt="t", skip_pages=1),
          PrefillRequest("b", list(range(40)), SamplingParams(),
                         prefix_pages=[3, 4],
                         kv_sources=(("10.0.0.2:50061", 2),))]
  assert lockstep.decode(lockstep.encode(reqs)) == reqs


def test_what_may_span_processes_is_checked_at_start_up():
  from absl import app
  from pdjax.launch.worker import check_spanning_pool
  check_spanning_pool("prefill", "prefill", 0)
  for role, pool, pages, match in (("decode", "decode", 0, "decode pool"),
                                   ("both", "prefill", 0, "role=prefill"),
                                   ("prefill", "prefill", 64, "prefix cache")):
    try:
      check_spanning_pool(role, pool, pages)
    except app.UsageError as e:
      assert match in str(e)
    else:
      raise AssertionError(f"{role}/{pool}/{pages} was accepted")


def test_the_leader_hands_on_the_kv_its_result_carries(monkeypatch):
  """``kv_ready``, ``on_result`` and the result get one and the same KV
  object (what ``PrefillEngine.prefill`` promises), and a KV held whole
  stays as it is;
  the batch is broadcast before the engine runs it, once validated."""
  import jax.numpy as jnp
  from pdjax.engine.requests import PrefillResult, RequestKV
  sent = []
  monkeypatch.setattr(lockstep, "_broadcast", sent.append)

  from fake_engines import FakePrefillEngine

  class Engine(FakePrefillEngine):
    def validate(self, prompt_ids):
      if not prompt_ids:
        raise ValueError("empty")

    def prefill(self, requests, *, kv_ready=None, on_result=None):
      assert sent, "ran before the followers were told"
      kv = RequestKV(jnp.zeros((1, 2, 1, 4, 1, 2)), 3)
      kv_ready(0, kv)
      out = PrefillResult(requests[0].request_id, 1, 0.0, kv, 3)
      if on_result is not None:
        on_result(0, out)
      return [out]

  leader = lockstep.LockstepPrefill(Engine())
  handed, early = [], []
  (res,) = leader.prefill([PrefillRequest("a", [5, 6, 7], SamplingParams())],
                          kv_ready=lambda i, kv: handed.append(kv),
                          on_result=lambda i, r: early.append((i, r)))
  assert len(handed) == 1 and handed[0] is res.kv
  assert early == [(0, res)] and early[0][1].kv is res.kv
  assert lockstep.decode(sent[0])[0].request_id == "a"
  with pytest.raises(ValueError, match="empty"):
    leader.prefill([PrefillRequest("b", [], SamplingParams())])
  assert len(sent) == 1          # refused before anything was broadcast
  leader.close()
  assert sent[-1] is None and leader.closed
