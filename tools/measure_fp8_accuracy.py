r"""How far FP8 weights (``--what=weights``), FP8 weights and activations
(``--what=w8a8``: ``activation_dtype=float8_e4m3fn``) or an FP8 KV pool
(``--what=kv``) move a model: greedy agreement and logit error against the
same checkpoint in its own precision.

For each prompt (a few fixed English prompts through the model's
tokenizer), the baseline (``--dtype``, default bfloat16) and the FP8 model
(``weight_dtype=float8_e4m3fn``, the same dtype for activations) each
decode ``--new_tokens`` greedy tokens; reported: the share of prompts
whose whole continuation is identical, the mean length of the matching
prefix, and on every position both models saw the same context: the
largest and mean |log p_fp8 - log p_base| over the vocabulary's top-k,
and the KL divergence KL(base || fp8).

  python tools/measure_fp8_accuracy.py --checkpoint=smollm2-135m-instruct
  python tools/measure_fp8_accuracy.py --checkpoint=tiny --dtype=float32

An FP8 checkpoint (tools/make_fp8_checkpoint.py) is its own baseline: its
weights dequantized in ``--dtype``; the FP8 run takes its scales as a pool
does (``--nocheckpoint_scales``: scales of its own, quantizing the
checkpoint's values a second time).

``--what=kv``: both runs go through a colocated engine (prefill, then
decode steps over the paged KV), one with a pool of ``--dtype`` and one
with ``kv_dtype="fp8"``; the engine reports the chosen tokens' log-probs
only, so the error is |d log p| of the baseline's token on the positions
both saw the same context (no KL). ``--kv_scales`` gives the FP8 run
per-head scales (a file as tools/calibrate_kv_scales.py writes, folded into
its weights as a deployment's ``kv_scales`` is); unset, its KV is unscaled.

  python tools/measure_fp8_accuracy.py --what=kv --dtype=bfloat16 \
      --kv_scales=smollm2-kv-scales.json

A JSON record with every figure goes to --out.
"""

from __future__ import annotations

import json
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", "smollm2-135m-instruct", "Model.")
flags.DEFINE_string("dtype", "bfloat16", "Activations and the baseline's "
                    "weights.")
flags.DEFINE_integer("new_tokens", 32, "Greedy tokens per prompt.")
flags.DEFINE_integer("top_k", 20, "Vocabulary entries the logit error "
                     "looks at (the baseline's most likely).")
flags.DEFINE_string("out", None, "JSON record.")
flags.DEFINE_enum("what", "weights", ["weights", "w8a8", "kv"],
                  "What is in FP8.")
flags.DEFINE_bool("checkpoint_scales", True, "An FP8 checkpoint's own "
                  "weight scales for the FP8 run, as a pool takes them "
                  "(--nocheckpoint_scales: scales of its own, max|w| / 448, "
                  "as for any other checkpoint).")
flags.DEFINE_string("kv_scales", None, "--what=kv: the FP8 pool's per-head "
                    "scales file (tools/calibrate_kv_scales.py), folded "
                    "into the FP8 run's weights (unset: unscaled).")

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Photosynthesis is the process by which",
    "Once upon a time, in a small village,",
    "The three laws of thermodynamics state that",
    "To make a cup of tea, first",
    "In 1969, the Apollo 11 mission",
    "A prime number is a natural number",
)


