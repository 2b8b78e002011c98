"""Request lifecycle types shared by the engines and the services.

A request's status (``RequestStatus``) moves only through
``RequestStatus.advance``, which checks the move against ``TRANSITIONS``
and raises ``IllegalTransition`` (a bug) on any other: a finished request
is never finished twice nor resumed. The states are ordered as vLLM's
(every state after the live ones is a finished one, so ``is_finished`` is
a comparison). In the decode engine, and the colocated engine in front of
it:

  WAITING ---> WAITING_FOR_KV ---> RUNNING <---> PREEMPTED_SWAPPED
     ^                                |
     |                                v
     +--------------------- PREEMPTED_RECOMPUTE

and from every one of them to FINISHED_{STOPPED,LENGTH,ABORTED,ERROR}
(which ones, below; ``TRANSITIONS`` is the table).

WAITING: in the colocated engine's admission queue, nothing reserved;
ended ABORTED when cancelled, past the queue's deadline or at shutdown. A
request evicted for recompute waits here again (with no deadline).

WAITING_FOR_KV: capacity reserved on a decode replica; the prompt's KV is
being prefilled (colocated) or transferred (disaggregated: a
``DecodeRequest`` starts here), or waits in the decode engine's inbox to
be written into the pool. Ends here when its first token already finishes
it (STOPPED, LENGTH), when cancelled (ABORTED) or when the insert is
refused (ERROR).

RUNNING: holds a row and pages; advanced by generate calls. Ends at
delivery (STOPPED, LENGTH) or by a cancel (ABORTED).

PREEMPTED_SWAPPED: still holds its row, its KV is in the replica's swap
space and it holds no pages; in no call. Back to RUNNING once the pool
has room; the call in flight when it was swapped out may still finish it.

PREEMPTED_RECOMPUTE: its row and pages are freed and its KV dropped; handed
on to be prefilled again (back to WAITING, at the head of the colocated
queue), or ended: ABORTED when a cancel is pending, ERROR where nothing
recomputes.

A failing engine (``fail_all``) ends every live request with ERROR.

``Lifecycle`` holds one request's status; every copy of a request
(``dataclasses.replace``) shares it, so it follows the request from the
queue to a row, out to recompute and back.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.engine.sampling import SamplingParams


class IllegalTransition(RuntimeError):
  """A request moved where its lifecycle does not go (a bug): finished
  twice, resumed after it ended, or skipping a state."""


class RequestStatus(enum.IntEnum):
  WAITING = 0
  WAITING_FOR_KV = 1
  RUNNING = 2
  PREEMPTED_SWAPPED = 3
  PREEMPTED_RECOMPUTE = 4
  FINISHED_STOPPED = 5
  FINISHED_LENGTH = 6
  FINISHED_ABORTED = 7
  FINISHED_ERROR = 8

  @property
  def is_finished(self) -> bool:
    return self >= RequestStatus.FINISHED_STOPPED

  @classmethod
  def finished(cls, reason: "FinishReason") -> "RequestStatus":
    """The finished status of ``reason``."""
    return _FINISHED[reason]

  def advance(self, new: "RequestStatus") -> "RequestStatus":
    """The one transition function: ``new`` when ``self -> new`` is a move
    of the lifecycle (``TRANSITIONS``), else ``IllegalTransition``. Also
    called as ``RequestStatus.advance(old, new)``."""
    new = RequestStatus(new)
    if new not in TRANSITIONS[self]:
      raise IllegalTransition(f"a request cannot go from {self.name} to "
                              f"{new.name}")
    return new


_ENDS = frozenset({RequestStatus.FINISHED_STOPPED,
                   RequestStatus.FINISHED_LENGTH,
                   RequestStatus.FINISHED_ABORTED,
                   RequestStatus.FINISHED_ERROR})

# The allowed moves (the module docstring's diagram); finished states have
# none.
TRANSITIONS: dict[RequestStatus, frozenset[RequestStatus]] = {
    RequestStatus.WAITING: frozenset({
        RequestStatus.WAITING_FOR_KV, RequestStatus.FINISHED_ABORTED,
        RequestStatus.FINISHED_ERROR}),
    RequestStatus.WAITING_FOR_KV: frozenset({RequestStatus.RUNNING}) | _ENDS,
    RequestStatus.RUNNING: frozenset({
        RequestStatus.PREEMPTED_SWAPPED,
        RequestStatus.PREEMPTED_RECOMPUTE}) | _ENDS,
    RequestStatus.PREEMPTED_SWAPPED: frozenset({RequestStatus.RUNNING})
                                     | _ENDS,
    RequestStatus.PREEMPTED_RECOMPUTE: frozenset({
        RequestStatus.WAITING, RequestStatus.FINISHED_ABORTED,
        RequestStatus.FINISHED_ERROR}),
    **{s: frozenset() for s in _ENDS},
}


class FinishReason(str, enum.Enum):
  STOP = "stop"          # EOS or a stop token id
  LENGTH = "length"      # max_tokens or the cache capacity
  ABORT = "abort"        # cancelled by the client or deadline
  ERROR = "error"

  @classmethod
  def from_status(cls, status: RequestStatus) -> "FinishReason | None":
    return {
        RequestStatus.FINISHED_STOPPED: cls.STOP,
        RequestStatus.FINISHED_LENGTH: cls.LENGTH,
        RequestStatus.FINISHED_ABORTED: cls.ABORT,
        RequestStatus.FINISHED_ERROR: cls.ERROR,
    }.get(status)


_FINISHED = {FinishReason.STOP: RequestStatus.FINISHED_STOPPED,
             FinishReason.LENGTH: RequestStatus.FINISHED_LENGTH,
             FinishReason.ABORT: RequestStatus.FINISHED_ABORTED,
             FinishReason.ERROR: RequestStatus.FINISHED_ERROR}


class Lifecycle:
  """One request's status, moved only by ``advance`` (``finish``). The
  engines read it to decide: whether a row takes part in a call, may be
  preempted or what its release frees, and the finish reason of the
  request's last event."""

  __slots__ = ("status",)

  def __init__(self, status: RequestStatus = RequestStatus.WAITING):
    self.status = RequestStatus(status)

  def advance(self, new: RequestStatus) -> None:
    self.status = self.status.advance(new)

  def finish(self, reason: FinishReason) -> FinishReason:
    """Ends the request with ``reason`` (raises if it has ended already)
    and returns ``reason``, for its last event."""
    self.advance(RequestStatus.finished(reason))
    return reason

  @property
  def reason(self) -> FinishReason | None:
    """The finish reason once finished; None while live."""
    return FinishReason.from_status(self.status)

  def __repr__(self) -> str:
    return f"Lifecycle({self.status.name})"


