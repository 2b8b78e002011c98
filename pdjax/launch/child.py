"""``python -m pdjax.launch.child MODULE ARGS...``: runs ``python -m MODULE
ARGS...`` as a process that dies with its launcher.

The launcher (``pdjax.launch.cluster.LocalCluster``) starts every process
through this module with ``PDJAX_PARENT_PID`` set to its own pid. Before
anything else, the child asks the kernel for SIGTERM when its parent goes
(``prctl(PR_SET_PDEATHSIG)``, Linux), then checks that the parent is still
the launcher (it may have died before the request took effect) and exits
if not; then it runs MODULE as ``__main__``. Doing this in the child after
exec, not in a ``preexec_fn`` between fork and exec, keeps Python code out
of the forked copy of a multithreaded launcher (a JAX or gRPC process),
where it can deadlock or crash.

A process whose parent is gone gets SIGTERM: a worker drains (nothing
routes to it any more) and exits, as on any SIGTERM.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

PARENT_ENV = "PDJAX_PARENT_PID"
PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
  """Requests ``sig`` on the parent's death; exits at once when the parent
  named by ``$PDJAX_PARENT_PID`` is already gone. No-op off Linux."""
  parent = os.environ.pop(PARENT_ENV, None)
  if parent is None or not sys.platform.startswith("linux"):
    return
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
  except (OSError, AttributeError):
    return
  if os.getppid() != int(parent):
    sys.exit(f"{sys.argv[1] if len(sys.argv) > 1 else 'child'}: the "
             "launcher that started this process is gone; not starting")


def main() -> None:
  if len(sys.argv) < 2:
    sys.exit("usage: python -m pdjax.launch.child MODULE [ARGS...]")
  die_with_parent()
  module = sys.argv[1]
  sys.argv = [module, *sys.argv[2:]]
  runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
