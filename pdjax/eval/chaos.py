"""Chaos soak: a deployment under load while things go wrong, then proof
that nothing was lost or left behind.

``run_chaos`` sends greedy requests (prompt ids from a fixed pool, random
output lengths) through the router's gRPC API and, a share of them, the
OpenAI-compatible gateway, with a share cancelled at a random token and a
few given tiny deadlines. While they run:

* one worker (``kill_role``) is killed with SIGKILL once ``kill_at`` of the
  requests have finished; the launcher's ``Supervisor`` starts it again on
  its port;
* ``slow_clients`` connections to the gateway send part of a request head
  and stall: the gateway must close each within its header timeout;
* a burst of ``bad_requests`` invalid ones (bad JSON, negative max_tokens,
  token ids past the vocabulary, an unknown model, a context overflow,
  ...): each must get a 4xx from the gateway or INVALID_ARGUMENT from the
  router, never a 5xx or INTERNAL.

Afterwards every request must have ended as completed with the reference
tokens (greedy continuations the same deployment gave before the chaos,
each prompt once), cancelled or past its deadline (the tokens it got a
prefix of the reference), or failed with a clear status (UNAVAILABLE or
ABORTED while the killed worker was down; RESOURCE_EXHAUSTED when the
router refused it); after an idle wait every worker's KV allocations
(decode rows, reservations, staged transfers and landing regions, KV a
prefill worker holds for a peer) and used/reserved pages are zero, the
restarted worker serves requests again, and the gateway answers /health.

No absl here: ``tools/chaos_soak.py`` is the command line and
``tests/test_chaos.py`` runs it small.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc

from pdjax.client import AsyncClient, GenerationError
from pdjax.launch.cluster import (LocalCluster, ProcessFailed, Supervisor,
                                  launch, start_gateway)

# ``pdjax_kv_live_allocations`` owners (pdjax.service.metrics): decode rows,
# reservations, staged transfers (incl. CUDA IPC landing regions) on decode
# workers; KV a prefill worker holds for a peer under a lease/TTL.
LIVE_OWNERS = ("decode_rows", "reservations", "staged_transfers",
               "prefill_held")
PAGE_STATES = ("used", "reserved")
# Failures a request may end with and still count as handled.
KILL_STATUSES = ("UNAVAILABLE", "ABORTED")
REFUSED_STATUSES = ("RESOURCE_EXHAUSTED",)
PROMPT_LENGTHS = (3, 17, 40, 100, 150, 200)


@dataclasses.dataclass
class ChaosConfig:
  num_requests: int = 2000
  cancel_share: float = 0.2
  deadline_share: float = 0.03
  gateway_share: float = 0.1       # of the requests, sent through the gateway
  concurrency: int = 32
  kill_at: float | None = 0.1      # fraction of the run; None: no kill
  kill_role: str = "decode"        # "decode" | "prefill"
  slow_clients: int = 20
  slow_at: float = 0.2             # fraction of the run they start at
  bad_requests: int = 40
  bad_at: float = 0.6
  num_prompts: int = 16
  max_tokens: int = 16
  seed: int = 0
  # A request failing UNAVAILABLE/ABORTED is the kill's if it overlapped
  # [kill, worker serving again + this].
  kill_grace_s: float = 10.0
  idle_timeout_s: float = 30.0
  restart_timeout_s: float = 300.0


def metric(text: str, name: str, labels: str = "") -> float:
  """One sample of a Prometheus text exposition (0 if absent)."""
  head = name + (("{" + labels + "}") if labels else "")
  for line in text.splitlines():
    if line.startswith(head + " "):
      return float(line.rsplit(" ", 1)[1])
  return 0.0


class Deployment:
  """A ``config`` deployment (grpc KV transport) with a gateway, on
  loopback, and a ``Supervisor`` that ``run_chaos`` drives."""

  def __init__(self, run_dir, *, config: str = "test", num_prefill: int = 2,
               num_decode: int = 2, header_timeout_s: float = 2.0,
               kv_ttl_s: float = 5.0, worker_flags=(), router_flags=(),
               ready_timeout_s: float = 600.0, log=print):
    self.cluster = LocalCluster(Path(run_dir))
    self.header_timeout_s = header_timeout_s
    try:
      self.address = launch(
          self.cluster, config=config, kv_transport="grpc",
          num_prefill=num_prefill, num_decode=num_decode,
          ready_timeout_s=ready_timeout_s,
          worker_flags=["--metrics_port=0", f"--kv_ttl_s={kv_ttl_s}",
                        *worker_flags],
          router_flags=["--metrics_port=0", *router_flags])
      self.gateway = start_gateway(
          self.cluster, self.address, ready_timeout_s=ready_timeout_s,
          gateway_flags=[f"--header_timeout_s={header_timeout_s}"])
    except BaseException:
      self.cluster.stop()
      raise
    # Restarts what dies, quickly (checked from the thread that started
    # the processes: run_chaos's event loop runs on it).
    self.supervisor = Supervisor(self.cluster, backoff_s=0.2, log=log)

  def proc(self, name: str):
    return next(p for p in self.cluster.procs if p.name == name)

  def worker_names(self, role: str | None = None) -> list[str]:
    roles = (role,) if role else ("prefill", "decode")
    return [p.name for p in self.cluster.procs if p.role in roles]

  def metrics(self, name: str) -> str:
    port = self.proc(name).metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                timeout=10) as r:
      return r.read().decode()

  def live(self) -> dict[str, float]:
    """What the workers still hold: {"decode0/reservations": 2, ...}."""
    out: dict[str, float] = {}
    for name in self.worker_names():
      try:
        text = self.metrics(name)
      except OSError as e:
        out[f"{name}/metrics"] = float("nan")
        out.setdefault("_errors", []).append(f"{name}: {e}")  # type: ignore
        continue
      for owner in LIVE_OWNERS:
        v = metric(text, "pdjax_kv_live_allocations", f'owner="{owner}"')
        if v:
          out[f"{name}/{owner}"] = v
      for state in PAGE_STATES:
        v = metric(text, "pdjax_kv_pages", f'state="{state}"')
        if v:
          out[f"{name}/pages_{state}"] = v
    return out

  def stop(self) -> None:
    self.cluster.stop()


def make_prompts(n: int, seed: int = 0, vocab: int = 512) -> list[list[int]]:
  rng = random.Random(seed)
  return [[rng.randrange(3, vocab) for _ in range(PROMPT_LENGTHS[
      i % len(PROMPT_LENGTHS)])] for i in range(n)]


async def reference_tokens(client: AsyncClient, prompts, max_tokens: int
                           ) -> list[list[int]]:
  """Greedy continuations of ``prompts`` from the deployment, before any
  chaos (a shorter greedy request's tokens are a prefix of these)."""
  out = []
  for p in prompts:
    r = await client.generate(prompt_token_ids=p, max_tokens=max_tokens,
                              temperature=0.0, ignore_eos=True,
                              timeout_s=120)
    out.append(list(r.token_ids))
  return out


# ------------------------------------------------------------ the requests
class _Run:
  """State shared by the tasks of one chaos run."""

  def __init__(self, cfg: ChaosConfig, dep: Deployment, prompts, ref,
               model: str):
    self.cfg, self.dep, self.prompts, self.ref = cfg, dep, prompts, ref
    self.model = model
    self.t0 = time.monotonic()
    self.done = 0
    self.done_event: dict[float, asyncio.Event] = {}
    self.records: list[dict] = []
    self.kill: dict[str, Any] = {}
    self.slow: dict[str, Any] = {}
    self.bad: list[dict] = []
    self.supervisor_error: str | None = None

  def at(self, fraction: float) -> asyncio.Event:
    ev = self.done_event.setdefault(fraction, asyncio.Event())
    if self.done >= fraction * self.cfg.num_requests:
      ev.set()
    return ev

  def finished_one(self) -> None:
    self.done += 1
    for f, ev in self.done_event.items():
      if self.done >= f * self.cfg.num_requests:
        ev.set()

  def now(self) -> float:
    return time.monotonic() - self.t0


def _check_tokens(got: list[int], want: list[int], complete: bool) -> bool:
  return got == want if complete else got == want[:len(got)]


async def _router_request(run: _Run, client: AsyncClient, i: int,
                          rng: random.Random) -> dict:
  cfg = run.cfg
  p = rng.randrange(len(run.prompts))
  n = rng.randint(1, cfg.max_tokens)
  roll = rng.random()
  cancel_after = (rng.randint(0, n - 1) if roll < cfg.cancel_share
                  else None)
  tiny = cfg.cancel_share <= roll < cfg.cancel_share + cfg.deadline_share
  timeout = rng.uniform(0.001, 0.02) if tiny else 120.0
  want = run.ref[p][:n]
  rec = {"i": i, "via": "router", "prompt": p, "max_tokens": n,
         "start": run.now()}
  toks: list[int] = []
  stream = client.stream(
      prompt_token_ids=run.prompts[p], max_tokens=n, temperature=0.0,
      ignore_eos=True, timeout_s=timeout)
  try:
    async for delta in stream:
      toks.extend(delta.token_ids)
      if delta.finish_reason:
        ok = delta.finish_reason == "length" and toks == want
        rec["outcome"] = "completed" if ok else "wrong_tokens"
        break
      if cancel_after is not None and len(toks) > cancel_after:
        await stream.aclose()
        rec["outcome"] = ("cancelled" if _check_tokens(toks, want, False)
                          else "wrong_tokens")
        break
    else:
      rec["outcome"] = "truncated"
  except GenerationError as e:
    code = e.code().name
    rec["status"], rec["details"] = code, e.details()[:200]
    if not _check_tokens(toks, want, False):
      rec["outcome"] = "wrong_tokens"
    elif code == "DEADLINE_EXCEEDED" and tiny:
      rec["outcome"] = "deadline"
    else:
      rec["outcome"] = f"failed:{code}"
  finally:
    await stream.aclose()
  rec["tokens"] = len(toks)
  rec["end"] = run.now()
  return rec


async def _gateway_request(run: _Run, session, i: int,
                           rng: random.Random) -> dict:
  """Non-streaming /v1/completions; a cancel is the client hanging up
  after a random delay (the gateway cancels the router call)."""
  import aiohttp
  cfg = run.cfg
  p = rng.randrange(len(run.prompts))
  n = rng.randint(1, cfg.max_tokens)
  roll = rng.random()
  hang_up = roll < cfg.cancel_share + cfg.deadline_share
  timeout = rng.uniform(0.01, 0.3) if hang_up else 120.0
  rec = {"i": i, "via": "gateway", "prompt": p, "max_tokens": n,
         "start": run.now(), "tokens": 0}
  body = {"model": run.model, "prompt": run.prompts[p], "max_tokens": n,
          "temperature": 0, "ignore_eos": True, "return_token_ids": True}
  try:
    async with session.post(f"{run.dep.gateway}/v1/completions", json=body,
                            timeout=aiohttp.ClientTimeout(total=timeout)
                            ) as r:
      data = await r.json(content_type=None)
      if r.status == 200:
        choice = data["choices"][0]
        toks = list(choice.get("token_ids") or [])
        rec["tokens"] = len(toks)
        ok = choice["finish_reason"] == "length" and toks == run.ref[p][:n]
        rec["outcome"] = "completed" if ok else "wrong_tokens"
      else:
        rec["status"] = f"HTTP{r.status}"
        rec["details"] = str(data.get("error", data))[:200]
        rec["outcome"] = f"failed:HTTP{r.status}"
  except asyncio.TimeoutError:
    rec["outcome"] = "cancelled" if hang_up else "failed:client_timeout"
  except aiohttp.ClientError as e:
    rec["outcome"], rec["details"] = "failed:connection", repr(e)[:200]
  rec["end"] = run.now()
  return rec


async def _load(run: _Run) -> None:
  import aiohttp
  cfg = run.cfg
  sem = asyncio.Semaphore(cfg.concurrency)
  # The gateway closes a connection idle for its header timeout (its
  # keep-alive timeout); a pooled connection reused just as it closes
  # fails the request sent on it. Idle connections are dropped here first.
  conn = aiohttp.TCPConnector(limit=0,
                              keepalive_timeout=run.dep.header_timeout_s / 2)
  async with AsyncClient(run.dep.address) as client, \
      aiohttp.ClientSession(connector=conn) as session:

    async def one(i: int) -> None:
      rng = random.Random(cfg.seed * 1_000_003 + i)
      async with sem:
        try:
          if rng.random() < cfg.gateway_share:
            rec = await _gateway_request(run, session, i, rng)
          else:
            rec = await _router_request(run, client, i, rng)
        except Exception as e:   # noqa: BLE001 - recorded, judged later
          rec = {"i": i, "outcome": f"error:{type(e).__name__}",
                 "details": repr(e)[:300], "start": 0.0, "end": run.now()}
      run.records.append(rec)
      run.finished_one()

    await asyncio.gather(*(one(i) for i in range(cfg.num_requests)))


# ---------------------------------------------------------------- the chaos
async def _supervise(run: _Run, stop: asyncio.Event) -> None:
  while not stop.is_set():
    try:
      run.dep.supervisor.check()
    except ProcessFailed as e:
      run.supervisor_error = str(e)
      return
    await asyncio.sleep(0.1)


async def _kill(run: _Run) -> None:
  cfg = run.cfg
  await run.at(cfg.kill_at).wait()
  name = run.dep.worker_names(cfg.kill_role)[0]
  p = run.dep.proc(name)
  old_pid = p.popen.pid
  run.kill.update(worker=name, role=cfg.kill_role, at_request=run.done,
                  port=p.port(), t=run.now())
  os.killpg(old_pid, signal.SIGKILL)
  deadline = time.monotonic() + cfg.restart_timeout_s
  while time.monotonic() < deadline:
    if p.popen.pid != old_pid and p.port() is not None:
      run.kill["serving_t"] = run.now()
      run.kill["restart_s"] = run.kill["serving_t"] - run.kill["t"]
      return
    if run.supervisor_error:
      break
    await asyncio.sleep(0.1)
  run.kill["serving_t"] = None


_PARTIAL_HEAD = (b"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\n"
                 b"Content-Type: application/json\r\n")


async def _slow_clients(run: _Run) -> None:
  """Connections that never finish their headers: each must be closed by
  the gateway within its header timeout (plus slack)."""
  cfg = run.cfg
  await run.at(cfg.slow_at).wait()
  host, port = run.dep.gateway.removeprefix("http://").split(":")
  limit = run.dep.header_timeout_s + 5.0
  conns = []
  for _ in range(cfg.slow_clients):
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(_PARTIAL_HEAD)
    await writer.drain()
    conns.append((reader, writer))
  t0 = time.monotonic()

  async def closed(reader) -> float | None:
    try:
      await asyncio.wait_for(reader.read(), limit)
      return time.monotonic() - t0
    except (asyncio.TimeoutError, ConnectionError):
      return None

  times = await asyncio.gather(*(closed(r) for r, _ in conns))
  for _, w in conns:
    w.close()
  got = [t for t in times if t is not None]
  run.slow.update(opened=len(conns), closed_by_gateway=len(got),
                  max_close_s=round(max(got), 3) if got else None,
                  header_timeout_s=run.dep.header_timeout_s)


def _bad_cases(model: str, vocab: int, max_seq_len: int) -> list[tuple]:
  """(name, via, request): invalid requests of every kind."""
  ok = {"model": model, "prompt": [5, 6, 7], "max_tokens": 4}
  return [
      ("bad_json", "gateway", b"{not json"),
      ("json_not_an_object", "gateway", b"[1, 2]"),
      ("negative_max_tokens", "gateway", {**ok, "max_tokens": -1}),
      ("token_out_of_vocab", "gateway", {**ok, "prompt": [vocab + 7]}),
      ("unknown_model", "gateway", {**ok, "model": "no-such-model"}),
      ("context_overflow", "gateway", {**ok, "max_tokens": max_seq_len * 4}),
      ("negative_temperature", "gateway", {**ok, "temperature": -1}),
      ("missing_prompt", "gateway", {"model": model, "max_tokens": 4}),
      ("negative_max_tokens", "router",
       dict(prompt_token_ids=[5, 6, 7], max_tokens=-1)),
      ("token_out_of_vocab", "router",
       dict(prompt_token_ids=[5, vocab + 7], max_tokens=4)),
      ("negative_token_id", "router",
       dict(prompt_token_ids=[5, -3], max_tokens=4)),
      ("context_overflow", "router",
       dict(prompt_token_ids=[5, 6, 7], max_tokens=max_seq_len * 4)),
      ("top_p_above_1", "router",
       dict(prompt_token_ids=[5, 6, 7], max_tokens=4, top_p=2.0)),
  ]


async def _bad_burst(run: _Run, vocab: int, max_seq_len: int) -> None:
  import aiohttp
  cfg = run.cfg
  await run.at(cfg.bad_at).wait()
  cases = _bad_cases(run.model, vocab, max_seq_len)
  picked = [cases[k % len(cases)] for k in range(cfg.bad_requests)]

  async def one(name, via, req, client, session) -> dict:
    rec = {"case": name, "via": via}
    if via == "gateway":
      kw = ({"data": req, "headers": {"Content-Type": "application/json"}}
            if isinstance(req, bytes) else {"json": req})
      async with session.post(f"{run.dep.gateway}/v1/completions",
                              timeout=aiohttp.ClientTimeout(total=60),
                              **kw) as r:
        await r.read()
        rec["status"] = r.status
        rec["ok"] = 400 <= r.status < 500
    else:
      try:
        await client.generate(temperature=0.0, timeout_s=60, **req)
        rec["status"], rec["ok"] = "OK", False
      except GenerationError as e:
        rec["status"] = e.code().name
        rec["ok"] = e.code() == grpc.StatusCode.INVALID_ARGUMENT
    return rec

  async with AsyncClient(run.dep.address) as client, \
      aiohttp.ClientSession() as session:
    run.bad = list(await asyncio.gather(
        *(one(*c, client, session) for c in picked)))


# ------------------------------------------------------------- afterwards
async def _serves_again(run: _Run, client: AsyncClient,
                        timeout_s: float = 60.0) -> dict:
  """Requests until one is served by the restarted worker, with the
  reference tokens."""
  if not run.kill.get("serving_t"):
    return {"served": False, "reason": "not restarted"}
  p = run.dep.proc(run.kill["worker"])
  address = f"127.0.0.1:{p.port()}"
  field = ("decode_worker" if run.kill["role"] == "decode"
           else "prefill_worker")
  deadline = time.monotonic() + timeout_s
  tries = wrong = 0
  last = ""
  while time.monotonic() < deadline:
    k = tries % len(run.prompts)
    tries += 1
    try:
      r = await client.generate(prompt_token_ids=run.prompts[k],
                                max_tokens=run.cfg.max_tokens,
                                temperature=0.0, ignore_eos=True,
                                timeout_s=60)
    except GenerationError as e:
      last = f"{e.code().name}: {e.details()[:100]}"
      await asyncio.sleep(0.2)
      continue
    if list(r.token_ids) != run.ref[k]:
      wrong += 1
    if getattr(r.usage, field) == address:
      return {"served": wrong == 0, "tries": tries, "wrong_tokens": wrong}
  return {"served": False, "tries": tries, "wrong_tokens": wrong,
          "last_error": last}


def _health(url: str) -> int:
  try:
    with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
      return r.status
  except urllib.error.HTTPError as e:
    return e.code
  except OSError:
    return 0


def _judge(run: _Run) -> dict:
  """Outcome counts, and the records that are not acceptable."""
  kill_lo = run.kill.get("t")
  kill_hi = ((run.kill.get("serving_t") or float("inf"))
             + run.cfg.kill_grace_s) if kill_lo is not None else None
  outcomes: dict[str, int] = {}
  statuses: dict[str, int] = {}
  bad = []
  for rec in run.records:
    o = rec["outcome"]
    outcomes[o] = outcomes.get(o, 0) + 1
    if "status" in rec:
      statuses[rec["status"]] = statuses.get(rec["status"], 0) + 1
    if o in ("completed", "cancelled", "deadline"):
      continue
    code = o.split(":", 1)[1] if o.startswith("failed:") else ""
    in_kill = (kill_lo is not None and rec["end"] >= kill_lo
               and rec["start"] <= kill_hi)
    if code in REFUSED_STATUSES:
      continue
    if in_kill and (code in KILL_STATUSES
                    or code in ("HTTP502", "HTTP503", "HTTP504")):
      rec["during_kill"] = True
      continue
    bad.append(rec)
  return {"outcomes": dict(sorted(outcomes.items())),
          "statuses": dict(sorted(statuses.items())),
          "unacceptable": bad}


async def _chaos(cfg: ChaosConfig, dep: Deployment, log) -> dict:
  async with AsyncClient(dep.address) as client:
    info = await client.model_info(timeout_s=60)
    vocab = int(info.get("vocab_size") or 512)
    max_seq_len = int(info.get("max_seq_len") or 256)
    prompts = make_prompts(cfg.num_prompts, cfg.seed, min(vocab, 512))
    t = time.monotonic()
    ref = await reference_tokens(client, prompts, cfg.max_tokens)
    log(f"reference: {len(prompts)} prompts in "
        f"{time.monotonic() - t:.1f} s")
  with urllib.request.urlopen(f"{dep.gateway}/v1/models", timeout=30) as r:
    model = json.loads(r.read())["data"][0]["id"]
  run = _Run(cfg, dep, prompts, ref, model)
  stop = asyncio.Event()
  sup = asyncio.create_task(_supervise(run, stop))
  side = []
  if cfg.kill_at is not None:
    side.append(asyncio.create_task(_kill(run)))
  if cfg.slow_clients:
    side.append(asyncio.create_task(_slow_clients(run)))
  if cfg.bad_requests:
    side.append(asyncio.create_task(_bad_burst(run, vocab, max_seq_len)))
  t = time.monotonic()
  await _load(run)
  load_s = time.monotonic() - t
  load_end_t = run.now()
  log(f"load: {cfg.num_requests} requests in {load_s:.1f} s")
  side_errors = []
  for task in side:
    try:
      await asyncio.wait_for(task, cfg.restart_timeout_s)
    except Exception as e:   # noqa: BLE001 - reported as a failed check
      side_errors.append(repr(e)[:300])
  if run.kill:
    # Whether the restarted worker was back while the load still ran.
    run.kill["rejoined_under_load"] = bool(
        run.kill.get("serving_t") and run.kill["serving_t"] < load_end_t)
  async with AsyncClient(dep.address) as client:
    serves = (await _serves_again(run, client)
              if cfg.kill_at is not None else None)
  stop.set()
  await sup
  # Idle: everything back (a prefill worker's KV for a killed decode
  # worker is freed by its TTL).
  deadline = time.monotonic() + cfg.idle_timeout_s
  live = dep.live()
  while live and time.monotonic() < deadline:
    await asyncio.sleep(0.25)
    live = dep.live()
  judged = _judge(run)
  done = [r for r in run.records if r["outcome"] == "completed"]
  summary = {
      "config": dataclasses.asdict(cfg),
      "requests": len(run.records),
      "via": {v: sum(r.get("via") == v for r in run.records)
              for v in ("router", "gateway")},
      "load_s": round(load_s, 2),
      "requests_per_s": round(len(run.records) / load_s, 1),
      "completed_tokens": sum(r["tokens"] for r in done),
      **{k: v for k, v in judged.items() if k != "unacceptable"},
      "failed_during_kill": sum(bool(r.get("during_kill"))
                                for r in run.records),
      "unacceptable": judged["unacceptable"][:20],
      "unacceptable_count": len(judged["unacceptable"]),
      "kill": run.kill,
      "restarted_worker_serves": serves,
      "slow_clients": run.slow,
      "bad_requests": {
          "sent": len(run.bad),
          "refused_4xx_or_invalid_argument": sum(b["ok"] for b in run.bad),
          "by_case": _bad_table(run.bad),
          "wrong": [b for b in run.bad if not b["ok"]]},
      "left_behind": live,
      "gateway_health": _health(dep.gateway),
      "supervisor_error": run.supervisor_error,
      "side_task_errors": side_errors,
      "restarts": [n for n, _ in dep.supervisor.restarted],
  }
  summary["checks"] = _checks(cfg, summary)
  summary["passed"] = all(summary["checks"].values())
  return summary


def _bad_table(bad: list[dict]) -> dict[str, str]:
  out: dict[str, set] = {}
  for b in bad:
    out.setdefault(f"{b['via']}/{b['case']}", set()).add(str(b["status"]))
  return {k: ",".join(sorted(v)) for k, v in sorted(out.items())}


def _checks(cfg: ChaosConfig, s: dict) -> dict[str, bool]:
  c = {
      "every_request_accounted": s["requests"] == cfg.num_requests,
      "every_outcome_acceptable": s["unacceptable_count"] == 0,
      "nothing_left_behind": not s["left_behind"],
      "gateway_health_200": s["gateway_health"] == 200,
      "no_supervisor_error": s["supervisor_error"] is None,
      "no_side_task_error": not s["side_task_errors"],
  }
  if cfg.kill_at is not None:
    c["worker_restarted"] = bool(s["kill"].get("serving_t"))
    c["restarted_worker_serves"] = bool(
        s["restarted_worker_serves"] and s["restarted_worker_serves"]
        .get("served"))
  if cfg.slow_clients:
    c["slow_clients_closed"] = (s["slow_clients"].get("closed_by_gateway")
                                == cfg.slow_clients)
  if cfg.bad_requests:
    c["bad_requests_refused_cleanly"] = (
        s["bad_requests"]["refused_4xx_or_invalid_argument"]
        == cfg.bad_requests)
  return c


def run_chaos(cfg: ChaosConfig, dep: Deployment, log=print) -> dict:
  """Runs the soak against ``dep`` (from the thread that started it: the
  supervisor restarts processes from here) and returns the summary
  (``summary["passed"]``, ``summary["checks"]``)."""
  t = time.monotonic()
  summary = asyncio.run(_chaos(cfg, dep, log))
  summary["wall_s"] = round(time.monotonic() - t, 1)
  return summary


def format_table(s: dict) -> str:
  """The summary as a Markdown table."""
  o = s["outcomes"]
  kill = s["kill"]
  rows = [
      ("requests (router / gateway)",
       f"{s['requests']} ({s['via']['router']} / {s['via']['gateway']})"),
      ("completed, reference tokens", o.get("completed", 0)),
      ("cancelled (tokens a prefix of the reference)", o.get("cancelled", 0)),
      ("deadline exceeded", o.get("deadline", 0)),
      ("failed while the killed worker was down",
       s["failed_during_kill"]),
      ("other failures by outcome", ", ".join(
          f"{k} {v}" for k, v in o.items()
          if k not in ("completed", "cancelled", "deadline")) or "none"),
      ("unacceptable (wrong tokens, 5xx/INTERNAL, hangs)",
       s["unacceptable_count"]),
      ("load time (s), requests/s", f"{s['load_s']}, {s['requests_per_s']}"),
      ("worker killed (SIGKILL) at request", (
          f"{kill['worker']} at {kill['at_request']}" if kill else "none")),
      ("restart to serving (s)", (
          f"{kill['restart_s']:.1f}" if kill.get("restart_s") else "-")),
      ("restarted worker back while the load ran",
       kill.get("rejoined_under_load", "-")),
      ("restarted worker serves again",
       (s["restarted_worker_serves"] or {}).get("served", "-")),
      ("slow clients closed by the gateway", (
          f"{s['slow_clients'].get('closed_by_gateway')}/"
          f"{s['slow_clients'].get('opened')} (max "
          f"{s['slow_clients'].get('max_close_s')} s, header timeout "
          f"{s['slow_clients'].get('header_timeout_s')} s)")
       if s["slow_clients"] else "none"),
      ("bad requests refused 4xx / INVALID_ARGUMENT", (
          f"{s['bad_requests']['refused_4xx_or_invalid_argument']}/"
          f"{s['bad_requests']['sent']}")),
      ("left behind after idle (KV allocations, pages)",
       s["left_behind"] or "nothing"),
      ("gateway /health", s["gateway_health"]),
      ("passed", s["passed"]),
  ]
  lines = ["| check | result |", "|---|---|"]
  lines += [f"| {k} | {v} |" for k, v in rows]
  return "\n".join(lines)
