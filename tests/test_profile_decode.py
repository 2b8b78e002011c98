"""tools/profile_decode.py and its trace reader, tools/trace_kernels.py:
the aggregation of a trace's kernels, and the tool end to end on CPU.

The aggregation runs on hand-made events whose counts, times, overlaps and
categories are known, so a wrong per-step division, a kernel counted twice
or a cuDNN kernel filed as a GEMM fails here rather than in a GPU run. The
end-to-end run is the tool on the tiny model in a subprocess (it defines
the benchmarks' absl flags, which must not meet the launchers' in a test
process); on CPU the trace has no device plane, so it exercises the host
fallback, the roofline arithmetic and the JSON record.
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
if str(TOOLS) not in sys.path:
  sys.path.insert(0, str(TOOLS))

import trace_kernels as tk  # noqa: E402  (flag-free)

US = 1000.0  # ns


def ev(name, start_us, dur_us, op="", module="jit_gen", line="s0"):
  return tk.Event(name, start_us * US, dur_us * US, op, module, line)


GEMM = "nvjet_sm90_tss_128x32_64x10_4x1_v_bz_NNT"
CUDNN = "cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16_knob_6"


def synthetic():
  """Two decode steps' worth: 65 us of kernels, 1 us of it overlapping."""
  return [
      *[ev(GEMM, t, 10, "custom-call.1") for t in (0, 20, 40, 60)],
      ev(CUDNN, 80, 5, "custom-call.2"), ev(CUDNN, 90, 5, "custom-call.2"),
      ev("input_concatenate_fusion", 100, 3),
      ev("input_concatenate_fusion", 110, 3),
      # On a second stream, inside the first GEMM: counts in the kernel
      # sum, not in the busy time.
      ev("loop_multiply_fusion", 5, 1, line="s1"),
      ev("loop_multiply_fusion", 120, 1),
      ev("input_reduce_fusion", 130, 2),
      # A Triton GEMM: only its XLA op's name says so.
      ev("fusion_51", 140, 4, "gemm_fusion_dot.3"),
      ev("mystery_kernel", 150, 1, module=""),
  ]


