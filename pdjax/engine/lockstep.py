"""A prefill pool whose mesh spans processes (multi-controller JAX).

With ``jax.distributed``, a mesh may hold devices of several processes
(hosts, or Kubernetes pods of one LeaderWorkerSet group). JAX then runs a
program only when *every* process calls it, with the same inputs, in the
same order: each process drives its own devices and the collectives meet in
the middle. A pool is still one gRPC service, though, so one process (the
leader, process 0) takes requests and forms batches, and the others
(followers) must replay exactly the engine calls the leader makes.

``LockstepPrefill`` wraps the leader's ``PrefillEngine``: before each
``prefill`` call it broadcasts the batch (the requests, as JSON) to every
process with ``multihost_utils.broadcast_one_to_all``, a collective over
the pool's devices, then makes the call. ``follow`` is the followers' loop:
receive a batch, make the same call, until the leader says stop. Warm-up
needs no message: it is deterministic, and every process runs it at start.

The KV a prefill produces is laid out replicated over the pool's mesh when
the mesh spans processes (``PrefillEngine`` gathers it in the programs), so
the leader holds every request's whole KV on its own first device and hands
it off through the ordinary transports, as a one-process pool would; the
wrapper gives the transports that local copy. The gather is the price of
the first version: a decode pool that spans processes the same way could
take per-process shards instead.

Not yet for multi-process pools: the prefix cache (its block store would
have to be driven in lockstep too), refused at start-up.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Sequence

import jax
import numpy as np

from pdjax.engine.requests import PrefillRequest, PrefillResult, RequestKV
from pdjax.engine.sampling import SamplingParams

log = logging.getLogger(__name__)

_STOP = -1


def spans_processes(mesh) -> bool:
  """Whether ``mesh`` holds devices of other processes than this one."""
  me = jax.process_index()
  return any(d.process_index != me for d in mesh.devices.flat)


def encode(requests: Sequence[PrefillRequest]) -> bytes:
  return json.dumps([dataclasses.asdict(r) for r in requests]).encode()


def decode(payload: bytes) -> list[PrefillRequest]:
  out = []
  for d in json.loads(payload.decode()):
    s = d.pop("sampling")
    s["stop_token_ids"] = tuple(s["stop_token_ids"])
    if d.get("prefix_pages") is not None:
      d["prefix_pages"] = list(d["prefix_pages"])
    # Shared KV's (address, blocks) sources: JSON makes them lists.
    d["kv_sources"] = tuple(tuple(src) for src in d.get("kv_sources", ()))
    out.append(PrefillRequest(sampling=SamplingParams(**s), **d))
  return out


def _broadcast(payload: bytes | None = None) -> bytes | None:
  """The leader's ``payload`` (``None``: stop) on every process; followers'
  arguments are ignored. Two collectives: the length, then the bytes as
  int32 words (every process must pass the same shapes)."""
  from jax.experimental import multihost_utils
  leader = jax.process_index() == 0
  n = (_STOP if payload is None else len(payload)) if leader else 0
  n = int(multihost_utils.broadcast_one_to_all(np.array([n], np.int32))[0])
  if n == _STOP:
    return None
  words = -(-n // 4)
  if leader:
    buf = np.frombuffer(payload.ljust(words * 4, b"\0"), np.int32)
  else:
    buf = np.zeros((words,), np.int32)
  out = np.asarray(multihost_utils.broadcast_one_to_all(buf), np.int32)
  return out.tobytes()[:n]


def local_kv(kv: RequestKV) -> RequestKV:
  """The leader's own copy of a KV replicated over processes: single-device
  arrays on its first device, which every transport can send. A KV this
  process holds whole already is returned as it is."""
  if all(p.is_fully_addressable for p in kv.pieces):
    return kv

  def local(a: jax.Array) -> jax.Array:
    if a.is_fully_addressable:
      return a
    if not a.is_fully_replicated:
      raise ValueError("a KV spanning processes must be replicated over the "
                       "pool's mesh to be handed off from one of them")
    return a.addressable_data(0)

  if kv.layer_groups:
    return RequestKV(None, kv.num_tokens, kv.first_page, kv.release_fn,
                     layer_groups=[local(g) for g in kv.layer_groups])
  return RequestKV(local(kv.kv), kv.num_tokens, kv.first_page,
                   kv.release_fn)


class LockstepPrefill:
  """The leader's side: the wrapped engine's interface, with every
  ``prefill`` announced to the followers first. Calls come from one thread
  (the prefill worker's batcher), as the replay needs one order."""

  def __init__(self, engine):
    self.engine = engine
    self.closed = False
    # The engine's side of the PrefillBackend seam; a pool spanning
    # processes has no prefix cache (refused at start-up).
    self.cfg = engine.cfg
    self.config = engine.config
    self.mesh = engine.mesh
    self.prefix_store = None

  def prefill(self, requests: Sequence[PrefillRequest], *,
              kv_ready=None, on_result=None) -> list[PrefillResult]:
    if self.closed:
      raise RuntimeError("the prefill pool's followers have been stopped")
    for r in requests:     # refused here, before any process computes
      self.engine.validate(r.prompt_ids)
    _broadcast(encode(requests))
    # One local copy per KV, handed to kv_ready and carried by the result
    # alike (the engine's contract: the same object).
    local: dict[int, RequestKV] = {}

    def localized(kv: RequestKV) -> RequestKV:
      if id(kv) not in local:
        local[id(kv)] = local_kv(kv)
      return local[id(kv)]

    def local_result(r: PrefillResult) -> PrefillResult:
      return dataclasses.replace(r, kv=localized(r.kv))

    ready = (None if kv_ready is None
             else lambda i, kv: kv_ready(i, localized(kv)))
    done = (None if on_result is None
            else lambda i, r: on_result(i, local_result(r)))
    results = self.engine.prefill(requests, kv_ready=ready, on_result=done)
    return [local_result(r) for r in results]

  def close(self) -> None:
    """Tells the followers to stop (once; the worker is shutting down)."""
    if not self.closed:
      self.closed = True
      _broadcast(None)


def follow(engine) -> int:
  """A follower's loop: replays the leader's prefill calls until it says
  stop. Returns the number of batches replayed. A call that fails here
  failed on the leader too (same programs, same inputs): it is logged and
  the loop goes on, as the leader's worker does."""
  batches = 0
  while True:
    payload = _broadcast()
    if payload is None:
      return batches
    try:
      engine.prefill(decode(payload))
    except Exception:  # noqa: BLE001 - the leader reports it to its callers
      log.exception("replayed prefill failed")
    batches += 1


__all__ = ["LockstepPrefill", "follow", "spans_processes", "local_kv",
           "encode", "decode"]
