"""The KV hand-off contract between a prefill worker and a decode worker.

Lifecycle of one hand-off (every step has a timeout, every buffer one owner):

  1. The router asks the decode worker to reserve capacity under a
     ``transfer_id`` it generated (unguessable), and passes the same id and
     the decode worker's address to the prefill worker (``KvDestination``).
  2. Prefill side, ``KvSender.send``: makes the KV available to that decode
     worker and returns a ``KvHandle``. The sender owns the KV until the
     decode side confirms (``release``) or the TTL expires: nothing is freed
     early (wrong tokens) and nothing is stranded (leaks).
  3. Decode side, ``KvReceiver.receive``: redeems the handle into the decode
     replica's layout, then confirms so the sender frees its copy.

Transports implement the two halves; ``pdjax.transfer.make_transport``
picks one by name (``--kv_transport``). What a transport can do beyond
that is part of the contract too, with a default for transports that
cannot: a sender that ``writes_landing`` regions (CUDA IPC, layer group by
layer group) wants one lent for a destination (``wants_landing``); a
receiver may ``lend_landing`` such regions, and a receiver whose peers
push KV to it hands out a ``StreamIntake`` (``intake``), which the decode
worker serves as its ``KvTransfer`` service.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import logging
import threading
import time
from typing import Callable

import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from pdjax.engine.kv import pages_for
from pdjax.transfer.ids import new_pull_uuid, new_transfer_id  # noqa: F401
from pdjax.engine.requests import RequestKV
from pdjax.v1 import kv_pb2

log = logging.getLogger(__name__)

# The paths a ``device`` hand-off may take (``KvHandle.transport`` names the
# one it took; ``pdjax.transfer.cuda_ipc`` chooses).
PATH_LOCAL, PATH_CUDA_IPC, PATH_TRANSFER = "local", "cuda_ipc", "transfer"


class TransferError(RuntimeError):
  """A hand-off that failed; the request may be retried or re-prefilled."""


class TransferTimeout(TransferError):
  pass


class TransferDenied(TransferError):
  """The id is unknown to this worker, or was issued to another worker."""


class TransferExhausted(TransferError):
  """The receiving device has no memory for the KV now (the request may be
  retried later or elsewhere; the worker itself is fine)."""


def device_failure(e: Exception, what: str) -> TransferError:
  """A JAX runtime error met while a KV lands, as the transfer error it
  means: out of device memory is ``TransferExhausted`` (the caller answers
  RESOURCE_EXHAUSTED and releases what the request held), anything else a
  plain ``TransferError``. The runtime's first line says what ran out."""
  text = str(e).strip()
  first = text.splitlines()[0] if text else type(e).__name__
  if "RESOURCE_EXHAUSTED" in first or "Out of memory" in first:
    return TransferExhausted(f"{what}: the device is out of memory ({first})")
  return TransferError(f"{what}: {first}")


class IssuedTransfers:
  """The transfer ids the router issued to this worker (at Reserve), each
  with the most KV pages it may bring. A hand-off under any other id is
  refused: KV lands only where it was routed."""

  def __init__(self):
    self._ids: dict[str, int | None] = {}
    self._lock = threading.Lock()

  def add(self, transfer_id: str, max_pages: int | None = None) -> None:
    with self._lock:
      self._ids[transfer_id] = max_pages

  def discard(self, transfer_id: str) -> None:
    with self._lock:
      self._ids.pop(transfer_id, None)

  def check(self, transfer_id: str) -> int | None:
    """The id's page bound, or TransferDenied for an id not issued here."""
    with self._lock:
      if transfer_id not in self._ids:
        raise TransferDenied(f"transfer {transfer_id!r} was not issued to "
                             "this worker")
      return self._ids[transfer_id]


@functools.lru_cache(maxsize=64)
def _dtype_of(spec) -> np.dtype:
  """``jnp.dtype(spec)``, remembered: every hand-off names its dtype, and the
  lookup is a measurable part of a small hand-off's fixed cost."""
  return jnp.dtype(spec)