@pytest.mark.parametrize("name,op,category", [
    (GEMM, "", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32", "", "gemm"),
    ("gemv2T_kernel_val", "", "gemm"),
    ("fusion_12", "gemm_fusion_dot.1", "gemm"),
    (CUDNN, "", "attention"),  # has "wmma"/"flash": attention wins
    ("memcpy32_post", "", "copy"),
    ("MemcpyD2D", "copy.72", "copy"),
    ("loop_dynamic_update_slice_fusion", "", "copy"),
    ("input_scatter_fusion_1", "", "copy"),
    ("input_reduce_fusion_3", "", "reduce_sort"),
    ("sort_kernel", "", "reduce_sort"),
    ("loop_add_fusion", "", "fusion"),
    ("something_else", "", "other"),
])
def test_categorize(name, op, category):
  assert tk.categorize(name, op) == category


def test_aggregate_counts_divides_and_groups():
  agg = tk.aggregate(synthetic(), steps=2)
  assert agg["steps"] == 2 and agg["num_events"] == 13
  assert agg["kernel_us_per_step"] == pytest.approx(65 / 2)
  assert agg["busy_us_per_step"] == pytest.approx(64 / 2)
  rows = {r["name"]: r for r in agg["kernels"]}
  assert [r["name"] for r in agg["kernels"]][:3] == [
      GEMM, CUDNN, "input_concatenate_fusion"]
  g = rows[GEMM]
  assert (g["count"], g["count_per_step"]) == (4, 2.0)
  assert g["total_us"] == pytest.approx(40)
  assert g["us_per_step"] == pytest.approx(20)
  assert g["share"] == pytest.approx(40 / 65)
  assert g["ops"] == ["custom-call.1"]
  assert rows["fusion_51"]["category"] == "gemm"
  assert rows["mystery_kernel"]["category"] == "other"
  cats = agg["categories"]
  expect = {"gemm": (5, 44), "attention": (2, 10), "copy": (2, 6),
            "fusion": (2, 2), "reduce_sort": (1, 2), "other": (1, 1)}
  assert set(cats) == set(expect)
  for cat, (count, us) in expect.items():
    assert cats[cat]["count_per_step"] == pytest.approx(count / 2), cat
    assert cats[cat]["us_per_step"] == pytest.approx(us / 2), cat
    assert cats[cat]["share"] == pytest.approx(us / 65), cat
  assert sum(c["share"] for c in cats.values()) == pytest.approx(1)
  assert agg["modules"]["jit_gen"]["us_per_step"] == pytest.approx(64 / 2)
  assert agg["modules"]["?"]["count"] == 1


def test_aggregate_of_nothing():
  agg = tk.aggregate([], steps=4)
  assert agg["kernel_us_per_step"] == 0 and agg["kernels"] == []
  assert all(c["share"] == 0 for c in agg["categories"].values())


def test_leaf_events_drop_enclosing_thunks():
  """A while loop's thunk spans its body's; touching events are siblings."""
  evs = [ev("while", 0, 100), ev("a", 10, 10), ev("call", 30, 40),
         ev("b", 35, 5), ev("c", 50, 10), ev("d", 100, 5), ev("e", 105, 5)]
  assert [e.name for e in tk.leaf_events(evs)] == ["a", "b", "c", "d", "e"]


def test_union_and_dedupe():
  evs = [ev("x", 0, 10), ev("y", 5, 10), ev("z", 20, 5), ev("x", 0, 10)]
  assert tk.union_ns(evs) == pytest.approx(20 * US)
  assert len(tk.dedupe(evs)) == 3


def _run_main(tmp_path, *args):
  """The tool on the tiny model, in a subprocess; (its JSON, stdout)."""
  out = tmp_path / "profile.json"
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  proc = subprocess.run(
      [sys.executable, str(TOOLS / "profile_decode.py"), "--model=tiny",
       "--batch_sizes=2", "--context_lengths=16", "--steps_per_call=2",
       "--warmup=1", "--repeat=1", "--calls_per_sample=4", f"--out={out}",
       f"--trace_dir={tmp_path / 'traces'}", *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(out.read_text()), proc.stdout


def test_cpu_end_to_end(tmp_path):
  data, printed = _run_main(tmp_path, "--trace_calls=2", "--hbm_tbps=0.02",
                            "--top=5")
  assert data["tool"] == "profile_decode"
  (rec,) = data["points"]
  assert rec["measurement"] == "profile", rec["results"]
  p, x = rec["params"], rec["results"]
  assert (p["batch"], p["context"], p["steps_per_call"],
          p["trace_calls"]) == (2, 16, 2, 2)
  for key in ("wall_step_s", "wall_step_untraced_s", "kernel_us_per_step",
              "busy_us_per_step", "kernels", "categories", "modules", "top",
              "roofline", "roofline_bench_bw", "source", "xplane", "lines"):
    assert key in x, key
  assert x["source"].startswith("host XLA ops")  # no device plane on CPU
  assert Path(x["xplane"]).is_file()
  assert x["steps"] == 4 and x["compiles_during_trace"] == 0
  assert x["kernels"] and len(x["top"]) == 5
  assert x["wall_step_s"] > 0 and x["kernel_us_per_step"] > 0
  assert sum(k["us_per_step"] for k in x["kernels"]) == pytest.approx(
      x["kernel_us_per_step"])
  assert sum(c["share"] for c in x["categories"].values()) == pytest.approx(1)
  # Busy is a union of the kernels' intervals: at most their sum.
  assert x["busy_us_per_step"] <= x["kernel_us_per_step"] * (1 + 1e-9)
  r = x["roofline"]
  assert r["hbm_bw"] == 0.02e12
  by = r["bytes_per_step"]
  assert math.isclose(by["total"], by["weights"] + by["kv"])
  kvbpt = rec["model_config"]["kv_bytes_per_token"]
  # Two setup calls, one warm-up, two untraced, then 4 traced steps.
  assert r["ctx_mean"] == pytest.approx(16 + 2 * 5 + 1.5 + 1)
  assert by["kv"] == pytest.approx(2 * r["ctx_mean"] * kvbpt)
  assert r["roofline_s"] == pytest.approx(by["total"] / 0.02e12)
  assert r["ratio_wall"] == pytest.approx(x["wall_step_s"] / r["roofline_s"])
  # The weights the GEMMs read: every layer's projections and the LM head.
  c = rec["model_config"]
  D, F, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
  H, K, L, V = c["num_heads"], c["num_kv_heads"], c["num_layers"], \
      c["vocab_size"]
  item = 4 if c["dtype"] == "float32" else 2
  want = (L * (D * (H + 2 * K) * hd + H * hd * D + 3 * D * F) + D * V) * item
  assert r["gemm"]["bytes"] == want
  assert r["gemm"]["roofline_us"] == pytest.approx(
      r["gemm"]["bytes"] / 0.02e12 * 1e6)
  assert r["gemm"]["us_per_step"] == x["categories"]["gemm"]["us_per_step"]
  # No --hbm_bw on CPU: bench_decode's rate does not apply.
  assert x["roofline_bench_bw"]["roofline_s"] is None
  assert "categories (per step)" in printed and "top 5 of" in printed


def test_layout_too_small_is_an_error_record(tmp_path):
  """More calls than bench_decode's layout leaves room for: the point is
  recorded as an error, and the run goes on."""
  data, _ = _run_main(tmp_path, "--trace_calls=20")
  (rec,) = data["points"]
  assert rec["measurement"] == "error"
  assert "--trace_calls" in rec["results"]["error"]


def test_jax_op_column_names_the_model_op():
  path = ("jit(_generate_entry)/while/body/eval_jaxpr/while/body/"
          "jit(dynamic_index_in_dim)/dynamic_slice")
  assert tk.jax_op_label({"jax_ops": [path], "ops": ["x.1"]}) == (
      "jit(dynamic_index_in_dim)/dynamic_slice")
  assert tk.jax_op_label({"jax_ops": [], "ops": ["copy.3"]}) == "copy.3"
  # Nothing but loop scaffolding: the XLA op says more.
  assert tk.jax_op_label({"jax_ops": ["jit(g)/while/body/eval_jaxpr"],
                      "ops": ["gemm_fusion_dot.15"]}) == "gemm_fusion_dot.15"
