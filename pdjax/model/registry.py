"""Turns a model spec from a config file or a flag into a checkpoint directory.

Configs and command lines name models by a short spec so the same flag takes
the built-in test model or a real checkpoint: ``"tiny"`` /
``"builtin:tiny"`` (built on first use, see ``pdjax.model.tiny``) or a local
Hugging Face directory. pdjax never downloads: a spec that is neither fails
here, naming what was tried, instead of deep inside weight loading.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pdjax.model.tiny import TINY_MODEL_NAME, ensure_tiny_model

BUILTIN_PREFIX = "builtin:"
# Built-in model name -> function that returns its (possibly new) directory.
BUILTIN_MODELS: dict[str, Callable[[], Path]] = {
    "tiny": ensure_tiny_model,
}
_ALIASES = {TINY_MODEL_NAME: "tiny"}


def resolve_checkpoint(spec: str | Path) -> Path:
  """The checkpoint directory ``spec`` names.

  A bare built-in name ("tiny", "pdjax-tiny") wins over a directory of the
  same name in the working directory; write "./tiny" for the latter.

  Raises:
    ValueError: an unknown ``builtin:`` name or an empty spec.
    FileNotFoundError: the path does not exist.
    NotADirectoryError: the path is a file.
  """
  if not isinstance(spec, Path):
    text = str(spec).strip()
    if not text:
      raise ValueError("empty model spec: expected 'builtin:tiny' or a "
                       "checkpoint directory")
    if text.startswith(BUILTIN_PREFIX):
      name = text[len(BUILTIN_PREFIX):]
      name = _ALIASES.get(name, name)
      if name not in BUILTIN_MODELS:
        raise ValueError(
            f"model spec {text!r}: unknown built-in model {name!r}; known: "
            + ", ".join(BUILTIN_PREFIX + n for n in sorted(BUILTIN_MODELS)))
      return BUILTIN_MODELS[name]()
    name = _ALIASES.get(text, text)
    if name in BUILTIN_MODELS:
      return BUILTIN_MODELS[name]()
    spec = Path(text)
  path = spec.expanduser()
  if not path.exists():
    raise FileNotFoundError(
        f"model spec {str(spec)!r}: no such checkpoint directory "
        f"({path.resolve()}); pass a local Hugging Face model directory "
        "(pdjax does not download) or one of: "
        + ", ".join(BUILTIN_PREFIX + n for n in sorted(BUILTIN_MODELS)))
  if not path.is_dir():
    raise NotADirectoryError(
        f"model spec {str(spec)!r}: {path} is a file; a checkpoint is a "
        "directory with config.json, *.safetensors and tokenizer.json")
  return path


__all__ = ["BUILTIN_MODELS", "BUILTIN_PREFIX", "resolve_checkpoint"]