def _greedy(forward, params, cfg, prompt, n):
  """(tokens, per-step log-probs [n, V]) of n greedy tokens."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  seq = list(prompt)
  logps = []
  for _ in range(n):
    logits = forward(params, jnp.asarray([seq], jnp.int32), cfg=cfg)[0, -1]
    lp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))
    logps.append(lp)
    seq.append(int(lp.argmax()))
  return seq[len(prompt):], np.stack(logps)


def _engine_greedy(params, cfg, rules, mesh, kv_dtype, prompts, n):
  """{prompt index: (tokens, log-probs)} of n greedy tokens through a
  colocated engine whose KV pool is ``kv_dtype``."""
  from pdjax.engine.colocated import ColocatedEngine
  from pdjax.engine.decode_config import DecodeConfig
  from pdjax.engine.prefill import PrefillConfig
  from pdjax.engine.sampling import SamplingParams
  engine = ColocatedEngine(
      params, cfg, mesh, rules,
      PrefillConfig(buckets=(32,), max_batch=1, page_size=16,
                    max_seq_len=128, kv_dtype=kv_dtype),
      DecodeConfig(max_seqs=len(prompts), num_pages=64, page_size=16,
                   max_seq_len=128, steps_per_call=4, kv_dtype=kv_dtype,
                   row_buckets=(len(prompts),)))
  out = {i: ([], []) for i in range(len(prompts))}
  s = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

  def callback(ev):
    i = int(ev.request_id)
    out[i][0].extend(ev.token_ids)
    out[i][1].extend(ev.logprobs)
  for i, ids in enumerate(prompts):
    engine.submit(str(i), ids, s, callback, seed_u32=0)
  engine.drain()
  return out


def _kv_accuracy(params, cfg, rules, mesh, tok) -> dict:
  import numpy as np
  prompts = [tok.encode(t) for t in PROMPTS]
  scaled = (params, cfg)
  if FLAGS.kv_scales:
    from pdjax.model import kv_scales
    from pdjax.model.kv_fold import fold_kv_scales
    scaled = fold_kv_scales(params, cfg,
                            kv_scales.read_file(FLAGS.kv_scales, cfg))
  base = _engine_greedy(params, cfg, rules, mesh, "auto", prompts,
                        FLAGS.new_tokens)
  fp8 = _engine_greedy(*scaled, rules, mesh, "fp8", prompts, FLAGS.new_tokens)
  same, prefix, errs = 0, [], []
  for i, text in enumerate(PROMPTS):
    (a, la), (b, lb) = base[i], fp8[i]
    n = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    prefix.append(n)
    same += n == len(a)
    errs.extend(abs(x - y) for x, y in zip(la[:n], lb[:n]))
    print(f"  {text!r}: {n}/{len(a)} tokens agree", flush=True)
  rec = {"what": "kv", "model": cfg.name, "dtype": FLAGS.dtype,
         "kv_dtype": "fp8", "kv_scales": FLAGS.kv_scales,
         "kv_scales_digest": scaled[1].kv_scales, "prompts": len(PROMPTS),
         "new_tokens": FLAGS.new_tokens, "identical_continuations": same,
         "mean_matching_prefix": float(np.mean(prefix)),
         "max_abs_logprob_error": float(max(errs)),
         "mean_abs_logprob_error": float(np.mean(errs))}
  how = f"FP8 scaled by {FLAGS.kv_scales}" if FLAGS.kv_scales else "FP8"
  print(f"{cfg.name}, a {FLAGS.dtype} KV pool against {how}: {same}/"
        f"{len(PROMPTS)} continuations identical ({FLAGS.new_tokens} greedy "
        f"tokens), matching prefix {rec['mean_matching_prefix']:.1f} on "
        f"average; |d log p| of the chosen token on the common prefix: max "
        f"{rec['max_abs_logprob_error']:.4f}, mean "
        f"{rec['mean_abs_logprob_error']:.5f}", flush=True)
  return rec


def main(argv) -> None:
  del argv
  import jax
  import numpy as np
  from pdjax.engine.setup import load_sharded, quantize_sharded
  from pdjax.model import llama, quant
  from pdjax.model.loading import fp8_weight_scales
  from pdjax.model.registry import resolve_checkpoint
  from pdjax.sharding import ShardingRules, make_mesh
  from pdjax.tokenizer import Tokenizer
  if FLAGS.kv_scales and FLAGS.what != "kv":
    raise app.UsageError("--kv_scales scales an FP8 KV: it needs --what=kv")
  t0 = time.perf_counter()
  rules = ShardingRules.load("decode_dp")
  mesh = make_mesh({"dp": 1}, jax.devices()[:1])
  path = resolve_checkpoint(FLAGS.checkpoint)
  base, cfg = load_sharded(path, rules, mesh, dtype=FLAGS.dtype)
  if FLAGS.what == "kv":
    rec = _kv_accuracy(base, cfg, rules, mesh, Tokenizer.from_checkpoint(path))
    rec.update(checkpoint=FLAGS.checkpoint,
               seconds=time.perf_counter() - t0,
               device=jax.devices()[0].device_kind)
    if FLAGS.out:
      with open(FLAGS.out, "w") as f:
        json.dump(rec, f, indent=1)
    return
  # The baseline's weights quantized as a pool loads them (not read again),
  # with an FP8 checkpoint's own scales.
  scales = fp8_weight_scales(path, cfg) if FLAGS.checkpoint_scales else None
  fp8, qcfg = quantize_sharded(
      base, cfg, rules, mesh, quant.FP8,
      quant.FP8 if FLAGS.what == "w8a8" else None, scales=scales)
  tok = Tokenizer.from_checkpoint(path)
  forward = jax.jit(llama.reference_forward, static_argnames="cfg")
  same, prefix, max_err, mean_err, kls = 0, [], 0.0, [], []
  for text in PROMPTS:
    ids = tok.encode(text)
    a, la = _greedy(forward, base, cfg, ids, FLAGS.new_tokens)
    b, lb = _greedy(forward, fp8, qcfg, ids, FLAGS.new_tokens)
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    prefix.append(n)
    same += n == len(a)
    # Positions where both saw the same context: up to the first
    # disagreement (its own distribution included).
    k = min(n + 1, len(a))
    top = np.argsort(-la[:k], axis=1)[:, :FLAGS.top_k]
    diff = np.abs(np.take_along_axis(lb[:k], top, 1)
                  - np.take_along_axis(la[:k], top, 1))
    max_err = max(max_err, float(diff.max()))
    mean_err.append(float(diff.mean()))
    pa = np.exp(la[:k])
    kls.extend((pa * (la[:k] - lb[:k])).sum(axis=1).tolist())
    print(f"  {text!r}: {n}/{len(a)} tokens agree", flush=True)
  rec = {"checkpoint": FLAGS.checkpoint, "model": cfg.name,
         "dtype": FLAGS.dtype, "weight_dtype": quant.FP8,
         "activation_dtype": qcfg.activation_dtype or FLAGS.dtype,
         "checkpoint_scales": sorted(scales or ()),
         "prompts": len(PROMPTS), "new_tokens": FLAGS.new_tokens,
         "identical_continuations": same,
         "mean_matching_prefix": float(np.mean(prefix)),
         "top_k": FLAGS.top_k, "max_abs_logprob_error": max_err,
         "mean_abs_logprob_error": float(np.mean(mean_err)),
         "mean_kl": float(np.mean(kls)), "max_kl": float(np.max(kls)),
         "seconds": time.perf_counter() - t0,
         "device": jax.devices()[0].device_kind}
  what = ("FP8 weights and activations" if FLAGS.what == "w8a8"
          else "FP8 weights")
  print(f"{cfg.name}, {FLAGS.dtype} against {what}: {same}/"
        f"{len(PROMPTS)} continuations identical ({FLAGS.new_tokens} greedy "
        f"tokens), matching prefix {rec['mean_matching_prefix']:.1f} on "
        f"average; |d log p| over the top {FLAGS.top_k}: max "
        f"{max_err:.3f}, mean {rec['mean_abs_logprob_error']:.4f}; KL mean "
        f"{rec['mean_kl']:.5f}, max {rec['max_kl']:.5f}", flush=True)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(rec, f, indent=1)


if __name__ == "__main__":
  app.run(main)
