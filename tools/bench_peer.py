"""The peer on pdjax's shapes: Hugging Face transformers + PyTorch.

Every GPU report puts pdjax beside this, measured in the same call on the
same card (a figure beside a peer measured elsewhere compares machines, not
programs). The model is the ``--model`` preset's shapes (the same
``ModelConfig`` pdjax's benchmarks build), as a ``LlamaForCausalLM`` with
random weights in the preset's dtype and PyTorch's SDPA attention.

What it times, each a median of ``--repeat`` samples after ``--warmup``:

* ``prefill``: one forward pass of a batch-1 prompt per ``--prefill_lengths``
  (no cache; only the last position's logits, as a server computes them),
  with its FLOP rate against the bf16 limits.
* ``decode``: one step of ``--decode_batches`` rows at ``--context`` tokens of
  KV in a ``StaticCache`` (the filled positions stand in for a prefill: a
  step's cost does not depend on the values), ``eager`` and ``compiled``
  (``torch.compile(mode="reduce-overhead")``: Inductor kernels and CUDA
  graphs, the fastest single-GPU transformers decode), against the HBM
  roofline (weight bytes + rows x context x KV bytes per token).
* ``generate``: ``model.generate`` of ``--generate_batch`` greedy rows of
  ``--generate_prompt`` tokens, ``--generate_tokens`` new tokens each, with a
  static cache and transformers' own compilation of the decode step; output
  tokens per second (the first run, which compiles, is not timed).

  python tools/bench_peer.py --model=llama3-8b --out=$OUT/peer.jsonl

Records go to ``--out`` as JSON lines (``tool: bench_peer``), the tables to
stdout. ``--budget_s`` bounds the run: parts that would start past it are
recorded as skipped.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path

from absl import app, flags

# JAX stays off the accelerator: it would take most of its memory, which
# is the peer's here (pdjax code below only builds configs).
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
from peer_model import hf_config  # noqa: E402

TOOL = "bench_peer"
FLAGS = flags.FLAGS
bc.define_common_flags()
flags.DEFINE_list("prefill_lengths", ["512", "2048"], "Prompt lengths.")
flags.DEFINE_list("decode_batches", ["1", "8", "32"], "Rows per step.")
flags.DEFINE_integer("context", 1024, "Tokens of KV each row attends to.")
flags.DEFINE_integer("decode_steps", 20, "Steps per decode sample.")
flags.DEFINE_list("decode_modes", ["eager", "compiled"],
                  "eager and/or compiled (torch.compile reduce-overhead).")
flags.DEFINE_integer("generate_batch", 32, "Rows of the generate run (0: "
                     "skip it).")
flags.DEFINE_integer("generate_prompt", 512, "Prompt tokens per row.")
flags.DEFINE_integer("generate_tokens", 128, "New tokens per row.")
flags.DEFINE_float("budget_s", 480.0, "Parts that would start later than "
                   "this many seconds into the run are skipped.")


class Peer:
  """The transformers model on this machine's accelerator (or CPU)."""

  def __init__(self, cfg):
    import torch
    from transformers import LlamaForCausalLM
    self.torch = torch
    self.cfg = cfg
    self.hf = hf_config(cfg)
    self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    self.dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                  "float32": torch.float32}[cfg.dtype]
    torch.manual_seed(FLAGS.seed)
    with torch.device(self.dev):
      self.model = LlamaForCausalLM._from_config(
          self.hf, dtype=self.dtype, attn_implementation="sdpa").eval()
    self.model.generation_config.eos_token_id = None
    self.model.generation_config.pad_token_id = 0

  def sync(self):
    if self.dev.type == "cuda":
      self.torch.cuda.synchronize()

  def free(self):
    gc.collect()
    if self.dev.type == "cuda":
      self.torch.cuda.empty_cache()

  def timed(self, fn, warmup: int, repeat: int) -> bc.Timing:
    """Wall seconds of ``fn()`` per sample (synchronized)."""
    for _ in range(warmup):
      fn()
    self.sync()
    out = []
    for _ in range(repeat):
      t0 = time.perf_counter()
      fn()
      self.sync()
      out.append(time.perf_counter() - t0)
    return bc.Timing(out)

  # ---------------------------------------------------------------- parts
  def prefill(self, tokens: int) -> float:
    torch = self.torch
    ids = torch.randint(3, self.cfg.vocab_size, (1, tokens), device=self.dev)

    def run():
      with torch.inference_mode():
        self.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return self.timed(run, FLAGS.warmup, FLAGS.repeat).median

  def static_cache(self, rows: int, context: int, length: int):
    from transformers import StaticCache
    cache = StaticCache(config=self.hf, max_cache_len=length)
    cache.early_initialization(
        batch_size=rows, num_heads=self.cfg.num_kv_heads,
        head_dim=self.cfg.head_dim, dtype=self.dtype, device=self.dev)
    for layer in cache.layers:
      layer.keys.normal_()
      layer.values.normal_()
    self.seek(cache, context)
    return cache

  @staticmethod
  def seek(cache, position: int) -> None:
    """Puts every layer's write position at ``position``."""
    for layer in cache.layers:
      layer.cumulative_length.fill_(position)

  def decode(self, rows: int, mode: str) -> float:
    """Seconds per decode step of ``rows`` rows at ``--context``."""
    torch = self.torch
    steps, context = FLAGS.decode_steps, FLAGS.context
    cache = self.static_cache(rows, context, context + steps + 1)
    ids = torch.randint(3, self.cfg.vocab_size, (rows, 1), device=self.dev)
    fn = self.model
    if mode == "compiled":
      fn = torch.compile(self.model, mode="reduce-overhead", fullgraph=True,
                         dynamic=False)

    def sample():
      self.seek(cache, context)
      with torch.inference_mode():
        for _ in range(steps):
          if mode == "compiled":
            torch.compiler.cudagraph_mark_step_begin()
          fn(input_ids=ids, past_key_values=cache, use_cache=True)
    try:
      return self.timed(sample, FLAGS.warmup, FLAGS.repeat).median / steps
    finally:
      del cache, fn
      self.free()

  def generate(self, rows: int, prompt: int, new: int) -> float:
    """Output tokens per second of one greedy generate run."""
    torch = self.torch
    ids = torch.randint(3, self.cfg.vocab_size, (rows, prompt),
                        device=self.dev)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
              do_sample=False, cache_implementation="static",
              pad_token_id=0, eos_token_id=None, max_new_tokens=new,
              min_new_tokens=new)

    def run():
      with torch.inference_mode():
        self.model.generate(**kw)
    return rows * new / self.timed(run, 1, max(1, FLAGS.repeat // 2)).median


def spec_limits(device_name: str) -> bc.Limits:
  """The datasheet limits of the card torch runs on (JAX does not look at
  it here); the spec flags override them."""
  hbm = mm = None
  for sub, bw, fl in bc.SPEC_LIMITS:
    if sub.lower() in device_name.lower():
      hbm, mm = bw, fl
      break
  if FLAGS["spec_hbm_bw"].present:
    hbm = FLAGS.spec_hbm_bw
  if FLAGS["spec_matmul_flops"].present:
    mm = FLAGS.spec_matmul_flops
  return bc.Limits(None, None, hbm, mm, source=f"datasheet of {device_name}")


def main(argv) -> None:
  del argv
  cfg = bc.model_from_flags()
  start = time.monotonic()
  peer = Peer(cfg)
  limits = spec_limits(peer.torch.cuda.get_device_name(0)
                       if peer.dev.type == "cuda" else "cpu")
  writer = bc.RecordWriter(FLAGS.out, model=FLAGS.model, cfg=cfg,
                           limits=limits)
  import transformers
  env = {"torch": peer.torch.__version__,
         "transformers": transformers.__version__,
         "device": (peer.torch.cuda.get_device_name(0)
                    if peer.dev.type == "cuda" else "cpu")}
  print(f"peer: transformers {env['transformers']}, torch {env['torch']} on "
        f"{env['device']}; {cfg.name} ({cfg.param_count() / 1e9:.2f}B "
        f"params, {cfg.dtype})", flush=True)
  weights = bc.param_bytes(cfg)["total"]

  def in_budget(what: str, params: dict) -> bool:
    if time.monotonic() - start < FLAGS.budget_s:
      return True
    writer.write(TOOL, what, {**params, **env}, {"skipped": "time budget"})
    print(f"  {what} {params}: skipped (time budget)", flush=True)
    return False

  def attempt(what: str, params: dict, fn) -> dict | None:
    try:
      return fn()
    except Exception as e:  # noqa: BLE001 - one part's failure is recorded
      writer.write(TOOL, what, {**params, **env},
                   {"error": f"{type(e).__name__}: {str(e)[:400]}"})
      print(f"  {what} {params}: {type(e).__name__}: {e}", flush=True)
      peer.free()
      return None

  prefill_rows, decode_rows, gen_rows = [], [], []
  for tokens in bc.parse_ints(",".join(FLAGS.prefill_lengths)):
    params = {"batch": 1, "tokens": tokens}
    if not in_budget("prefill", params):
      continue
    s = attempt("prefill", params, lambda t=tokens: peer.prefill(t))
    if s is None:
      continue
    flops = bc.prefill_flops(cfg, 1, tokens)["total"]
    res = {"time_s": s, "flops": flops, "tflops": flops / s / 1e12,
           "of_spec": bc.ratio(flops / s, limits.spec_matmul_flops)}
    writer.write(TOOL, "prefill", {**params, **env}, res)
    prefill_rows.append([tokens, f"{s * 1e3:.2f}", f"{res['tflops']:.0f}",
                         bc.fmt(res["of_spec"], ".2f")])
    print(f"  prefill T={tokens}: {s * 1e3:.2f} ms", flush=True)
  kv_token = cfg.kv_bytes_per_token()
  for mode in FLAGS.decode_modes:
    for rows in bc.parse_ints(",".join(FLAGS.decode_batches)):
      params = {"batch": rows, "context": FLAGS.context, "mode": mode}
      if not in_budget("decode", params):
        continue
      s = attempt("decode", params, lambda r=rows, m=mode: peer.decode(r, m))
      if s is None:
        continue
      # Mean KV length over the timed steps: context + (steps + 1) / 2.
      nbytes = weights + rows * (FLAGS.context + (FLAGS.decode_steps + 1)
                                 / 2) * kv_token
      roof = (None if limits.spec_hbm_bw is None
              else nbytes / limits.spec_hbm_bw)
      res = {"step_time_s": s, "bytes_per_step": nbytes,
             "roofline_spec_s": roof, "ratio_spec": bc.ratio(s, roof),
             "tokens_per_s": rows / s}
      writer.write(TOOL, "decode", {**params, **env}, res)
      decode_rows.append([mode, rows, f"{s * 1e3:.2f}",
                          bc.fmt(res["ratio_spec"], ".2f"),
                          f"{rows / s:.0f}"])
      print(f"  decode {mode} B={rows}: {s * 1e3:.2f} ms/step", flush=True)
  if FLAGS.generate_batch:
    params = {"batch": FLAGS.generate_batch, "prompt": FLAGS.generate_prompt,
              "new_tokens": FLAGS.generate_tokens}
    if in_budget("generate", params):
      tps = attempt("generate", params, lambda: peer.generate(
          FLAGS.generate_batch, FLAGS.generate_prompt, FLAGS.generate_tokens))
      if tps is not None:
        writer.write(TOOL, "generate", {**params, **env},
                     {"output_tokens_per_s": tps})
        gen_rows.append([FLAGS.generate_batch, FLAGS.generate_prompt,
                         FLAGS.generate_tokens, f"{tps:.0f}"])
  bc.print_table("peer prefill (batch 1)", ["tokens", "ms", "TFLOP/s",
                                           "of spec"], prefill_rows)
  bc.print_table(f"peer decode step (context {FLAGS.context})",
                 ["mode", "batch", "ms", "x spec roofline", "tok/s"],
                 decode_rows)
  bc.print_table("peer generate (static cache, compiled decode)",
                 ["batch", "prompt", "new", "output tok/s"], gen_rows)


if __name__ == "__main__":
  os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
  app.run(main)
