"""A host setting that costs one request's latency, named when a worker
starts.

On a virtual machine an idle CPU that halts exits to the hypervisor, and a
thread woken on it waits until the hypervisor runs that CPU again. Every
step of a request that crosses a thread or a process (the gRPC hops, the
hand-offs to and from the engine's thread) can meet such a wake-up: on the
KVM guests of BENCHMARKS.md, one stream's first token came 1.3-1.9 ms later
than with every CPU kept busy. A guest kernel whose idle loop polls for a
while before halting (the ``haltpoll`` cpuidle driver, or ``idle=poll``)
avoids the exits; this module tells which kind of host a worker runs on.
"""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
CMDLINE = Path("/proc/cmdline")
CPUIDLE_DRIVER = Path("/sys/devices/system/cpu/cpuidle/current_driver")


def _read(path: Path) -> str | None:
  try:
    return path.read_text()
  except OSError:
    return None


def idle_wake_note(cpuinfo: Path = CPUINFO, cmdline: Path = CMDLINE,
                   cpuidle_driver: Path = CPUIDLE_DRIVER) -> str | None:
  """A sentence for the log where this is a virtual machine (its CPU flags
  name a hypervisor) whose idle CPUs halt without polling first (no
  ``haltpoll`` cpuidle driver, no ``idle=poll``); None elsewhere, and where
  the files that would tell cannot be read."""
  info = _read(cpuinfo)
  if info is None:
    return None
  flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                if line.startswith("flags")), [])
  if "hypervisor" not in flags:
    return None
  if "idle=poll" in (_read(cmdline) or "").split():
    return None
  driver = (_read(cpuidle_driver) or "none").strip()
  if driver == "haltpoll":
    return None
  return (f"this machine is a virtual machine whose idle CPUs halt without "
          f"polling first (cpuidle driver: {driver}): each wake-up of an "
          f"idle CPU exits to the hypervisor, which adds to every request's "
          f"latency (about 1.5 ms to one stream's first token on the KVM "
          f"guests measured); a guest kernel with the haltpoll cpuidle "
          f"driver or idle=poll avoids it")


__all__ = ["idle_wake_note"]