@dataclasses.dataclass
class TokenEvent:
  """New tokens of one request, delivered in order. The last event of a
  request carries ``finish_reason`` (and possibly no tokens)."""
  request_id: str
  token_ids: list[int]
  logprobs: list[float]
  finish_reason: FinishReason | None = None
  error: str | None = None
  # Set on the event that ends a request refused for capacity (it waited in
  # the admission queue past its deadline): the service answers
  # RESOURCE_EXHAUSTED, a retry later may well succeed.
  exhausted: bool = False
  # A locally prefilled request's first event: prompt tokens whose KV came
  # from a prefix cache instead of being computed, and how long it waited
  # for its prefill and took in it (seconds).
  cached_tokens: int = 0
  queue_s: float = 0.0
  prefill_s: float = 0.0
  # The last event of a request its pool speculated for: tokens drafted
  # for it, and drafts the model kept.
  spec_drafted: int = 0
  spec_accepted: int = 0


TokenCallback = Callable[[TokenEvent], None]


class RequestKV:
  """A prompt's KV cache in page layout, as the prefill engine hands it on.

  ``kv``: [layers, 2, n_pages, page_size, kv_heads, head_dim]. ``n_pages`` is
  the page count of the prefill bucket (a power of two), so every consumer
  compiles once per bucket; only the first ``ceil(num_tokens / page_size)``
  pages carry data. ``first_page`` > 0 when the leading pages are not
  included (the receiver already holds them: prefix reuse).

  ``layer_groups``: set when the prefill ran its layers as several programs
  (``PrefillConfig.layer_groups``): the KV as consecutive slices of its
  layer axis, each an output of its own program, so each is ready while
  later layers still compute. A hand-off that can write layer ranges (the
  CUDA IPC path: the layer axis leads, so a layer range is one contiguous
  byte range) moves each slice as soon as it is done, under the rest of the
  prefill. ``kv`` is then joined from them on first use (one device copy),
  only by consumers that need the whole array.

  ``release_fn``: set when ``kv`` is a view of memory lent by a transport
  (a CUDA IPC landing region) rather than memory JAX owns. The consumer
  reads ``kv`` into its own pools, and once the program doing so has
  *completed* calls ``release()``, so the lender may reuse the memory; a
  consumer that drops the KV unread calls it too.
  """

  def __init__(self, kv: jax.Array | None, num_tokens: int,
               first_page: int = 0,
               release_fn: Callable[[], None] | None = None, *,
               layer_groups: Sequence[jax.Array] = ()):
    if (kv is None) == (not layer_groups):
      raise ValueError("a RequestKV is made of the whole array or of its "
                       "layer groups, exactly one of them")
    self._kv = kv
    self.layer_groups = tuple(layer_groups)
    self.num_tokens = num_tokens
    self.first_page = first_page
    self.release_fn = release_fn
    first = kv if kv is not None else self.layer_groups[0]
    layers = (kv.shape[0] if kv is not None
              else sum(g.shape[0] for g in self.layer_groups))
    self.shape = (layers,) + tuple(first.shape[1:])
    self.dtype = first.dtype

  @property
  def kv(self) -> jax.Array:
    if self._kv is None:
      self._kv = _join_layers(self.layer_groups)
    return self._kv

  @property
  def pieces(self) -> tuple[jax.Array, ...]:
    """The KV as slices of its layer axis, in order: the layer groups, or
    the whole array."""
    return self.layer_groups or (self._kv,)

  @property
  def borrowed(self) -> bool:
    return self.release_fn is not None

  def release(self) -> None:
    """Gives borrowed memory back (nothing reads ``kv`` any more). A no-op
    for KV that JAX owns, and after the first call."""
    fn, self.release_fn = self.release_fn, None
    if fn is not None:
      fn()

  @property
  def page_size(self) -> int:
    return self.shape[3]

  @property
  def num_pages(self) -> int:
    """Pages with data (from ``first_page`` on)."""
    return -(-self.num_tokens // self.page_size) - self.first_page

  @property
  def payload_bytes(self) -> int:
    """Bytes of the whole padded payload."""
    return math.prod(self.shape) * np.dtype(self.dtype).itemsize

  @property
  def nbytes(self) -> int:
    """Bytes of the pages that carry data."""
    return self.payload_bytes // self.shape[2] * self.num_pages

  def __repr__(self) -> str:
    groups = (f", layer_groups={len(self.layer_groups)}"
              if self.layer_groups else "")
    return (f"RequestKV(shape={self.shape}, dtype={self.dtype}, "
            f"num_tokens={self.num_tokens}, first_page={self.first_page}"
            f"{groups})")


@jax.jit
def _join_layers(groups):
  return jnp.concatenate(groups, axis=0)


@dataclasses.dataclass
class PrefillRequest:
  request_id: str
  prompt_ids: Sequence[int]
  sampling: SamplingParams
  seed_u32: int = 0
  cache_salt: str = ""
  # Leading pages the decode side already holds: not handed on.
  skip_pages: int = 0
  # Cached leading blocks already pinned by the caller (colocated: in the
  # decode replica's pools); None = look them up in the engine's store.
  prefix_pages: Sequence[int] | None = None
  # Shared KV: (address, leading blocks held) of peers or stores the
  # router says hold more of the prompt than this worker, best first.
  kv_sources: Sequence[tuple[str, int]] = ()


@dataclasses.dataclass
class PrefillResult:
  request_id: str
  first_token: int
  first_logprob: float
  kv: RequestKV
  prompt_len: int
  cached_tokens: int = 0   # prompt tokens whose KV came from a cache


@dataclasses.dataclass
class DecodeRequest:
  """A request entering the decode engine with its prompt KV ready."""
  request_id: str
  prompt_ids: Sequence[int]
  first_token: int
  first_logprob: float
  kv: RequestKV | None   # None once inserted (the engine keeps no payload)
  sampling: SamplingParams
  seed_u32: int
  callback: TokenCallback
  # The decode step resumes at position len(prompt_ids).
  reservation: "object | None" = None
  cache_salt: str = ""
  # Output tokens already generated, ``first_token`` the last of them: 1 for
  # a new request; more for one resumed after its row was preempted and
  # its KV recomputed, whose ``prompt_ids`` then end with the tokens it had
  # generated before ``first_token`` (the stream has them all already).
  tokens_generated: int = 1
  # Where the request is (shared by its copies). A request handed to the
  # decode engine has its capacity reserved, or gets it at ``submit``.
  lifecycle: Lifecycle = dataclasses.field(
      default_factory=lambda: Lifecycle(RequestStatus.WAITING_FOR_KV))


__all__ = ["RequestStatus", "IllegalTransition", "TRANSITIONS", "Lifecycle",
           "FinishReason", "TokenEvent", "TokenCallback",
           "RequestKV", "PrefillRequest", "PrefillResult", "DecodeRequest"]
