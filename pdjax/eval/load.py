"""Arrival processes and the asyncio runner that offers a workload as load.

Latency under load depends as much on *when* requests arrive as on what they
are, so the runner separates the two: an arrival process plans send times
(Poisson at a rate, all at once, optionally capped at N in flight) and the
runner sends each ``WorkItem`` at its time, recording every token's arrival
with ``time.perf_counter()`` on the client, independent of server clocks.

Backends: anything with ``stream(item, sampling)`` returning an async iterator
of ``Delta`` (an ``async def`` generator method is the natural way). The
router and OpenAI-compatible servers are adapted to it in
``pdjax.eval.backends``; tests use an in-process fake. An exception raised by the stream marks the request failed
with the exception's message, and with the gRPC status code name when the
exception has a ``code()`` method (``grpc.aio.AioRpcError`` does).

Interruption: if the task running ``run_workload`` is cancelled (under
``asyncio.run``, the first Ctrl-C does exactly that), requests in flight are
cancelled, recorded with ``cancelled=True``, and ``run_workload`` *returns*
the records so far instead of propagating the cancellation, so the caller can
still write them. Callers that need to know check
``asyncio.current_task().cancelling()`` afterwards (``run_sweep`` does, and
stops). A second Ctrl-C under ``asyncio.run`` raises ``KeyboardInterrupt``.

Multiturn items (``WorkItem.turn > 0``) are sent only once the previous round
of their conversation has finished, at the later of that moment and their
planned time. By default the round's prompt is then rebuilt from what really
happened: previous sent prompt + previous generated tokens + the new user
tokens, so a server's prefix cache sees the history it actually produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import numpy as np

from pdjax.eval.stats import (COMPLETED, RequestRecord, Summary, summarize,
                              wall_duration)
from pdjax.eval.workloads import WorkItem


def eval_extra_missing(module: str) -> ImportError:
  """The error for an evaluation dependency that is not installed: they are
  the ``eval`` extra (``pip install 'pdjax[eval]'``), not the server's."""
  return ImportError(f"{module} is needed by pdjax's evaluation tools and is "
                     "not installed: pip install 'pdjax[eval]'")


class _NoBar:
  """A progress bar that shows nothing (``progress=False``)."""

  def update(self, n: int = 1) -> None:
    pass

  def set_postfix(self, *args, **kwargs) -> None:
    pass

  def close(self) -> None:
    pass


def _progress_bar(total: int, progress: bool):
  if not progress:
    return _NoBar()
  try:
    from tqdm.auto import tqdm
  except ImportError:
    raise eval_extra_missing("tqdm") from None
  return tqdm(total=total, delay=1.0, unit="req", dynamic_ncols=True)


@dataclasses.dataclass
class Delta:
  """One stream message: zero or more new tokens and their text."""
  token_ids: list[int]
  text: str = ""
  finish_reason: str | None = None
  usage: dict[str, Any] | None = None


class Backend(Protocol):
  """What the runner needs from a serving endpoint.

  ``stream`` is typically an ``async def`` generator method. ``sampling`` is
  the run-wide dict (vLLM names: temperature, top_p, top_k, seed, ignore_eos,
  stop_token_ids); ``item.max_tokens`` is the per-request output budget.
  """

  def stream(self, item: WorkItem,
             sampling: dict[str, Any]) -> AsyncIterator[Delta]:
    ...


def poisson_arrival_times(n: int, rate: float | None,
                          seed: int = 0) -> np.ndarray:
  """Planned send offsets (s) of ``n`` requests; the first one at 0.

  Gaps between consecutive requests are exponential with mean ``1 / rate``
  (a Poisson process), drawn from a generator seeded with ``seed``. ``rate``
  None or inf: every request at 0 (all at once).
  """
  if rate is None or math.isinf(rate):
    return np.zeros(n)
  if rate <= 0:
    raise ValueError(f"rate must be > 0, got {rate}")
  if n == 0:
    return np.zeros(0)
  gaps = np.random.default_rng(seed).exponential(1.0 / rate, n - 1)
  return np.concatenate([[0.0], np.cumsum(gaps)])


def parse_schedule(spec: Sequence[str] | str) -> list[tuple[float, float]]:
  """'2:60,8:60,2:60' (or its items) -> [(rate, seconds), ...]."""
  items = spec.split(",") if isinstance(spec, str) else list(spec)
  out = []
  for item in items:
    rate, sep, seconds = str(item).partition(":")
    try:
      seg = (float(rate), float(seconds))
    except ValueError:
      seg = None
    if not sep or seg is None or not (seg[0] > 0 and seg[1] > 0
                                      and math.isfinite(seg[0])):
      raise ValueError(f"a rate schedule is RATE:SECONDS,... with both > 0 "
                       f"and the rate finite, got {item!r}")
    out.append(seg)
  if not out:
    raise ValueError("the rate schedule is empty")
  return out


