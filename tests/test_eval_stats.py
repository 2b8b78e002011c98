"""Tests of the batch-eval driver: statistics, workloads, load, CLI.

The statistics are checked on hand-computed cases because their definitions
(ITL per token inside multi-token messages, who counts in SLO attainment) are
exactly where serving benchmarks quietly disagree. The runner and the CLI run
end to end against an in-process fake backend that streams tokens with small
sleeps, so the whole file stays fast and needs no server.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
from absl import flags

from pdjax.eval import load, stats, workloads
from pdjax.eval.load import Delta
from pdjax.eval.stats import RequestRecord
from pdjax.eval.workloads import WorkItem


def _batch_eval():
  """The batch-eval driver (``pdjax bench``, tools/batch_eval.py)."""
  from pdjax.eval import cli
  return cli


def _rec(rid="r", send=0.0, times=(), error=None, code=None, cancelled=False,
         prompt_tokens=10) -> RequestRecord:
  times = list(times)
  return RequestRecord(
      request_id=rid, prompt_tokens=prompt_tokens, output_tokens=len(times),
      send_time=send, first_token_time=times[0] if times else None,
      token_times=times, finish_reason=None if error else "length",
      error=error, status_code=code, token_ids=list(range(len(times))),
      end_time=(times[-1] if times else send + 0.01), cancelled=cancelled)


# ------------------------------------------------------------------ stats


def test_percentiles_linear_interpolation():
  d = stats.Distribution.of([4.0, 1.0, 3.0, 2.0])
  assert d.count == 4
  assert d.mean == pytest.approx(2.5)
  assert d.p50 == pytest.approx(2.5)
  assert d.p90 == pytest.approx(3.7)   # 1 + 0.9 * 3 = rank 3.7
  assert d.p99 == pytest.approx(3.97)
  assert (d.min, d.max) == (1.0, 4.0)
  empty = stats.Distribution.of([])
  assert empty.count == 0 and empty.p50 is None and empty.mean is None


def test_ttft_tpot_itl_with_multi_token_messages():
  # Messages at 0.5 (1 token), 0.7 (3 tokens), 1.0 (1 token).
  r = _rec(send=0.1, times=[0.5, 0.7, 0.7, 0.7, 1.0])
  assert r.ttft == pytest.approx(0.4)
  assert r.tpot == pytest.approx((1.0 - 0.5) / 4)
  assert r.itls == pytest.approx([0.2, 0.0, 0.0, 0.3])
  assert np.mean(r.itls) == pytest.approx(r.tpot)  # by construction
  assert r.e2e == pytest.approx(0.9)
  assert r.status == stats.COMPLETED


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(st.lists(st.floats(0.0, 10.0), min_size=2, max_size=40))
def test_itl_properties(gaps):
  times = np.cumsum(gaps).tolist()
  r = _rec(send=0.0, times=times)
  assert len(r.itls) == len(times) - 1
  assert sum(r.itls) == pytest.approx(times[-1] - times[0], abs=1e-9)
  assert np.mean(r.itls) == pytest.approx(r.tpot, abs=1e-9)
  assert r.ttft + (len(times) - 1) * r.tpot == pytest.approx(r.e2e, abs=1e-9)


def test_one_token_output_has_no_tpot_and_meets_tpot_slo():
  r = _rec(send=0.0, times=[0.2])
  assert r.tpot is None and r.itls == []
  assert r.meets_slo(ttft_slo=0.25, tpot_slo=1e-9)
  assert not r.meets_slo(ttft_slo=0.1, tpot_slo=1.0)


def test_summarize_attainment_goodput_and_failures():
  records = [
      _rec("a", 0.0, [0.1, 0.15, 0.2]),             # ttft .1 tpot .05: met
      _rec("b", 0.0, [0.3, 0.35]),                   # ttft .3: missed
      _rec("c", 0.0, [0.1, 0.3, 0.5]),               # tpot .2: missed
      _rec("d", 0.0, [0.05], error="boom", code="UNAVAILABLE"),  # failed
      _rec("e", 0.0, [0.2]),                         # 1 token, ttft .2: met
      _rec("f", 0.0, [0.1], cancelled=True),         # not judged
  ]
  s = stats.summarize(records, duration_s=2.0, ttft_slo=0.25, tpot_slo=0.1,
                      label="x", rate=4.0)
  assert (s.completed, s.failed, s.cancelled) == (4, 1, 1)
  assert s.num_requests == 6
  assert s.slo_met == 2
  assert s.slo_attainment == pytest.approx(2 / 5)
  assert s.goodput == pytest.approx(1.0)
  assert s.request_throughput == pytest.approx(2.0)
  assert s.total_output_tokens == 3 + 2 + 3 + 1
  assert s.output_token_throughput == pytest.approx(9 / 2)
  assert s.input_token_throughput == pytest.approx(40 / 2)
  assert s.errors == {"UNAVAILABLE": 1}
  # Distributions over completed requests only.
  assert s.ttft.count == 4
  assert s.ttft.p50 == pytest.approx(np.percentile([0.1, 0.3, 0.1, 0.2], 50))
  assert s.tpot.count == 3  # "e" has no TPOT
  assert s.itl.count == 2 + 1 + 2
  assert s.itl.mean == pytest.approx(np.mean([0.05, 0.05, 0.05, 0.2, 0.2]))
  assert s.e2e.max == pytest.approx(0.5)
  table = stats.format_table(s)
  assert "TTFT" in table and "40.0%" in table and "UNAVAILABLE" in table


def test_failed_only_and_empty_runs():
  s = stats.summarize([_rec("d", 0, [], error="x")], 1.0, 0.25, 0.1)
  assert s.slo_attainment == 0.0 and s.goodput == 0.0 and s.errors == {
      "error": 1}
  s = stats.summarize([], 0.0, 0.25, 0.1)
  assert s.slo_attainment is None and s.goodput is None
  stats.format_table(s)  # renders without numbers


def test_summary_json_round_trip_with_inf_rate():
  s = stats.summarize([_rec("a", 0, [0.1, 0.2])], 1.0, 0.25, 0.1,
                      rate=math.inf, label="disagg")
  text = s.to_json()
  assert "Infinity" not in text  # strict JSON
  back = stats.Summary.from_dict(json.loads(text))
  assert back == s
  rec = _rec("a", 0, [0.1, 0.2, 0.2])
  d = json.loads(json.dumps(rec.to_dict()))
  assert d["itls"] == pytest.approx([0.1, 0.0])
  assert RequestRecord.from_dict(d) == rec


def test_wall_duration():
  recs = [_rec("a", 1.0, [1.5, 2.0]), _rec("b", 1.5, [3.0])]
  assert stats.wall_duration(recs) == pytest.approx(2.0)
  assert stats.wall_duration([]) == 0.0


def test_max_goodput_rate():
  def pts(*pairs):
    return [_Pt(r, a) for r, a in pairs]
  assert stats.max_goodput_rate(pts((1, 1.0), (2, 0.95), (4, 0.5))) == 2
  assert stats.max_goodput_rate(pts((1, 0.9), (2, 0.89))) == 1  # inclusive
  assert stats.max_goodput_rate(pts((1, 0.5), (2, 0.1))) is None
  assert stats.max_goodput_rate(
      pts((1, 0.95), (2, 0.85), (4, 0.5)), attainment_target=0.8) == 2
  # Literal definition: the highest passing rate, even above a failing one.
  assert stats.max_goodput_rate(pts((1, 1.0), (2, 0.8), (3, 0.92))) == 3
  assert stats.max_goodput_rate(pts((None, 1.0), (1, None))) is None


class _Pt:

  def __init__(self, rate, att):
    self.rate, self.slo_attainment = rate, att


# -------------------------------------------------------------- workloads


def _gen(preset, n=50, **kw):
  kw = {"vocab_size": 1000, "max_model_len": 100_000, "seed": 0, **kw}
  return workloads.generate(preset, n, **kw)


@pytest.mark.parametrize("preset", sorted(workloads.PRESETS))
def test_workloads_deterministic_and_valid(preset):
  a = _gen(preset, exclude_token_ids=[0, 1, 2, 999])
  assert a == _gen(preset, exclude_token_ids=[0, 1, 2, 999])
  assert a != _gen(preset, seed=1, exclude_token_ids=[0, 1, 2, 999])
  assert len(a) == 50
  assert len({it.request_id for it in a}) == 50
  for i, it in enumerate(a):
    assert it.index == i and it.max_tokens >= 1
    assert it.num_prompt_tokens == len(it.prompt_token_ids) >= 1
    ids = np.asarray(it.prompt_token_ids)
    assert ids.min() >= 3 and ids.max() < 999


@pytest.mark.parametrize("preset", sorted(workloads.PRESETS))
def test_workloads_fit_max_model_len_and_scale(preset):
  for it in _gen(preset, n=100, max_model_len=300):
    assert it.num_prompt_tokens + it.max_tokens <= 300
  full = _gen(preset, n=400)
  small = _gen(preset, n=400, length_scale=0.1)
  med = lambda items, f: float(np.median([f(i) for i in items]))
  ratio = med(small, lambda i: i.max_tokens) / med(full, lambda i: i.max_tokens)
  assert 0.07 < ratio < 0.13
  # Same seed, same shapes: lengths don't depend on the vocabulary.
  assert [i.max_tokens for i in full] == [
      i.max_tokens for i in _gen(preset, n=400, vocab_size=50_000)]


@pytest.mark.parametrize("preset,in_range,out_range", [
    ("chat", (150, 450), (130, 280)),
    ("summarize", (2000, 5000), (50, 150)),
    ("code", (110, 220), (120, 260)),
])
def test_preset_shapes(preset, in_range, out_range):
  items = _gen(preset, n=1000)
  ins = np.array([i.num_prompt_tokens for i in items])
  outs = np.array([i.max_tokens for i in items])
  assert in_range[0] < np.median(ins) < in_range[1]
  assert out_range[0] < np.median(outs) < out_range[1]
  if preset == "chat":  # long tail
    assert np.percentile(ins, 99) > 4 * np.median(ins)
  if preset == "summarize":
    assert ins.min() >= 1000 and outs.max() <= 256
  if preset == "code":
    assert 80 < np.percentile(ins, 10) and np.percentile(ins, 90) < 300


def test_shared_prefix_items_share_the_system_prompt():
  items = _gen("shared-prefix", n=20)
  prefix = items[0].prompt_token_ids[:2048]
  assert all(it.prompt_token_ids[:2048] == prefix for it in items)
  assert all(it.num_prompt_tokens > 2048 for it in items)
  scaled = _gen("shared-prefix", n=5, length_scale=0.01)
  assert all(it.prompt_token_ids[:20] == scaled[0].prompt_token_ids[:20]
             for it in scaled)


def test_multiturn_rounds_resend_history():
  items = _gen("multiturn", n=60)
  by_conv: dict[str, list[WorkItem]] = {}
  for it in items:
    by_conv.setdefault(it.conversation_id, []).append(it)
  assert len(by_conv) > 1
  for turns in by_conv.values():
    assert [t.turn for t in turns] == list(range(len(turns)))
    assert turns[0].new_token_ids is None
    for prev, cur in zip(turns, turns[1:]):
      n_prev = prev.num_prompt_tokens + prev.max_tokens
      assert cur.prompt_token_ids[:prev.num_prompt_tokens] == (
          prev.prompt_token_ids)
      assert cur.prompt_token_ids[n_prev:] == cur.new_token_ids
  # Interleaved: consecutive requests are not all from one conversation.
  convs = [it.conversation_id for it in items]
  assert sum(a != b for a, b in zip(convs, convs[1:])) > len(items) // 3
  for it in _gen("multiturn", n=60, max_model_len=1500):
    assert it.num_prompt_tokens + it.max_tokens <= 1500


def test_load_dataset(tmp_path):
  p = tmp_path / "d.jsonl"
  lines = [
      {"prompt": "hello there", "max_tokens": 7},
      {"prompt": "no budget"},
      {"conversations": [{"from": "system", "value": "sys"},
                         {"from": "human", "value": "a b c"},
                         {"from": "gpt", "value": "one two three four"}]},
      {"conversations": [{"from": "gpt", "value": "orphan"}]},  # skipped
      {"prompt_token_ids": [5, 6, 7]},
  ]
  p.write_text("\n".join(json.dumps(l) for l in lines) + "\n")
  count = lambda s: len(s.split())
  items = workloads.load_dataset(p, count_tokens=count, default_max_tokens=9)
  assert [i.prompt for i in items] == ["hello there", "no budget", "a b c",
                                       None]
  assert [i.max_tokens for i in items] == [7, 9, 4, 9]
  assert [i.num_prompt_tokens for i in items] == [2, 2, 3, 3]
  assert items[3].prompt_token_ids == [5, 6, 7]
  # Without a counter: unknown prompt length, default output budget.
  items = workloads.load_dataset(p)
  assert items[2].max_tokens == 256 and items[2].num_prompt_tokens is None
  # Sampling: seeded, cycles when asked for more than the file has.
  a = workloads.load_dataset(p, num_requests=10, seed=3)
  assert len(a) == 10 and len({i.request_id for i in a}) == 10
  assert a == workloads.load_dataset(p, num_requests=10, seed=3)
  # max_model_len: drop prompts that can't fit, cap the rest's outputs.
  items = workloads.load_dataset(p, count_tokens=count, max_model_len=6)
  assert [i.max_tokens for i in items] == [4, 4, 3, 3]
  # ShareGPT as one JSON array.
  q = tmp_path / "sharegpt.json"
  q.write_text(json.dumps([lines[2], lines[2]]))
  assert len(workloads.load_dataset(q, count_tokens=count)) == 2


# ----------------------------------------------------------- load / runner


def test_poisson_gaps():
  t = load.poisson_arrival_times(20_000, rate=5.0, seed=1)
  assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
  gaps = np.diff(t)
  assert gaps.mean() == pytest.approx(0.2, rel=0.03)
  assert gaps.std() == pytest.approx(0.2, rel=0.05)  # exponential: std=mean
  assert np.array_equal(t, load.poisson_arrival_times(20_000, 5.0, seed=1))
  assert not np.array_equal(t, load.poisson_arrival_times(20_000, 5.0, 2))
  assert np.all(load.poisson_arrival_times(5, math.inf) == 0)
  assert np.all(load.poisson_arrival_times(5, None) == 0)
  with pytest.raises(ValueError):
    load.poisson_arrival_times(5, 0.0)


class _Code:
  name = "UNAVAILABLE"


class FakeRpcError(Exception):

  def code(self):
    return _Code()

  def details(self):
    return "backend went away"


class FakeBackend:
  """Streams max_tokens tokens in messages of ``chunk``, with small sleeps."""

  def __init__(self, chunk=1, first_delay=0.004, delay=0.001,
               fail_ids=(), fail_after=2):
    self.chunk, self.first_delay, self.delay = chunk, first_delay, delay
    self.fail_ids, self.fail_after = set(fail_ids), fail_after
    self.sent: dict[str, list[int]] = {}
    self.prompts: dict[str, list[int] | str] = {}
    self.sampling: dict[str, dict] = {}
    self.in_flight = self.max_in_flight = 0

  async def stream(self, item, sampling):
    self.prompts[item.request_id] = item.prompt_token_ids or item.prompt
    self.sampling[item.request_id] = sampling
    self.sent[item.request_id] = []
    self.in_flight += 1
    self.max_in_flight = max(self.max_in_flight, self.in_flight)
    try:
      await asyncio.sleep(self.first_delay)
      n, i = item.max_tokens, 0
      while i < n:
        if item.request_id in self.fail_ids and i >= self.fail_after:
          raise FakeRpcError("rpc failed")
        k = min(self.chunk, n - i)
        ids = [(7 * (item.index + j) + 3) % 997 for j in range(i, i + k)]
        self.sent[item.request_id].extend(ids)
        i += k
        yield Delta(ids, "".join(f"<{t}>" for t in ids),
                    finish_reason="length" if i == n else None,
                    usage={"prompt_tokens": 11, "completion_tokens": i}
                    if i == n else None)
        await asyncio.sleep(self.delay)
    finally:
      self.in_flight -= 1


def _items(n=12, max_tokens=5):
  return [WorkItem(request_id=f"r{i}", max_tokens=max_tokens + i % 3,
                   prompt_token_ids=[1, 2, 3], index=i) for i in range(n)]


def test_runner_records_multi_token_messages_and_failures():
  fake = FakeBackend(chunk=3, fail_ids={"r4"})
  seen = []
  items = _items()
  recs = asyncio.run(load.run_workload(
      fake, items, concurrency=4, sampling={"temperature": 0.0},
      on_record=seen.append, progress=False))
  assert [r.request_id for r in recs] == [i.request_id for i in items]
  assert sorted(r.request_id for r in seen) == sorted(
      i.request_id for i in items)
  assert fake.max_in_flight <= 4
  assert fake.sampling["r0"] == {"temperature": 0.0}
  for r, it in zip(recs, items):
    assert r.token_ids == fake.sent[r.request_id]
    assert r.output_tokens == len(r.token_ids) == len(r.token_times)
    assert r.text == "".join(f"<{t}>" for t in r.token_ids)
    assert all(b >= a for a, b in zip(r.token_times, r.token_times[1:]))
    assert r.send_time <= r.first_token_time <= r.end_time
    if r.request_id == "r4":
      assert r.status == "failed" and r.status_code == "UNAVAILABLE"
      assert r.error == "backend went away"
      assert r.output_tokens == 3  # one 3-token message before failing
      continue
    assert r.status == "completed" and r.finish_reason == "length"
    assert r.output_tokens == it.max_tokens
    assert r.prompt_tokens == 11  # from usage
    # Within a 3-token message the 2nd and 3rd tokens have ITL 0.
    assert r.itls[0] == 0.0 and r.itls[1] == 0.0 and r.itls[2] > 0


def test_runner_follows_the_rate_and_plain_exceptions_fail():

  class Broken:

    async def stream(self, item, sampling):
      raise RuntimeError("no route")
      yield  # pylint: disable=unreachable

  rate = 200.0
  items = _items(10)
  recs = asyncio.run(load.run_workload(FakeBackend(), items, rate=rate,
                                       seed=5, progress=False))
  plan = load.poisson_arrival_times(10, rate, seed=5)
  for r, t in zip(recs, plan):
    assert r.send_time >= t - 1e-3
    assert r.send_time < t + 0.05
  recs = asyncio.run(load.run_workload(Broken(), items[:2], progress=False))
  assert [(r.status, r.error, r.status_code) for r in recs] == [
      ("failed", "no route", None)] * 2


def test_runner_returns_partial_results_when_cancelled():
  fake = FakeBackend(first_delay=0.0, delay=0.02)
  items = _items(6, max_tokens=4) + [
      WorkItem(request_id="slow", max_tokens=1000, prompt_token_ids=[1],
               index=6)]
  seen = []

  async def go():
    task = asyncio.create_task(load.run_workload(
        fake, items, concurrency=7, on_record=seen.append, progress=False))
    await asyncio.sleep(0.3)
    task.cancel()
    return await task  # returns instead of raising

  recs = asyncio.run(go())
  assert len(recs) == 7
  assert [r.status for r in recs[:6]] == ["completed"] * 6
  assert recs[6].status == "cancelled" and 0 < recs[6].output_tokens < 1000
  assert len(seen) == 7
  s = stats.summarize(recs, stats.wall_duration(recs), 10.0, 10.0)
  assert (s.completed, s.cancelled, s.slo_attainment) == (6, 1, 1.0)


def test_runner_multiturn_closed_loop():
  items = _gen("multiturn", n=12, length_scale=0.02)
  fake = FakeBackend()
  recs = asyncio.run(load.run_workload(fake, items, progress=False))
  by_id = {r.request_id: r for r in recs}
  sent = {}
  for it in items:
    r = by_id[it.request_id]
    assert r.status == "completed"
    if it.turn:
      prev = sent[(it.conversation_id, it.turn - 1)]
      assert fake.prompts[it.request_id] == (
          fake.prompts[prev.request_id] + prev.token_ids + it.new_token_ids)
      assert r.send_time >= prev.end_time
    sent[(it.conversation_id, it.turn)] = r


# --------------------------------------------------------------- CLI


def _check_run_dir(d: Path, fake: FakeBackend, n: int, png: bool = True):
  text = (d / "results.jsonl").read_text()
  lines = [json.loads(l) for l in text.splitlines()]
  assert len(lines) == n
  summary = json.loads((d / "summary.json").read_text())
  for l in lines:
    assert l["status"] == "completed"
    assert l["token_ids"] == fake.sent[l["request_id"]]
    assert l["output_tokens"] == len(l["token_ids"]) == len(l["token_times"])
    assert len(l["itls"]) == l["output_tokens"] - 1
    assert l["ttft"] == pytest.approx(l["first_token_time"] - l["send_time"])
    assert l["text"] == "".join(f"<{t}>" for t in l["token_ids"])
  assert summary["completed"] == n and summary["failed"] == 0
  assert summary["total_output_tokens"] == sum(
      l["output_tokens"] for l in lines)
  assert summary["itl"]["count"] == sum(len(l["itls"]) for l in lines)
  assert summary["interrupted"] is False
  if png:
    assert (d / "latency_cdf.png").stat().st_size > 0
  return lines, summary


def test_cli_single_run_end_to_end(tmp_path):
  be = _batch_eval()
  fake = FakeBackend(chunk=2)
  cfg = be.EvalConfig(preset="code", num_requests=16, rate=500.0,
                      concurrency=8, length_scale=0.03, vocab_size=320,
                      label="disagg", out_dir=str(tmp_path / "run"),
                      progress=False, seed=3)
  out = asyncio.run(be.run_eval(cfg, backend=fake))
  assert not out.interrupted
  lines, summary = _check_run_dir(tmp_path / "run", fake, 16)
  assert summary["ttft_slo"] == 0.125 and summary["tpot_slo"] == 0.2
  assert summary["label"] == "disagg" and summary["rate"] == 500.0
  assert all(l["label"] == "disagg" for l in lines)
  assert fake.sampling["code-000000"]["ignore_eos"] is True
  assert fake.sampling["code-000000"]["seed"] == 3
  assert json.loads((tmp_path / "run" / "config.json").read_text())[
      "preset"] == "code"


def test_cli_sweep_and_plot_only(tmp_path, capsys):
  be = _batch_eval()
  for label in ("disaggregated", "colocated"):
    fake = FakeBackend()
    cfg = be.EvalConfig(preset="chat", num_requests=8, sweep_rates=[100, 400],
                        length_scale=0.02, vocab_size=320, label=label,
                        out_dir=str(tmp_path / label), progress=False,
                        ttft_slo=1.0, tpot_slo=1.0)
    out = asyncio.run(be.run_eval(cfg, backend=fake))
    assert [s.rate for s in out.summaries] == [100, 400]
    for r in ("rate_100", "rate_400"):
      _check_run_dir(tmp_path / label / r, fake, 8, png=False)
    sweep = json.loads((tmp_path / label / "sweep.json").read_text())
    assert sweep["max_goodput_rate"] == 400
    assert [p["slo_attainment"] for p in sweep["points"]] == [1.0, 1.0]
    assert (tmp_path / label / "sweep.png").exists()
    assert (tmp_path / label / "latency_cdf.png").exists()
  written = be.plot_only([str(tmp_path / "disaggregated"),
                          str(tmp_path / "colocated"),
                          str(tmp_path / "colocated" / "rate_100")],
                         str(tmp_path / "cmp"))
  assert written["sweep"].stat().st_size > 0
  assert written["latency_cdf"].stat().st_size > 0
  out = capsys.readouterr().out
  assert "[disaggregated]" in out and "[colocated]" in out
  # A sweep cut off before its sweep.json (a time limit): its finished rate
  # runs stand for it; a folder with neither is still an error.
  (tmp_path / "colocated" / "sweep.json").unlink()
  be.plot_only([str(tmp_path / "colocated")], str(tmp_path / "cut"))
  out = capsys.readouterr().out
  assert "[colocated]" in out and "100.00" in out and "400.00" in out
  with pytest.raises(FileNotFoundError, match="neither"):
    be.plot_only([str(tmp_path / "cut")], str(tmp_path / "none"))


def test_sweep_with_an_arrival_window_sends_rate_times_window(tmp_path):
  be = _batch_eval()
  fake = FakeBackend()
  cfg = be.EvalConfig(preset="chat", duration_s=0.05, sweep_rates=[100, 300],
                      length_scale=0.02, vocab_size=320, label="w",
                      out_dir=str(tmp_path / "w"), progress=False)
  assert cfg.num_requests == 15          # enough for the highest rate
  out = asyncio.run(be.run_eval(cfg, backend=fake))
  assert [s.completed for s in out.summaries] == [5, 15]
  low = _check_run_dir(tmp_path / "w" / "rate_100", fake, 5, png=False)[0]
  high = _check_run_dir(tmp_path / "w" / "rate_300", fake, 15, png=False)[0]
  # The lower rate sends the first requests of the same workload.
  assert ([l["request_id"] for l in low]
          == [l["request_id"] for l in high][:5])
  with pytest.raises(ValueError, match="finite rate"):
    be.EvalConfig(duration_s=10.0)
  with pytest.raises(ValueError, match="> 0"):
    be.EvalConfig(duration_s=0.0, rate=4.0)


def test_a_rate_schedule_steps_the_offered_rate(tmp_path):
  """A piecewise rate: each segment's arrivals at its own rate, one run,
  and each segment's attainment in summary.json."""
  sched = load.parse_schedule("200:2,800:2,200:2")
  assert sched == [(200.0, 2.0), (800.0, 2.0), (200.0, 2.0)]
  t = load.piecewise_arrival_times(sched, seed=4)
  counts = [np.sum((t >= a) & (t < a + 2)) for a in (0, 2, 4)]
  assert 300 < counts[0] < 500 and 1400 < counts[1] < 1800
  assert 300 < counts[2] < 500 and np.all(np.diff(t) > 0)
  assert [load.segment_of(x, sched) for x in (0.1, 2.0, 5.9, 9)] == [
      0, 1, 2, 2]
  for bad in ("2", "2:0", "0:5", "inf:3", ""):
    with pytest.raises(ValueError):
      load.parse_schedule(bad)
  be = _batch_eval()
  fake = FakeBackend()
  cfg = be.EvalConfig(preset="chat", rate_schedule=[(50, 0.1), (200, 0.1)],
                      length_scale=0.02, vocab_size=320, label="ramp",
                      out_dir=str(tmp_path / "ramp"), progress=False,
                      ttft_slo=1.0, tpot_slo=1.0, seed=1)
  n = len(load.piecewise_arrival_times([(50, 0.1), (200, 0.1)], 1))
  assert cfg.num_requests == n and cfg.rate == pytest.approx(n / 0.2)
  asyncio.run(be.run_eval(cfg, backend=fake))
  summary = json.loads((tmp_path / "ramp" / "summary.json").read_text())
  segs = summary["segments"]
  assert [s["rate"] for s in segs] == [50, 200]
  assert sum(s["requests"] for s in segs) == n
  assert all(s["failed"] == 0 and s["slo_attainment"] == 1.0 for s in segs
             if s["requests"])
  with pytest.raises(ValueError, match="one run"):
    be.EvalConfig(rate_schedule=[(1, 1)], sweep_rates=[1.0])


