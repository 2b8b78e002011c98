"""Smoke tests of the engine benchmarks (``tools/bench_*.py``) on CPU.

The benchmarks run on the GPU machine in one timed call, where a crash or a
record with a missing field costs the whole call; these run each tool end to
end on the tiny model with the smallest sizes, and check that every record
is complete and that every ratio is the quotient it claims to be (computed
from the record's own measured time and limits, never a number written
here).

Each tool defines absl flags at import, so each runs as its own process
(``python tools/bench_x.py ...``), as it does on the GPU machine. The
environment conftest.py sets (CPU platform, 8 virtual devices, the
persistent compilation cache) is inherited, so repeated runs reuse
compiled programs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
ENV_FIELDS = ("tool", "measurement", "run_id", "date", "model",
              "model_config", "params", "results", "limits", "device_kind",
              "platform", "num_devices", "jax_version", "xla_flags")
# Explicit limits: on CPU the tools print ratios as n/a unless given.
LIMITS = ["--hbm_bw=2e10", "--matmul_flops=1e11", "--spec_hbm_bw=4e10",
          "--spec_matmul_flops=2e11"]


def run_tool(script: str, out: Path, *args: str, timeout: int = 240):
  """Runs a tool; returns (stdout, the JSON records it wrote)."""
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  proc = subprocess.run(
      [sys.executable, str(TOOLS / script), f"--out={out}", *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, (
      f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
      f"stderr:\n{proc.stderr[-4000:]}")
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert records, f"{script} wrote no records"
  for r in records:
    missing = [f for f in ENV_FIELDS if f not in r]
    assert not missing, (missing, r)
    assert r["device_kind"] and r["jax_version"]
  return proc.stdout, records


def close(a, b, rel=1e-9):
  assert a is not None and b is not None, (a, b)
  assert math.isclose(a, b, rel_tol=rel), (a, b)


def test_prefill(tmp_path):
  stdout, records = run_tool(
      "bench_prefill.py", tmp_path / "prefill.jsonl", "--prompt_lengths=16,32",
      "--tp=1,2", "--warmup=1", "--repeat=2", "--measure_ceilings",
      "--ceiling_hbm_mib=4", "--ceiling_matmul_n=128", *LIMITS)
  rows = [r for r in records if r["measurement"] == "prefill"]
  assert {(r["params"]["tp"], r["params"]["prompt_len"]) for r in rows} == {
      (1, 16), (1, 32), (2, 16), (2, 32)}
  for r in rows:
    p, x, lim = r["params"], r["results"], r["limits"]
    sec = x["time_s"]["median"]
    assert sec > 0 and len(x["time_s"]["samples"]) == 2
    assert x["compiles_during_timing"] == 0
    close(x["flops"]["total"], x["flops"]["linear"] + x["flops"]["attention"]
          + x["flops"]["lm_head"])
    close(x["achieved_flops"], x["flops"]["total"] / sec)
    close(x["tokens_per_s"], p["prompt_len"] / sec)
    close(x["mfu"], x["achieved_flops"] / (lim["matmul_flops"] * p["tp"]))
    close(x["mfu_spec"],
          x["achieved_flops"] / (lim["spec_matmul_flops"] * p["tp"]))
    close(x["mfu_run_ceiling"],
          x["achieved_flops"] / (lim["run_matmul_flops"] * p["tp"]))
    assert x["e2e_time_s"]["median"] > 0
  assert "speedup" in stdout and "MFU" in stdout


def test_prefill_with_joined_projections(tmp_path):
  _, records = run_tool(
      "bench_prefill.py", tmp_path / "prefill.jsonl", "--prompt_lengths=16",
      "--tp=1", "--warmup=1", "--repeat=1", "--fuse_projections",
      "--pause_ms=30", *LIMITS)
  rows = [r for r in records if r["measurement"] == "prefill"]
  assert len(rows) == 1 and rows[0]["params"]["fused_projections"] is True
  assert rows[0]["params"]["pause_ms"] == 30
  assert rows[0]["results"]["time_s"]["median"] > 0
  assert rows[0]["results"]["kernels"] is None   # no --trace_dir


def test_prefill_traced(tmp_path):
  """--trace_dir: the traced calls' kernels (on CPU, the XLA runtime's
  thunks) per call by category, whose sum is the kernels' time, and the
  GEMMs' rate over the linear and LM head FLOPs."""
  stdout, records = run_tool(
      "bench_prefill.py", tmp_path / "prefill.jsonl", "--prompt_lengths=16",
      "--tp=1", "--warmup=1", "--repeat=1", "--noe2e", "--trace_calls=2",
      f"--trace_dir={tmp_path / 'traces'}", *LIMITS)
  (row,) = [r for r in records if r["measurement"] == "prefill"]
  k = row["results"]["kernels"]
  assert k["calls"] == 2 and (tmp_path / "traces" / "T16").is_dir()
  cats = k["us_per_call_by_category"]
  close(sum(cats.values()), k["kernel_us_per_call"])
  fl = row["results"]["flops"]
  if cats.get("gemm"):
    close(k["gemm_flops_per_s"],
          (fl["linear"] + fl["lm_head"]) / (cats["gemm"] * 1e-6))
  assert k["top"] and "kernels per call (us)" in stdout


