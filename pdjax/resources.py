"""Files that ship inside the package: deployments, model cards, chat
templates and sharding rules.

They live under ``pdjax/configs/`` and ``pdjax/shardings/`` and are found
through ``importlib.resources``, so an installed wheel resolves
``--config=local``, ``--sharding=prefill_tp`` or ``--chat_template=plain``
exactly as a checkout does, from any working directory. A flag value is a
file path when it names an existing file or has a suffix, else a name
looked up here; ``named`` says which names exist when one does not.
"""

from __future__ import annotations

import importlib.resources
from importlib.resources.abc import Traversable
from pathlib import Path

# Kind -> (folder under the package, suffix of its files).
KINDS = {
    "deployment": (("configs", "deployments"), ".toml"),
    "model": (("configs", "models"), ".toml"),
    "chat_template": (("configs", "chat_templates"), ".jinja"),
    "sharding": (("shardings",), ".toml"),
}


def folder(kind: str) -> Traversable:
  """The package folder holding files of ``kind``."""
  parts, _ = KINDS[kind]
  out = importlib.resources.files("pdjax")
  for p in parts:
    out = out / p
  return out


def names(kind: str) -> list[str]:
  """The names the package ships for ``kind``, sorted."""
  _, suffix = KINDS[kind]
  return sorted(f.name[:-len(suffix)] for f in folder(kind).iterdir()
                if f.name.endswith(suffix))


def packaged(kind: str, name: str) -> Traversable | None:
  """The package's file of ``kind`` called ``name``, or None."""
  _, suffix = KINDS[kind]
  f = folder(kind) / f"{name}{suffix}"
  return f if f.is_file() else None


def find(kind: str, spec: str | Path) -> Path | Traversable | None:
  """A file path (an existing file, or any spec with a suffix) or a name the
  package ships; None when ``spec`` is a bare name it does not."""
  path = Path(spec)
  if path.is_file() or path.suffix:
    return path
  return packaged(kind, str(spec))


def read(kind: str, spec: str | Path) -> tuple[str, str]:
  """(text, where it came from) of a file or packaged name; a bare name the
  package does not ship is a FileNotFoundError listing those it does."""
  f = find(kind, spec)
  if f is None:
    raise FileNotFoundError(
        f"{kind.replace('_', ' ')} {str(spec)!r} not found: neither a file "
        f"nor one of the packaged names ({', '.join(names(kind))})")
  try:
    return f.read_text(encoding="utf-8"), str(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{kind.replace('_', ' ')} file {f} not found"
                            ) from None


__all__ = ["KINDS", "find", "folder", "names", "packaged", "read"]