def test_cli_main_with_flags(tmp_path, monkeypatch, capsys):
  be = _batch_eval()
  fake = FakeBackend()
  made = []
  monkeypatch.setattr(be, "make_backend",
                      lambda *a, **kw: made.append((a, kw)) or fake)
  data = tmp_path / "in.jsonl"
  data.write_text("\n".join(json.dumps({"prompt": f"p{i}", "max_tokens": 3})
                            for i in range(4)))
  argv = ["batch_eval", f"--input={data}", "--num_requests=6",
          "--concurrency=2", f"--out_dir={tmp_path / 'o'}", "--noprogress",
          "--temperature=0.7", "--top_k=5", "--min_p=0.05", "--min_tokens=2",
          "--presence_penalty=0.5", "--repetition_penalty=1.1",
          "--stop_token_ids=9,10",
          "--sessions"]
  fv = flags.FlagValues()
  be.define_flags(fv)
  fv(argv)
  assert be.main(["batch_eval"], fv) == 0
  _check_run_dir(tmp_path / "o", fake, 6)
  assert made == [(("localhost:50051", "pdjax"),
                   {"model": None, "api_key": None, "sessions": True})]
  s = fake.sampling["req-000000"]
  assert s == {"temperature": 0.7, "top_p": 1.0, "top_k": 5, "min_p": 0.05,
               "min_tokens": 2, "presence_penalty": 0.5,
               "frequency_penalty": 0.0, "repetition_penalty": 1.1,
               "seed": 0, "ignore_eos": False, "stop_token_ids": [9, 10]}
  assert "TTFT" in capsys.readouterr().out


