r"""KV hand-off benchmark: each transport's GB/s against the device link.

A request KV (the prefill engine's page layout ``[layers, 2, pages, page,
kv_heads, head_dim]``, every page carrying data) of each size is handed from
a prefill-side layout on device 0 to a decode replica's layout, through the
transports' own classes, and timed end to end:

* ``local``: ``LocalSender`` -> ``LocalReceiver`` in this process; the
  receiver ``device_put``s onto device 1 when there are two devices. On a
  single device the decode layout is the prefill layout and the hand-off is
  zero-copy (reported as such, not as a rate).
* ``device``: ``DeviceSender`` here -> ``DeviceReceiver`` in a child
  process (``jax.experimental.transfer``: the child pulls).
* ``grpc``: ``GrpcStreamSender`` here -> a ``GrpcStreamReceiver`` behind a
  ``KvTransfer`` gRPC server in the child, then its ``receive`` (one
  ``device_put`` into the replica layout). ``--grpc_chunk_mib`` sets the
  chunk size.

The child is a fresh program started with ``subprocess`` (never a fork of a
process that has initialised JAX), talking JSON lines over its stdin and
stdout; it uses device 1 when two exist, else shares device 0 (both
processes then run with ``XLA_PYTHON_CLIENT_PREALLOCATE=false``, which this
tool sets unless the environment says otherwise).

Time: ``e2e`` runs from the sender's ``send`` call to the receiver holding
the array in its final layout (for the child transports it includes one
pipe round trip, well under a millisecond). GB/s = payload bytes / e2e.
Every hand-off is checked: a position-weighted checksum of the bits is
computed on device on both sides and must be equal.

Ceiling, measured in the same run: ``jax.device_put`` from device 0 to
device 1 when there are two devices (the peer-to-peer link), else a
same-device copy (a jitted negation: bytes / time, which moves the bytes
through HBM twice). Each path's ratio is its GB/s over that ceiling.

Examples:
  python tools/bench_transfer.py --sizes_mib=1,4 --transports=local,device,grpc
  python tools/bench_transfer.py --model=llama3-8b \
      --sizes_mib=128,512,2048,4096 --out=/tmp/transfer.jsonl
"""

from __future__ import annotations

import base64
import gc
import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
from concurrent import futures

# Two JAX processes share the device(s): neither may grab most of the memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import bench_common as bc  # noqa: E402  Sets sys.path and XLA_FLAGS first.

from absl import app, flags  # noqa: E402

bc.define_common_flags()
flags.DEFINE_string("transports", "local,device,grpc",
                    "Transports to measure.")
flags.DEFINE_string("sizes_mib", None,
                    "KV payload sizes in MiB (default 128,512,2048,4096 on "
                    "GPU, 1,4,16 on CPU); rounded to whole pages.")
flags.DEFINE_integer("grpc_max_mib", None,
                     "Larger sizes skip grpc (host staging is slow; default "
                     "1024 on GPU, no cap on CPU).")
flags.DEFINE_integer("grpc_chunk_mib", 4, "gRPC KV chunk size (MiB).")
flags.DEFINE_integer("device_connections", 4,
                     "Transport connections of each transfer server.")
flags.DEFINE_integer("page_size", 16, "Tokens per KV page.")
flags.DEFINE_float("timeout_s", 300.0,
                   "Deadline of one hand-off and of the child's start.")
flags.DEFINE_enum("role", "parent", ["parent", "child"],
                  "Internal: the child process runs the receivers.")
flags.DEFINE_integer("child_device", 0, "Internal: the child's device index.")
FLAGS = flags.FLAGS

TOOL = "bench_transfer"
_PREFIX = "@@"  # Marks protocol lines on the child's stdout.


# ------------------------------------------------------------------ payloads
def _linear_index(shape):
  """uint32 linear index of every element (wrapping past 2**32)."""
  import jax
  import jax.numpy as jnp
  idx = jnp.zeros(shape, jnp.uint32)
  for d, n in enumerate(shape):
    idx = idx * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, shape, d)
  return idx


def _uint_dtype(dtype):
  import jax.numpy as jnp
  return {2: jnp.uint16, 4: jnp.uint32}[jnp.dtype(dtype).itemsize]


