"""KV reuse measured end to end: a deployment per scenario, the batch-eval
driver's ``multiturn`` (or ``shared-prefix``) preset through it, and the
workers' own counters.

  python tools/bench_prefix_cache.py --config=test --platform=cpu \\
      --preset=multiturn --num_requests=48 --out=/tmp/prefix.json

Scenarios (``--scenarios``, comma list):
  off        no prefix caching anywhere
  prefill    the prefill worker's block store only
  both       prefill store + decode-side block reuse (only missing blocks
             are sent)
  kv0, kv1   2 prefill workers with both caches; router KV-aware weight 0
             (load only) vs 1 (Dynamo-style overlap scoring)
  share0     kv0 with the caches shared (--kv_fetch=auto): a prefill worker
             fetches the blocks the router says a peer holds instead of
             computing them, when the measured rates say it pays
  store0     share0 plus a KV store process the workers write through to
             (or, --kv_store_write=evict, evict to) and fetch from
             (python -m pdjax.launch.kvstore)
Reported per scenario: TTFT p50/p90, and apart for the requests a cache
served part of (their usage's ``cached_prompt_tokens``) and the others
(and, with ``off`` among the scenarios, those requests' TTFT against the
same requests uncached: all of them, and those with half the prompt or
more cached),
prompt tokens computed vs served from a cache (prefill side), KV bytes
sent vs skipped (decode-side reuse), KV bytes fetched from peers and the
store and written through to it (shared KV), and the prefill workers that
served.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = flags.DEFINE_string("config", "test", "Deployment config.")
PLATFORM = flags.DEFINE_enum("platform", "cpu", ["cpu", "gpu"], "Where.")
CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model override.")
PRESET = flags.DEFINE_string("preset", "multiturn", "Batch-eval preset.")
NUM = flags.DEFINE_integer("num_requests", 48, "Requests per scenario.")
RATE = flags.DEFINE_float("rate", 8.0, "Offered load (req/s).")
LENGTH_SCALE = flags.DEFINE_float("length_scale", 0.1,
                                  "Preset length scale (CPU: small).")
MAX_LEN = flags.DEFINE_integer("max_model_len", 256, "Prompt + output cap.")
VOCAB = flags.DEFINE_integer("vocab_size", 512, "Synthetic ids below this.")
SCENARIOS = flags.DEFINE_list("scenarios", ["off", "prefill", "both", "kv0",
                                            "kv1"], "What to run.")
CACHE_PAGES = flags.DEFINE_integer("cache_pages", 256,
                                   "Prefill store pages when on.")
OUT = flags.DEFINE_string("out", None, "JSON results file.")

SCENARIO_ARGS = {
    "off": dict(num_prefill=1, worker=[], router=[]),
    "prefill": dict(num_prefill=1, worker=["--prefix_cache_pages={pages}"],
                    router=[]),
    "both": dict(num_prefill=1, worker=["--prefix_cache_pages={pages}",
                                        "--prefix_caching"], router=[]),
    "kv0": dict(num_prefill=2, worker=["--prefix_cache_pages={pages}",
                                       "--prefix_caching"],
                router=["--kv_overlap_weight=0"]),
    "kv1": dict(num_prefill=2, worker=["--prefix_cache_pages={pages}",
                                       "--prefix_caching"],
                router=["--kv_overlap_weight=1"]),
    "share0": dict(num_prefill=2, worker=["--prefix_cache_pages={pages}",
                                          "--prefix_caching",
                                          "--kv_fetch={fetch}"],
                   router=["--kv_overlap_weight=0"]),
    "store0": dict(num_prefill=2, worker=["--prefix_cache_pages={pages}",
                                          "--prefix_caching",
                                          "--kv_fetch={fetch}",
                                          "--kv_store_write={write}"],
                   router=["--kv_overlap_weight=0"], kv_store=True),
}
WRITE = flags.DEFINE_enum("kv_store_write", "through", ["through", "evict"],
                          "When store0's workers write blocks to the store.")
FETCH = flags.DEFINE_enum("kv_fetch", "auto", ["auto", "always"],
                          "Fetch policy of the shared-KV scenarios.")
TRANSPORT = flags.DEFINE_enum("kv_transport", None, ["grpc", "device"],
                              "KV transport (default: the deployment's).")


def _metric_sum(text: str, name: str, label: str = "") -> float:
  total = 0.0
  for line in text.splitlines():
    if line.startswith(name) and (not label or label in line) and (
        not line.startswith("#")):
      total += float(line.rsplit(" ", 1)[1])
  return total


def _gc_full(text: str) -> dict[str, float]:
  """A worker's full (generation 2) collections so far: count, seconds."""
  return {"count": _metric_sum(text, "pdjax_gc_pause_seconds_count",
                               'generation="2"'),
          "seconds": _metric_sum(text, "pdjax_gc_pause_seconds_sum",
                                 'generation="2"')}