def test_client_adapter_maps_the_stream():
  from pdjax.eval.backends import RouterBackend

  class Out:

    def __init__(self, ids, text, fin=None, usage=None):
      self.token_ids, self.text, self.finish_reason, self.usage = (
          ids, text, fin, usage)

  class Usage:
    prompt_tokens, completion_tokens = 3, 2

  class Client:
    kwargs = None

    async def stream(self, **kw):
      Client.kwargs = kw
      yield Out([4], "a")
      yield Out([5], "b", "stop", Usage())

  item = WorkItem(request_id="x", max_tokens=2, prompt_token_ids=[1, 2, 3],
                  index=4)

  async def go():
    return [d async for d in RouterBackend(Client()).stream(
        item, {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.25,
               "min_tokens": 1, "frequency_penalty": 0.5,
               "repetition_penalty": 1.0, "seed": 10, "ignore_eos": True,
               "stop_token_ids": None})]

  deltas = asyncio.run(go())
  assert deltas == [Delta([4], "a"), Delta([5], "b", "stop",
                                           {"prompt_tokens": 3,
                                            "completion_tokens": 2})]
  assert Client.kwargs == dict(
      prompt=None, prompt_token_ids=[1, 2, 3], max_tokens=2, temperature=0.0,
      top_p=1.0, top_k=0, min_p=0.25, min_tokens=1, presence_penalty=None,
      frequency_penalty=0.5, repetition_penalty=None, seed=14,
      stop_token_ids=None, ignore_eos=True, request_id="x")