def make_payload(shape, dtype, sharding, seed: int):
  """A KV-shaped array of finite values with a distinct bit pattern per
  element, made on its devices (an 8B model's 4 GiB never touches host)."""
  import jax
  import jax.numpy as jnp
  udt = _uint_dtype(dtype)
  mask = 0x3FFF if jnp.dtype(udt).itemsize == 2 else 0x3FFFFFFF

  def fill():
    h = (_linear_index(shape) ^ jnp.uint32(seed)) * jnp.uint32(2654435761)
    h = h ^ (h >> 15)
    bits = (h & jnp.uint32(mask)).astype(udt)  # exponent < max: no inf/nan
    return jax.lax.bitcast_convert_type(bits, dtype)

  return jax.jit(fill, out_shardings=sharding)()


_CHECKSUM_FNS = {}


def checksum(x) -> int:
  """Position-weighted sum of the bits, mod 2**32, computed on device."""
  import jax
  import jax.numpy as jnp
  key = (x.shape, str(x.dtype))
  if key not in _CHECKSUM_FNS:
    udt = _uint_dtype(x.dtype)

    def fn(a):
      u = jax.lax.bitcast_convert_type(a, udt).astype(jnp.uint32)
      w = _linear_index(a.shape) * jnp.uint32(2246822519) + jnp.uint32(
          374761393)
      return jnp.sum(u * (w | jnp.uint32(1)), dtype=jnp.uint32)

    _CHECKSUM_FNS[key] = jax.jit(fn)
  return int(_CHECKSUM_FNS[key](x))


def _same_buffers(a, b) -> bool:
  """Whether ``a`` reuses ``b``'s device buffers (a hand-off that moved
  nothing: one device, equivalent layouts)."""
  if a is b:
    return True
  def ptrs(x):
    return sorted(s.data.unsafe_buffer_pointer() for s in x.addressable_shards)

  try:
    return ptrs(a) == ptrs(b)
  except Exception:  # pylint: disable=broad-except
    return False


def _grpc_options(chunk_bytes: int):
  n = max(64 << 20, 2 * chunk_bytes + (1 << 20))
  return [("grpc.max_receive_message_length", n),
          ("grpc.max_send_message_length", n)]


def _decode_sharding(device, shape):
  """A decode replica's payload layout on ``device`` (decode_dp rules)."""
  from pdjax.engine.kv import kv_sharding
  from pdjax.sharding import ShardingRules, make_mesh, replica_meshes
  sub = replica_meshes(make_mesh({"dp": 1}, [device]), "dp")[0]
  rules = ShardingRules.load("decode_dp").without("dp")
  return kv_sharding(rules, sub, shape)


# ------------------------------------------------------------------ child
def _emit(obj) -> None:
  sys.stdout.write(_PREFIX + json.dumps(obj) + "\n")
  sys.stdout.flush()


def child_main() -> None:
  """The receiving side: DeviceReceiver and a KvTransfer gRPC server."""
  import grpc
  import jax
  from pdjax.transfer.device import DeviceReceiver
  from pdjax.transfer.grpc_stream import GrpcStreamReceiver
  from pdjax.v1 import decode_pb2_grpc, kv_pb2

  devices = jax.devices()
  dev = devices[min(FLAGS.child_device, len(devices) - 1)]
  drecv = DeviceReceiver(dev, connections=FLAGS.device_connections)
  grecv = GrpcStreamReceiver(ttl_s=FLAGS.timeout_s * 4)

  class Servicer(decode_pb2_grpc.KvTransferServicer):
    """The synchronous form of the decode service's KvTransfer intake."""

    def PushKv(self, request_iterator, context):  # noqa: N802
      try:
        return grecv.push(request_iterator)
      except Exception as e:  # pylint: disable=broad-except
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

  chunk = FLAGS.grpc_chunk_mib << 20
  server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                       options=_grpc_options(chunk))
  decode_pb2_grpc.add_KvTransferServicer_to_server(Servicer(), server)
  port = server.add_insecure_port("127.0.0.1:0")
  server.start()
  _emit({"ready": True, "device": str(dev), "device_kind": dev.device_kind,
         "grpc_address": f"127.0.0.1:{port}"})
  for line in sys.stdin:
    msg = json.loads(line)
    op = msg["op"]
    try:
      if op == "quit":
        break
      if op == "expect":
        # As the decode worker does: the id is bound to a reservation of
        # this many pages.
        drecv.expect(msg["tid"], "bench", max_pages=msg["max_pages"])
        grecv.expect(msg["tid"], "bench", max_pages=msg["max_pages"])
        _emit({"ok": True})
        continue
      handle = kv_pb2.KvHandle.FromString(base64.b64decode(msg["handle"]))
      sharding = _decode_sharding(dev, tuple(handle.shape))
      recv = drecv if op == "device" else grecv
      t0 = time.perf_counter()
      kv = recv.receive(handle, sharding, timeout_s=FLAGS.timeout_s)
      kv.kv.block_until_ready()
      recv_s = time.perf_counter() - t0
      _emit({"ok": True, "recv_s": recv_s, "checksum": checksum(kv.kv),
             "nbytes": kv.kv.nbytes})
      del kv
    except Exception as e:  # pylint: disable=broad-except
      _emit({"ok": False, "error": f"{type(e).__name__}: {e}"})
  server.stop(0)


