"""One jitted program per (function, settings) in a process.

An engine jits its programs from module-level functions bound to its
settings (``functools.partial(_chunk_program, cfg=cfg)``). Two engines of
the same settings in one process (a worker holding both pools' engines, a
test process building many, a replica per data-parallel shard) would each
make their own ``jax.jit`` object, and each would trace, lower and compile
the same program again: XLA's persistent cache spares the compile at best,
never the tracing and lowering. ``shared_jit`` hands out one ``jax.jit``
object per equal (function, settings), so the second engine finds its
programs traced and compiled.

Settings are compared by value: ``functools.partial`` objects by their
function, arguments and keywords, containers by their items, everything
else by ``==`` (configs, shardings and meshes compare by value). A setting
that cannot be hashed makes a program of its own, as ``jax.jit`` would.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable

import jax

_MAX_PROGRAMS = 4096
_programs: dict[Any, Any] = {}
_lock = threading.Lock()


def _key(x: Any) -> Any:
  """A hashable value equal for equal settings (TypeError if none)."""
  if isinstance(x, functools.partial):
    return ("partial", _key(x.func), tuple(_key(a) for a in x.args),
            tuple(sorted((k, _key(v)) for k, v in x.keywords.items())))
  if isinstance(x, dict):
    return ("dict", tuple(sorted((k, _key(v)) for k, v in x.items())))
  if isinstance(x, (list, tuple)):
    return (type(x).__name__, tuple(_key(v) for v in x))
  hash(x)
  return x


def shared_jit(fn: Callable, **jit_kwargs) -> Callable:
  """``jax.jit(fn, **jit_kwargs)``, the same object for every equal
  ``fn`` and ``jit_kwargs`` in this process (see the module docstring)."""
  try:
    key = (_key(fn), _key(jit_kwargs))
  except TypeError:
    return jax.jit(fn, **jit_kwargs)
  with _lock:
    program = _programs.get(key)
    if program is None:
      if len(_programs) >= _MAX_PROGRAMS:
        _programs.pop(next(iter(_programs)))   # the oldest
      program = _programs[key] = jax.jit(fn, **jit_kwargs)
    return program


__all__ = ["shared_jit"]