def test_ttft_stages_are_summarized_per_stage():
  """The router's per-request TTFT breakdown becomes one distribution per
  stage (in the server's order) over the completed requests that report
  it; it survives the summary's JSON and shows in the report."""
  recs = []
  for i in range(4):
    r = _rec(f"r{i}", times=(0.1, 0.2))
    r.usage = {"ttft_stages": {"prepare": 0.001 * (i + 1), "queue": 0.0,
                               "prefill": 0.01 * (i + 1), "return": 0.002}}
    recs.append(r)
  recs.append(_rec("plain", times=(0.1, 0.2)))      # reported no stages
  recs.append(_rec("bad", error="x", code="INTERNAL"))
  s = stats.summarize(recs, 1.0, 1.0, 1.0)
  assert list(s.ttft_stages) == ["prepare", "queue", "prefill", "return"]
  assert s.ttft_stages["prefill"].count == 4
  assert s.ttft_stages["prefill"].p50 == pytest.approx(0.025)
  assert s.ttft_stages["queue"].max == 0.0
  back = stats.Summary.from_dict(json.loads(s.to_json()))
  assert back == s
  table = stats.format_table(s)
  assert "TTFT by stage" in table and "prefill" in table
  assert "TTFT by stage" not in stats.format_table(
      stats.summarize(recs[4:], 1.0, 1.0, 1.0))


