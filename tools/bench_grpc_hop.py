r"""One gRPC hop between two processes of this host, as pdjax's services make it.

A request's first token crosses four hops (client -> router -> worker and
back); this measures what one costs here, apart from any engine:

  call     a new server-streaming ``Decode`` call per request (a request of
           ``--prompt_ids`` ids, its first message back): what the router
           does per request, through ``make_channel``/``make_server``
  stream   one message each way on a stream kept open (bytes of the same
           size): what a long-lived stream between two processes would cost

Both with the deployment's service token (its interceptors on the channel
and the server) unless ``--noservice_token``. The server runs in a child
process on a Unix socket or TCP port (``--transport``). Each sample is one
round trip (two hops) timed on the client after ``--gap_ms`` idle, as a
one-stream load leaves the processes between requests.

  python tools/bench_grpc_hop.py --calls=2000
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402

flags.DEFINE_enum("mode", "both", ["call", "stream", "both"], "What to time.")
flags.DEFINE_enum("transport", "tcp", ["tcp", "unix"], "Where the server "
                  "listens: 127.0.0.1 or a Unix socket.")
flags.DEFINE_integer("calls", 1000, "Round trips timed per mode.")
flags.DEFINE_integer("warmup", 100, "Round trips first, not timed.")
flags.DEFINE_integer("prompt_ids", 512, "Prompt ids in each request.")
flags.DEFINE_float("gap_ms", 2.0, "Idle time before each round trip.")
flags.DEFINE_bool("service_token", True, "With the deployment's service "
                  "token (interceptors on both ends).")
flags.DEFINE_bool("loop_spin", False, "Keep both ends' event loops polling "
                  "(never sleeping in epoll) through the idle gap: what a "
                  "hop costs when the receiving loop need not be woken.")
flags.DEFINE_string("serve", None, "Internal: run the server on this address.")
FLAGS = flags.FLAGS

_STREAM_METHOD = "/pdjax.bench.Hop/Echo"


def _security():
  from pdjax.service.common import Security
  return Security(service_token="bench-hop" if FLAGS.service_token else None)


async def _spin() -> None:
  while True:
    await asyncio.sleep(0)


async def _serve(address: str) -> None:
  import grpc
  from pdjax.service.common import make_server
  from pdjax.v1 import decode_pb2, decode_pb2_grpc
  # Held until the process ends (the loop keeps only a weak reference).
  spinner = asyncio.ensure_future(_spin()) if FLAGS.loop_spin else None

  class Decode(decode_pb2_grpc.DecodeServicer):
    async def Decode(self, request, context):
      yield decode_pb2.DecodeResponse(token_ids=[1], logprobs=[0.0])

  async def echo(requests, context):
    async for m in requests:
      yield m

  server = make_server(_security())
  decode_pb2_grpc.add_DecodeServicer_to_server(Decode(), server)
  server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
      "pdjax.bench.Hop", {"Echo": grpc.stream_stream_rpc_method_handler(
          echo, lambda b: b, lambda b: b)}),))
  server.add_insecure_port(address)
  await server.start()
  await server.wait_for_termination()


async def _time(address: str) -> dict[str, list[float]]:
  from pdjax.service.common import make_channel
  from pdjax.v1 import decode_pb2, decode_pb2_grpc
  channel = make_channel(address, _security(), aio=True)
  spinner = asyncio.ensure_future(_spin()) if FLAGS.loop_spin else None
  await asyncio.wait_for(channel.channel_ready(), 30)
  out: dict[str, list[float]] = {}
  n = FLAGS.warmup + FLAGS.calls
  gap = FLAGS.gap_ms / 1000
  if FLAGS.mode in ("call", "both"):
    stub = decode_pb2_grpc.DecodeStub(channel)
    req = decode_pb2.DecodeRequest(
        request_id="hop", prompt_token_ids=range(FLAGS.prompt_ids),
        local_prefill=True)
    samples = []
    for _ in range(n):
      await asyncio.sleep(gap)
      t0 = time.perf_counter()
      call = stub.Decode(req)
      await call.read()
      samples.append(time.perf_counter() - t0)
      call.cancel()
    out["call"] = samples[FLAGS.warmup:]
  if FLAGS.mode in ("stream", "both"):
    call = channel.stream_stream(_STREAM_METHOD, lambda b: b, lambda b: b)()
    payload = bytes(decode_pb2.DecodeRequest(
        request_id="hop", prompt_token_ids=range(FLAGS.prompt_ids),
        local_prefill=True).ByteSize())
    samples = []
    for _ in range(n):
      await asyncio.sleep(gap)
      t0 = time.perf_counter()
      await call.write(payload)
      await call.read()
      samples.append(time.perf_counter() - t0)
    call.cancel()
    out["stream"] = samples[FLAGS.warmup:]
  if spinner is not None:
    spinner.cancel()
  await channel.close()
  return out


def main(argv) -> None:
  del argv
  if FLAGS.serve:
    asyncio.run(_serve(FLAGS.serve))
    return
  with tempfile.TemporaryDirectory() as tmp:
    if FLAGS.transport == "unix":
      address = f"unix://{tmp}/hop.sock"
    else:
      from pdjax.launch.cluster import free_port
      address = f"127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [sys.executable, __file__, f"--serve={address}",
         f"--service_token={FLAGS.service_token}",
         f"--loop_spin={FLAGS.loop_spin}"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
      results = asyncio.run(_time(address))
    finally:
      server.terminate()
      server.wait()
  for mode, samples in results.items():
    ms = sorted(s * 1e3 for s in samples)
    print(f"{mode:6s} round trip (two hops): p50 {statistics.median(ms):.3f} "
          f"ms, p90 {ms[int(0.9 * (len(ms) - 1))]:.3f} ms, n={len(ms)} "
          f"({FLAGS.transport}, service token "
          f"{'on' if FLAGS.service_token else 'off'}"
          f"{', loops spinning' if FLAGS.loop_spin else ''})")


if __name__ == "__main__":
  app.run(main)
