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
attention), the attention alone, one projection's GEMM alone, and the
RMSNorm alone. Prints one JSON line per check: whether row 0's output is
bitwise equal, and the largest difference.

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
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from bench_common import preset_config
  from pdjax.model import llama

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

  for paged in (False, True):
    if paged and not llama.cudnn_paged_attention_applies(cfg, L * N, B, M):
      continue
    step = jax.jit(functools.partial(llama.decode_forward, cfg=cfg,
                                     paged_attention=paged),
                   compiler_options=options or None)

    def logits(t, p, tab, step=step):
      return step(params, t, p, kp, vp, tab).logits
    tag = "paged" if paged else "gathered"
    check(f"decode step ({tag}): neighbours live vs idle", logits)
    check(f"decode step ({tag}): row 0 vs row {B // 2 + 1}", logits,
          seq_rows=(0, B // 2 + 1), lives=(0, 0))

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
  check("RMSNorm: neighbours live vs idle", rows_of(norm))
  if args.out:
    Path(args.out).write_text(json.dumps(
        {"device": str(jax.devices()[0]), "model": args.model, "rows": B,
         "autotune_level": args.autotune_level, "results": results},
        indent=1))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
