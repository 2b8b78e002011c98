r"""KV hand-off bandwidth GPU 0 -> GPU 1 between two pdjax processes (CUDA IPC).

This process is the prefill side (GPU 0, ``CudaIpcSender``); it starts a
receiver process (GPU 1, ``LandingPool`` + ``CudaIpcReceiver``) and, for
each payload size, hands KV shaped like Llama-3-8B's (``[32, 2, n, 16, 8,
128]`` bf16: 2 MiB a page) through pdjax's classes, against the raw rates
measured in the same run:

* ``device_put``: ``jax.device_put`` GPU 0 -> GPU 1 in this process (XLA's
  peer copy, one process);
* ``raw_ipc``: one ``cuMemcpyDtoD`` from this process's JAX buffer into the
  receiver's landing buffer, nothing else (the link through CUDA IPC);
* ``send``: ``CudaIpcSender.send``: lease check, copies, then either the
  interprocess event's record (``signal="event"``, the default: the copy
  runs on after it returns) or a stream sync (``signal="sync"``, the
  ``_sync`` keys: the sender waits for the copy);
* ``recv``: ``CudaIpcReceiver.receive`` in the receiver: the wait on the
  sender's event (event signal), then the landing region as a JAX array in
  the replica's layout, a DLPack view (no copy);
* ``e2e``: wall time from just before ``send`` (this process) to the
  receiver's view being ready (its process): ``time.perf_counter`` is
  ``CLOCK_MONOTONIC``, one clock for the processes of a host. It includes
  the handle's trip through the pipe between them (a real part of a
  hand-off; a deployment's gRPC trip is longer). With the event signal the
  copy overlaps that trip, so send + recv would undercount it;
* ``stream``: ``--stream_k`` hand-offs back to back into as many regions,
  the sender writing each handle to the receiver as ``send`` returns and
  waiting for no answer until all are sent: ``k * bytes`` over first send
  start -> last view ready (no insert, and the bytes are checked after);
* ``insert``: what the decode engine then does with it, emulated: a jitted
  device-local copy of the viewed KV into a donated pool-sized array, after
  which the region is released (every path pays this copy; the earlier
  receiver paid it twice, copying the region out first).

Keys without a suffix are the event signal's (the default sender);
``_sync`` keys the sender's sync. The signals are measured in the same run,
alternating, so the table shows one against the other. ``*_phases_ms`` say
where a hand-off's time goes (the sender's ``first_copy_ms``: from the call
to its first copy issued; the receiver's ``after_wait_ms``: from the
copies' end to its return).

Every hand-off is checked: a position-weighted checksum of the bits is
computed on device on both sides, and the first elements are compared.

  timeout 120 python tools/gpu/ipc_bandwidth.py --out /tmp/ipc.json
  python tools/gpu/ipc_bandwidth.py --sizes_mib 256 --reps 3 --out x.json

Needs two GPUs, ``cuda-bindings`` and CuPy. Exits 2 (with a JSON line saying
why) where they are missing. Writes the JSON after each size, and stops
starting new sizes past ``--budget_s``, so ``timeout`` keeps what was
measured.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Two JAX processes share the GPUs: neither may take most of the memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("NVSHMEM_DISABLE_NVLS", "1"),
               ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")):
  os.environ.setdefault(_k, _v)

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

PAGE_SHAPE = (32, 2, None, 16, 8, 128)   # Llama-3-8B KV, n pages
PAGE_BYTES = 32 * 2 * 16 * 8 * 128 * 2
_PREFIX = "@@"


def _shape(pages: int) -> tuple[int, ...]:
  return tuple(pages if s is None else s for s in PAGE_SHAPE)


def _payload(shape, seed: int, device):
  """Finite bf16 values with a distinct bit pattern per element, made on
  the device (4 GiB never touches the host)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import SingleDeviceSharding
  n = 1
  for s in shape:
    n *= s

  def fill():
    i = jax.lax.iota(jnp.uint32, n)
    h = (i ^ jnp.uint32(seed)) * jnp.uint32(2654435761)
    h = h ^ (h >> 15)
    bits = (h & jnp.uint32(0x3FFF)).astype(jnp.uint16)
    return jax.lax.bitcast_convert_type(bits, jnp.bfloat16).reshape(shape)

  return jax.jit(fill, out_shardings=SingleDeviceSharding(device))()