class Child:
  """The receiver process and its JSON-lines channel."""

  def __init__(self, device_index: int, timeout_s: float):
    env = dict(os.environ)
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    cmd = [sys.executable, os.path.abspath(__file__), "--role=child",
           f"--child_device={device_index}",
           f"--device_connections={FLAGS.device_connections}",
           f"--grpc_chunk_mib={FLAGS.grpc_chunk_mib}",
           f"--timeout_s={FLAGS.timeout_s}"]
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, env=env, text=True,
                                 bufsize=1)
    self._lines: queue.Queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()
    self.info = self._next(timeout_s)
    if not self.info.get("ready"):
      raise RuntimeError(f"receiver process did not start: {self.info}")

  def _read(self) -> None:
    for line in self.proc.stdout:
      if line.startswith(_PREFIX):
        self._lines.put(json.loads(line[len(_PREFIX):]))
      else:
        sys.stderr.write("[child] " + line)
    self._lines.put({"ok": False, "error": "receiver process exited "
                     f"(code {self.proc.poll()})"})

  def _next(self, timeout_s: float):
    try:
      return self._lines.get(timeout=timeout_s)
    except queue.Empty:
      raise TimeoutError(f"receiver process silent for {timeout_s:.0f} s")

  def request(self, msg, timeout_s: float):
    self.proc.stdin.write(json.dumps(msg) + "\n")
    self.proc.stdin.flush()
    reply = self._next(timeout_s)
    if not reply.get("ok"):
      raise RuntimeError(reply.get("error", reply))
    return reply

  def close(self) -> None:
    try:
      self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
      self.proc.stdin.flush()
      self.proc.wait(timeout=30)
    except Exception:  # pylint: disable=broad-except
      self.proc.kill()
      self.proc.wait()


# ------------------------------------------------------------------ parent
def _hand_offs(transport, kv, child, senders, local, timeout_s, repeat,
               warmup):
  """Runs warmup + repeat hand-offs; returns (timings, per-sample info)."""
  import jax
  from pdjax.transfer.base import new_transfer_id
  from pdjax.v1 import kv_pb2
  e2e, recv, send, sums, zero_copy = [], [], [], [], False
  for i in range(warmup + repeat):
    tid = new_transfer_id()
    if transport == "local":
      sender, receiver, sharding = local
      receiver.expect(tid, "bench")
      t0 = time.perf_counter()
      handle = sender.send(kv, kv_pb2.KvDestination(
          transport="local", transfer_id=tid), timeout_s=timeout_s)
      t1 = time.perf_counter()
      out = receiver.receive(handle, sharding, timeout_s=timeout_s)
      jax.block_until_ready(out.kv)
      t2 = time.perf_counter()
      zero_copy = _same_buffers(out.kv, kv.kv)
      cs = checksum(out.kv)
      r_s = t2 - t1
      del out
    else:
      child.request({"op": "expect", "tid": tid,
                     "max_pages": int(kv.kv.shape[2])}, timeout_s)
      sender = senders[transport]
      dest = kv_pb2.KvDestination(
          transport=transport, transfer_id=tid, decode_tp=1,
          decode_address=child.info["grpc_address"])
      t0 = time.perf_counter()
      handle = sender.send(kv, dest, timeout_s=timeout_s)
      t1 = time.perf_counter()
      reply = child.request({"op": transport, "handle": base64.b64encode(
          handle.SerializeToString()).decode()}, timeout_s)
      t2 = time.perf_counter()
      sender.release(tid)
      cs, r_s = reply["checksum"], reply["recv_s"]
    if i >= warmup:
      e2e.append(t2 - t0)
      send.append(t1 - t0)
      recv.append(r_s)
    sums.append(cs)
  return (bc.Timing(e2e), bc.Timing(send), bc.Timing(recv), sums, zero_copy)


