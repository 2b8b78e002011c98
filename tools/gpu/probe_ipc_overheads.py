r"""Where a small CUDA IPC hand-off's fixed time goes, call by call.

A 128 MiB hand-off copies for about 0.34 ms over NVLink; everything else the
sender and receiver do is fixed cost, and 60 us of it is the difference
between 85% of the link (the share a same-host hand-off should reach) and
less. ``ipc_bandwidth.py`` measures the phases between two processes; this
probe times each call they are made of, in one process on two GPUs, median
of ``--reps``:

* driver calls: making the context current, issuing a 4 KiB peer copy,
  synchronising an idle stream, a 4 KiB copy and its sync;
* JAX calls the sender makes on the KV: ``block_until_ready`` of a ready
  array, ``unsafe_buffer_pointer``, ``nbytes``, ``jnp.dtype``;
* pdjax's own steps: ``handle_for``, ``check_kv_handle``, a DLPack import,
  ``RequestKV``, ``reshard_kv`` onto a one-device replica;
* the whole ``CudaIpcSender.send`` and ``CudaIpcReceiver.receive`` of a
  4 KiB KV (pure fixed cost), the sender writing into GPU 1's landing buffer
  through a peer pointer (one process cannot open its own IPC handle).

  python tools/gpu/probe_ipc_overheads.py --out /tmp/overheads.json
  python tools/gpu/probe_ipc_overheads.py --fake    # CPU: the code runs

Prints a table (us) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))


def _time(fn, reps: int) -> float:
  """Median microseconds of ``fn()``."""
  for _ in range(3):
    fn()
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  ts.sort()
  return ts[len(ts) // 2] * 1e6


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--reps", type=int, default=200)
  ap.add_argument("--fake", action="store_true",
                  help="FakeCudaDriver over host memory (CPU smoke run)")
  ap.add_argument("--out", default="")
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from pdjax.engine.kv import reshard_kv
  from pdjax.engine.requests import RequestKV
  from pdjax.transfer import cuda_ipc as ci
  from pdjax.transfer.base import handle_for
  from pdjax.v1 import kv_pb2

  devs = jax.devices()
  src_dev, dst_dev = devs[0], devs[min(1, len(devs) - 1)]
  if args.fake:
    registry = ci.FakeIpcRegistry()
    send_driver = ci.FakeCudaDriver(registry)
    recv_driver = ci.FakeCudaDriver(registry)
  else:
    send_driver = recv_driver = ci.RealCudaDriver()
  s_ord, d_ord = ci.device_ordinal(src_dev), ci.device_ordinal(dst_dev)

  shape = (32, 2, 1, 16, 8, 1)            # 4 KiB of bf16: fixed cost only
  kv = RequestKV(jax.device_put(jnp.ones(shape, jnp.bfloat16), src_dev), 16)
  x = kv.kv
  x.block_until_ready()
  geometry = (32, 16, 8, 1, "bfloat16", 64)
  pool = ci.LandingPool(recv_driver, d_ord, 1, 64 << 20, lease_s=3600.0)
  receiver = ci.CudaIpcReceiver(pool, dst_dev, geometry=geometry)
  sender = ci.CudaIpcSender(send_driver)
  replica = NamedSharding(Mesh(np.array([dst_dev]), ("tp",)),
                          PartitionSpec())

  def lend(tid: str):
    receiver.expect(tid, "probe", max_pages=64)
    slot = receiver.lend(tid, kv.payload_bytes)
    if not args.fake:   # one process cannot open its own handle
      sender._open[(s_ord, slot.handle)] = slot.ptr - slot.offset
    return slot, kv_pb2.KvDestination(
        transport="device", transfer_id=tid, ipc_handle=slot.handle,
        ipc_offset=slot.offset, ipc_bytes=slot.nbytes,
        ipc_deadline_ms=slot.deadline_ms)

  slot, dest = lend("t-probe")
  handle = sender.send(kv, dest, timeout_s=10)
  if not args.fake:   # nor its own event: the receiver waits on the sender's
    receiver._events[handle.ipc_event_handle] = sender._events[s_ord][0]
  src = x.unsafe_buffer_pointer()
  rows: dict[str, float] = {}
  r = args.reps
  rows["driver.activate"] = _time(lambda: send_driver.activate(s_ord), r)
  rows["driver.synchronize (idle stream)"] = _time(
      lambda: send_driver.synchronize(s_ord), r)

  def issue():
    send_driver.memcpy_dtod(s_ord, slot.ptr, src, 4096)
  rows["driver.memcpy_dtod 4 KiB (issue)"] = _time(issue, r)
  send_driver.synchronize(s_ord)

  def copy_sync():
    send_driver.memcpy_dtod(s_ord, slot.ptr, src, 4096)
    send_driver.synchronize(s_ord)
  rows["4 KiB copy + sync"] = _time(copy_sync, r)
  rows["jax block_until_ready (ready)"] = _time(x.block_until_ready, r)
  rows["jax unsafe_buffer_pointer"] = _time(x.unsafe_buffer_pointer, r)
  rows["jax Array.nbytes"] = _time(lambda: x.nbytes, r)
  rows["jax devices()"] = _time(x.devices, r)
  rows["jnp.dtype('bfloat16')"] = _time(lambda: jnp.dtype("bfloat16"), r)
  rows["handle_for"] = _time(lambda: handle_for(kv, "cuda_ipc", "t"), r)
  rows["check_kv_handle"] = _time(
      lambda: ci.check_kv_handle(handle, geometry, 64), r)
  rows["DLPack import (foreign_memory.view)"] = _time(
      lambda: recv_driver.view(d_ord, slot.ptr, shape, jnp.bfloat16,
                               dst_dev), min(r, 50))
  view = recv_driver.view(d_ord, slot.ptr, shape, jnp.bfloat16, dst_dev)
  rows["RequestKV(...)"] = _time(lambda: RequestKV(view, 16), r)
  rows["reshard_kv onto a one-device replica"] = _time(
      lambda: reshard_kv(RequestKV(view, 16), replica), r)
  receiver.forget("t-probe")

  sends, recvs, n = [], [], [0]

  def round_trip():
    n[0] += 1
    tid = f"t{n[0]}"
    _, d = lend(tid)
    t = time.perf_counter()
    h = sender.send(kv, d, timeout_s=10)
    sends.append(time.perf_counter() - t)
    t = time.perf_counter()
    got = receiver.receive(h, replica, timeout_s=10)
    recvs.append(time.perf_counter() - t)
    got.release()
  for _ in range(r):
    round_trip()
  sends, recvs = sorted(sends[3:]), sorted(recvs[3:])
  rows["CudaIpcSender.send 4 KiB (whole)"] = sends[len(sends) // 2] * 1e6
  rows["CudaIpcReceiver.receive 4 KiB (whole)"] = recvs[len(recvs) // 2] * 1e6
  rows.update({f"send phase {k}": v * 1e3
               for k, v in sender.last_phases.items()})
  rows.update({f"receive phase {k}": v * 1e3
               for k, v in receiver.last_phases.items()})
  sender._open.clear()
  receiver._events.clear()   # the sender's own event: it destroys it
  sender.close()
  receiver.close()

  width = max(map(len, rows))
  print(f"{'call':<{width}} | median us")
  for k, v in rows.items():
    print(f"{k:<{width}} | {v:9.1f}")
  if args.out:
    Path(args.out).write_text(json.dumps(
        {"device": str(src_dev), "fake": args.fake, "reps": r,
         "median_us": rows}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
