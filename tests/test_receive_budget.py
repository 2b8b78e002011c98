"""The decode worker's bound on device memory that KV receives in flight
allocate (``pdjax.service.receive_budget``), and the deployment settings
around it (XLA's memory share per pool)."""

from __future__ import annotations

import asyncio

import pytest

from pdjax.config import (DecodePoolConfig, DeploymentConfig,
                          PrefillPoolConfig, resolve)
from pdjax.service.receive_budget import ReceiveBudget, receive_bytes
from pdjax.transfer.base import TransferExhausted
from pdjax.v1 import kv_pb2


def test_receive_bytes_counts_only_paths_that_allocate():
  shape = [2, 2, 3, 16, 4, 8]
  want = 2 * 2 * 3 * 16 * 4 * 8 * 2
  for path in ("transfer", "grpc"):
    assert receive_bytes(kv_pb2.KvHandle(shape=shape, dtype="bfloat16",
                                         transport=path)) == want
  for path in ("cuda_ipc", "local"):
    assert receive_bytes(kv_pb2.KvHandle(shape=shape, dtype="bfloat16",
                                         transport=path)) == 0
  assert receive_bytes(kv_pb2.KvHandle(shape=shape, dtype="nope",
                                       transport="grpc")) == 0


async def _hold(budget, name, nbytes, log, gate, timeout_s=5.0):
  async with budget.hold(nbytes, timeout_s):
    log.append(("in", name, budget.held))
    await gate.wait()
  log.append(("out", name))


def test_receives_past_the_budget_wait_and_go_in_arrival_order():
  """Two receives fit at once; the third waits until one ends. A large
  KV first in line is not overtaken by a small one behind it that would
  fit, and a KV larger than the whole budget runs alone."""
  async def run():
    budget = ReceiveBudget(100)
    log, gates = [], {n: asyncio.Event() for n in "abcde"}
    tasks = [asyncio.ensure_future(_hold(budget, "a", 40, log, gates["a"])),
             asyncio.ensure_future(_hold(budget, "b", 40, log, gates["b"]))]
    await asyncio.sleep(0.01)
    tasks.append(asyncio.ensure_future(_hold(budget, "c", 200, log,
                                             gates["c"])))
    await asyncio.sleep(0.01)
    tasks.append(asyncio.ensure_future(_hold(budget, "d", 10, log,
                                             gates["d"])))
    await asyncio.sleep(0.01)
    # a and b in; c (larger than the budget) waits for both to end, and d,
    # which would fit now, waits behind c.
    assert [e[1] for e in log if e[0] == "in"] == ["a", "b"]
    assert budget.waiting == 2
    gates["a"].set()
    await asyncio.sleep(0.01)
    assert [e[1] for e in log if e[0] == "in"] == ["a", "b"]
    gates["b"].set()
    await asyncio.sleep(0.01)
    assert log[-1] == ("in", "c", 200)        # alone
    gates["c"].set()
    await asyncio.sleep(0.01)
    assert log[-1] == ("in", "d", 10)
    gates["d"].set()
    await asyncio.gather(*tasks)
    assert budget.held == 0 and budget.waiting == 0
  asyncio.run(run())


def test_a_receive_out_of_time_is_exhausted_and_leaves_the_line():
  """One that waits past its deadline gets TransferExhausted (the decode
  service answers RESOURCE_EXHAUSTED) and takes nothing; the one behind it
  is admitted once there is room, not held up by the one that left."""
  async def run():
    budget = ReceiveBudget(100)
    log, gate, later = [], asyncio.Event(), asyncio.Event()
    first = asyncio.ensure_future(_hold(budget, "a", 80, log, gate))
    await asyncio.sleep(0.01)
    with pytest.raises(TransferExhausted, match="receive budget"):
      async with budget.hold(50, timeout_s=0.05):
        raise AssertionError("admitted past the budget")
    assert budget.held == 80 and budget.waiting == 0
    third = asyncio.ensure_future(_hold(budget, "c", 50, log, later))
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.sleep(0.01)
    assert log[-1] == ("in", "c", 50)
    later.set()
    await asyncio.gather(first, third)
    assert budget.held == 0
  asyncio.run(run())


def test_bytes_go_back_when_the_receive_fails():
  async def run():
    budget = ReceiveBudget(100)
    with pytest.raises(RuntimeError):
      async with budget.hold(60, timeout_s=1):
        assert budget.held == 60
        raise RuntimeError("the transfer failed")
    assert budget.held == 0
    unbounded = ReceiveBudget(0)       # 0: no bound, nothing counted
    async with unbounded.hold(1 << 40, timeout_s=0.01):
      assert unbounded.held == 0
  asyncio.run(run())
  with pytest.raises(ValueError):
    ReceiveBudget(-1)


def test_pool_memory_settings_come_from_the_deployment_file():
  dep = DeploymentConfig.load("gpu-8b")
  assert dep.decode.gpu_memory_fraction == 0.85
  assert dep.prefill.gpu_memory_fraction is None
  assert dep.decode.max_receive_mib == 2048
  assert dep.memory_fraction(("decode",)) == 0.85
  assert dep.memory_fraction(("prefill",)) is None
  assert dep.memory_fraction(("prefill", "decode")) == 0.85
  # A flag is an override of the pool's setting (pdjax.launch.worker).
  flagged = resolve("gpu-8b", {"prefill": {"gpu_memory_fraction": 0.5}})
  assert flagged.memory_fraction(("prefill",)) == 0.5
  assert DeploymentConfig().memory_fraction(("prefill", "decode")) is None
  with pytest.raises(ValueError, match="gpu_memory_fraction"):
    DecodePoolConfig(gpu_memory_fraction=1.5)
  with pytest.raises(ValueError, match="gpu_memory_fraction"):
    PrefillPoolConfig(gpu_memory_fraction=0.0)
  with pytest.raises(ValueError, match="max_receive_mib"):
    DecodePoolConfig(max_receive_mib=-1)