def test_speculative_acceptance_is_summarized_when_drafted():
  """The server's draft/accepted counts sum over completed requests (the
  router's usage names; failed ones are left out) into the acceptance
  rate, which the report shows only when something was drafted."""
  recs = []
  for i, (drafted, accepted) in enumerate(((10, 4), (6, 6), (0, 0))):
    r = _rec(f"r{i}", times=(0.1, 0.2))
    r.usage = {"spec_draft_tokens": drafted,
               "spec_accepted_tokens": accepted}
    recs.append(r)
  recs.append(_rec("plain", times=(0.1, 0.2)))      # no usage at all
  bad = _rec("bad", error="x", code="INTERNAL")
  bad.usage = {"spec_draft_tokens": 100, "spec_accepted_tokens": 0}
  recs.append(bad)
  s = stats.summarize(recs, 1.0, 1.0, 1.0)
  assert (s.spec_draft_tokens, s.spec_accepted_tokens) == (16, 10)
  assert s.spec_acceptance == pytest.approx(10 / 16)
  assert stats.Summary.from_dict(json.loads(s.to_json())) == s
  table = stats.format_table(s)
  assert "acceptance rate" in table and "62.5%" in table
  plain = stats.summarize(recs[2:4], 1.0, 1.0, 1.0)
  assert plain.spec_acceptance is None
  assert "acceptance" not in stats.format_table(plain)
