"""``host_latency.idle_wake_note``: which hosts a worker names as costing
latency at every wake-up (a virtual machine whose idle CPUs halt without
polling), read from files laid out as /proc and /sys lay them out."""

from __future__ import annotations

import pytest

from pdjax.launch.host_latency import idle_wake_note

VM_FLAGS = "fpu vme de pse tsc msr hypervisor lahf_lm avx2"
METAL_FLAGS = "fpu vme de pse tsc msr lahf_lm avx2"


def host(tmp_path, flags, driver=None, cmdline="console=ttyS0 quiet"):
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text(f"processor\t: 0\nmodel name\t: X\nflags\t\t: {flags}\n"
                     f"\nprocessor\t: 1\nflags\t\t: {flags}\n")
  cmd = tmp_path / "cmdline"
  cmd.write_text(cmdline + "\n")
  drv = tmp_path / "current_driver"
  if driver is not None:
    drv.write_text(driver + "\n")
  return dict(cpuinfo=cpuinfo, cmdline=cmd, cpuidle_driver=drv)


@pytest.mark.parametrize("driver", [None, "none", "acpi_idle"])
def test_a_vm_whose_idle_cpus_halt_is_named(tmp_path, driver):
  note = idle_wake_note(**host(tmp_path, VM_FLAGS, driver))
  assert note is not None
  assert f"cpuidle driver: {driver or 'none'}" in note
  assert "haltpoll" in note and "idle=poll" in note


@pytest.mark.parametrize("case", ["metal", "haltpoll", "idle_poll"])
def test_hosts_that_do_not_halt_on_the_hypervisor_are_not(tmp_path, case):
  kw = {"metal": dict(flags=METAL_FLAGS, driver="intel_idle"),
        "haltpoll": dict(flags=VM_FLAGS, driver="haltpoll"),
        "idle_poll": dict(flags=VM_FLAGS, driver="none",
                          cmdline="quiet idle=poll")}[case]
  assert idle_wake_note(**host(tmp_path, **kw)) is None


def test_nothing_is_claimed_without_the_cpu_flags(tmp_path):
  paths = host(tmp_path, VM_FLAGS, "none")
  paths["cpuinfo"] = tmp_path / "absent"
  assert idle_wake_note(**paths) is None

