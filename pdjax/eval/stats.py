"""Per-request records and the latency / SLO / goodput statistics over them.

Every number is computed from client-side timestamps (``time.perf_counter()``
at the driver), so a disaggregated and a colocated deployment are measured the
same way, queueing and the prefill->decode KV hand-off included. The
definitions follow the field's usage (vLLM's ``benchmark_serving``, DistServe)
and are pinned down here because small differences (ITL per token or per
message? failed requests in the SLO denominator?) change the headline numbers:

* TTFT: send time -> arrival of the first token.
* TPOT: (last token time - first token time) / (output tokens - 1); ``None``
  for outputs of fewer than two tokens.
* ITL: every gap between consecutive token *arrivals*. A stream message may
  carry several tokens; they all get that message's arrival time, so the gap
  since the previous message is attributed to the first token of the message
  and the other tokens of the message get a gap of 0. This keeps exactly one
  ITL per token after the first (``output_tokens - 1`` values per request) and
  makes the ITL mean equal to TPOT, while the zeros show up honestly in the
  distribution (a server that batches its stream messages has a bimodal ITL).
* E2E latency: send time -> arrival of the last token.
* SLO attainment: the share of requests with TTFT <= ``ttft_slo`` and
  TPOT <= ``tpot_slo``. A request with one output token meets the TPOT part
  by definition; a failed request, or a completed one that produced no token,
  meets neither. The denominator is completed + failed requests: requests
  cancelled by the driver (Ctrl-C) were never judged and are left out.
* Goodput (DistServe): SLO-meeting requests per second of wall time at one
  offered rate. Over a rate sweep, the "max goodput rate" is the highest
  offered rate whose attainment is >= the target (90% by default).
* Latency distributions (TTFT/TPOT/ITL/E2E) cover completed requests only; a
  failed request's partial timings would bias them.
* Speculative decoding: the server's drafted and accepted token counts
  (its usage's ``spec_draft_tokens`` / ``spec_accepted_tokens``), summed
  over completed requests; the acceptance rate is accepted / drafted.
* Percentiles use linear interpolation between closest ranks (numpy's default
  ``method="linear"``): p50 of [1, 2, 3, 4] is 2.5.

Times are in seconds everywhere here; only ``format_table`` prints ms.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np

PERCENTILES = (50, 90, 99)

# Record statuses.
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"


@dataclasses.dataclass
class RequestRecord:
  """What the driver observed for one request.

  ``token_times`` is authoritative: one arrival time per output token, tokens
  delivered in one stream message sharing that message's time. Times are
  ``time.perf_counter()`` values shifted so that 0 is the start of the run.
  """
  request_id: str
  prompt_tokens: int
  output_tokens: int
  send_time: float
  first_token_time: float | None = None
  token_times: list[float] = dataclasses.field(default_factory=list)
  finish_reason: str | None = None
  error: str | None = None
  # gRPC status code name (e.g. "UNAVAILABLE") when the failure carried one.
  status_code: str | None = None
  text: str = ""
  token_ids: list[int] = dataclasses.field(default_factory=list)
  # When the stream ended (success, failure or cancellation).
  end_time: float | None = None
  # Set by the driver for requests in flight when the run was interrupted.
  cancelled: bool = False
  max_tokens: int | None = None
  conversation_id: str | None = None
  turn: int | None = None
  # The server's usage report, verbatim, when it sent one.
  usage: dict[str, Any] | None = None

  @property
  def status(self) -> str:
    if self.cancelled:
      return CANCELLED
    if self.error is not None:
      return FAILED
    return COMPLETED

  @property
  def ttft(self) -> float | None:
    if self.first_token_time is None:
      return None
    return self.first_token_time - self.send_time

  @property
  def tpot(self) -> float | None:
    n = len(self.token_times)
    if n < 2:
      return None
    return (self.token_times[-1] - self.token_times[0]) / (n - 1)

  @property
  def itls(self) -> list[float]:
    """Gaps between consecutive token arrivals (0 within one message)."""
    t = self.token_times
    return [t[i] - t[i - 1] for i in range(1, len(t))]

  @property
  def e2e(self) -> float | None:
    if not self.token_times:
      return None
    return self.token_times[-1] - self.send_time

  def meets_slo(self, ttft_slo: float, tpot_slo: float) -> bool:
    """Both SLOs met; 1-token outputs meet TPOT, failures meet nothing."""
    if self.status != COMPLETED:
      return False
    ttft = self.ttft
    if ttft is None or ttft > ttft_slo:
      return False
    tpot = self.tpot
    return tpot is None or tpot <= tpot_slo

  def to_dict(self) -> dict[str, Any]:
    """All stored fields plus the derived metrics (for results.jsonl)."""
    d = dataclasses.asdict(self)
    d.update(status=self.status, ttft=self.ttft, tpot=self.tpot,
             e2e=self.e2e, itls=self.itls)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> RequestRecord:
    """Inverse of ``to_dict``; derived and unknown keys are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass
