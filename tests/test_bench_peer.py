"""The transformers peer (``tools/bench_peer.py``) runs pdjax's shapes: the
model it builds has exactly the preset's parameters, and the tool runs end
to end on the tiny model with records whose ratios are their own
quotients."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from test_benchmarks_smoke import TOOLS, run_tool

pytest.importorskip("transformers")


def test_peer_model_has_the_presets_shapes():
  sys.path.insert(0, str(TOOLS))
  import torch
  import transformers
  from peer_model import hf_config  # flag-free, unlike bench_peer
  from pdjax.model.presets import preset_config
  for name in ("tiny", "llama3-1b"):
    cfg = preset_config(name)
    hf = hf_config(cfg)
    with torch.device("meta"):
      model = transformers.LlamaForCausalLM(hf)
    assert sum(p.numel() for p in model.parameters()) == cfg.param_count()
    assert hf.tie_word_embeddings == cfg.tie_word_embeddings


def test_peer_tool_end_to_end(tmp_path: Path):
  out = tmp_path / "peer.jsonl"
  stdout, records = run_tool(
      "bench_peer.py", out, "--model=tiny", "--prefill_lengths=16",
      "--decode_batches=2", "--context=32", "--decode_steps=2",
      "--decode_modes=eager", "--generate_batch=2", "--generate_prompt=8",
      "--generate_tokens=3", "--warmup=1", "--repeat=2",
      "--spec_hbm_bw=4e10", "--spec_matmul_flops=2e11")
  kinds = {r["measurement"]: r for r in records}
  assert set(kinds) == {"prefill", "decode", "generate"}
  d = kinds["decode"]["results"]
  assert math.isclose(d["roofline_spec_s"], d["bytes_per_step"] / 4e10)
  assert math.isclose(d["ratio_spec"], d["step_time_s"] / d["roofline_spec_s"])
  assert kinds["generate"]["results"]["output_tokens_per_s"] > 0
  assert "peer decode step" in stdout
