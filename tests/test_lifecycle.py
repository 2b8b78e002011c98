"""A request's lifecycle (``RequestStatus``): the transition table, and the
paths requests take through a colocated engine (tiny model, one CPU
device), each recorded move by move: finish, cancel while queued, running,
swapped out or queued again for recompute, preemption and resumption,
the queue's deadline, a first token that ends the request. Every request
ends exactly once, its last event's reason is its final status's, and
every page, swapped page, row and reservation comes back."""

from __future__ import annotations

import collections
import dataclasses
import time

import pytest

from pdjax.engine.requests import (TRANSITIONS, DecodeRequest, FinishReason,
                                   IllegalTransition, Lifecycle,
                                   RequestStatus)
from pdjax.engine.sampling import SamplingParams
from test_engines import Collector, assert_clean
from test_paging import DCFG, _engine, _requests

S = RequestStatus
LIVE = [s for s in S if not s.is_finished]
FINISHED = [s for s in S if s.is_finished]


# ------------------------------------------------------------ the table
def test_allowed_moves_are_accepted_and_every_other_raises():
  for old in S:
    for new in S:
      if new in TRANSITIONS[old]:
        assert S.advance(old, new) is new
        life = Lifecycle(old)
        life.advance(new)
        assert life.status is new
      else:
        with pytest.raises(IllegalTransition):
          S.advance(old, new)
        life = Lifecycle(old)
        with pytest.raises(IllegalTransition):
          life.advance(new)
        assert life.status is old   # unchanged


def test_finished_states_are_terminal_and_come_after_the_live_ones():
  assert set(TRANSITIONS) == set(S)
  assert max(LIVE) < min(FINISHED)
  assert FINISHED == [S.FINISHED_STOPPED, S.FINISHED_LENGTH,
                      S.FINISHED_ABORTED, S.FINISHED_ERROR]
  for s in FINISHED:
    assert not TRANSITIONS[s]
  for s in LIVE:
    assert s not in TRANSITIONS[s]           # no move to itself
    assert TRANSITIONS[s] & set(FINISHED)    # every live state can end
    assert S.FINISHED_ERROR in TRANSITIONS[s]


@pytest.mark.parametrize("old,new", [
    (S.FINISHED_LENGTH, S.FINISHED_ABORTED),   # finished twice
    (S.FINISHED_ABORTED, S.FINISHED_ABORTED),
    (S.FINISHED_STOPPED, S.RUNNING),           # resumed after the end
    (S.FINISHED_ERROR, S.WAITING),
    (S.WAITING, S.RUNNING),                    # a row without a reservation
    (S.WAITING, S.FINISHED_LENGTH),            # tokens before a prefill
    (S.PREEMPTED_SWAPPED, S.PREEMPTED_RECOMPUTE),
    (S.PREEMPTED_RECOMPUTE, S.RUNNING),        # back without a prefill
    (S.PREEMPTED_RECOMPUTE, S.FINISHED_LENGTH),
    (S.RUNNING, S.WAITING),
])
def test_illegal_moves_raise(old, new):
  with pytest.raises(IllegalTransition, match=f"{old.name} to {new.name}"):
    S.advance(old, new)


def test_finish_and_reason():
  life = Lifecycle()
  assert life.status is S.WAITING and life.reason is None
  life.advance(S.WAITING_FOR_KV)
  life.advance(S.RUNNING)
  assert life.reason is None
  assert life.finish(FinishReason.STOP) is FinishReason.STOP
  assert life.status is S.FINISHED_STOPPED
  assert life.reason is FinishReason.STOP
  with pytest.raises(IllegalTransition):
    life.finish(FinishReason.ABORT)
  for reason in FinishReason:
    assert FinishReason.from_status(S.finished(reason)) is reason


def test_copies_of_a_request_share_its_lifecycle():
  req = DecodeRequest("a", [1, 2], 3, 0.0, None, SamplingParams(), 0,
                      lambda ev: None)
  assert req.lifecycle.status is S.WAITING_FOR_KV
  copy = dataclasses.replace(req, kv=None, prompt_ids=[1, 2, 3])
  copy.lifecycle.advance(S.RUNNING)
  assert req.lifecycle.status is S.RUNNING
  other = DecodeRequest("b", [1], 3, 0.0, None, SamplingParams(), 0,
                        lambda ev: None)
  assert other.lifecycle is not req.lifecycle


# ------------------------------------------------------------ the engine
@pytest.fixture
def moves(monkeypatch):
  """Every move of every lifecycle, in order: lifecycle -> statuses."""
  paths: dict[Lifecycle, list[RequestStatus]] = {}
  advance = Lifecycle.advance

  def recorded(self, new):
    paths.setdefault(self, [self.status])
    advance(self, new)
    paths[self].append(self.status)

  monkeypatch.setattr(Lifecycle, "advance", recorded)
  return paths


def _submit(engine, reqs, col) -> dict[str, Lifecycle]:
  out = {}
  for rid, p, s in reqs:
    engine.submit(rid, p, s, col, seed_u32=s.seed_u32(0))
    out[rid] = engine._waiting[-1].lifecycle
  return out


def _ends_once(col: Collector, lives: dict[str, Lifecycle]) -> None:
  """Each request: exactly one final event, the last one, whose reason is
  its lifecycle's final status's."""
  for rid, life in lives.items():
    assert life.status.is_finished, (rid, life)
    ends = [e for e in col.events[rid] if e.finish_reason is not None]
    assert len(ends) == 1, (rid, col.events[rid])
    assert col.reason(rid) == life.reason, (rid, life)


