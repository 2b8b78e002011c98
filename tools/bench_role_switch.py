r"""New prefill capacity, two ways: move a worker of both pools from the
decode pool (``WorkerControl.SetRole``), or start a fresh prefill worker;
the time from the decision until the new capacity serves its first request.

An elastic deployment of ``pdjax/configs/deployments/test.toml`` (the router, one
prefill and one decode worker, one worker of both pools serving decode)
serves a steady closed-loop load of greedy requests; each request's
``usage.prefill_worker`` says which worker prefilled it. Per repeat:

* move: SetRole(prefill) on the flexible worker, then the first request
  prefilled there (and SetRole(decode) back, untimed);
* fresh: ``LocalCluster.spawn_worker("prefill")`` (a new process: imports,
  weights, every program compiled or read from XLA's persistent cache,
  registration), then the first request prefilled there; then it is
  drained away.

  python tools/bench_role_switch.py --repeats=3 \
      --out=tools/results/role_switch.json
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]

REPEATS = flags.DEFINE_integer("repeats", 3, "Measurements of each way.")
STREAMS = flags.DEFINE_integer("streams", 4, "Requests in flight.")
OUT = flags.DEFINE_string("out", None, "JSON results file.")
RUN_DIR = flags.DEFINE_string("run_dir", None, "Process logs (default: a "
                              "temporary directory).")


class Load:
  """Closed-loop greedy requests; notes when each prefill worker first
  served one."""

  def __init__(self, address: str, streams: int):
    self.address = address
    self.streams = streams
    self.first: dict[str, float] = {}
    self.failed = 0
    self.ok = 0
    self._stop = asyncio.Event()

  async def run(self):
    from pdjax.client import AsyncClient
    async with AsyncClient(self.address, timeout_s=120) as client:
      async def stream(k):
        while not self._stop.is_set():
          try:
            r = await client.generate(prompt_token_ids=[5 + k, 6, 7, 8] * 8,
                                      max_tokens=4, temperature=0.0,
                                      ignore_eos=True)
          except Exception:  # noqa: BLE001 - counted
            self.failed += 1
            continue
          self.ok += 1
          self.first.setdefault(r.usage.prefill_worker, time.monotonic())
      await asyncio.gather(*(stream(k) for k in range(self.streams)))

  async def first_at(self, address: str, since: float,
                     timeout_s: float = 600) -> float:
    self.first.pop(address, None)
    deadline = time.monotonic() + timeout_s
    while address not in self.first:
      if time.monotonic() > deadline:
        raise TimeoutError(f"{address} served nothing in {timeout_s} s")
      await asyncio.sleep(0.005)
    return self.first[address] - since

  def stop(self):
    self._stop.set()


def main(argv) -> None:
  del argv
  sys.path.insert(0, str(ROOT))
  import tempfile
  from pdjax.launch.cluster import (LocalCluster, launch_elastic,
                                    router_security)
  from pdjax.planner.control import RouterClient
  run_dir = Path(RUN_DIR.value or tempfile.mkdtemp(prefix="role-switch-"))
  cluster = LocalCluster(run_dir)
  try:
    address = launch_elastic(cluster, config="test", num_prefill=1,
                             num_decode=1, num_flex=1, flex_role="decode")
    flex = next(p for p in cluster.procs if p.name == "flex0")
    flex_address = f"127.0.0.1:{flex.port()}"

    async def run():
      load = Load(address, STREAMS.value)
      task = asyncio.ensure_future(load.run())
      client = RouterClient(address, router_security(cluster))
      moves, fresh = [], []
      await asyncio.sleep(3)
      for _ in range(REPEATS.value):
        t0 = time.monotonic()
        await client.set_role(flex_address, "prefill")
        moves.append(await load.first_at(flex_address, t0))
        await client.set_role(flex_address, "decode")
        t0 = time.monotonic()
        p = cluster.spawn_worker("prefill")
        while p.port() is None:
          await asyncio.sleep(0.05)
        up = time.monotonic() - t0
        served = await load.first_at(f"127.0.0.1:{p.port()}", t0)
        fresh.append((served, up))
        cluster.stop_proc(p)
        await asyncio.to_thread(p.popen.wait, 120)
        print(f"move {moves[-1]:.3f} s; fresh worker {served:.1f} s "
              f"(serving after {up:.1f} s)", flush=True)
      load.stop()
      await task
      await client.close()
      return moves, fresh, load

    moves, fresh, load = asyncio.run(run())
  finally:
    cluster.stop()
  result = {
      "move_to_first_request_s": moves,
      "fresh_to_first_request_s": [s for s, _ in fresh],
      "fresh_to_serving_s": [u for _, u in fresh],
      "median_move_s": statistics.median(moves),
      "median_fresh_s": statistics.median(s for s, _ in fresh),
      "requests": load.ok, "failed": load.failed,
  }
  print(json.dumps(result, indent=1))
  if OUT.value:
    Path(OUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(OUT.value).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
  app.run(main)
