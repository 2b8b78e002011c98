r"""Per-head scales for an FP8 KV cache, measured on a model: the file a
deployment names as ``kv_scales`` (``pdjax.model.kv_scales``).

The model (``--checkpoint`` at ``--dtype``, as the deployment loads it)
prefills calibration prompts; the largest |K| (after RoPE) and |V| of each
(layer, KV head) give its scales, each the smallest power of two s with
amax / s <= 448 / ``--headroom``, so values up to ``--headroom`` times the
largest seen still fit e4m3 unsaturated.

The prompts, first that applies:

* ``--input``: a dataset as ``pdjax bench --input`` reads it (JSONL of
  ``{"prompt": ...}`` or ``{"prompt_token_ids": [...]}``, or ShareGPT);
* ``--preset`` (or a checkpoint without a tokenizer, such as
  ``random:llama3-8b``): random token ids shaped as that batch-eval preset's
  prompts (``pdjax.eval.workloads``);
* otherwise the English paragraphs the package ships
  (``pdjax/model/assets/tiny_corpus.txt``), each as a user message through
  the checkpoint's chat template where it has one (``--nochat_template``:
  plain text), so the calibration sees the system prompt and special tokens
  that served chats carry.

  python tools/calibrate_kv_scales.py --checkpoint=smollm2-135m-instruct \
      --dtype=bfloat16 --out=smollm2-kv-scales.json

The file also records what the scales were measured on and the amax of
every head (``calibration``; the pools read only the scales).
"""

from __future__ import annotations

import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", "smollm2-135m-instruct", "Model: a "
                    "directory, a .gguf file, a name or random:<preset>.")
flags.DEFINE_string("dtype", None, "The model's dtype, as the deployment "
                    "loads it (unset: the checkpoint's).")
flags.DEFINE_string("out", None, "The scales file to write.")
flags.DEFINE_float("headroom", 2.0, "How far past the largest value seen "
                   "a head's values may go before they saturate (>= 1).")
flags.DEFINE_string("input", None, "Calibration prompts: a dataset file "
                    "(JSONL or ShareGPT, as pdjax bench --input).")
flags.DEFINE_string("preset", None, "Calibration prompts: random token ids "
                    "shaped as this batch-eval preset's prompts (chat, code, "
                    "summarize, ...; the default for a model without a "
                    "tokenizer: chat).")
flags.DEFINE_integer("num_prompts", 64, "Calibration prompts at most.")
flags.DEFINE_integer("max_prompt_tokens", 512, "Longer prompts are cut to "
                     "this many tokens.")
flags.DEFINE_bool("chat_template", True, "Packaged paragraphs: as user "
                  "messages through the checkpoint's chat template (where "
                  "it has one).")
flags.DEFINE_integer("seed", 0, "Dataset order and preset token ids.")

def corpus_paragraphs() -> list[str]:
  """The packaged corpus's paragraphs (its one-line titles left out)."""
  from pdjax.model.tiny import CORPUS_PATH
  paras = [p.strip() for p in CORPUS_PATH.read_text().split("\n\n")]
  return [p for p in paras if len(p.split()) >= 20]


