"""PNG charts of batch-eval results: latency CDFs and rate sweeps.

The charts exist to compare deployments, so every function takes several
labelled runs and draws one line per label on shared axes ("disaggregated"
next to "colocated"). Figures are built on ``matplotlib.figure.Figure`` with
the Agg canvas directly, not through ``pyplot``: no global backend switch, no
display needed, and nothing leaks between calls in a long-lived process.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pdjax.eval.stats import COMPLETED, RequestRecord, Summary, max_goodput_rate


def _figure(**kwargs):
  """A new Figure; matplotlib is imported here, not with the module: it is
  the ``eval`` extra, not a server dependency."""
  try:
    from matplotlib.figure import Figure
  except ImportError:
    from pdjax.eval.load import eval_extra_missing
    raise eval_extra_missing("matplotlib") from None
  return Figure(**kwargs)


def _save(fig, path: str | Path) -> Path:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=120)
  return path


def _ecdf(values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  x = np.sort(np.asarray(values, dtype=np.float64))
  return x, np.arange(1, x.size + 1) / x.size


def plot_latency_cdfs(runs: Mapping[str, Sequence[RequestRecord]],
                      path: str | Path, *, ttft_slo: float | None = None,
                      tpot_slo: float | None = None,
                      title: str | None = None) -> Path:
  """TTFT, TPOT and ITL CDFs (ms), one line per run label.

  Only completed requests are drawn; SLOs, when given, are dashed verticals.
  """
  fig = _figure(figsize=(15, 4.5))
  fig.subplots_adjust(left=0.05, right=0.98, bottom=0.13, top=0.86,
                      wspace=0.22)
  axes = fig.subplots(1, 3)
  metrics = (("TTFT", lambda r: [r.ttft] if r.ttft is not None else [],
              ttft_slo),
             ("TPOT", lambda r: [r.tpot] if r.tpot is not None else [],
              tpot_slo),
             ("ITL", lambda r: r.itls, None))
  for ax, (name, get, slo) in zip(axes, metrics):
    for label, records in runs.items():
      vals = [v for r in records if r.status == COMPLETED for v in get(r)]
      if vals:
        x, y = _ecdf(vals)
        ax.step(x * 1e3, y, where="post", label=f"{label} (n={len(vals)})")
    if slo is not None and math.isfinite(slo):
      ax.axvline(slo * 1e3, color="gray", linestyle="--", linewidth=1,
                 label=f"SLO {slo * 1e3:g} ms")
    ax.set_xlabel(f"{name} (ms)")
    ax.set_ylabel("fraction of " + ("tokens" if name == "ITL" else
                                    "requests"))
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.set_title(f"{name} CDF")
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8, loc="lower right")
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def _plottable(points: Sequence[Summary], attr: str) -> list[Summary]:
  pts = [p for p in points if p.rate is not None and math.isfinite(p.rate)
         and getattr(p, attr) is not None]
  return sorted(pts, key=lambda p: p.rate)


def plot_sweep(sweeps: Mapping[str, Sequence[Summary]], path: str | Path, *,
               attainment_target: float = 0.9,
               title: str | None = None) -> Path:
  """SLO attainment and goodput vs offered request rate, one line per label.

  The attainment panel draws the target as a horizontal line and marks each
  label's max goodput rate with a dotted vertical in the label's colour (and
  names it in the legend); the
  goodput panel draws goodput = offered rate as a grey reference. Points with
  an infinite or missing rate are skipped.
  """
  fig = _figure(figsize=(12, 4.5))
  fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.86,
                      wspace=0.22)
  ax_att, ax_gp = fig.subplots(1, 2)
  max_rate = 0.0
  for label, points in sweeps.items():
    att = _plottable(points, "slo_attainment")
    line = None
    if att:
      best = max_goodput_rate(att, attainment_target)
      (line,) = ax_att.plot(
          [p.rate for p in att], [100 * p.slo_attainment for p in att],
          marker="o", label=f"{label} (max goodput rate: "
          f"{'none' if best is None else f'{best:g} req/s'})")
      max_rate = max(max_rate, att[-1].rate)
      if best is not None:
        ax_att.axvline(best, color=line.get_color(), linestyle=":",
                       linewidth=1.2)
    gp = _plottable(points, "goodput")
    if gp:
      kw = {"color": line.get_color()} if line is not None else {}
      ax_gp.plot([p.rate for p in gp], [p.goodput for p in gp], marker="o",
                 label=label, **kw)
      max_rate = max(max_rate, gp[-1].rate)
  ax_att.axhline(100 * attainment_target, color="red", linestyle="--",
                 linewidth=1, label=f"{100 * attainment_target:g}% target")
  ax_att.set_ylim(0, 102)
  ax_att.set_xlabel("request rate (req/s)")
  ax_att.set_ylabel("SLO attainment (%)")
  ax_att.set_title("SLO attainment vs rate")
  if max_rate > 0:
    ax_gp.plot([0, max_rate], [0, max_rate], color="gray", linestyle="--",
               linewidth=1, label="goodput = rate")
  ax_gp.set_xlabel("request rate (req/s)")
  ax_gp.set_ylabel("goodput (req/s meeting both SLOs)")
  ax_gp.set_title("goodput vs rate")
  for ax in (ax_att, ax_gp):
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  ax_gp.set_ylim(bottom=0)
  if title:
    fig.suptitle(title)
  return _save(fig, path)