def _path(moves, life) -> list[RequestStatus]:
  return moves.get(life, [life.status])


def _follows(path, *statuses) -> bool:
  """Whether ``statuses`` occur in ``path`` one right after another."""
  n = len(statuses)
  return any(tuple(path[i:i + n]) == statuses for i in range(len(path)))


# The state a request is cancelled in (found between iterations), and the
# moves its path ends with.
_CANCEL_IN = {
    None: (),
    "queued": (S.WAITING, S.FINISHED_ABORTED),
    "running": (S.RUNNING, S.FINISHED_ABORTED),
    "swapped": (S.PREEMPTED_SWAPPED, S.FINISHED_ABORTED),
    "requeued": (S.PREEMPTED_RECOMPUTE, S.WAITING, S.FINISHED_ABORTED),
}


@pytest.mark.parametrize("cancel_in", list(_CANCEL_IN))
def test_paths_through_the_engine(tiny_decode_params, moves, cancel_in):
  """Eight requests to the end of the context on a pool of four contexts
  with a small swap space: rows are swapped out and back, and evicted and
  recomputed. Without a cancel every request finishes (LENGTH), some
  after a swap and some after a recompute; otherwise the first request
  found in the state named (queued for admission, running, swapped out,
  queued again for recompute) is cancelled there, and ends ABORTED from
  that state."""
  engine = _engine(tiny_decode_params, dataclasses.replace(DCFG,
                                                           swap_pages=4))
  col = Collector()
  reqs = _requests()
  lives = _submit(engine, reqs, col)
  target = None

  def found(kind, rid):
    nonlocal target
    if cancel_in == kind and target is None:
      target = rid
      engine.cancel(rid)

  found("queued", "r7")   # four are prefilled per iteration
  for i in range(2000):
    if not engine.has_work:
      break
    engine.step()
    requeued = {w.request_id for w in engine._waiting
                if w.tokens_generated > 1}
    for rid, life in lives.items():
      if life.status is S.RUNNING and i >= 3:
        found("running", rid)
      elif life.status is S.PREEMPTED_SWAPPED:
        found("swapped", rid)
      elif rid in requeued:
        found("requeued", rid)
  assert not engine.has_work
  _ends_once(col, lives)
  paths = {rid: _path(moves, life) for rid, life in lives.items()}
  if cancel_in is not None:
    assert target is not None, f"no request was ever {cancel_in}"
    tail = _CANCEL_IN[cancel_in]
    assert paths[target][-len(tail):] == list(tail), paths[target]
  for rid, path in paths.items():
    if rid != target:
      assert path[:3] == [S.WAITING, S.WAITING_FOR_KV, S.RUNNING], path
      assert path[-1] is S.FINISHED_LENGTH, (rid, path)
  if cancel_in is None:   # preempted both ways, and resumed
    assert any(_follows(p, S.RUNNING, S.PREEMPTED_SWAPPED, S.RUNNING)
               for p in paths.values()), paths
    assert any(_follows(p, S.RUNNING, S.PREEMPTED_RECOMPUTE, S.WAITING,
                        S.WAITING_FOR_KV, S.RUNNING)
               for p in paths.values()), paths
  assert_clean(engine)


def test_deadline_first_token_and_resubmission(tiny_decode_params, moves):
  """The queue's deadline ends a waiting request (ABORTED, exhausted) and
  a cancel ends a waiting one; a request whose first token is its last
  ends at submission, never holding a row; a finished request submitted
  to the decode pool again is refused."""
  engine = _engine(tiny_decode_params, dataclasses.replace(DCFG, max_seqs=2))
  col = Collector()
  long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
  one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
  lives = _submit(engine, [("one", [7] * 6, one), ("q0", [5] * 6, long),
                           ("q1", [6] * 6, long)], col)
  for _ in range(2):   # "one" ends with its first token; q0, q1 take the
    engine.step()      # two rows
  assert engine.kv_usage()["rows_live"] == 2 and not engine.num_waiting
  engine.queue_timeout_s = 0.3   # from here on (no compile in the way)
  lives.update(_submit(engine, [("late", [8] * 6, long),
                                ("gone", [9] * 6, long)], col))
  engine.step()
  engine.cancel("gone")
  time.sleep(0.4)
  engine.drain()
  _ends_once(col, lives)
  assert _path(moves, lives["one"]) == [S.WAITING, S.WAITING_FOR_KV,
                                        S.FINISHED_LENGTH]
  assert col.tokens("one") and len(col.tokens("one")) == 1
  assert _path(moves, lives["late"]) == [S.WAITING, S.FINISHED_ABORTED]
  assert col.events["late"][-1].exhausted
  assert _path(moves, lives["gone"]) == [S.WAITING, S.FINISHED_ABORTED]
  assert not col.events["gone"][-1].exhausted
  for rid in ("q0", "q1"):
    assert _path(moves, lives[rid]) == [S.WAITING, S.WAITING_FOR_KV,
                                        S.RUNNING, S.FINISHED_LENGTH]
  assert_clean(engine)
  stale = DecodeRequest("q0", [5] * 6, 1, 0.0, None, long, 0, col,
                        lifecycle=lives["q0"])
  with pytest.raises(IllegalTransition, match="FINISHED_LENGTH"):
    engine.submit_decode(stale)
  assert len([e for e in col.events["q0"] if e.finish_reason]) == 1
  assert_clean(engine)
  assert collections.Counter(
      e.finish_reason for rid in lives for e in col.events[rid]
      if e.finish_reason) == {FinishReason.LENGTH: 3, FinishReason.ABORT: 2}
