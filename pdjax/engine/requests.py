"""Request lifecycle types shared by the engines and the services.

A request moves through an ordered set of states (vLLM's convention: every
state after RUNNING is a finished one, so ``is_finished`` is a comparison):

  WAITING -> [WAITING_FOR_KV] -> RUNNING -> FINISHED_{STOPPED,LENGTH,ABORTED,ERROR}

WAITING: admitted, no decode capacity yet. WAITING_FOR_KV: capacity reserved,
the prompt's KV is being computed or transferred. RUNNING: in a decode slot.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Callable, Sequence

import jax

from pdjax.engine.sampling import SamplingParams


class RequestStatus(enum.IntEnum):
  WAITING = 0
  WAITING_FOR_KV = 1
  RUNNING = 2
  FINISHED_STOPPED = 3
  FINISHED_LENGTH = 4
  FINISHED_ABORTED = 5
  FINISHED_ERROR = 6

  @property
  def is_finished(self) -> bool:
    return self > RequestStatus.RUNNING


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


@dataclasses.dataclass
class TokenEvent:
  """New tokens of one request, delivered in order. The last event of a
  request carries ``finish_reason`` (and possibly no tokens)."""
  request_id: str
  token_ids: list[int]
  logprobs: list[float]
  finish_reason: FinishReason | None = None
  error: str | None = None


TokenCallback = Callable[[TokenEvent], None]


@dataclasses.dataclass
class RequestKV:
  """A prompt's KV cache in page layout, as the prefill engine hands it on.

  ``kv``: [layers, 2, n_pages, page_size, kv_heads, head_dim]. ``n_pages`` is
  the page count of the prefill bucket (a power of two), so every consumer
  compiles once per bucket; only the first ``ceil(num_tokens / page_size)``
  pages carry data. ``first_page`` > 0 when the leading pages are not
  included (the receiver already holds them: prefix reuse).

  ``release_fn``: set when ``kv`` is a view of memory lent by a transport
  (a CUDA IPC landing region) rather than memory JAX owns. The consumer
  reads ``kv`` into its own pools, and once the program doing so has
  *completed* calls ``release()``, so the lender may reuse the memory; a
  consumer that drops the KV unread calls it too.
  """
  kv: jax.Array
  num_tokens: int
  first_page: int = 0
  release_fn: Callable[[], None] | None = dataclasses.field(
      default=None, repr=False, compare=False)

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
    return self.kv.shape[3]

  @property
  def num_pages(self) -> int:
    """Pages with data (from ``first_page`` on)."""
    return -(-self.num_tokens // self.page_size) - self.first_page

  @property
  def nbytes(self) -> int:
    """Bytes of the pages that carry data."""
    per_page = self.kv.nbytes // self.kv.shape[2]
    return per_page * self.num_pages


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


__all__ = ["RequestStatus", "FinishReason", "TokenEvent", "TokenCallback",
           "RequestKV", "PrefillRequest", "PrefillResult", "DecodeRequest"]