def piecewise_arrival_times(schedule: Sequence[tuple[float, float]],
                            seed: int = 0) -> np.ndarray:
  """Planned send offsets (s) of a Poisson process whose rate is constant
  within each ``(rate, seconds)`` segment, the segments one after another
  (a load ramp: ``[(2, 60), (8, 60), (2, 60)]``). Exponential gaps are
  memoryless, so each segment starts its own draw at its start. Seeded."""
  rng = np.random.default_rng(seed)
  out: list[float] = []
  start = 0.0
  for rate, seconds in schedule:
    t = start
    while True:
      t += rng.exponential(1.0 / rate)
      if t >= start + seconds:
        break
      out.append(t)
    start += seconds
  return np.asarray(out)


def segment_of(t: float, schedule: Sequence[tuple[float, float]]) -> int:
  """The index of the schedule segment offset ``t`` falls in."""
  end = 0.0
  for i, (_, seconds) in enumerate(schedule):
    end += seconds
    if t < end:
      return i
  return len(schedule) - 1


def _status_code(e: BaseException) -> str | None:
  code = getattr(e, "code", None)
  if not callable(code):
    return None
  try:
    c = code()
  except Exception:  # pylint: disable=broad-except
    return None
  if c is None:
    return None
  return getattr(c, "name", None) or str(c)


def _error_message(e: BaseException) -> str:
  details = getattr(e, "details", None)
  if callable(details):
    try:
      msg = details()
    except Exception:  # pylint: disable=broad-except
      msg = None
    if msg:
      return str(msg)
  return str(e) or type(e).__name__


