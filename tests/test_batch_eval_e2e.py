"""The batch-eval driver against a real local deployment (issue: batch-eval
driver): 32 requests through ``pdjax bench`` into a router started by
``pdjax.launch`` processes; the results file and summary must be complete and
consistent with what was streamed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cluster_helpers import Cluster, metric

pytestmark = pytest.mark.timeout(600)


def test_driver_against_local_cluster(tmp_path):
  c = Cluster(tmp_path / "cluster", kv_transport="grpc", num_prefill=1,
              num_decode=1, warmup=False)
  try:
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "-m", "pdjax.cli", "bench",
         f"--target={c.address}", "--preset=chat", "--length_scale=0.05",
         "--max_model_len=256", "--vocab_size=512", "--num_requests=32",
         "--rate=16", "--seed=3", f"--out_dir={out}", "--label=disagg",
         "--noprogress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    router_metrics = c.metrics("router")
  finally:
    c.stop()
  assert "Goodput" in proc.stdout and "TTFT" in proc.stdout
  records = [json.loads(l) for l in
             (out / "results.jsonl").read_text().splitlines()]
  summary = json.loads((out / "summary.json").read_text())
  assert len(records) == 32
  assert len({r["request_id"] for r in records}) == 32
  for r in records:
    assert r["status"] == "completed", r
    assert r["output_tokens"] == len(r["token_ids"]) == len(r["token_times"])
    assert r["output_tokens"] == r["max_tokens"]  # presets ignore EOS
    assert r["usage"]["completion_tokens"] == r["output_tokens"]
    assert r["usage"]["prompt_tokens"] == r["prompt_tokens"]
    assert r["usage"]["prefill_worker"]  # disaggregated: a prefill worker
    assert 0 < r["ttft"] <= r["e2e"]
    assert len(r["itls"]) == r["output_tokens"] - 1
    assert r["token_times"] == sorted(r["token_times"])
  assert summary["completed"] == 32 and summary["failed"] == 0
  assert summary["total_output_tokens"] == sum(r["output_tokens"] for r in records)
  assert summary["total_input_tokens"] == sum(r["prompt_tokens"] for r in records)
  assert 0.0 <= summary["slo_attainment"] <= 1.0
  assert summary["ttft"]["count"] == 32
  assert summary["slo_met"] == round(summary["slo_attainment"] * 32)
  assert abs(summary["goodput"] - summary["slo_met"]
             / summary["duration_s"]) < 1e-6
  assert (out / "latency_cdf.png").stat().st_size > 0
  # The router's traffic histograms (what the pool planner reads) count
  # every request's lengths.
  assert metric(router_metrics, "pdjax_request_prompt_tokens_count") == 32
  assert metric(router_metrics, "pdjax_request_prompt_tokens_sum") == sum(
      r["prompt_tokens"] for r in records)
  assert metric(router_metrics, "pdjax_request_generation_tokens_sum") == \
      summary["total_output_tokens"]
