r"""BENCHMARKS.md rows from a ``run_goodput.sh`` runs folder.

  python tools/gpu/goodput_table.py RUNS_DIR [--preset chat]

RUNS_DIR holds ``CONFIG/PRESET/rate_R/{summary.json,results.jsonl}`` (the
tarball ``run_goodput.sh`` writes, unpacked). Per (config, rate): SLO
attainment, goodput, TTFT and TPOT p50/p90/p99, the prefill side of the KV
hand-off as a share of TTFT (``usage.kv_send_s / ttft``, mean over
requests), the KV paths the hand-offs took and the decode side's redeem
time (``usage.kv_receive_s``, mean).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path


def rows(runs: Path, preset: str):
  for cfg_dir in sorted(p for p in runs.iterdir() if (p / preset).is_dir()):
    rates = sorted((p for p in (cfg_dir / preset).glob("rate_*")),
                   key=lambda p: float(p.name[5:]))
    for rate_dir in rates:
      if not (rate_dir / "summary.json").exists():
        continue    # cut off by the run's time limit: no summary, no row
      s = json.loads((rate_dir / "summary.json").read_text())
      recs = [json.loads(line) for line in
              (rate_dir / "results.jsonl").read_text().splitlines()]
      shares, redeem, paths = [], [], collections.Counter()
      for r in recs:
        u = r.get("usage") or {}
        if not u.get("kv_path"):
          continue           # prefilled where it decodes: no hand-off
        paths[u["kv_path"]] += 1
        if u.get("kv_send_s") is not None and r.get("ttft"):
          shares.append(u["kv_send_s"] / r["ttft"])
        if u.get("kv_receive_s") is not None:
          redeem.append(u["kv_receive_s"])
      yield dict(
          config=cfg_dir.name, rate=s["rate"], attain=s["slo_attainment"],
          goodput=s["goodput"],
          ttft=[s["ttft"][k] * 1e3 for k in ("p50", "p90", "p99")],
          tpot=[s["tpot"][k] * 1e3 for k in ("p50", "p90", "p99")],
          share=sum(shares) / len(shares) if shares else None,
          paths=dict(paths),
          redeem_ms=sum(redeem) / len(redeem) * 1e3 if redeem else None)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("runs", type=Path)
  ap.add_argument("--preset", default="chat")
  args = ap.parse_args()
  print("| preset | config | rate | attainment | goodput req/s | TTFT p50 / "
        "p90 / p99 ms | TPOT p50 / p90 / p99 ms | hand-off share of TTFT | "
        "KV path | decode-side redeem ms |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows(args.runs, args.preset):
    paths = (", ".join(f"{k} {v}" for k, v in r["paths"].items())
             or "local prefill")
    share = "-" if r["share"] is None else f"{r['share']:.2%}"
    redeem = "-" if r["redeem_ms"] is None else f"{r['redeem_ms']:.1f}"
    ttft = " / ".join(f"{x:.0f}" for x in r["ttft"])
    tpot = " / ".join(f"{x:.1f}" for x in r["tpot"])
    print(f"| {args.preset} | {r['config']} | {r['rate']:g} | "
          f"{r['attain']:.1%} | {r['goodput']:.2f} | {ttft} | {tpot} | "
          f"{share} | {paths} | {redeem} |")

if __name__ == "__main__":
  main()