class Distribution:
  """mean / percentiles of one latency metric, in seconds (None if empty)."""
  count: int = 0
  mean: float | None = None
  p50: float | None = None
  p90: float | None = None
  p99: float | None = None
  min: float | None = None
  max: float | None = None

  @classmethod
  def of(cls, values: Iterable[float]) -> Distribution:
    a = np.asarray(list(values), dtype=np.float64)
    if a.size == 0:
      return cls()
    p50, p90, p99 = np.percentile(a, PERCENTILES, method="linear")
    return cls(count=int(a.size), mean=float(a.mean()), p50=float(p50),
               p90=float(p90), p99=float(p99), min=float(a.min()),
               max=float(a.max()))


@dataclasses.dataclass
class Summary:
  """The aggregate of one run (one offered rate or concurrency)."""
  label: str
  rate: float | None  # offered request rate; inf = all at once; None = n/a
  concurrency: int | None
  num_requests: int
  completed: int
  failed: int
  cancelled: int
  duration_s: float
  total_input_tokens: int
  total_output_tokens: int
  request_throughput: float | None
  input_token_throughput: float | None
  output_token_throughput: float | None
  ttft: Distribution
  tpot: Distribution
  itl: Distribution
  e2e: Distribution
  ttft_slo: float
  tpot_slo: float
  slo_met: int
  slo_attainment: float | None
  goodput: float | None
  # status code name (or "error" when none) -> count, over failed requests.
  errors: dict[str, int] = dataclasses.field(default_factory=dict)
  # Where the server says TTFT went (its usage's ``ttft_stages``): stage ->
  # distribution over the completed requests that reported it; empty for
  # servers that report no stages.
  ttft_stages: dict[str, Distribution] = dataclasses.field(
      default_factory=dict)
  # Speculative decoding, as the server reports it (0 and 0 for servers and
  # pools that do not speculate).
  spec_draft_tokens: int = 0
  spec_accepted_tokens: int = 0

  @property
  def spec_acceptance(self) -> float | None:
    """Accepted / drafted tokens; None when nothing was drafted."""
    if not self.spec_draft_tokens:
      return None
    return self.spec_accepted_tokens / self.spec_draft_tokens

  def to_dict(self) -> dict[str, Any]:
    return to_jsonable(dataclasses.asdict(self))

  def to_json(self, indent: int | None = 2) -> str:
    """JSON text; non-finite floats (an ``inf`` rate) are written as strings."""
    return json.dumps(self.to_dict(), indent=indent)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> Summary:
    d = dict(d)
    for name in ("ttft", "tpot", "itl", "e2e"):
      d[name] = Distribution(**d.get(name) or {})
    d["ttft_stages"] = {k: Distribution(**v) for k, v in
                        (d.get("ttft_stages") or {}).items()}
    for name in ("rate", "ttft_slo", "tpot_slo"):
      if isinstance(d.get(name), str):
        d[name] = float(d[name])
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def to_jsonable(obj: Any) -> Any:
  """``obj`` with non-finite floats as strings, for strict JSON."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return str(obj)  # "inf", "-inf", "nan": float() reads them back
  if isinstance(obj, dict):
    return {k: to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  return obj


def wall_duration(records: Sequence[RequestRecord]) -> float:
  """First send to last stream end over ``records`` (0 if there are none)."""
  if not records:
    return 0.0
  start = min(r.send_time for r in records)
  end = max(r.end_time if r.end_time is not None else
            (r.token_times[-1] if r.token_times else r.send_time)
            for r in records)
  return max(0.0, end - start)


def summarize(records: Sequence[RequestRecord], duration_s: float,
              ttft_slo: float, tpot_slo: float, *, label: str = "",
              rate: float | None = None,
              concurrency: int | None = None) -> Summary:
  """Aggregates one run. See the module docstring for every definition.

  Args:
    records: all requests the run sent (completed, failed and cancelled).
    duration_s: wall time of the run, the denominator of every throughput and
      of goodput (``wall_duration(records)`` when the caller has nothing
      better). Throughputs are None when it is not positive.
    ttft_slo: TTFT objective, seconds.
    tpot_slo: TPOT objective, seconds.
    label: deployment name carried into plots.
    rate: offered request rate (req/s) of the run, for sweeps.
    concurrency: in-flight cap of the run, if any.
  """
  if duration_s < 0:
    raise ValueError(f"duration_s must be >= 0, got {duration_s}")
  done = [r for r in records if r.status == COMPLETED]
  failed = [r for r in records if r.status == FAILED]
  n_cancelled = sum(r.status == CANCELLED for r in records)
  judged = len(done) + len(failed)
  met = sum(r.meets_slo(ttft_slo, tpot_slo) for r in done)
  errors: dict[str, int] = {}
  for r in failed:
    key = r.status_code or "error"
    errors[key] = errors.get(key, 0) + 1
  in_tok = sum(r.prompt_tokens for r in done)
  spec = [(r.usage or {}) for r in done]
  out_tok = sum(len(r.token_times) for r in done)

  def per_s(x: float) -> float | None:
    return x / duration_s if duration_s > 0 else None

  return Summary(
      label=label, rate=rate, concurrency=concurrency,
      num_requests=len(records), completed=len(done), failed=len(failed),
      cancelled=n_cancelled, duration_s=duration_s,
      total_input_tokens=in_tok, total_output_tokens=out_tok,
      request_throughput=per_s(len(done)),
      input_token_throughput=per_s(in_tok),
      output_token_throughput=per_s(out_tok),
      ttft=Distribution.of(r.ttft for r in done if r.ttft is not None),
      tpot=Distribution.of(r.tpot for r in done if r.tpot is not None),
      itl=Distribution.of(x for r in done for x in r.itls),
      e2e=Distribution.of(r.e2e for r in done if r.e2e is not None),
      ttft_slo=ttft_slo, tpot_slo=tpot_slo, slo_met=met,
      slo_attainment=met / judged if judged else None,
      goodput=per_s(met), errors=errors, ttft_stages=ttft_stages(done),
      spec_draft_tokens=sum(int(u.get("spec_draft_tokens") or 0)
                            for u in spec),
      spec_accepted_tokens=sum(int(u.get("spec_accepted_tokens") or 0)
                               for u in spec))


def ttft_stages(records: Iterable[RequestRecord]) -> dict[str, Distribution]:
  """Per stage of the server's TTFT breakdown (``usage["ttft_stages"]``,
  seconds), its distribution over the records that report one, in the
  order the server lists the stages."""
  values: dict[str, list[float]] = {}
  for r in records:
    for stage, v in ((r.usage or {}).get("ttft_stages") or {}).items():
      values.setdefault(stage, []).append(float(v))
  return {stage: Distribution.of(v) for stage, v in values.items()}


class _SweepPoint(Protocol):
  rate: float | None
  slo_attainment: float | None


def max_goodput_rate(points: Iterable[_SweepPoint],
                     attainment_target: float = 0.9) -> float | None:
  """Highest offered rate whose SLO attainment is >= ``attainment_target``.

  Taken literally over the measured points (a passing rate above a failing
  one still counts: sweeps are noisy and the caller sees both on the chart).
  Points without a rate or attainment are skipped; None if no point passes.
  """
  best = None
  for p in points:
    if p.rate is None or p.slo_attainment is None:
      continue
    if p.slo_attainment >= attainment_target and (best is None or
                                                  p.rate > best):
      best = p.rate
  return best


def _ms(x: float | None) -> str:
  return "-" if x is None else f"{x * 1e3:.2f}"


def _num(x: float | None, fmt: str = ".2f") -> str:
  return "-" if x is None else format(x, fmt)


def format_table(s: Summary) -> str:
  """The human-readable report printed at the end of a run."""
  w = 44
  lines = [f" {s.label or 'run'} ".center(w + 16, "=")]

  def row(name: str, value: str) -> None:
    lines.append(f"{name + ':':<{w}}{value:>16}")

  if s.rate is not None:
    row("Offered rate (req/s)", _num(s.rate))
  if s.concurrency is not None:
    row("Max concurrency", str(s.concurrency))
  row("Requests completed", str(s.completed))
  row("Requests failed", str(s.failed))
  if s.cancelled:
    row("Requests cancelled (interrupted)", str(s.cancelled))
  row("Duration (s)", _num(s.duration_s))
  row("Total input tokens", str(s.total_input_tokens))
  row("Total output tokens", str(s.total_output_tokens))
  row("Request throughput (req/s)", _num(s.request_throughput))
  row("Input token throughput (tok/s)", _num(s.input_token_throughput))
  row("Output token throughput (tok/s)", _num(s.output_token_throughput))
  row(f"SLO attainment (TTFT<={s.ttft_slo * 1e3:g}ms, "
      f"TPOT<={s.tpot_slo * 1e3:g}ms)",
      "-" if s.slo_attainment is None else f"{100 * s.slo_attainment:.1f}%")
  row("Goodput (req/s)", _num(s.goodput))
  if s.spec_acceptance is not None:
    row("Spec. decoding accepted/drafted", f"{s.spec_accepted_tokens}/"
        f"{s.spec_draft_tokens}")
    row("Spec. decoding acceptance rate", f"{100 * s.spec_acceptance:.1f}%")
  lines.append(" Latency (ms) ".center(w + 16, "-"))
  lines.append(f"{'':<8}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}"
               f"{'n':>12}")
  for name, d in (("TTFT", s.ttft), ("TPOT", s.tpot), ("ITL", s.itl),
                  ("E2E", s.e2e)):
    lines.append(f"{name:<8}{_ms(d.mean):>10}{_ms(d.p50):>10}"
                 f"{_ms(d.p90):>10}{_ms(d.p99):>10}{d.count:>12}")
  if s.ttft_stages:
    lines.append(" TTFT by stage, server-side (ms) ".center(w + 16, "-"))
    lines.append(f"{'':<12}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}"
                 f"{'n':>8}")
    for name, d in s.ttft_stages.items():
      lines.append(f"{name:<12}{_ms(d.mean):>10}{_ms(d.p50):>10}"
                   f"{_ms(d.p90):>10}{_ms(d.p99):>10}{d.count:>8}")
  if s.errors:
    lines.append(" Errors ".center(w + 16, "-"))
    for code, n in sorted(s.errors.items()):
      row(code, str(n))
  lines.append("=" * (w + 16))
  return "\n".join(lines)


def format_sweep_table(points: Sequence[Summary],
                       attainment_target: float = 0.9) -> str:
  """One line per offered rate, and the max goodput rate under it."""
  lines = [f"{'rate':>10}{'attain':>10}{'goodput':>10}{'ttft p90':>12}"
           f"{'tpot p90':>12}{'failed':>8}"]
  for p in sorted(points, key=lambda p: (p.rate is None, p.rate or 0.0)):
    att = ("-" if p.slo_attainment is None else
           f"{100 * p.slo_attainment:.1f}%")
    lines.append(f"{_num(p.rate):>10}{att:>10}{_num(p.goodput):>10}"
                 f"{_ms(p.ttft.p90):>12}{_ms(p.tpot.p90):>12}{p.failed:>8}")
  best = max_goodput_rate(points, attainment_target)
  lines.append(f"max goodput rate (attainment >= "
               f"{100 * attainment_target:.0f}%): "
               f"{'none' if best is None else f'{best:.2f} req/s'}")
  return "\n".join(lines)
