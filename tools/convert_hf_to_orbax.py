"""Converts a Hugging Face model directory into a pdjax orbax checkpoint.

Why convert at all: loading safetensors means transposing and stacking every
layer on the host before sharding, on every worker start. The converted
checkpoint stores pdjax's layout, so a server restores each device's shard
directly (see ``pdjax.model.checkpoint``). Conversion runs once, offline.

Usage:
  python tools/convert_hf_to_orbax.py --hf_dir=HF_DIR --out=OUT_DIR \\
      --dtype=bfloat16
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from absl import app
from absl import flags
from absl import logging


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the CLI flags (only when run as a program, so that importing
  ``convert`` from this module never touches the global absl flags)."""
  flags.DEFINE_string("hf_dir", None, "Hugging Face model directory "
                      "(config.json + safetensors).", flag_values=flag_values)
  flags.DEFINE_string("out", None, "Output pdjax checkpoint directory.",
                      flag_values=flag_values)
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"],
                    "Storage dtype of the converted weights.",
                    flag_values=flag_values)
  flags.DEFINE_bool("overwrite", False,
                    "Replace an existing checkpoint at --out.",
                    flag_values=flag_values)
  flags.mark_flags_as_required(["hf_dir", "out"], flag_values=flag_values)


def convert(hf_dir: str | Path, out: str | Path, dtype: str = "bfloat16", *,
            overwrite: bool = False) -> dict[str, Any]:
  """HF dir -> pdjax checkpoint; returns a summary dict (also for tests)."""
  # Imported here so `--help` answers without initialising jax.
  import jax
  from pdjax.model.checkpoint import save_checkpoint
  from pdjax.model.config import ModelConfig
  from pdjax.model.weights import load_hf_params

  start = time.perf_counter()
  hf_dir = Path(hf_dir)
  cfg = ModelConfig.from_hf_dir(hf_dir, dtype=dtype)
  params = load_hf_params(hf_dir, cfg)
  loaded = time.perf_counter()
  path = save_checkpoint(out, params, cfg, tokenizer_dir=hf_dir,
                         overwrite=overwrite,
                         extra={"converted_from": str(hf_dir.absolute())})
  leaves = jax.tree.leaves(params)
  return {
      "out": str(path),
      "architecture": cfg.architecture,
      "dtype": cfg.dtype,
      "params": int(sum(x.size for x in leaves)),
      "bytes": int(sum(x.size * x.dtype.itemsize for x in leaves)),
      "load_s": loaded - start,
      "save_s": time.perf_counter() - loaded,
      "copied": sorted(p.name for p in path.iterdir()
                       if p.is_file() and p.name != "pdjax_model.json"),
  }


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS
         ) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  fv = flag_values
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every step at INFO
  s = convert(fv.hf_dir, fv.out, fv.dtype, overwrite=fv.overwrite)
  print(f"converted {fv.hf_dir} ({s['architecture']}) -> {s['out']}\n"
        f"  params: {s['params']:,} ({s['params'] / 1e9:.3f} B)  "
        f"dtype: {s['dtype']}  bytes: {s['bytes']:,} "
        f"({s['bytes'] / 2**30:.2f} GiB)\n"
        f"  time: load {s['load_s']:.1f} s, save {s['save_s']:.1f} s\n"
        f"  copied: {', '.join(s['copied']) or '(no tokenizer files found)'}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
