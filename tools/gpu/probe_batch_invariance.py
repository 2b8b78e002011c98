r"""Is one row of a decode step computed the same whatever the other rows
hold? Bit for bit, on this backend, in bf16.

The decode pool's batch-invariant mode runs every call at one shape, which
only helps if a fixed-shape step computes each row independently of its
neighbours. This probe checks that directly, piece by piece, with random
weights (``--model``, bf16): a step of ``--rows`` rows where row 0 holds one
sequence, against the same step with

  neighbours  the other rows live (their own tokens, lengths and pages)
              instead of idle;
  row_index   the sequence in another row (the others idle);

for the whole decode step (``decode_forward``, gathered and cuDNN paged
attention), one projection's GEMM alone, and the RMSNorm alone; whether a
decode step, a 256-token prefill and greedy sampling give the same bits
over ``--repeats`` calls on the same inputs; then (``--engine_streams``) a
batch-invariant colocated engine serving one stream alone, alone again,
and among others. ``--xla_attention``: every attention XLA's, never
cuDNN's (as the batch-invariant mode's decode step). Prints one
JSON line per check: whether row 0's output (or the stream's tokens and
logprobs) is bitwise equal, and the largest difference (or the first
differing position).

  python3 tools/gpu/probe_batch_invariance.py --model=llama3-1b --out x.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for _p in (ROOT, ROOT / "tools"):
  if str(_p) not in sys.path:
    sys.path.insert(0, str(_p))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="llama3-1b")
  ap.add_argument("--rows", type=int, default=16)
  ap.add_argument("--pages_per_row", type=int, default=16)
  ap.add_argument("--page_size", type=int, default=16)
  ap.add_argument("--autotune_level", type=int, default=0,
                  help="xla_gpu_autotune_level of the compiled steps "
                  "(0: the batch-invariant mode's; -1: XLA's default)")
  ap.add_argument("--engine_streams", type=int, default=8,
                  help="Also serve this many random prompts through a "
                  "batch-invariant colocated engine (0: skip): stream 0 alone "
                  "twice and among the others, its logprobs compared step "
                  "by step")
  ap.add_argument("--engine_tokens", type=int, default=32)
  ap.add_argument("--engine_attention", default="auto",
                  choices=["auto", "paged", "gather"],
                  help="The engine's DecodeConfig.attention")
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--xla_attention", action="store_true",
                  help="Attention by XLA everywhere, not cuDNN")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from bench_common import preset_config
  from pdjax.model import llama

  if args.xla_attention:
    llama.attention_impl = lambda dtype, head_dim: "xla"
  cfg = preset_config(args.model, model_config=None, dtype="bfloat16")
  params = llama.init_params(cfg, seed=0)
  B, M, P = args.rows, args.pages_per_row, args.page_size
  L, K, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
  N = B * M + 1                       # pages per layer; page 0 is null
  rng = np.random.default_rng(0)
  kp = jnp.asarray(rng.normal(size=(L * N, P, K, hd)) * 0.5, jnp.bfloat16)
  vp = jnp.asarray(rng.normal(size=(L * N, P, K, hd)) * 0.5, jnp.bfloat16)
  options = ({} if args.autotune_level < 0 or jax.default_backend() != "gpu"
             else {"xla_gpu_autotune_level": args.autotune_level})

  def batch(live_rows, seq_row):
    """tokens, positions, page table: the probed sequence in ``seq_row``,
    ``live_rows`` others with their own data, the rest idle."""
    toks = np.zeros(B, np.int32)
    pos = np.zeros(B, np.int32)
    table = np.zeros((B, M), np.int32)
    toks[seq_row], pos[seq_row] = 1234 % cfg.vocab_size, M * P // 2 + 3
    table[seq_row] = 1 + np.arange(M)
    others = [r for r in range(B) if r != seq_row][:live_rows]
    for j, r in enumerate(others):
      toks[r] = rng.integers(1, cfg.vocab_size)
      pos[r] = rng.integers(1, M * P - 1)
      table[r] = 1 + M * (j + 1) + np.arange(M)
    return jnp.asarray(toks), jnp.asarray(pos), jnp.asarray(table)

  results = []

  def check(name, fn, *, seq_rows=(0, 0), lives=(0, B - 1)):
    """Row output of the probed sequence in two batches."""
    outs = []
    for live, row in zip(lives, seq_rows):
      out = np.asarray(jax.device_get(fn(*batch(live, row))), np.float32)
      outs.append(out[row])
    # Padded vocabulary rows are -inf in both: equal, and left out of the
    # difference.
    finite = np.isfinite(outs[0]) & np.isfinite(outs[1])
    diff = float(np.abs(outs[0] - outs[1])[finite].max(initial=0.0))
    r = {"check": name,
         "bitwise_equal": bool(np.array_equal(outs[0], outs[1],
                                              equal_nan=True)),
         "max_abs_diff": diff, "nan": int(np.isnan(outs[0]).sum())}
    results.append(r)
    print(json.dumps(r), flush=True)

  def repeat(name, fn):
    """The same batch (every row live) run ``--repeats`` times: is the
    step itself deterministic?"""
    inputs = batch(B - 1, 0)
    first = np.asarray(jax.device_get(fn(*inputs)), np.float32)
    same = sum(np.array_equal(first, np.asarray(jax.device_get(fn(*inputs)),
                                                np.float32), equal_nan=True)
               for _ in range(args.repeats - 1))
    r = {"check": name, "bitwise_equal": same == args.repeats - 1,
         "calls_equal_to_the_first": int(same) + 1}
    results.append(r)
    print(json.dumps(r), flush=True)

  for paged in (None, "cudnn"):
    if paged and not llama.cudnn_paged_attention_applies(cfg, L * N, B, M):
      continue
    step = jax.jit(functools.partial(llama.decode_forward, cfg=cfg,
                                     paged_attention=paged),
                   compiler_options=options or None)

    def logits(t, p, tab, step=step):
      return step(params, t, p, kp, vp, tab).logits
    tag = "paged" if paged else "gathered"
    repeat(f"decode step ({tag}): the same inputs, {args.repeats} calls",
           logits)
    check(f"decode step ({tag}): neighbours live vs idle", logits)
    check(f"decode step ({tag}): row 0 vs row {B // 2 + 1}", logits,
          seq_rows=(0, B // 2 + 1), lives=(0, 0))

  # The prefill (outside the mode: one prompt per program keeps its batch
  # out of the question, not its kernels' repeatability).
  prompt = jnp.asarray(rng.integers(1, cfg.vocab_size, (1, 256)), jnp.int32)
  prefill = jax.jit(functools.partial(llama.prefill_forward, cfg=cfg),
                    compiler_options=options or None)
  repeat(f"prefill of 256 tokens (cuDNN's attention where it applies), "
         f"{args.repeats} calls",
         lambda t, p, tab: prefill(params, prompt,
                                   jnp.array([256], jnp.int32)).logits)

  # The pieces, on activations of the model's sizes.
  D = cfg.hidden_size
  x_all = jnp.asarray(rng.normal(size=(B, D)), jnp.bfloat16)
  w = params["layers"]["w_up"][0]                       # [D, F]
  gemm = jax.jit(lambda x: jnp.einsum("bd,df->bf", x, w,
                                      preferred_element_type=jnp.float32),
                 compiler_options=options or None)
  norm = jax.jit(lambda x: llama.rms_norm(x, params["layers"]["attn_norm"][0],
                                          cfg.rms_norm_eps))

  def rows_of(fn):
    def run(t, p, tab):
      live = (t != 0)[:, None]
      x = jnp.where(live, x_all, 0).astype(jnp.bfloat16)
      return fn(x)
    return run
  check("GEMM (w_up): neighbours live vs idle", rows_of(gemm))
  from pdjax.engine.sampling import sample
  greedy = jax.jit(lambda logits: sample(
      logits, jnp.zeros(B), jnp.ones(B), jnp.zeros(B, jnp.int32),
      jnp.zeros(B), jnp.zeros(B, jnp.uint32), jnp.zeros(B, jnp.int32), all_greedy=True))
  big = jnp.asarray(rng.normal(size=(B, cfg.padded_vocab)) * 3, jnp.float32)
  repeat(f"greedy sampling's logprobs ({cfg.padded_vocab} logits), "
         f"{args.repeats} calls", lambda t, p, tab: greedy(big)[1][:, None])
  check("RMSNorm: neighbours live vs idle", rows_of(norm))
  if args.engine_streams:
    results.extend(_engine_checks(params, cfg, args.engine_streams,
                                  args.engine_tokens, args.engine_attention))
  if args.out:
    Path(args.out).write_text(json.dumps(
        {"device": str(jax.devices()[0]), "model": args.model, "rows": B,
         "autotune_level": args.autotune_level,
         "xla_attention": args.xla_attention, "results": results},
        indent=1))
  return 0


def _engine_checks(params, cfg, streams: int, max_tokens: int,
                   attention: str) -> list:
  """Stream 0's greedy tokens and logprobs from a batch-invariant
  colocated engine (one prompt per prefill program): alone, alone again
  (is the engine deterministic run to run?), and among ``streams - 1``
  others. Each comparison: the first output position whose token differs,
  and the first whose logprob's bits do (None: none)."""
  import jax
  import numpy as np
  from pdjax.engine.colocated import ColocatedEngine
  from pdjax.engine.decode_config import DecodeConfig
  from pdjax.engine.prefill import PrefillConfig
  from pdjax.engine.sampling import SamplingParams
  from pdjax.engine.setup import shard_params
  from pdjax.sharding import ShardingRules, make_mesh
  rules = ShardingRules.load("decode_dp")
  mesh = make_mesh({"dp": 1}, jax.devices()[:1])
  params = shard_params(params, cfg, rules, mesh)
  L, page = 1024, 16
  pcfg = PrefillConfig(buckets=(128, 256, 512, 1024), max_batch=1,
                       page_size=page, max_seq_len=L)
  dcfg = DecodeConfig(max_seqs=streams, num_pages=streams * (L // page) + 1,
                      max_seq_len=L, page_size=page, steps_per_call=4,
                      table_buckets=(L // page,), batch_invariant=True,
                      attention=attention)
  engine = ColocatedEngine(params, cfg, mesh, rules, pcfg, dcfg)
  engine.warmup()
  rng = np.random.default_rng(1)
  prompts = [rng.integers(1, cfg.vocab_size, int(n)).tolist()
             for n in rng.integers(100, 600, streams)]

  def serve(ps, tag):
    got = {}
    def on(ev):
      toks, lps = got.setdefault(ev.request_id, ([], []))
      toks.extend(ev.token_ids)
      lps.extend(np.float32(x) for x in ev.logprobs)
    for i, p in enumerate(ps):
      engine.submit(f"{tag}-{i}", p, SamplingParams(
          max_tokens=max_tokens, temperature=0.0, ignore_eos=True), on)
    while engine.has_work:
      engine.step()
    return got[f"{tag}-0"]

  def first_difference(a, b):
    """(first position whose token differs, first whose logprob's bits
    differ), None where none does."""
    tok = next((i for i, (x, y) in enumerate(zip(a[0], b[0])) if x != y),
               None)
    lp = next((i for i, (x, y) in enumerate(zip(a[1], b[1]))
               if x.tobytes() != y.tobytes()), None)
    return tok, lp

  alone = serve(prompts[:1], "alone")
  again = serve(prompts[:1], "again")
  among = serve(prompts, "among")
  out = []
  for name, other in (("engine: alone, run twice", again),
                      (f"engine: alone vs among {streams - 1} others",
                       among)):
    tok, lp = first_difference(alone, other)
    r = {"check": f"{name} (attention {attention})",
         "bitwise_equal": tok is None and lp is None,
         "first_differing_token": tok, "first_differing_logprob": lp,
         "tokens": len(alone[0])}
    print(json.dumps(r), flush=True)
    out.append(r)
  return out


if __name__ == "__main__":
  raise SystemExit(main())
