r"""How much of the CUDA IPC KV hand-off a prefill in layer groups hides.

The prefill worker starts a request's hand-off as soon as its prefill is
dispatched (``PrefillEngine.prefill(kv_ready=...)``); with
``layer_groups`` = G the engine runs the layers as G programs, and the
sender copies each group's KV into the decode worker's landing region while
later groups compute. What TTFT still pays is the hand-off left once the
first token is known. This tool measures it on the real path: this process
is the prefill side (GPU 0: ``PrefillEngine`` on a Llama-3-8B-shaped model,
random bf16 weights, ``CudaIpcSender``), a receiver process on GPU 1 lends
landing regions and reads them (``tools/gpu/ipc_bandwidth.py``'s receiver:
``LandingPool`` + ``CudaIpcReceiver``). Per prompt length and G, median of
``--reps``:

* ``alone_ms``: the prefill with no hand-off (dispatch -> first token on
  the host), for this G; ``tflops``: its useful FLOP rate (does splitting
  the layers into programs cost compute?);
* ``tail_ms``: from the moment the last layer's KV is done to the moment
  the KV is in the landing region: the hand-off left after the layers.
  At G=1 that is the whole copy; ``hidden``: ``1 - tail_ms / tail_ms(G=1)``;
* ``head_ms``: from the last layer's KV done to the first token on the host
  (final norm, LM head, sampling, the read-back): the time a tail shorter
  than it costs nothing;
* ``exposed_ms``: how far the hand-off ran past the first token (what it
  adds to TTFT);
* ``copy_ms``: the KV's bytes at the raw IPC rate measured in the same run.

Medians over runs of per-run differences: the GPU's own run-to-run
spread (several ms at 8K tokens) is larger than the copy, so comparing
two medians of whole prefills would measure that spread, not the hand-off.
Runs with and without the hand-off alternate.

Every hand-off is checked: the landed bits' checksum equals the KV's, and
the first token is the same for every G.

  python tools/gpu/handoff_overlap.py --out /tmp/overlap.json
  python tools/gpu/handoff_overlap.py --fake --model tiny   # CPU, fake CUDA

``--fake`` runs everything in this process with the fake CUDA driver (host
memory, real byte copies): the logic, not the speed.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("NVSHMEM_DISABLE_NVLS", "1"),
               ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")):
  os.environ.setdefault(_k, _v)

ROOT = Path(__file__).resolve().parents[2]
for _p in (ROOT, ROOT / "tools", ROOT / "tools" / "gpu"):
  if str(_p) not in sys.path:
    sys.path.insert(0, str(_p))

import ipc_bandwidth as ib  # noqa: E402  (the receiver process and checksum)


class _FakeReceiver:
  """The receiver's commands served in this process over the fake driver
  (the sender shares its registry, so its copies land here)."""

  def __init__(self, registry, pool_bytes: int, device):
    from pdjax.transfer import cuda_ipc as ci
    self.pool = ci.LandingPool(ci.FakeCudaDriver(registry), 0, 1, pool_bytes,
                               lease_s=3600.0)
    self.receiver = ci.CudaIpcReceiver(self.pool, device)
    self.device = device
    self.checksum = ib._checksum_fn()  # pylint: disable=protected-access

  def ask(self, cmd):
    from jax.sharding import SingleDeviceSharding
    from pdjax.v1 import kv_pb2
    if cmd["cmd"] == "lend":
      self.receiver.expect(cmd["tid"], "bench")
      slot = self.receiver.lend(cmd["tid"], cmd["nbytes"])
      return None if slot is None else {
          "handle": slot.handle.hex(), "offset": slot.offset,
          "nbytes": slot.nbytes, "deadline_ms": slot.deadline_ms}
    if cmd["cmd"] == "discard":
      self.receiver.discard(cmd["tid"])
      self.receiver.forget(cmd["tid"])
      return {"ok": True}
    handle = kv_pb2.KvHandle.FromString(base64.b64decode(cmd["handle"]))
    out = self.receiver.receive(handle, SingleDeviceSharding(self.device),
                                timeout_s=60)
    got = {"checksum": self.checksum(out.kv)}
    out.release()
    got["live"] = self.receiver.live()
    return got

  def close(self):
    self.pool.close()


def _median(xs):
  xs = sorted(xs)
  return xs[len(xs) // 2]


def _raw_rate(child, sender, nbytes: int, device, reps: int = 5) -> float:
  """Bytes/s of one bare cuMemcpyDtoD of ``nbytes`` into a lent region."""
  import jax
  import jax.numpy as jnp
  src = jax.device_put(jnp.zeros((nbytes,), jnp.uint8), device)
  src.block_until_ready()
  slot = child.ask({"cmd": "lend", "tid": "raw", "nbytes": nbytes})
  driver = sender.driver
  from pdjax.transfer.cuda_ipc import device_ordinal
  ordinal = device_ordinal(device)
  with sender._lock:  # pylint: disable=protected-access
    remote = sender.remote_pointer(ordinal, bytes.fromhex(slot["handle"]))
  ptr = src.addressable_data(0).unsafe_buffer_pointer()
  ts = []
  for r in range(reps + 1):
    t = time.perf_counter()
    driver.memcpy_dtod(ordinal, remote + slot["offset"], ptr, nbytes)
    driver.synchronize(ordinal)
    if r:
      ts.append(time.perf_counter() - t)
  child.ask({"cmd": "discard", "tid": "raw"})
  return nbytes / _median(ts)


def run(args) -> dict:
  import jax
  import numpy as np

  import bench_common as bc
  from pdjax.engine.kv import payload_pages
  from pdjax.engine.prefill import PrefillConfig, PrefillEngine
  from pdjax.engine.requests import PrefillRequest
  from pdjax.engine.sampling import SamplingParams
  from pdjax.model.presets import preset_config
  from pdjax.sharding import ShardingRules, make_mesh
  from pdjax.transfer import cuda_ipc as ci

  start = time.monotonic()
  cfg = preset_config(args.model)
  lengths = [int(x) for x in args.lengths.split(",")]
  groups = [int(x) for x in args.groups.split(",")]
  P = 16
  src_dev = jax.devices()[0]
  rules = ShardingRules.load("prefill_tp")
  mesh = make_mesh({"tp": 1}, [src_dev])
  params = bc.random_params(cfg, rules, mesh)
  item = np.dtype(cfg.jnp_dtype).itemsize
  page_bytes = cfg.num_layers * 2 * P * cfg.num_kv_heads * cfg.head_dim * item
  pool_bytes = max(payload_pages(T // P) for T in lengths) * page_bytes
  checksum = ib._checksum_fn()  # pylint: disable=protected-access
  if args.fake:
    registry = ci.FakeIpcRegistry()
    child = _FakeReceiver(registry, pool_bytes, jax.devices()[-1])
    sender = ci.CudaIpcSender(ci.FakeCudaDriver(registry), signal="sync")
  else:
    child = ib._Child([sys.executable,  # pylint: disable=protected-access
                       str(Path(ib.__file__).resolve()), "--role",
                       "receiver", "--device", "1", "--pool_bytes",
                       str(pool_bytes)])
    ready = child.read(timeout_s=180)
    assert ready.get("ready"), ready
    sender = ci.CudaIpcSender(ci.RealCudaDriver(), signal="sync")
  raw_rate = _raw_rate(child, sender, pool_bytes, src_dev)
  threads = concurrent.futures.ThreadPoolExecutor(2)
  greedy = SamplingParams(max_tokens=1, temperature=0.0)
  results = {"device": src_dev.device_kind, "model": cfg.name,
             "kv": f"{page_bytes} bytes a page of {P} tokens",
             "raw_ipc_GBps": raw_rate / 1e9, "rows": []}

  def write():
    if args.out:
      Path(args.out).parent.mkdir(parents=True, exist_ok=True)
      Path(args.out).write_text(json.dumps(results, indent=1))

  def timed_send(kv, dest):
    # The sender synchronizes (signal="sync"), so its return is when the KV
    # is in the landing region (with the event signal it returns earlier).
    handle = sender.send(kv, dest, timeout_s=60)
    return handle, time.perf_counter()

  def watch(kv):
    """When each layer group's KV was done (beside the send, not before)."""
    ready = []
    for piece in kv.pieces:
      piece.block_until_ready()
      ready.append(time.perf_counter())
    return ready

  try:
    for T in lengths:
      rng = np.random.default_rng(T)
      prompt = rng.integers(3, cfg.vocab_size, T).tolist()
      base = None
      for G in groups:
        if time.monotonic() - start > args.budget_s:
          results["stopped"] = f"budget of {args.budget_s} s spent"
          break
        config = PrefillConfig(buckets=(T,), max_batch=1, page_size=P,
                               max_seq_len=2 * T, layer_groups=G)
        engine = PrefillEngine(params, cfg, mesh, rules, config)
        rows, alone = [], []
        for rep in range(args.reps + 1):   # the first call compiles
          tid = f"{T}-{G}-{rep}"
          nbytes = payload_pages(T // P) * page_bytes
          t0 = time.perf_counter()
          engine.prefill([PrefillRequest(tid, prompt, greedy)])
          if rep:
            alone.append(time.perf_counter() - t0)
          dest = ib.lend_destination(child, tid, nbytes)
          box = {}

          def kv_ready(i, kv, dest=dest, box=box):
            box["called"] = time.perf_counter()
            box["send"] = threads.submit(timed_send, kv, dest)
            box["watch"] = threads.submit(watch, kv)

          t0 = time.perf_counter()
          (res,) = engine.prefill([PrefillRequest(tid, prompt, greedy)],
                                  kv_ready=kv_ready)
          t1 = time.perf_counter()
          handle, t_sent = box["send"].result()
          ready = box["watch"].result()
          got = child.ask({"cmd": "receive", "handle": base64.b64encode(
              handle.SerializeToString()).decode()})
          ok = (got["checksum"] == checksum(res.kv.kv) and got["live"] == 0)
          if rep:
            rows.append({"prefill_s": t1 - t0,
                         "exposed_s": max(0.0, t_sent - t1),
                         "alone_s": alone[-1],
                         # since dispatch: kv_ready called, each group's
                         # KV done, the copy done, first token on host
                         "kv_ready_ms": (box["called"] - t0) * 1e3,
                         "group_done_ms": [(t - t0) * 1e3 for t in ready],
                         "sent_ms": (t_sent - t0) * 1e3,
                         "token_ms": (t1 - t0) * 1e3,
                         "token": res.first_token, "ok": ok})
        row = {
            "prompt_len": T, "layer_groups": G, "kv_bytes": nbytes,
            "alone_ms": _median(alone) * 1e3,
            "exposed_ms": _median([r["exposed_s"] for r in rows]) * 1e3,
            "correct": all(r["ok"] for r in rows),
            "first_token": rows[0]["token"],
            "same_token": len({r["token"] for r in rows}) == 1}
        last = [r["group_done_ms"][-1] for r in rows]
        row["tail_ms"] = _median([r["sent_ms"] - t
                                  for r, t in zip(rows, last)])
        row["head_ms"] = _median([r["token_ms"] - t
                                  for r, t in zip(rows, last)])
        row["copy_ms"] = nbytes / raw_rate * 1e3
        row["tflops"] = (bc.prefill_flops(cfg, 1, T)["total"]
                         / (row["alone_ms"] / 1e3) / 1e12)
        if base is None:
          base = row
        row["hidden"] = 1 - row["tail_ms"] / base["tail_ms"]
        row["alone_vs_g1"] = row["alone_ms"] / base["alone_ms"]
        row["reps"] = rows
        row["token_as_g1"] = row["first_token"] == base["first_token"]
        results["rows"].append(row)
        write()
        print(json.dumps(row), flush=True)
  finally:
    threads.shutdown()
    sender.close()
    child.close()
  results["elapsed_s"] = time.monotonic() - start
  write()
  return results


def print_table(results) -> None:
  print(f"raw IPC copy: {results['raw_ipc_GBps']:.1f} GB/s")
  cols = ("prompt_len", "layer_groups", "alone_ms", "alone_vs_g1", "tflops",
          "copy_ms", "tail_ms", "hidden", "head_ms", "exposed_ms",
          "correct", "token_as_g1")
  print(" | ".join(f"{c:>13}" for c in cols))
  for row in results["rows"]:
    print(" | ".join(
        f"{row[c]:>13.3f}" if isinstance(row[c], float)
        else f"{'n/a' if row[c] is None else row[c]!s:>13}" for c in cols))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--model", default="llama3-8b")
  ap.add_argument("--lengths", default="2048,8192")
  ap.add_argument("--groups", default="1,2,4,8",
                  help="layer-group counts; the first is the baseline")
  ap.add_argument("--reps", type=int, default=15)
  ap.add_argument("--budget_s", type=float, default=300.0,
                  help="no new configuration starts after this long")
  ap.add_argument("--fake", action="store_true",
                  help="fake CUDA driver, one process (CPU smoke run)")
  ap.add_argument("--out", default=None, help="JSON results file")
  args = ap.parse_args(argv)
  if not args.fake:
    reason = ib._unavailable()  # pylint: disable=protected-access
    if reason:
      print(json.dumps({"skipped": reason}))
      return 2
  results = run(args)
  print_table(results)
  ok = all(r["correct"] and r["token_as_g1"] for r in results["rows"])
  return 0 if ok and results["rows"] else 1


if __name__ == "__main__":
  sys.exit(main())