async def run_workload(
    backend: Backend,
    items: Sequence[WorkItem],
    *,
    rate: float | None = None,
    concurrency: int | None = None,
    sampling: dict[str, Any] | None = None,
    seed: int = 0,
    on_record: Callable[[RequestRecord], None] | None = None,
    progress: bool = True,
    closed_loop: bool = True,
    arrival_times: Sequence[float] | None = None,
) -> list[RequestRecord]:
  """Sends ``items`` to ``backend`` and records what came back.

  Args:
    backend: see ``Backend``.
    items: the workload, in planned send order.
    rate: offered load in requests/s (Poisson arrivals, seeded by ``seed``);
      None or inf sends everything at once.
    concurrency: if set, at most this many requests in flight; a request
      waiting for a slot is sent (and its TTFT clock starts) when it gets one.
      With ``rate`` None this is a fixed-concurrency (closed-loop) run.
    sampling: passed to every ``backend.stream`` call.
    seed: seeds the arrival process.
    on_record: called with each record as its request ends (completed,
      failed or cancelled), in completion order.
    progress: show a tqdm bar (it appears only on runs longer than 1 s).
    closed_loop: rebuild multiturn prompts from the generated history (see
      the module docstring); False sends the synthetic history as is.
    arrival_times: planned send offsets, one per item, instead of ``rate``
      (e.g. ``piecewise_arrival_times``).

  Returns:
    One record per request that was sent, in ``items`` order. Requests not
    yet sent when the run was cancelled have no record.
  """
  if concurrency is not None and concurrency < 1:
    raise ValueError(f"concurrency must be >= 1, got {concurrency}")
  sampling = dict(sampling or {})
  if arrival_times is not None:
    if len(arrival_times) != len(items):
      raise ValueError(f"{len(arrival_times)} arrival times for "
                       f"{len(items)} items")
    plan = np.asarray(arrival_times, dtype=np.float64)
  else:
    plan = poisson_arrival_times(len(items), rate, seed)
  sem = asyncio.Semaphore(concurrency) if concurrency else None
  loop = asyncio.get_running_loop()
  # (conversation_id, turn) -> future of (sent prompt ids, record or None).
  rounds: dict[tuple[str, int], asyncio.Future] = {
      (it.conversation_id, it.turn): loop.create_future()
      for it in items if it.conversation_id is not None
      and it.turn is not None}
  records: dict[int, RequestRecord] = {}
  bar = _progress_bar(len(items), progress)
  n_failed = 0
  t0 = time.perf_counter()

  def clock() -> float:
    return time.perf_counter() - t0

  async def send(i: int, item: WorkItem) -> RequestRecord:
    rec = RequestRecord(
        request_id=item.request_id, prompt_tokens=item.num_prompt_tokens or 0,
        output_tokens=0, send_time=clock(), max_tokens=item.max_tokens,
        conversation_id=item.conversation_id, turn=item.turn)
    records[i] = rec
    text: list[str] = []
    try:
      stream = backend.stream(item, sampling)
      if inspect.isawaitable(stream):
        stream = await stream
      closer = (contextlib.aclosing(stream) if hasattr(stream, "aclose")
                else contextlib.nullcontext(stream))
      async with closer:
        async for delta in stream:
          now = clock()
          if delta.token_ids:
            if rec.first_token_time is None:
              rec.first_token_time = now
            rec.token_times.extend([now] * len(delta.token_ids))
            rec.token_ids.extend(int(t) for t in delta.token_ids)
          if delta.text:
            text.append(delta.text)
          if delta.finish_reason is not None:
            rec.finish_reason = delta.finish_reason
          if delta.usage is not None:
            rec.usage = dict(delta.usage)
    except asyncio.CancelledError:
      rec.cancelled = True
      raise
    except Exception as e:  # pylint: disable=broad-except
      rec.error = _error_message(e)
      rec.status_code = _status_code(e)
    finally:
      rec.end_time = clock()
      rec.text = "".join(text)
      rec.output_tokens = len(rec.token_ids)
      if rec.usage and rec.usage.get("prompt_tokens") is not None:
        rec.prompt_tokens = int(rec.usage["prompt_tokens"])
      if rec.cancelled and on_record is not None:
        on_record(rec)
    return rec

  async def one(i: int, item: WorkItem) -> None:
    nonlocal n_failed
    key = (item.conversation_id, item.turn)
    sent_ids: list[int] | None = None
    rec: RequestRecord | None = None
    try:
      prev = rounds.get((item.conversation_id, (item.turn or 0) - 1))
      if item.turn and prev is not None:
        prev_ids, prev_rec = await prev
        if (closed_loop and prev_rec is not None and prev_ids is not None
            and prev_rec.status == COMPLETED
            and item.new_token_ids is not None):
          item = dataclasses.replace(
              item, prompt_token_ids=(prev_ids + prev_rec.token_ids +
                                      item.new_token_ids),
              num_prompt_tokens=None)
      sent_ids = item.prompt_token_ids
      if sem is not None:
        async with sem:
          rec = await send(i, item)
      else:
        rec = await send(i, item)
      if rec.error is not None:
        n_failed += 1
        bar.set_postfix(failed=n_failed, refresh=False)
      bar.update(1)
      if on_record is not None:
        on_record(rec)
    finally:
      fut = rounds.get(key)
      if fut is not None and not fut.done():
        fut.set_result((sent_ids, rec))

  tasks: list[asyncio.Task] = []
  try:
    for i, item in enumerate(items):
      delay = plan[i] - clock()
      if delay > 0:
        await asyncio.sleep(delay)
      tasks.append(asyncio.create_task(one(i, item)))
    await asyncio.gather(*tasks)
  except asyncio.CancelledError:
    # Interrupted: cancel what is in flight, keep what finished, and return.
    for t in tasks:
      t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
  except BaseException:
    for t in tasks:
      t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    raise
  finally:
    bar.close()
  return [records[i] for i in sorted(records)]


@dataclasses.dataclass
class SweepResult:
  """One offered rate of a sweep."""
  rate: float
  records: list[RequestRecord]
  summary: Summary


async def run_sweep(
    backend: Backend,
    items: Sequence[WorkItem],
    rates: Sequence[float],
    *,
    ttft_slo: float,
    tpot_slo: float,
    label: str = "",
    concurrency: int | None = None,
    sampling: dict[str, Any] | None = None,
    seed: int = 0,
    on_result: Callable[[SweepResult], None] | None = None,
    on_record: Callable[[float, RequestRecord], None] | None = None,
    progress: bool = True,
) -> list[SweepResult]:
  """Runs the same workload once per offered rate, in the order given.

  Each rate drains completely before the next starts, so runs do not overlap.
  If the sweep is cancelled (Ctrl-C), the current rate's partial result is
  included and the remaining rates are skipped.
  """
  results = []
  for rate in rates:
    cb = None if on_record is None else (
        lambda r, rate=rate: on_record(rate, r))
    records = await run_workload(
        backend, items, rate=rate, concurrency=concurrency, sampling=sampling,
        seed=seed, on_record=cb, progress=progress)
    summary = summarize(records, wall_duration(records), ttft_slo, tpot_slo,
                        label=label, rate=rate, concurrency=concurrency)
    res = SweepResult(rate, records, summary)
    results.append(res)
    if on_result is not None:
      on_result(res)
    task = asyncio.current_task()
    if task is not None and task.cancelling():
      break
  return results