def main(argv) -> None:
  del argv
  if FLAGS.role == "child":
    child_main()
    return
  import grpc
  import jax
  from pdjax.engine.kv import kv_sharding, request_kv_shape
  from pdjax.engine.requests import RequestKV
  from pdjax.sharding import ShardingRules, make_mesh
  from pdjax.transfer.device import DeviceSender
  from pdjax.transfer.grpc_stream import GrpcStreamSender
  from pdjax.transfer.local import (LocalKvExchange, LocalReceiver,
                                    LocalSender)

  cfg = bc.model_from_flags()
  limits = bc.resolve_limits()
  writer = bc.RecordWriter(FLAGS.out, model=FLAGS.model, cfg=cfg,
                           limits=limits)
  gpu = bc.is_gpu()
  devices = jax.devices()
  src, dst = devices[0], devices[1 if len(devices) > 1 else 0]
  sizes = bc.parse_ints(FLAGS.sizes_mib or (
      "128,512,2048,4096" if gpu else "1,4,16"))
  grpc_max = FLAGS.grpc_max_mib or (1024 if gpu else None)
  transports = [t for t in FLAGS.transports.split(",") if t]
  P = FLAGS.page_size
  page_bytes = (jax.numpy.dtype(cfg.jnp_dtype).itemsize
                * math.prod(request_kv_shape(cfg, 1, P)))
  prefill_mesh = make_mesh({"tp": 1}, [src])
  prefill_rules = ShardingRules.load("prefill_tp")
  print(f"transfer benchmark: {cfg.name} KV ({page_bytes} B/page) on "
        f"{len(devices)} x {bc.device_kind()}; sender device {src}, local "
        f"receiver device {dst}", flush=True)

  def start_child():
    """The receiver process, or None (recorded) if it cannot start: the
    in-process transport is still measured."""
    t0 = time.perf_counter()
    try:
      c = Child(1 if len(devices) > 1 else 0, FLAGS.timeout_s)
    except Exception as e:  # pylint: disable=broad-except
      print(f"receiver process failed to start: {e}", flush=True)
      writer.write(TOOL, "error", {"transport": "child"},
                   {"error": str(e)[:2000]})
      return None
    print(f"receiver process ready in {time.perf_counter() - t0:.1f} s on "
          f"{c.info['device']}", flush=True)
    return c

  child = None
  senders = {}
  if "device" in transports or "grpc" in transports:
    child = start_child()
    if child is None:
      transports = [t for t in transports if t == "local"]
    if "device" in transports:
      senders["device"] = DeviceSender(
          src, connections=FLAGS.device_connections,
          ttl_s=FLAGS.timeout_s * 4)
    if "grpc" in transports:
      opts = _grpc_options(FLAGS.grpc_chunk_mib << 20)
      senders["grpc"] = GrpcStreamSender(
          lambda addr: grpc.insecure_channel(addr, options=opts),
          chunk_bytes=FLAGS.grpc_chunk_mib << 20)
  exchange = LocalKvExchange(ttl_s=FLAGS.timeout_s * 4)
  try:
    for mib in sizes:
      pages = max(1, (mib << 20) // page_bytes)
      shape = request_kv_shape(cfg, pages, P)
      sharding = kv_sharding(prefill_rules, prefill_mesh, shape)
      payload = make_payload(shape, cfg.jnp_dtype, sharding, FLAGS.seed + mib)
      kv = RequestKV(payload, pages * P)
      nbytes = payload.nbytes
      src_sum = checksum(payload)
      base = {"size_mib": mib, "pages": pages, "page_size": P,
              "bytes": nbytes, "shape": list(shape),
              "warmup": FLAGS.warmup, "repeat": FLAGS.repeat}
      # The ceilings.
      ceiling = {}
      neg = jax.jit(lambda x: -x)
      warm, rep = max(FLAGS.warmup, 2), max(FLAGS.repeat, 5)
      t = bc.time_calls(lambda: neg(payload), warmup=warm, repeat=rep)
      ceiling["device_copy"] = nbytes / t.median
      writer.write(TOOL, "ceiling", {**base, "path": "device_copy"},
                   {"time_s": t.as_dict(), "bw": ceiling["device_copy"],
                    "hbm_traffic_bw": 2 * ceiling["device_copy"]})
      if len(devices) > 1:
        to = _decode_sharding(dst, shape)  # Where local's receiver puts it.
        t = bc.time_calls(lambda: jax.device_put(payload, to), warmup=warm,
                          repeat=rep)
        ceiling["p2p"] = nbytes / t.median
        writer.write(TOOL, "ceiling", {**base, "path": "p2p"},
                     {"time_s": t.as_dict(), "bw": ceiling["p2p"]})
      ceil_name = "p2p" if "p2p" in ceiling else "device_copy"
      print(f"{mib} MiB: ceiling {ceil_name} "
            f"{ceiling[ceil_name] / 1e9:.1f} GB/s", flush=True)
      for transport in transports:
        params = {**base, "transport": transport, "ceiling_path": ceil_name}
        if transport == "grpc":
          params["chunk_mib"] = FLAGS.grpc_chunk_mib
          if grpc_max and mib > grpc_max:
            writer.write(TOOL, "skipped", params,
                         {"reason": f"> --grpc_max_mib={grpc_max}"})
            continue
        if transport == "device":
          params["connections"] = FLAGS.device_connections
        try:
          local = (LocalSender(exchange), LocalReceiver(exchange),
                   _decode_sharding(dst, shape))
          # At least one warm-up hand-off: the first one of a transport
          # opens connections and compiles the receiver's programs.
          e2e, send, recv, sums, zero_copy = _hand_offs(
              transport, kv, child, senders, local, FLAGS.timeout_s,
              max(FLAGS.repeat, 1), max(FLAGS.warmup, 1))
        except Exception as e:  # pylint: disable=broad-except
          traceback.print_exc()
          print(f"  {transport} {mib} MiB: FAILED: {e}", flush=True)
          writer.write(TOOL, "error", params, {"error": str(e)[:2000]})
          if transport != "local" and child is not None:
            child.close()  # It may be wedged: start a fresh one.
            child = start_child()
            if child is None:
              transports = [t for t in transports if t == "local"]
          continue
        bw = None if zero_copy else nbytes / e2e.median
        results = {
            "e2e_time_s": e2e.as_dict(), "send_time_s": send.as_dict(),
            "recv_time_s": recv.as_dict(), "bw": bw,
            "recv_bw": None if zero_copy else nbytes / recv.median,
            "zero_copy": zero_copy,
            "checksum_ok": all(s == src_sum for s in sums),
            "ceiling_bw": ceiling[ceil_name], "ceilings": ceiling,
            "ratio_to_ceiling": bc.ratio(bw, ceiling[ceil_name])}
        writer.write(TOOL, "transfer", params, results)
        print(f"  {transport:6s} {mib:5d} MiB: "
              + ("zero-copy" if zero_copy else f"{bw / 1e9:.2f} GB/s")
              + f" ({e2e.median * 1e3:.2f} ms), checksum "
              f"{'ok' if results['checksum_ok'] else 'MISMATCH'}", flush=True)
      payload = kv = None  # Frees this size's arrays before the next.
      gc.collect()
  finally:
    if child is not None:
      child.close()
    for s in senders.values():
      s.close()
  _print_summary(writer.records)


def _print_summary(records) -> None:
  rows = []
  for r in records:
    if r["measurement"] != "transfer":
      continue
    p, x = r["params"], r["results"]
    rows.append([
        p["transport"], p["size_mib"],
        bc.fmt(x["e2e_time_s"]["median"] * 1e3, ".2f"),
        "zero-copy" if x["zero_copy"] else bc.fmt(x["bw"] / 1e9, ".2f"),
        "-" if x["zero_copy"] else bc.fmt(x["recv_bw"] / 1e9, ".2f"),
        f"{p['ceiling_path']} {x['ceiling_bw'] / 1e9:.1f}",
        bc.fmt(x["ratio_to_ceiling"], ".1%"),
        "ok" if x["checksum_ok"] else "MISMATCH"])
  bc.print_table(
      "KV hand-off (median e2e: send call -> receiver holds it in its layout)",
      ["transport", "MiB", "e2e_ms", "GB/s", "recv_GB/s", "ceiling GB/s",
       "vs_ceiling", "bytes"], rows,
      "ceiling: p2p = jax.device_put device 0 -> 1 (one process); "
      "device_copy = same-device copy (bytes/time; HBM moves 2x).")
  bad = [r for r in records if r["measurement"] == "error"]
  if bad:
    print("FAILED: " + "; ".join(
        f"{r['params'].get('transport')}"
        + (f" {r['params']['size_mib']} MiB" if "size_mib" in r["params"]
           else "") + f": {r['results']['error'][:200]}" for r in bad))


if __name__ == "__main__":
  app.run(main)