def check_kv_handle(h: kv_pb2.KvHandle, geometry=None,
                    max_pages: int | None = None, *, error=TransferError):
  """(shape, dtype) of a handle's KV, or ``error``: the sender does not get
  to choose how much memory a receiver allocates or reads. ``geometry``:
  (layers, page_size, kv_heads, head_dim, dtype, max_payload_pages) of this
  worker; ``max_pages``: the pages reserved for the request."""
  shape = tuple(int(s) for s in h.shape)
  if len(shape) != 6 or shape[1] != 2 or min(shape) <= 0:
    raise error(f"KV shape {list(shape)} is not [layers, 2, pages, page, "
                "kv_heads, head_dim]")
  try:
    dtype = _dtype_of(h.dtype)
  except TypeError as e:
    raise error(f"KV dtype {h.dtype!r} is not a dtype") from e
  if geometry is not None:
    L, P, K, hd, gdtype, max_payload = geometry
    if (shape[0], shape[3], shape[4], shape[5]) != (L, P, K, hd) or (
        _dtype_of(gdtype) != dtype):
      raise error(f"KV {list(shape)} {h.dtype} does not match this worker's "
                  f"layout [{L}, 2, n, {P}, {K}, {hd}] {gdtype}")
    if shape[2] > max_payload:
      raise error(f"KV of {shape[2]} pages exceeds the largest payload this "
                  f"worker accepts ({max_payload})")
  data_pages = pages_for(h.num_tokens, shape[3]) - h.first_page
  if h.num_tokens <= 0 or not 0 < data_pages <= shape[2]:
    raise error(f"num_tokens {h.num_tokens} from page {h.first_page} does "
                f"not fit the KV shape {list(shape)}")
  if max_pages is not None and data_pages > max_pages:
    raise error(f"KV of {data_pages} pages exceeds the {max_pages} reserved "
                "for it")
  return shape, dtype


@dataclasses.dataclass
class _Held:
  value: object
  deadline: float
  nbytes: int


class LeaseTable:
  """KV held for a peer, by transfer id, with a TTL: the one owner of every
  buffer waiting to be picked up. ``reap`` frees what expired."""

  def __init__(self, ttl_s: float, on_free: Callable[[str, object], None]
               | None = None):
    self.ttl_s = ttl_s
    self._items: dict[str, _Held] = {}
    self._lock = threading.Lock()
    self._on_free = on_free
    self.expired = 0

  def put(self, key: str, value: object, nbytes: int = 0) -> None:
    """Holds ``value`` under ``key``; a value already held there (a retried
    hand-off reusing its id) is freed, never silently dropped."""
    with self._lock:
      old = self._items.get(key)
      self._items[key] = _Held(value, time.monotonic() + self.ttl_s, nbytes)
    if old is not None and self._on_free:
      self._on_free(key, old.value)

  def pop(self, key: str):
    with self._lock:
      held = self._items.pop(key, None)
    if held is None:
      return None
    if self._on_free:
      self._on_free(key, held.value)
    return held.value

  def get(self, key: str):
    with self._lock:
      held = self._items.get(key)
    return None if held is None else held.value

  def reap(self) -> int:
    now = time.monotonic()
    with self._lock:
      dead = [k for k, h in self._items.items() if h.deadline < now]
      values = [(k, self._items.pop(k).value) for k in dead]
    for k, v in values:
      self.expired += 1
      log.warning("KV for transfer %s expired unclaimed after %.0f s", k,
                  self.ttl_s)
      if self._on_free:
        self._on_free(k, v)
    return len(values)

  def __len__(self) -> int:
    return len(self._items)

  @property
  def nbytes(self) -> int:
    with self._lock:
      return sum(h.nbytes for h in self._items.values())