def _checksum_fn():
  import jax
  import jax.numpy as jnp

  @jax.jit
  def checksum(x):
    u = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    u = u.reshape(-1)
    w = jax.lax.iota(jnp.uint32, u.size) % jnp.uint32(65521) + 1
    return jnp.sum(u * w, dtype=jnp.uint32)

  return lambda x: int(checksum(x))


def _head(x, n: int = 16) -> str:
  """The first ``n`` elements' bits (an index, not a reshape: no copy of a
  4 GiB array)."""
  import jax
  import numpy as np
  first = x[(0,) * (x.ndim - 1)][:n]
  return np.asarray(jax.device_get(first)).view(np.uint16).tobytes().hex()


def _unavailable() -> str | None:
  try:
    import jax
  except ImportError as e:
    return f"jax: {e}"
  if jax.default_backend() != "gpu":
    return f"backend is {jax.default_backend()}, not gpu"
  if len(jax.devices()) < 2:
    return f"{len(jax.devices())} GPU(s); need 2"
  try:
    from pdjax.transfer.cuda_ipc import RealCudaDriver
    RealCudaDriver()
  except Exception as e:  # noqa: BLE001
    return f"CUDA driver bindings: {e}"
  return None


def _emit(obj) -> None:
  sys.stdout.write(_PREFIX + json.dumps(obj) + "\n")
  sys.stdout.flush()


# ------------------------------------------------------------------ receiver
def receiver_main(args, inp=None, emit=None) -> int:
  """Serves the sender's commands (JSON lines on ``inp``, answers through
  ``emit``; stdin/stdout by default)."""
  inp = sys.stdin if inp is None else inp
  emit = _emit if emit is None else emit
  import jax
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from pdjax.transfer.cuda_ipc import (CudaIpcReceiver, LandingPool,
                                       RealCudaDriver, device_ordinal)
  from pdjax.v1 import kv_pb2

  dev = jax.devices()[args.device]
  driver = RealCudaDriver()
  pool = LandingPool(driver, device_ordinal(dev), args.pool_buffers,
                     args.pool_bytes, lease_s=3600.0)
  receiver = CudaIpcReceiver(pool, dev)
  checksum = _checksum_fn()
  # The layout the decode engine asks for: its one-device replica's mesh.
  target = NamedSharding(Mesh(np.array([dev]), ("tp",)), PartitionSpec())
  import jax.numpy as jnp
  pages = args.pool_bytes // PAGE_BYTES
  # Stands in for the decode pools the insert writes into (donated, reused).
  pools = jax.device_put(jnp.zeros(_shape(pages), jnp.bfloat16), dev)
  insert = jax.jit(lambda pools, kv: jax.lax.dynamic_update_slice(
      pools, kv, (0,) * kv.ndim), donate_argnums=(0,))
  lent_at: dict[str, int] = {}   # transfer id -> the region's address
  held = {}   # transfer id -> a stream's KV, checked once the stream is done

  def check(out, tid: str) -> dict:
    """Whether ``out`` is a view of the region lent under ``tid``, and its
    bits' checksum and first elements; then the region goes back."""
    got = {"view": bool(out.kv.addressable_data(0).unsafe_buffer_pointer()
                        == lent_at.pop(tid, None)),
           "checksum": checksum(out.kv), "head": _head(out.kv)}
    out.release()
    return got

  emit({"ready": True, "device": str(dev)})
  for line in inp:
    cmd = json.loads(line)
    try:
      if cmd["cmd"] == "lend":
        receiver.expect(cmd["tid"], "bench")    # issued, as at Reserve
        slot = receiver.lend(cmd["tid"], cmd["nbytes"])
        if slot is not None:
          lent_at[cmd["tid"]] = slot.ptr
        emit(None if slot is None else {
            "handle": slot.handle.hex(), "offset": slot.offset,
            "nbytes": slot.nbytes, "deadline_ms": slot.deadline_ms,
            "device": slot.device})
      elif cmd["cmd"] == "receive":
        handle = kv_pb2.KvHandle.FromString(base64.b64decode(cmd["handle"]))
        t = time.perf_counter()
        out = receiver.receive(handle, target, timeout_s=60)
        out.kv.block_until_ready()
        t_done = time.perf_counter()     # the view is ready: the hand-off's end
        got = {"recv_s": t_done - t, "t_done": t_done,
               "phases": receiver.last_phases}
        if cmd.get("hold"):
          # Part of a stream: answered at once, checked by check_held (a
          # check here would delay the stream's next hand-off).
          held[handle.transfer_id] = out
          emit(got)
          continue
        t = time.perf_counter()
        pools = insert(pools, out.kv)
        pools.block_until_ready()
        got["insert_s"] = time.perf_counter() - t
        got.update(check(out, handle.transfer_id))
        del out
        got["live"] = receiver.live()
        emit(got)
      elif cmd["cmd"] == "check_held":
        checks = [check(held.pop(tid), tid) for tid in list(held)]
        emit({"checks": checks, "live": receiver.live()})
      elif cmd["cmd"] == "discard":
        # The raw copies are done (synchronised): the region may be reused.
        receiver.discard(cmd["tid"])
        receiver.forget(cmd["tid"])
        emit({"ok": True})
      elif cmd["cmd"] == "quit":
        break
    except Exception as e:  # noqa: BLE001 - reported to the parent
      emit({"error": f"{type(e).__name__}: {e}"})
  pool.close()
  return 0