def test_timed_calls_pause_before_each_sample_outside_it():
  """``time_calls(pause_s=...)`` sleeps before every timed call, and the
  sleep is not in the samples: the run lasts at least the pauses, while
  the samples add up to the calls' own time."""
  import time
  if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))
  import bench_common
  calls = []

  def fn():
    calls.append(time.perf_counter())
    return []

  t0 = time.perf_counter()
  timing = bench_common.time_calls(fn, warmup=1, repeat=3, pause_s=0.05)
  wall = time.perf_counter() - t0
  assert len(calls) == 4 and len(timing.samples) == 3
  assert wall >= 3 * 0.05
  # Each gap between timed calls holds a whole pause.
  assert all(b - a >= 0.05 for a, b in zip(calls[1:], calls[2:]))
  assert sum(timing.samples) < wall - 3 * 0.05 + 1e-3


@pytest.mark.parametrize("loop_spin", [False, True])
def test_grpc_hop_tool_times_both_ways_of_crossing(loop_spin):
  """``bench_grpc_hop.py`` starts its server process and times a new call
  and a message pair on an open stream, each a round trip; with
  ``--loop_spin`` both ends' event loops keep polling through the gaps
  (and the lines say so)."""
  proc = subprocess.run(
      [sys.executable, str(TOOLS / "bench_grpc_hop.py"), "--calls=20",
       "--warmup=5", "--gap_ms=1", f"--loop_spin={loop_spin}"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = [l for l in proc.stdout.splitlines() if "round trip" in l]
  assert [l.split()[0] for l in lines] == ["call", "stream"], proc.stdout
  for line in lines:
    p50 = float(line.split("p50 ")[1].split(" ms")[0])
    assert p50 > 0 and "n=20" in line and "service token on" in line
    assert ("loops spinning" in line) == loop_spin, line


_LIVE_BYTES_PER_COMBO = """
import sys, jax
sys.path.insert(0, "tools")
import bench_decode
from absl import app
run_combo = bench_decode._run_combo
def counted(*args, **kwargs):
  print("live bytes", sum(a.nbytes for a in jax.live_arrays()), flush=True)
  return run_combo(*args, **kwargs)
bench_decode._run_combo = counted
app.run(bench_decode.main, argv=["bench_decode", *sys.argv[1:]])
"""


def test_decode_frees_each_combos_pool_before_the_next(tmp_path):
  """The device memory live when each combination starts is the weights'
  alone, the same every time: an engine left for the collector to find
  later kept an 8B pool of 35 GB alive into the next combination, which
  then could not allocate its own on an H100."""
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  proc = subprocess.run(
      [sys.executable, "-c", _LIVE_BYTES_PER_COMBO, "--batch_sizes=4,1",
       "--context_lengths=16", "--steps_per_call=2", "--calls_per_sample=1",
       "--warmup=0", "--repeat=1", f"--out={tmp_path / 'd.jsonl'}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-4000:]
  live = [int(l.split()[-1]) for l in proc.stdout.splitlines()
          if l.startswith("live bytes")]
  assert len(live) == 2 and live[0] > 0 and live[1] == live[0], live


def test_decode(tmp_path):
  stdout, records = run_tool(
      "bench_decode.py", tmp_path / "decode.jsonl", "--batch_sizes=1,2",
      "--context_lengths=16", "--steps_per_call=2", "--calls_per_sample=2",
      "--warmup=1", "--repeat=2", "--compare_steps_per_call",
      "--compare_at=2x16", *LIMITS)
  rows = [r for r in records if r["measurement"] == "decode"]
  assert {(r["params"]["batch"], r["params"]["steps_per_call"])
          for r in rows} == {(1, 2), (2, 2), (2, 1)}
  # Serving's smallest program holds both batches.
  assert {r["params"]["program_rows"] for r in rows} == {8}
  for r in rows:
    p, x, lim = r["params"], r["results"], r["limits"]
    assert x["rows_live_every_step"], r
    assert x["compiles_during_timing"] == 0
    step = x["step_time_s"]
    close(step, x["call_time_s"]["median"] / p["steps_per_call"])
    by = x["bytes_per_step"]
    kvbpt = r["model_config"]["kv_bytes_per_token"]
    close(by["kv"], p["batch"] * x["ctx_mean"] * kvbpt)
    assert x["ctx_mean"] > p["context"]
    close(x["roofline_s"], by["total"] / lim["hbm_bw"])
    close(x["ratio"], step / x["roofline_s"])
    close(x["ratio_spec"], step / (by["total"] / lim["spec_hbm_bw"]))
    assert x["ratio_run"] is None  # No --measure_ceilings here.
    close(x["achieved_bw"], by["total"] / step)
    close(x["tokens_per_s"], p["batch"] / step)
  assert "dispatch overhead" in stdout


def test_pipeline(tmp_path):
  stdout, records = run_tool(
      "bench_pipeline.py", tmp_path / "pipeline.jsonl", "--num_layers=2",
      "--pp=1,2", "--microbatches=2", "--batch=4", "--context=16",
      "--steps_per_call=2", "--warmup=1", "--repeat=2", *LIMITS)
  rows = {(r["params"]["pp"], r["params"]["microbatches"]): r
          for r in records if r["measurement"] == "pipeline"}
  assert set(rows) == {(1, 1), (2, 2)}
  t1 = rows[(1, 1)]["results"]["step_time_s"]
  for (pp, m), r in rows.items():
    p, x = r["params"], r["results"]
    assert x["rows_live_every_step"] and x["compiles_during_timing"] == 0
    assert (x["stages"], x["microbatches"]) == (pp, m)
    step = x["step_time_s"]
    close(step, x["call_time_s"]["median"] / p["steps_per_call"])
    close(x["bubble_ideal"], (pp - 1) / (m + pp - 1))
    close(x["work_ratio_ideal"], (m + pp - 1) / m)
    close(x["bubble_measured"], 1 - t1 / (pp * step))
    close(x["work_ratio"], step / t1)
    assert p["microbatch_rows"] == -(-p["batch"] // m)
  assert "bubble_ideal" in stdout


@pytest.mark.parametrize("args", [
    ("--timed=step", "--temperature=0.7"),
    ("--sampling_path=device",)])
def test_decode_serving_loop_and_sampling_paths(tmp_path, args):
  """The engine iteration (dispatch + delivery) and the sampled program;
  the on-device sampling choice (the baseline)."""
  _, records = run_tool(
      "bench_decode.py", tmp_path / "decode.jsonl", "--batch_sizes=2",
      "--context_lengths=16", "--steps_per_call=2", "--calls_per_sample=2",
      "--warmup=1", "--repeat=1", *args, *LIMITS)
  (r,) = [r for r in records if r["measurement"] == "decode"]
  assert r["results"]["rows_live_every_step"]
  assert r["results"]["compiles_during_timing"] == 0
  flags = dict(a[2:].split("=") for a in args)
  assert r["params"]["timed_call"] == flags.get("timed", "dispatch")
  assert r["params"]["sampling_path"] == flags.get("sampling_path", "host")
  assert r["params"]["temperature"] == float(flags.get("temperature", 0))


def test_decode_in_a_program_of_given_rows(tmp_path):
  """--program_rows: the live row runs in a program of that many rows (the
  rest idle), and is measured as one row."""
  _, records = run_tool(
      "bench_decode.py", tmp_path / "decode.jsonl", "--batch_sizes=1",
      "--program_rows=2", "--context_lengths=16", "--steps_per_call=2",
      "--calls_per_sample=2", "--warmup=1", "--repeat=1", *LIMITS)
  (r,) = [r for r in records if r["measurement"] == "decode"]
  assert (r["params"]["batch"], r["params"]["program_rows"]) == (1, 2)
  assert r["results"]["rows_live_every_step"]
  assert r["results"]["compiles_during_timing"] == 0
  close(r["results"]["tokens_per_s"], 1 / r["results"]["step_time_s"])


@pytest.mark.parametrize("flag", ["--unroll_layers", "--scan_unroll"])
def test_decode_with_the_layer_loop_unrolled(tmp_path, flag):
  """The probes' unrolled layer loops (weights split per layer, or the scan
  unrolled over the stacked weights) serve the benchmark's decode calls,
  with no compile while timed."""
  _, records = run_tool(
      "bench_decode.py", tmp_path / "decode.jsonl", "--batch_sizes=1",
      flag, "--context_lengths=16", "--steps_per_call=2",
      "--calls_per_sample=2", "--warmup=1", "--repeat=1", *LIMITS)
  (r,) = [r for r in records if r["measurement"] == "decode"]
  assert r["results"]["compiles_during_timing"] == 0
  close(r["results"]["tokens_per_s"], 1 / r["results"]["step_time_s"])


def test_decode_skips_what_does_not_fit(tmp_path):
  _, records = run_tool(
      "bench_decode.py", tmp_path / "decode.jsonl", "--batch_sizes=4",
      "--context_lengths=64", "--hbm_gib=0.0001", "--warmup=0",
      "--repeat=1")
  assert [r["measurement"] for r in records] == ["skipped"]
  x = records[0]["results"]
  assert x["estimated_need_bytes"] > x["budget_bytes"]


COMMON_CHURN = ["--probe_context=40", "--probe_calls=3", "--max_seqs=4",
                "--num_pages=128", "--max_seq_len=256", "--table_buckets=4",
                "--steps_per_call=2"]


def test_decode_churn(tmp_path):
  """The probe (2 rows) before and after a churn of chat and summarize
  requests, a third of them cancelled part-way: every churn request ends,
  several at once; the probe's pages are one run of the pool in a fresh
  pool and after the churn too (lowest free pages first)."""
  stdout, records = run_tool(
      "bench_decode_churn.py", tmp_path / "churn.jsonl", *COMMON_CHURN,
      "--churn_requests=10", "--churn_presets=chat,summarize",
      "--cancel_share=0.34", "--probe_rows=2")
  (r,) = records
  assert r["measurement"] == "probe_ratio"
  x = r["results"]
  before, after, churn = x["before"], x["after"], x["churn"]
  assert churn["requests"] == 10 and churn["output_tokens"] > 0
  assert churn["presets"] == ["chat", "summarize"]
  assert churn["peak_live_rows"] > 1
  for p in (before, after):
    assert p["compiles_during_timing"] == 0 and p["rows"] == 2
    close(p["step_ms"], p["call_ms"] / 2)
    assert p["pages"] == 40 // 16 + 1
    assert p["page_runs"] == 1
  close(x["ratio"], after["call_ms"] / before["call_ms"])
  assert f"after / before: {x['ratio']:.2f}x" in stdout


def test_decode_soak_with_fifo_pages(tmp_path):
  """The soak: rounds of churn and probe, each a record and a point of the
  chart; with a first-in-first-out free list the probe's pages spread over
  the pool after the churn (what the lowest-first order prevents)."""
  chart = tmp_path / "soak.png"
  stdout, records = run_tool(
      "bench_decode_churn.py", tmp_path / "soak.jsonl", *COMMON_CHURN,
      "--churn_requests=10", "--page_order=fifo", "--soak_minutes=0.001",
      f"--chart={chart}")
  assert [r["measurement"] for r in records] == ["soak_round"]
  x = records[0]["results"]
  assert x["round"] == 1 and x["churn"]["requests"] == 10
  assert x["probe"]["page_runs"] > 1
  close(x["ratio"], x["probe"]["call_ms"] / x["before_call_ms"])
  assert chart.stat().st_size > 0
  assert "round 1" in stdout
  # The chart again from the records alone (a soak where matplotlib was
  # missing draws it afterwards).
  redrawn = tmp_path / "redrawn.png"
  proc = subprocess.run(
      [sys.executable, str(TOOLS / "bench_decode_churn.py"),
       f"--chart_from={tmp_path / 'soak.jsonl'}", f"--chart={redrawn}"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"{redrawn}: 1 rounds" in proc.stdout and redrawn.stat().st_size > 0


def test_admission(tmp_path):
  """Streams without max_tokens on a pool of four whole contexts and eight
  rows: whole-budget admission runs four at a time, on-demand more; every
  stream answered under both, with the same tokens; the throughput is the
  quotient it claims. Without the engine's warm-up: it compiles every
  serving program of a configuration no other test uses (most of the
  tool's time here, none of what this checks); the runs compile what they
  use instead."""
  stdout, records = run_tool(
      "bench_admission.py", tmp_path / "adm.jsonl", "--streams=16",
      "--max_seqs=8", "--num_pages=17", "--max_seq_len=64",
      "--table_buckets=2", "--length_scale=0.05", "--temperature=0",
      "--noengine_warmup")
  runs = {r["params"]["admission"]: r["results"] for r in records
          if r["measurement"] == "admission"}
  (summary,) = [r for r in records if r["measurement"] == "summary"]
  assert set(runs) == {"full", "on_demand"}
  for x in runs.values():
    assert x["answered"] == 16 and x["refused"] == x["errors"] == 0
    close(x["tokens_per_s"], x["output_tokens"] / x["wall_s"])
  assert runs["full"]["peak_rows"] == 4 < runs["on_demand"]["peak_rows"]
  assert runs["full"]["preempted_swap"] == 0
  assert summary["results"]["tokens_mismatched"] == []
  assert "on_demand / full" in stdout


def test_transfer(tmp_path):
  stdout, records = run_tool(
      "bench_transfer.py", tmp_path / "transfer.jsonl", "--sizes_mib=1",
      "--transports=local,device,grpc", "--warmup=1", "--repeat=2")
  rows = {r["params"]["transport"]: r for r in records
          if r["measurement"] == "transfer"}
  assert set(rows) == {"local", "device", "grpc"}, records
  ceilings = {r["params"]["path"]: r["results"]["bw"] for r in records
              if r["measurement"] == "ceiling"}
  assert "p2p" in ceilings and "device_copy" in ceilings  # 8 CPU devices.
  for name, r in rows.items():
    p, x = r["params"], r["results"]
    assert x["checksum_ok"], name
    assert not x["zero_copy"], name  # Device 0 -> device 1.
    close(x["bw"], p["bytes"] / x["e2e_time_s"]["median"])
    close(x["ceiling_bw"], ceilings[p["ceiling_path"]])
    close(x["ratio_to_ceiling"], x["bw"] / x["ceiling_bw"])
  assert "MISMATCH" not in stdout


def test_correctness_check(tmp_path):
  stdout, records = run_tool("bench_common.py", tmp_path / "check.jsonl",
                             "--check_model=tiny")
  (r,) = records
  cases = r["results"]["cases"]
  assert r["results"]["ok"] and [(c["path"], c["tp"]) for c in cases] == [
      ("bucket", 1), ("bucket", 2), ("chunked", 1)]
  assert "CHECK PASSED" in stdout


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-v"]))


def test_handoff_overlap_tool(tmp_path):
  """The hand-off-under-prefill tool end to end with the fake CUDA driver:
  every hand-off's landed bits checked, the same first token for every
  layer-group count, each group's KV done before the next (the groups are
  separate programs), and the derived columns the differences they claim."""
  out = tmp_path / "overlap.json"
  proc = subprocess.run(
      [sys.executable, str(TOOLS / "gpu" / "handoff_overlap.py"), "--fake",
       "--model", "tiny", "--lengths", "64", "--groups", "1,2", "--reps",
       "2", "--out", str(out)],
      capture_output=True, text=True, timeout=240, cwd=REPO)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  rows = json.loads(out.read_text())["rows"]
  assert [r["layer_groups"] for r in rows] == [1, 2]
  for r in rows:
    assert r["correct"] and r["token_as_g1"]
    for rep in r["reps"]:
      done = rep["group_done_ms"]
      assert len(done) == r["layer_groups"] and done == sorted(done)
    tails = sorted(rep["sent_ms"] - rep["group_done_ms"][-1]
                   for rep in r["reps"])
    assert r["tail_ms"] == tails[len(tails) // 2]
  assert rows[1]["hidden"] == pytest.approx(
      1 - rows[1]["tail_ms"] / rows[0]["tail_ms"])


def test_prompt_lookup_tool(tmp_path):
  """The prompt-lookup timing tool end to end: both ways' drafts agree
  (the tool checks every call) and its figures are what it says."""
  out = tmp_path / "lookup.json"
  proc = subprocess.run(
      [sys.executable, str(TOOLS / "bench_prompt_lookup.py"), "--rows=4",
       "--context=64", "--calls=3", "--vocab=7", f"--out={out}"],
      capture_output=True, text=True, timeout=240, cwd=REPO)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  rec = json.loads(out.read_text())
  assert (rec["rows"], rec["context"], rec["calls"]) == (4, 64, 3)
  assert rec["speedup"] == pytest.approx(
      rec["rescan_ms_per_call"] / rec["index_ms_per_call"])


def test_the_ttft_marks_patch_applies_to_this_tree():
  """``tools/gpu/ttft_hops.patch`` (the marks ``run_ttft_hops.sh`` and
  ``run_ttft_hops_cpu.sh`` apply for a run) still applies: checked only,
  the tree is not touched."""
  proc = subprocess.run(
      ["git", "apply", "--check", str(TOOLS / "gpu" / "ttft_hops.patch")],
      cwd=REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