def calibration_prompts(checkpoint, cfg, *, input_path=None, preset=None,
                        num_prompts=64, max_prompt_tokens=512,
                        chat_template=True, seed=0
                        ) -> tuple[list[list[int]], str]:
  """(token id lists, what they are) as the module docstring says."""
  from pdjax.model import presets
  from pdjax.tokenizer import Tokenizer
  if num_prompts < 1 or max_prompt_tokens < 1:
    raise ValueError("num_prompts and max_prompt_tokens must be >= 1")
  tok = (None if presets.is_random(checkpoint)
         else Tokenizer.from_checkpoint(checkpoint))
  if input_path is not None:
    from pdjax.eval import workloads
    items = workloads.load_dataset(input_path)
    if len(items) > num_prompts:   # a seeded draw of num_prompts of them
      items = workloads.load_dataset(input_path, num_requests=num_prompts,
                                     seed=seed)
    if any(it.prompt is not None for it in items) and tok is None:
      raise ValueError(f"{input_path} has text prompts, but {checkpoint} has "
                       "no tokenizer: give prompt_token_ids")
    ids = [it.prompt_token_ids if it.prompt is None else tok.encode(it.prompt)
           for it in items]
    what = f"{len(ids)} prompts of {input_path}"
  elif preset is not None or tok is None:
    from pdjax.eval import workloads
    preset = preset or "chat"
    # One output token each: the prompts keep the preset's lengths (cut to
    # max_prompt_tokens below).
    items = workloads.generate(
        preset, num_prompts, vocab_size=cfg.vocab_size,
        max_model_len=cfg.max_position_embeddings, seed=seed,
        exclude_token_ids=cfg.eos_token_ids, max_tokens=1)
    ids = [it.prompt_token_ids for it in items]
    what = f"{len(ids)} random-token prompts shaped as the {preset!r} preset"
  else:
    texts = corpus_paragraphs()[:num_prompts]
    template = None
    if chat_template:
      from pdjax.gateway.chat_template import load_chat_template
      template = load_chat_template(None, checkpoint)
    if template is not None:
      ids = [tok.encode(template.render([{"role": "user", "content": t}]),
                        add_bos=False) for t in texts]
      what = (f"{len(ids)} packaged paragraphs as user messages through "
              "the chat template")
    else:
      ids = [tok.encode(t) for t in texts]
      what = f"{len(ids)} packaged paragraphs"
  limit = min(max_prompt_tokens, cfg.max_position_embeddings)
  return [list(p)[:limit] for p in ids], what


def calibrate(checkpoint: str, *, dtype=None, headroom=2.0, **prompt_kw):
  """(scales, calibration record) of ``checkpoint`` (a spec as
  ``--checkpoint`` takes it); ``prompt_kw``: ``calibration_prompts``'."""
  import jax
  from pdjax.engine.setup import load_sharded
  from pdjax.model import kv_scales
  from pdjax.model.kv_calibrate import kv_amax
  from pdjax.model.presets import is_random
  from pdjax.model.registry import resolve_checkpoint
  from pdjax.sharding import ShardingRules, make_mesh
  path = checkpoint if is_random(checkpoint) else resolve_checkpoint(
      checkpoint)
  rules = ShardingRules.load("decode_dp")
  mesh = make_mesh({"dp": 1}, jax.devices()[:1])
  params, cfg = load_sharded(path, rules, mesh, dtype=dtype)
  prompts, what = calibration_prompts(path, cfg, **prompt_kw)
  k, v, tokens = kv_amax(params, cfg, prompts)
  scales = kv_scales.from_amax(k, v, headroom)
  record = {"checkpoint": str(checkpoint), "model": cfg.name,
            "dtype": cfg.dtype, "prompts": what, "tokens": tokens,
            "headroom": headroom, "k_amax": k.tolist(), "v_amax": v.tolist()}
  return scales, record


def main(argv) -> None:
  del argv
  from pdjax.model import kv_scales
  if not FLAGS.out:
    raise app.UsageError("--out is required: the scales file to write")
  t0 = time.perf_counter()
  try:
    scales, record = calibrate(
        FLAGS.checkpoint, dtype=FLAGS.dtype, headroom=FLAGS.headroom,
        input_path=FLAGS.input, preset=FLAGS.preset,
        num_prompts=FLAGS.num_prompts,
        max_prompt_tokens=FLAGS.max_prompt_tokens,
        chat_template=FLAGS.chat_template, seed=FLAGS.seed)
  except (OSError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  kv_scales.write_file(FLAGS.out, scales, record)
  ek, ev = scales.exponents()
  print(f"{record['model']}: {record['tokens']} tokens of {record['prompts']}"
        f"; K scales 2**{ek.min()} .. 2**{ek.max()}, V scales 2**{ev.min()} "
        f".. 2**{ev.max()} (headroom {FLAGS.headroom:g}) -> {FLAGS.out} "
        f"({time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
  app.run(main)
