r"""Where one stream's time to first token goes, hop by hop.

``ttft_hops.patch`` adds timestamp marks along a request's way (client
send, router arrival and send, the worker's handler and submit, the
engine's prefill and first token, each way back); each process appends
``<request id> <mark> <time.perf_counter()>`` lines to
``$PDJAX_TRACE.<pid>`` (perf_counter is CLOCK_MONOTONIC on Linux: one
clock for every process of the host). This reads those files and prints
the median, mean and p90 of each step between consecutive marks, in the
order a request meets them, over the last ``--last`` requests (the timed
ones: warm-up requests come first).

  python3 tools/gpu/ttft_hops.py $OUT/trace/2048_coloc
"""
import argparse
import collections
import glob

import numpy as np


def read(prefix: str) -> list[dict[str, float]]:
  """Per request (in file order of first appearance): mark -> time (s)."""
  marks: dict[str, dict[str, float]] = collections.defaultdict(dict)
  for path in sorted(glob.glob(prefix + ".*")):
    with open(path) as f:
      for line in f:
        rid, mark, t = line.split()
        marks[rid].setdefault(mark, float(t))
  return [m for m in marks.values() if "C_send" in m and "C_recv" in m]


def table(requests: list[dict[str, float]]) -> list[str]:
  common = set.intersection(*(set(r) for r in requests))
  order = sorted(common, key=lambda k: np.median(
      [r[k] - r["C_send"] for r in requests]))
  lines = [f"{len(requests)} requests; marks: {' '.join(order)}"]
  for a, b in zip(order, order[1:]):
    ms = np.array([(r[b] - r[a]) * 1e3 for r in requests])
    lines.append(f"  {a:>12} -> {b:<12} p50 {np.median(ms):7.3f}  "
                 f"mean {ms.mean():7.3f}  p90 {np.percentile(ms, 90):7.3f}")
  total = np.array([(r["C_recv"] - r["C_send"]) * 1e3 for r in requests])
  lines.append(f"  client send -> first token p50 {np.median(total):.3f}")
  return lines


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("prefix", help="the $PDJAX_TRACE the processes wrote to")
  ap.add_argument("--last", type=int, default=20,
                  help="the last this many requests (the timed ones)")
  args = ap.parse_args()
  requests = read(args.prefix)[-args.last:]
  if not requests:
    raise SystemExit(f"no request with both client marks in {args.prefix}.*")
  print("\n".join(table(requests)))


if __name__ == "__main__":
  main()
