"""On two GPUs: TP=2 prefill -> hand-off -> TP=1 decode gives the tokens of
colocated serving, and the prefill KV of TP=2 equals TP=1's.

  python tools/gpu/check_two_gpu.py --out=/tmp/check.json

In float32 (small Llama shape) the greedy tokens must be identical; in
bf16 on Llama-3-8B shapes the agreement is reported (a TP=2 all-reduce sums
in another order, so a near-tie can flip a token; the first divergence is
reported with the two logit margins). Runs in one process: the prefill mesh
spans GPUs 0 and 1, the decode replica and the colocated engine use GPU 1.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

OUT = flags.DEFINE_string("out", None, "JSON results file.")
PROMPTS = flags.DEFINE_integer("prompts", 6, "Prompts per check.")
NEW = flags.DEFINE_integer("new_tokens", 24, "Tokens generated per prompt.")
BF16_8B = flags.DEFINE_bool("bf16_8b", True, "Also run the bf16 8B check.")


def run_check(cfg, label, prompts_lens, new_tokens):
  import jax
  import numpy as np
  from pdjax.engine.colocated import ColocatedEngine
  from pdjax.engine.decode import DecodeConfig, DecodeEngine
  from pdjax.engine.prefill import PrefillConfig, PrefillEngine
  from pdjax.engine.requests import DecodeRequest, PrefillRequest
  from pdjax.engine.sampling import SamplingParams
  from pdjax.engine.setup import param_shardings
  from pdjax.model import llama
  from pdjax.sharding import ShardingRules, make_mesh

  devs = jax.devices()
  rng = np.random.RandomState(0)
  prompts = [rng.randint(3, cfg.vocab_size - 1, size=n).tolist()
             for n in prompts_lens]
  sp = SamplingParams(max_tokens=new_tokens, temperature=0.0,
                      ignore_eos=True)
  pcfg = PrefillConfig(buckets=(512, 2048), max_batch=1, page_size=16,
                       max_seq_len=4096)
  dcfg = DecodeConfig(max_seqs=8, page_size=16, num_pages=1024,
                      max_seq_len=4096, steps_per_call=4,
                      table_buckets=(32, 128))
  ptp = ShardingRules.load("prefill_tp")
  ddp = ShardingRules.load("decode_dp")
  mesh2 = make_mesh({"tp": 2}, devs[:2])
  mesh1 = make_mesh({"tp": 1}, devs[:1])
  dmesh = make_mesh({"dp": 1}, devs[1:2])
  params2 = llama.init_params(cfg, seed=1, std=0.02,
                              shardings=param_shardings(cfg, ptp, mesh2))
  params1 = jax.device_put(params2, param_shardings(cfg, ptp, mesh1))
  paramsd = jax.device_put(params2, param_shardings(cfg, ddp, dmesh))
  out = {"label": label, "dtype": cfg.dtype}

  # Prefill KV: TP=2 vs TP=1.
  pe2 = PrefillEngine(params2, cfg, mesh2, ptp, pcfg)
  pe1 = PrefillEngine(params1, cfg, mesh1, ptp, pcfg)
  reqs = [PrefillRequest(str(i), p, sp) for i, p in enumerate(prompts)]
  r2 = pe2.prefill(reqs)
  r1 = pe1.prefill(reqs)
  kv_err = max(float(np.max(np.abs(
      np.asarray(a.kv.kv, np.float32) - np.asarray(b.kv.kv, np.float32))))
               for a, b in zip(r1, r2))
  out["prefill_kv_max_abs_diff_tp2_vs_tp1"] = kv_err
  out["first_token_equal_tp2_vs_tp1"] = [a.first_token == b.first_token
                                         for a, b in zip(r1, r2)]

  # Disaggregated: TP=2 prefill -> reshard -> decode on GPU 1.
  de = DecodeEngine(paramsd, cfg, dmesh, ddp, dcfg)
  disagg: dict[str, list[int]] = {}
  t0 = time.perf_counter()
  for r, p in zip(r2, prompts):
    disagg[r.request_id] = [r.first_token]
    de.submit(DecodeRequest(r.request_id, p, r.first_token, r.first_logprob,
                            r.kv, sp, 0,
                            lambda ev: disagg[ev.request_id].extend(
                                ev.token_ids)))
  de.drain()
  out["disagg_s"] = time.perf_counter() - t0

  # Colocated on GPU 1.
  ce = ColocatedEngine(paramsd, cfg, dmesh, ddp, pcfg, dcfg)
  coloc: dict[str, list[int]] = {}
  for i, p in enumerate(prompts):
    ce.submit(str(i), p, sp,
              lambda ev: coloc.setdefault(ev.request_id, []).extend(
                  ev.token_ids))
  ce.drain()
  same = [disagg[str(i)] == coloc[str(i)] for i in range(len(prompts))]
  agree = [float(np.mean(np.array(disagg[str(i)]) == np.array(
      coloc[str(i)]))) for i in range(len(prompts))]
  out["tokens_identical"] = same
  out["token_agreement"] = agree
  out["all_identical"] = all(same)
  print(json.dumps(out), flush=True)
  return out


def main(argv):
  del argv
  import jax
  from pdjax.model.config import ModelConfig, RopeConfig
  from pdjax.model.presets import preset_config
  results = {"devices": [str(d) for d in jax.devices()],
             "jax": jax.__version__}
  if len(jax.devices()) < 2:
    print("needs two GPUs")
    return
  small = ModelConfig(
      architecture="llama", vocab_size=32000, hidden_size=1024,
      intermediate_size=2816, num_layers=8, num_heads=16, num_kv_heads=8,
      head_dim=64, rope=RopeConfig(theta=500000.0), dtype="float32",
      name="llama-small-f32")
  results["f32_small"] = run_check(small, "f32_small", [7, 300, 1500, 40,
                                                        900, 120][:PROMPTS.value],
                                   NEW.value)
  if BF16_8B.value:
    results["bf16_8b"] = run_check(preset_config("llama3-8b"), "bf16_8b",
                                   [7, 300, 1500, 40, 900, 120][:PROMPTS.value],
                                   NEW.value)
  if OUT.value:
    Path(OUT.value).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
  app.run(main)