def _scrape(proc) -> str:
  import urllib.request
  port = proc.metrics_port
  with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                              timeout=10) as r:
    return r.read().decode()


def run_scenario(name: str, work: Path) -> dict:
  from pdjax.launch.cluster import LocalCluster, launch
  spec = SCENARIO_ARGS[name]
  worker = [f.format(pages=CACHE_PAGES.value, fetch=FETCH.value,
                     write=WRITE.value) for f in spec["worker"]]
  cluster = LocalCluster(work / name, PLATFORM.value)
  try:
    address = launch(cluster, config=CONFIG.value,
                     checkpoint=CHECKPOINT.value,
                     kv_transport=TRANSPORT.value,
                     num_prefill=spec["num_prefill"], num_decode=1,
                     worker_flags=["--metrics_port=0", *worker],
                     router_flags=["--metrics_port=0", *spec["router"]],
                     kv_store=spec.get("kv_store", False))
    out = work / name / "eval"
    prefill = [p for p in cluster.procs if p.name.startswith("prefill")]
    decode = [p for p in cluster.procs if p.name.startswith("decode")]
    # Full collections before the requests (start-up and warm-up ones,
    # the start-up heap's freeze among them), taken off the counts after.
    gc_before = {p.name: _gc_full(_scrape(p)) for p in [*prefill, *decode]}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "batch_eval.py"),
         f"--target={address}", f"--preset={PRESET.value}",
         f"--num_requests={NUM.value}", f"--rate={RATE.value}",
         f"--length_scale={LENGTH_SCALE.value}",
         f"--max_model_len={MAX_LEN.value}",
         f"--vocab_size={VOCAB.value}", f"--label={name}",
         f"--out_dir={out}", "--noprogress"],
        capture_output=True, text=True, timeout=1800)
    if proc.returncode:
      raise RuntimeError(f"batch_eval failed: {proc.stderr[-2000:]}")
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    time.sleep(0.6)   # the workers' gauges follow their counters in 0.25 s
    ptexts = [_scrape(p) for p in prefill]
    dtexts = [_scrape(p) for p in decode]
    records = [json.loads(l) for l in
               (out / "results.jsonl").read_text().splitlines()]
    served = {}
    for r in records:
      w = (r.get("usage") or {}).get("prefill_worker", "")
      served[w] = served.get(w, 0) + 1
    return {
        "scenario": name, "wall_s": wall,
        "ttft_p50_ms": summary["ttft"]["p50"] * 1e3,
        "ttft_p90_ms": summary["ttft"]["p90"] * 1e3,
        # Which requests set the tail: those a cache served part of (the
        # buffered path) or those computed whole.
        **_ttft_by_cache(records),
        "completed": summary["completed"],
        "prompt_tokens_computed": sum(_metric_sum(
            t, "pdjax_prefill_tokens_total", 'source="computed"')
                                      for t in ptexts),
        "prompt_tokens_cached": sum(_metric_sum(
            t, "pdjax_prefill_tokens_total", 'source="cache"')
                                    for t in ptexts),
        "kv_bytes_sent": sum(_metric_sum(
            t, "pdjax_kv_transfer_bytes_total", 'direction="sent"')
                             for t in ptexts),
        "kv_bytes_skipped": sum(_metric_sum(
            t, "pdjax_kv_transfer_skipped_bytes_total") for t in ptexts),
        # Shared KV: blocks fetched (from peers, from the store; the
        # peers' pulled device to device, by CUDA IPC or
        # jax.experimental.transfer), their bytes, and the bytes written
        # through to the store.
        **{f"kv_{stat}": sum(_metric_sum(
            t, "pdjax_prefix_cache_blocks",
            f'pool="prefill_remote",stat="{stat}"') for t in ptexts)
           for stat in ("peer_blocks", "store_blocks", "pulled_blocks",
                        "pulled_cuda_ipc_blocks", "pulled_transfer_blocks",
                        "fetched_bytes",
                        "declined_blocks", "published_bytes")},
        "decode_cache_hits": sum(_metric_sum(
            t, "pdjax_prefix_cache_blocks",
            'pool="decode",stat="hits"') for t in dtexts),
        "prefill_workers_served": served,
        # Full collections of each worker's garbage collector while the
        # requests ran (count and seconds stopped): a pause of tens of ms
        # lands on whatever request the worker was serving.
        "gc_full_collections": {
            p.name: {k: v - gc_before[p.name][k]
                     for k, v in _gc_full(t).items()}
            for p, t in [*zip(prefill, ptexts), *zip(decode, dtexts)]},
        # Per request, in the workload's order (the same in every
        # scenario: one seed), for pairing a scenario's requests with the
        # same ones uncached (``_paired``).
        # With when it was sent (s from the first) and where its TTFT went
        # (the router's stages, ms).
        "requests": [{
            "prompt_tokens": r["prompt_tokens"],
            "cached_prompt_tokens": int((r.get("usage") or {}).get(
                "cached_prompt_tokens") or 0),
            "ttft_ms": (r["ttft"] * 1e3 if r.get("ttft") is not None
                        and r.get("status") == "completed" else None),
            "send_s": r.get("send_time"),
            "stages_ms": {k: v * 1e3 for k, v in ((r.get("usage") or {}).get(
                "ttft_stages") or {}).items()}}
                     for r in records],
    }
  finally:
    cluster.stop()