# ------------------------------------------------------------------ sender
class _Child:
  def __init__(self, argv: list[str]):
    self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True,
                                 cwd=str(ROOT))

  def read(self, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      line = self.proc.stdout.readline()
      if not line:
        raise RuntimeError(f"receiver exited ({self.proc.poll()})")
      if line.startswith(_PREFIX):
        return json.loads(line[len(_PREFIX):])
      sys.stderr.write("[receiver] " + line)
    raise TimeoutError("receiver did not answer")

  def write(self, obj) -> None:
    self.proc.stdin.write(json.dumps(obj) + "\n")
    self.proc.stdin.flush()

  def answer(self):
    out = self.read()
    if isinstance(out, dict) and "error" in out:
      raise RuntimeError("receiver: " + out["error"])
    return out

  def ask(self, obj):
    self.write(obj)
    return self.answer()

  def close(self):
    try:
      self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
      self.proc.stdin.flush()
      self.proc.wait(timeout=20)
    except Exception:  # noqa: BLE001
      self.proc.kill()


def lend_destination(child, tid: str, nbytes: int):
  """Asks the receiver to lend a region for ``tid``; the ``KvDestination``
  a prefill worker would get for it."""
  from pdjax.v1 import kv_pb2
  slot = child.ask({"cmd": "lend", "tid": tid, "nbytes": nbytes})
  if slot is None:
    raise RuntimeError(f"no landing region for {nbytes} bytes")
  return kv_pb2.KvDestination(
      transport="device", transfer_id=tid,
      ipc_handle=bytes.fromhex(slot["handle"]), ipc_offset=slot["offset"],
      ipc_bytes=slot["nbytes"], ipc_deadline_ms=slot["deadline_ms"])


def _median(xs):
  xs = sorted(xs)
  return xs[len(xs) // 2]


def _encode(handle) -> str:
  return base64.b64encode(handle.SerializeToString()).decode()


SIGNALS = ("sync", "event")      # the sender's signal; event is the default


def _table(rows, cols) -> None:
  widths = [max(len(c), 8) for c in cols]
  print(" | ".join(f"{c:>{w}}" for c, w in zip(cols, widths)))
  for row in rows:
    cells = []
    for c, w in zip(cols, widths):
      v = row.get(c, "n/a")
      cells.append(f"{v:>{w}.3f}" if isinstance(v, float) else f"{v!s:>{w}}")
    print(" | ".join(cells))


def sender_main(args) -> int:
  start = time.monotonic()
  reason = _unavailable()
  if reason:
    print(json.dumps({"skipped": reason}))
    return 2
  import jax

  from pdjax.engine.requests import RequestKV
  from pdjax.transfer.cuda_ipc import (CudaIpcSender, RealCudaDriver,
                                       device_ordinal)

  sizes = [int(s) for s in args.sizes_mib.split(",")]
  pages = [max(1, (s << 20) // PAGE_BYTES) for s in sizes]
  pool_bytes = max(pages) * PAGE_BYTES
  # One buffer per region a stream has lent at once (the largest size).
  child = _Child([sys.executable, str(Path(__file__).resolve()),
                  "--role", "receiver", "--device", "1",
                  "--pool_bytes", str(pool_bytes),
                  "--pool_buffers", str(max(1, args.stream_k))])
  src_dev, dst_dev = jax.devices()[0], jax.devices()[1]
  checksum = _checksum_fn()
  driver = RealCudaDriver()
  # One sender for both signals (``signal`` is read per send): two would
  # each open the landing buffers, and a context opens a handle only once.
  sender = CudaIpcSender(driver)
  ordinal = device_ordinal(src_dev)
  results = {"device": str(src_dev.device_kind), "src": str(src_dev),
             "dst": str(dst_dev), "kv_shape": "[32, 2, n, 16, 8, 128] bf16",
             "clock": time.get_clock_info("perf_counter").implementation,
             "stream_k": args.stream_k, "rows": []}
  out_path = Path(args.out) if args.out else None

  def write():
    if out_path:
      out_path.parent.mkdir(parents=True, exist_ok=True)
      out_path.write_text(json.dumps(results, indent=1))

  try:
    ready = child.read(timeout_s=180)
    assert ready.get("ready"), ready
    for i, n in enumerate(pages):
      if time.monotonic() - start > args.budget_s:
        results["stopped"] = f"budget of {args.budget_s} s spent"
        break
      shape = _shape(n)
      nbytes = n * PAGE_BYTES
      x = _payload(shape, 17 + i, src_dev)
      x.block_until_ready()
      want_sum, want_head = checksum(x), _head(x)
      row = {"mib": nbytes >> 20, "pages": n, "bytes": nbytes}

      # jax.device_put GPU 0 -> GPU 1, one process.
      ts = []
      for r in range(args.reps + 1):
        t = time.perf_counter()
        y = jax.device_put(x, dst_dev)
        y.block_until_ready()
        if r:
          ts.append(time.perf_counter() - t)
        del y
      row["device_put_GBps"] = nbytes / _median(ts) / 1e9

      # Raw cuMemcpyDtoD into the receiver's landing buffer.
      tid = f"raw-{i}"
      slot = child.ask({"cmd": "lend", "tid": tid, "nbytes": nbytes})
      remote = sender.remote_pointer(ordinal, bytes.fromhex(slot["handle"]))
      src = x.addressable_data(0).unsafe_buffer_pointer()
      ts = []
      for r in range(args.reps + 1):
        t = time.perf_counter()
        driver.memcpy_dtod(ordinal, remote + slot["offset"], src, nbytes)
        driver.synchronize(ordinal)
        if r:
          ts.append(time.perf_counter() - t)
      row["raw_ipc_GBps"] = nbytes / _median(ts) / 1e9
      child.ask({"cmd": "discard", "tid": tid})

      # pdjax: CudaIpcSender -> CudaIpcReceiver, one hand-off at a time, the
      # two signals alternating (the first round of each warms up).
      kv = RequestKV(x, n * shape[3])
      runs = {m: {"send": [], "recv": [], "e2e": [], "insert": [],
                  "view": [], "send_phases": [], "recv_phases": []}
              for m in SIGNALS}
      correct = dict.fromkeys(SIGNALS, True)   # every hand-off's bits
      for r in range(args.reps + 1):
        for mode in SIGNALS:
          sender.signal = mode
          tid = f"kv-{i}-{mode}-{r}"
          dest = lend_destination(child, tid, nbytes)
          t = time.perf_counter()
          handle = sender.send(kv, dest, timeout_s=60)
          send_s = time.perf_counter() - t
          got = child.ask({"cmd": "receive", "handle": _encode(handle)})
          correct[mode] &= (got["checksum"] == want_sum
                            and got["head"] == want_head
                            and got["live"] == 0)
          if "recv_first_ms" not in row:   # it imports the region's view
            row["recv_first_ms"] = got["recv_s"] * 1e3
          if r:
            run = runs[mode]
            run["send_phases"].append(dict(sender.last_phases))
            run["recv_phases"].append(got["phases"])
            run["send"].append(send_s)
            run["recv"].append(got["recv_s"])
            run["e2e"].append(got["t_done"] - t)
            run["insert"].append(got["insert_s"])
            run["view"].append(got["view"])
      for mode, run in runs.items():
        sfx = "" if mode == "event" else "_" + mode
        row.update({
            f"send{sfx}_GBps": nbytes / _median(run["send"]) / 1e9,
            f"recv{sfx}_GBps": nbytes / _median(run["recv"]) / 1e9,
            f"e2e{sfx}_GBps": nbytes / _median(run["e2e"]) / 1e9,
            f"send{sfx}_ms": _median(run["send"]) * 1e3,
            f"recv{sfx}_ms": _median(run["recv"]) * 1e3,
            f"e2e{sfx}_ms": _median(run["e2e"]) * 1e3,
            f"send{sfx}_phases_ms": {
                k: _median([p[k] for p in run["send_phases"]])
                for k in run["send_phases"][0]},
            f"recv{sfx}_phases_ms": {
                k: _median([p[k] for p in run["recv_phases"]])
                for k in run["recv_phases"][0]}})
        row[f"e2e{sfx}_over_raw"] = (row[f"e2e{sfx}_GBps"]
                                     / row["raw_ipc_GBps"])
      inserts = [x for run in runs.values() for x in run["insert"]]
      row.update(insert_ms=_median(inserts) * 1e3,
                 insert_GBps=nbytes / _median(inserts) / 1e9,
                 zero_copy=all(v for run in runs.values()
                               for v in run["view"]))

      # A stream: stream_k hand-offs back to back into as many regions.
      for mode in SIGNALS if args.stream_k else ():
        sender.signal = mode
        rates = []
        for r in range(args.reps + 1):
          dests = [lend_destination(child, f"st-{i}-{mode}-{r}-{k}", nbytes)
                   for k in range(args.stream_k)]
          t0 = time.perf_counter()
          for dest in dests:
            child.write({"cmd": "receive", "hold": True,
                         "handle": _encode(sender.send(kv, dest,
                                                       timeout_s=60))})
          got = [child.answer() for _ in dests]
          span = max(g["t_done"] for g in got) - t0
          checked = child.ask({"cmd": "check_held"})
          correct[mode] &= checked["live"] == 0 and all(
              c["checksum"] == want_sum and c["head"] == want_head
              and c["view"] for c in checked["checks"])
          if r:
            rates.append(args.stream_k * nbytes / span)
        sfx = "" if mode == "event" else "_" + mode
        row[f"stream{sfx}_GBps"] = _median(rates) / 1e9
        row[f"stream{sfx}_over_raw"] = (row[f"stream{sfx}_GBps"]
                                        / row["raw_ipc_GBps"])
      row["correct_by_signal"] = correct
      row["correct"] = all(correct.values())
      results["rows"].append(row)
      write()
      del x, kv
  finally:
    sender.close()
    child.close()
  results["elapsed_s"] = time.monotonic() - start
  write()
  print(f"GB/s (rates) and their share of the raw IPC copy; _sync: the "
        f"sender synchronizes, else it signals by event; stream: "
        f"{args.stream_k} hand-offs back to back")
  _table(results["rows"], ("mib", "device_put_GBps", "raw_ipc_GBps",
                           "e2e_sync_GBps", "e2e_GBps", "e2e_sync_over_raw",
                           "e2e_over_raw", "stream_sync_GBps", "stream_GBps",
                           "stream_over_raw", "correct"))
  print("one hand-off, ms")
  _table(results["rows"], ("mib", "send_sync_ms", "recv_sync_ms",
                           "e2e_sync_ms", "send_ms", "recv_ms", "e2e_ms",
                           "recv_first_ms", "insert_GBps", "zero_copy"))
  print("one hand-off (event), phases, ms")
  _table([{"mib": r["mib"],
           **{"send_" + k: v for k, v in r["send_phases_ms"].items()},
           **{"recv_" + k: v for k, v in r["recv_phases_ms"].items()}}
          for r in results["rows"]],
         ("mib", "send_first_copy_ms", "send_issue_ms", "send_total_ms",
          "recv_wait_ms", "recv_view_ms", "recv_after_wait_ms",
          "recv_total_ms"))
  print(json.dumps({"summary": results["rows"]}))
  return 0 if all(r["correct"] for r in results["rows"]) else 1


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--sizes_mib", default="128,512,2048,4096")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--out", default=None, help="JSON results file")
  ap.add_argument("--budget_s", type=float, default=90.0,
                  help="no new size starts after this long")
  ap.add_argument("--stream_k", type=int, default=8,
                  help="hand-offs per stream measurement (0: none); the "
                       "receiver allocates this many landing buffers of the "
                       "largest size (8 x 4 GiB at the default sizes)")
  ap.add_argument("--role", default="sender", choices=["sender", "receiver"])
  ap.add_argument("--device", type=int, default=1, help=argparse.SUPPRESS)
  ap.add_argument("--pool_bytes", type=int, default=0, help=argparse.SUPPRESS)
  ap.add_argument("--pool_buffers", type=int, default=1,
                  help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.role == "receiver":
    return receiver_main(args)
  return sender_main(args)


if __name__ == "__main__":
  sys.exit(main())