class KvSender(abc.ABC):
  """Prefill side of a transport."""

  name: str = ""
  # Whether hand-offs may write the KV straight into a region the decode
  # worker lends (CUDA IPC), layer group by layer group while the prefill
  # computes: the prefill worker then asks for regions and runs its
  # prompts in layer groups (``pdjax.service.landing``).
  writes_landing: bool = False

  def wants_landing(self, dest: kv_pb2.KvDestination) -> bool:
    """Whether a lent region would let this hand-off take that path."""
    return False

  @abc.abstractmethod
  def send(self, kv: RequestKV, dest: kv_pb2.KvDestination, *,
           timeout_s: float) -> kv_pb2.KvHandle:
    """Makes ``kv`` available to the destination; returns the handle."""

  def release(self, transfer_id: str) -> None:
    """The decode side has the KV (or gave up): free our copy."""

  def reap(self) -> int:
    return 0

  def live(self) -> int:
    """KV buffers held for peers right now."""
    return 0

  def address(self) -> str:
    return ""

  def close(self) -> None:
    pass


class KvReceiver(abc.ABC):
  """Decode side of a transport."""

  name: str = ""

  @abc.abstractmethod
  def receive(self, handle: kv_pb2.KvHandle, sharding: NamedSharding, *,
              timeout_s: float) -> RequestKV:
    """Redeems ``handle`` into ``sharding`` (the decode replica's layout).
    The result may borrow the transport's memory (``RequestKV.borrowed``):
    whoever takes it must ``release()`` it once read (the decode engine
    does, after its insert)."""

  def expect(self, transfer_id: str, request_id: str, *,
             max_pages: int | None = None) -> None:
    """Registers a transfer id the router issued to this worker, and the
    most KV pages it may bring (its reservation)."""

  def forget(self, transfer_id: str) -> None:
    """The reservation behind an id is gone: drop anything staged for it
    (a region lent for it included)."""

  def lend_landing(self, transfer_id: str, prompt_tokens: int):
    """A region of this worker's memory the prefill worker may write the
    transfer's KV into (a ``LandingSlot``), or None: this transport lends
    none (or has none free, or the KV would not fit). ``TransferDenied``
    for an id not issued here."""
    return None

  @property
  def intake(self) -> "StreamIntake | None":
    """Where pushed KV streams land, for transports whose senders push
    (served as the ``KvTransfer`` service); None for the others."""
    return None

  def reap(self) -> int:
    return 0

  def live(self) -> int:
    return 0

  def address(self) -> str:
    return ""

  def close(self) -> None:
    pass


class StreamIntake(abc.ABC):
  """A receiver's intake of pushed KV streams: ``begin`` opens staging for
  a stream's first chunk (or refuses it), ``place`` stores each chunk,
  ``finish`` checks the stream is whole and acknowledges it, ``abandon``
  drops a stream that broke off."""

  @abc.abstractmethod
  def begin(self, first: kv_pb2.KvChunk): ...

  @abc.abstractmethod
  def place(self, staging, chunk: kv_pb2.KvChunk) -> None: ...

  @abc.abstractmethod
  def finish(self, staging) -> kv_pb2.KvAck: ...

  @abc.abstractmethod
  def abandon(self, staging) -> None: ...


class IssuedKvReceiver(KvReceiver):
  """A receiver that redeems only the transfer ids the router issued to
  this worker (``IssuedTransfers``): ``expect`` registers one, ``forget``
  drops it (a subclass that stages anything for an id drops that too)."""

  def __init__(self):
    self._issued = IssuedTransfers()

  def expect(self, transfer_id: str, request_id: str, *,
             max_pages: int | None = None) -> None:
    self._issued.add(transfer_id, max_pages)

  def forget(self, transfer_id: str) -> None:
    self._issued.discard(transfer_id)


def handle_for(kv: RequestKV, transport: str, transfer_id: str
               ) -> kv_pb2.KvHandle:
  return kv_pb2.KvHandle(
      transport=transport, transfer_id=transfer_id, num_tokens=kv.num_tokens,
      first_page=kv.first_page, shape=list(kv.shape),
      dtype=np.dtype(kv.dtype).name)


__all__ = ["TransferError", "TransferTimeout", "TransferDenied",
           "TransferExhausted", "KvSender", "StreamIntake", "check_kv_handle",
           "IssuedTransfers", "KvReceiver", "IssuedKvReceiver", "LeaseTable",
           "new_transfer_id", "new_pull_uuid", "handle_for", "device_failure",
           "PATH_LOCAL", "PATH_CUDA_IPC", "PATH_TRANSFER"]
