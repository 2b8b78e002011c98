r"""Writes a Hugging Face FP8 checkpoint of a model, as FP8 checkpoints are
published: every layer's q/k/v/o and gate/up/down weight in F8_E4M3
([out, in]) with its ``weight_scale`` beside it, one per output channel
(``--scheme=channel``, llm-compressor's ``channel`` strategy) or one for the
tensor (``--scheme=tensor``), ``max|w| / 448`` either way; the embedding,
norms and LM head as they are; ``quantization_config`` in ``config.json``
(compressed-tensors). The tokenizer goes along (``tokenizer.json``: the
source's, or built from a GGUF's metadata).

For measuring what serving such a checkpoint costs, against the model it
stands for (``tools/measure_fp8_accuracy.py --checkpoint=DIR``).

  python tools/make_fp8_checkpoint.py --checkpoint=smollm2-135m-instruct \
      --scheme=tensor --out=/tmp/smollm2-fp8-tensor
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", "smollm2-135m-instruct", "The model.")
flags.DEFINE_enum("scheme", "tensor", ["tensor", "channel"],
                  "One scale per tensor or per output channel.")
flags.DEFINE_string("out", None, "The directory to write.")
flags.mark_flag_as_required("out")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
               "up_proj", "down_proj")


def quantize(w, scheme: str):
  """(q e4m3, scale float32) of a float32 [out, in] weight."""
  import ml_dtypes
  import numpy as np
  axis = None if scheme == "tensor" else 1
  amax = np.abs(w).max(axis=axis, keepdims=axis is not None)
  scale = np.maximum(amax / 448.0, np.finfo(np.float32).tiny).astype(
      np.float32)
  q = np.clip(w / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn)
  return q, scale


def _tokenizer_json(source: Path) -> str | None:
  from pdjax.model.gguf_file import GGUFFile, find_gguf
  gguf = find_gguf(source)
  if gguf is not None:
    from pdjax.model.gguf_tokenizer import build_raw_tokenizer
    return build_raw_tokenizer(GGUFFile(gguf)).to_str()
  f = source / "tokenizer.json"
  return f.read_text() if f.is_file() else None


def main(argv) -> None:
  del argv
  import numpy as np
  import torch
  from safetensors.numpy import load_file
  from safetensors.torch import save_file
  from pdjax.model.loading import load_model
  from pdjax.model.registry import resolve_checkpoint
  from pdjax.model.weights import save_hf_checkpoint
  source = Path(resolve_checkpoint(FLAGS.checkpoint))
  out = Path(FLAGS.out)
  params, cfg = load_model(source, dtype="float32")
  tok = _tokenizer_json(source)
  with tempfile.TemporaryDirectory() as tmp:
    save_hf_checkpoint(params, cfg, tmp,
                       extra_files={"tokenizer.json": tok} if tok else None)
    del params
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(tmp).iterdir():
      if f.name != "model.safetensors":
        shutil.copy(f, out / f.name)
    tensors = load_file(str(Path(tmp) / "model.safetensors"))
  written = {}
  for name, x in tensors.items():
    if any(f".{p}.weight" in name for p in PROJECTIONS):
      q, scale = quantize(x.astype(np.float32), FLAGS.scheme)
      written[name] = torch.from_numpy(q.view(np.uint8)).view(
          torch.float8_e4m3fn)
      written[name[:-len("weight")] + "weight_scale"] = torch.from_numpy(
          np.ascontiguousarray(scale))
    else:
      written[name] = torch.from_numpy(np.ascontiguousarray(x))
  save_file(written, str(out / "model.safetensors"),
            metadata={"format": "pt"})
  config = json.loads((out / "config.json").read_text())
  config["quantization_config"] = {
      "quant_method": "compressed-tensors", "format": "float-quantized",
      "config_groups": {"group_0": {
          "targets": ["Linear"], "weights": {
              "num_bits": 8, "type": "float", "strategy": FLAGS.scheme}}},
      "ignore": ["lm_head"]}
  (out / "config.json").write_text(json.dumps(config, indent=2))
  print(f"wrote {out}: {cfg.name}, {len(written)} tensors, projections in "
        f"FP8 with a scale per {FLAGS.scheme}")


if __name__ == "__main__":
  app.run(main)
