"""Writes the pdjax-tiny model directory (see pdjax/model/tiny.py).

The directory is a standard Hugging Face checkpoint (config.json,
model.safetensors, tokenizer.json, ...) that both pdjax and transformers
load. Servers and tests build it on demand; this tool is for putting it
somewhere explicit, e.g. to inspect it or to bake it into an image.

  python tools/make_tiny_model.py --out /tmp/pdjax-tiny
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags

from pdjax.model import tiny

_OUT = flags.DEFINE_string(
    "out", None,
    "Directory to write. Default: the cache location "
    "($PDJAX_CACHE/models/pdjax-tiny-<version>, PDJAX_CACHE defaulting to "
    "~/.cache/pdjax). Left alone if it already holds the model.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  existed = tiny.is_complete(_OUT.value or tiny.default_tiny_model_dir())
  path = tiny.ensure_tiny_model(_OUT.value)
  state = "already present" if existed else "written"
  print(f"{tiny.TINY_MODEL_NAME}-{tiny.TINY_MODEL_VERSION} {state}: {path}")


if __name__ == "__main__":
  app.run(main)