def _ttft_by_cache(records) -> dict:
  """TTFT p50/p90 (ms) and count of the completed requests whose usage
  reports cached prompt tokens, and of the others."""
  import numpy as np
  out = {}
  for key, hit in (("cached", True), ("uncached", False)):
    ttft = [r["ttft"] * 1e3 for r in records
            if r.get("ttft") is not None and r.get("status") == "completed"
            and bool((r.get("usage") or {}).get("cached_prompt_tokens"))
            == hit]
    out[f"{key}_requests"] = len(ttft)
    out[f"ttft_p50_{key}_ms"] = (float(np.percentile(ttft, 50)) if ttft
                                 else None)
    out[f"ttft_p90_{key}_ms"] = (float(np.percentile(ttft, 90)) if ttft
                                 else None)
  return out


def _paired(row: dict, off: dict) -> dict:
  """TTFT of ``row``'s requests that a cache served part of against the
  same requests in the scenario without caching (``off``), p50 and p90,
  for those with any prompt cached and for those with half or more."""
  import numpy as np
  out = {}
  for key, least in (("cached", 1e-9), ("half_cached", 0.5)):
    pairs = [(a["ttft_ms"], b["ttft_ms"])
             for a, b in zip(row["requests"], off["requests"])
             if a["ttft_ms"] is not None and b["ttft_ms"] is not None
             and a["cached_prompt_tokens"] >= least * a["prompt_tokens"]]
    out[f"{key}_pairs"] = len(pairs)
    for q in (50, 90):
      out[f"{key}_ttft_p{q}_ms"] = (float(np.percentile(
          [a for a, _ in pairs], q)) if pairs else None)
      out[f"{key}_ttft_p{q}_off_ms"] = (float(np.percentile(
          [b for _, b in pairs], q)) if pairs else None)
  return out


def main(argv) -> None:
  del argv
  work = Path(tempfile.mkdtemp(prefix="pdjax-prefix-"))
  rows = [run_scenario(s, work) for s in SCENARIOS.value]
  cols = ("scenario", "ttft_p50_ms", "ttft_p90_ms", "cached_requests",
          "ttft_p90_cached_ms", "ttft_p90_uncached_ms",
          "prompt_tokens_computed",
          "prompt_tokens_cached", "kv_bytes_sent", "kv_bytes_skipped",
          "kv_peer_blocks", "kv_store_blocks", "kv_pulled_blocks",
          "kv_pulled_cuda_ipc_blocks", "kv_pulled_transfer_blocks",
          "kv_fetched_bytes",
          "kv_declined_blocks", "kv_published_bytes", "decode_cache_hits")
  print(" | ".join(cols + ("requests per prefill worker",)))
  for r in rows:
    print(" | ".join(f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c])
                     for c in cols), "|", r["prefill_workers_served"])
  off = next((r for r in rows if r["scenario"] == "off"), None)
  if off is not None:
    print("the requests a cache served part of, TTFT (ms) against the same "
          "requests without caching:")
    for r in rows:
      if r is off:
        continue
      r["paired"] = p = _paired(r, off)
      for key in ("cached", "half_cached"):
        if p[f"{key}_pairs"]:
          print(f"  {r['scenario']}, {key} ({p[f'{key}_pairs']}): p50 "
                f"{p[f'{key}_ttft_p50_ms']:.1f} against "
                f"{p[f'{key}_ttft_p50_off_ms']:.1f}, p90 "
                f"{p[f'{key}_ttft_p90_ms']:.1f} against "
                f"{p[f'{key}_ttft_p90_off_ms']:.1f}")
  if OUT.value:
    Path(OUT.value).write_text(json.dumps(
        {"preset": PRESET.value, "num_requests": NUM.value,
         "kv_fetch": FETCH.value, "kv_transport": TRANSPORT.value,
         "kv_store_write": WRITE.value,
         "rate": RATE.value, "length_scale": LENGTH_SCALE.value,
         "config": CONFIG.value, "platform": PLATFORM.value,
         "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))


if __name__ == "__main__":
  app.run(main)
