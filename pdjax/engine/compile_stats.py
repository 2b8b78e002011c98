"""A process-wide count of XLA compilations, from ``jax.monitoring`` events.

Serving must never compile after warm-up: one compile of the generate program
of a large model stalls every running sequence for seconds. Such regressions
are silent (a stray Python int used as an index, a host array of a new shape,
a new sharding), so the engines and services count compilations and expose
the number as a metric, and tests assert that it does not move while serving.

JAX reports each backend compilation as the duration event
``/jax/core/compile/backend_compile_duration``; it fires for every executable
JAX builds, persistent-cache hits included (those still create a new
executable in this process, which is what a latency-sensitive loop cares
about). The listener is registered once per process (``install``, which
importing this module already does, so a service that imports it at start-up
counts its warm-up too); counters are plain integers under a lock, so any
thread may read them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Iterator

import jax

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_lock = threading.Lock()
_installed = False
_count = 0
_seconds = 0.0
# Open CompileCounter blocks; each gets every compile that happens while open.
_active: list["CompileCounter"] = []
# After warm-up a compile is a bug worth a log line (with the program name).
_warn = False
_log = logging.getLogger(__name__)


def _listener(event: str, duration: float, *args, **kwargs) -> None:
  """Duration listener. Extra arguments (newer JAX versions pass metadata
  such as the function name as keyword arguments) are accepted and ignored,
  so the listener keeps working across versions."""
  del args
  if event != BACKEND_COMPILE_EVENT:
    return
  global _count, _seconds
  name = kwargs.get("fun_name")
  with _lock:
    _count += 1
    _seconds += float(duration)
    for c in _active:
      c._record(float(duration), name)
    warn = _warn
  if warn:
    _log.warning("XLA compiled %s (%.2f s) while serving: a program missing "
                 "from the warm-up", name or "a program", duration)


def warn_on_compile(enabled: bool = True) -> None:
  """From now on, log every compilation as a warning (call after warm-up)."""
  global _warn
  with _lock:
    _warn = enabled


def install() -> None:
  """Registers the listener with JAX; idempotent and thread-safe.

  Compilations that happen before the first call are not counted, so the
  engines call this at construction time, before any of their programs are
  compiled.
  """
  global _installed
  with _lock:
    if _installed:
      return
    jax.monitoring.register_event_duration_secs_listener(_listener)
    _installed = True


def compile_count() -> int:
  """Backend compilations seen by this process since ``install``."""
  install()
  with _lock:
    return _count


def compile_seconds() -> float:
  """Total seconds spent in those compilations."""
  install()
  with _lock:
    return _seconds


class CompileCounter:
  """Records the compilations that happen inside a ``with`` block.

  Usage::

    with CompileCounter() as c:
      engine.step()
    assert c.count == 0, c.names

  Counts are process-wide (another thread compiling during the block is
  counted too): compilation is a process-wide stall, so that is the useful
  notion.
  """

  def __init__(self):
    self.count = 0
    self.seconds = 0.0
    self.names: list[str] = []

  def _record(self, seconds: float, name: str | None) -> None:
    # Called with the module lock held.
    self.count += 1
    self.seconds += seconds
    if name:
      self.names.append(str(name))

  def __enter__(self) -> "CompileCounter":
    install()
    with _lock:
      _active.append(self)
    return self

  def __exit__(self, *exc) -> None:
    with _lock:
      _active.remove(self)


class UnexpectedCompilation(AssertionError):
  """Code that must not compile did."""


@contextlib.contextmanager
def no_compiles(what: str = "block") -> Iterator[CompileCounter]:
  """Asserts that the block triggers no compilation (raises on exit)."""
  with CompileCounter() as c:
    yield c
  if c.count:
    names = f" ({', '.join(c.names)})" if c.names else ""
    raise UnexpectedCompilation(
        f"{what} compiled {c.count} program(s) in {c.seconds:.2f}s{names}")


install()

__all__ = ["BACKEND_COMPILE_EVENT", "install", "compile_count",
           "compile_seconds", "CompileCounter", "no_compiles",
           "UnexpectedCompilation"]
