"""The seams between the services and the engines: what a service may call.

A worker's gRPC service talks to its engine through one of these and never
reaches past it (into replicas, pools or programs), so an engine can change
inside without the service noticing, and a fake one can stand in for it in
the services' tests (``tests/fake_engines.py``):

* ``PrefillBackend``: a prefill pool (``PrefillEngine``, or
  ``LockstepPrefill`` for a pool spanning processes) as the prefill worker
  uses it: batches of prompts in, first tokens and KVs out.
* ``DecodeBackend``: a decode pool that can also prefill its own requests
  (``ColocatedEngine``), as the decode worker uses it: decode-side admission
  (reservations under the router's transfer ids), requests in (with a KV, or
  a prompt to prefill here), the loop's step, and the accounting the worker
  publishes.
* ``PrefixStore``: where a prefill engine finds cached prompt blocks (the
  prefill worker's own block cache, or a colocated replica's pools). A
  store may look past its own tiers (the deployment's shared KV,
  ``pdjax.engine.remote_tier``) inside ``match``, and serve its blocks to
  peers (``export``, answered on its owner's thread by ``serve_peers``).

The KV transports' contract is ``pdjax.transfer.base`` (``KvSender``,
``KvReceiver`` and their capabilities).
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Protocol, Sequence

from jax.sharding import Mesh, Sharding

from pdjax.engine.requests import (DecodeRequest, PrefillRequest,
                                   PrefillResult, RequestKV, TokenCallback)
from pdjax.engine.sampling import SamplingParams


class PrefixStore(abc.ABC):
  """Cached prompt blocks, named by ``block_hashes``, as a prefill engine
  uses them: ``match`` pins the longest cached prefix, ``gather_into``
  copies it into a prefill's KV buffer, ``release`` unpins; a store that
  fills itself from the prefills (the prefill worker's) also keeps their
  new blocks (``store``, ``store_pages``)."""

  page_size: int
  # Whether the store keeps the blocks of the prefills that use it
  # (``store``, ``store_pages``): the prefill worker's does; a colocated
  # replica's is filled by its finished rows instead.
  keeps_prefills: bool = False
  # The store's block-set changes for KV-aware routing (None: not shared).
  cache_events: Any = None
  # Its host-memory tier (``pdjax.engine.host_tier``), if it has one.
  host_tier: Any = None
  # Shared KV (``pdjax.engine.remote_tier.RemoteTier``), if it has one.
  remote: Any = None
  # Called (any thread) when a peer's request waits for the owner's
  # ``serve_peers``: the owner's loop sets it to wake itself.
  wake: Callable[[], None] | None = None

  @abc.abstractmethod
  def hashes(self, token_ids: Sequence[int], salt: str = "") -> list[bytes]:
    """The block names of a prompt."""

  @abc.abstractmethod
  def match(self, hashes: Sequence[bytes],
            sources: Sequence[tuple[str, int]] = ()) -> list[int]:
    """Pages of the longest cached prefix of ``hashes``, each pinned.
    ``sources``: (address, blocks) of peers said to hold more of it (a
    store with a remote tier may fetch from them; others ignore it)."""

  @abc.abstractmethod
  def release(self, pages: Sequence[int]) -> None:
    """Unpins pages ``match`` pinned."""

  @abc.abstractmethod
  def gather_into(self, pages: Sequence[int], k_buf, v_buf):
    """The prefill buffers with ``pages`` at their head."""

  def store(self, hashes: Sequence[bytes], first: int, k_buf, v_buf) -> int:
    """Keeps a buffered prefill's blocks ``first ..``; how many were new
    (0: this store is filled elsewhere)."""
    return 0

  def store_pages(self, hashes: Sequence[bytes], kv) -> int:
    """Keeps a batched prefill's request KV; how many blocks were new."""
    return 0

  def warmup(self, engine) -> None:
    """Compiles the store's programs for ``engine``'s shapes."""

  def observe_prefill(self, tokens: int, seconds: float) -> None:
    """A prefill computed ``tokens`` prompt tokens in ``seconds`` (a store
    that fetches weighs fetches against this rate)."""

  def export(self, hashes: Sequence[bytes], timeout_s: float
             ) -> list[tuple[bytes, Any]]:
    """Any thread: (name, array) of the leading run of ``hashes`` held
    here, for a peer (empty: this store serves none)."""
    return []

  def serve_peers(self) -> int:
    """The owner's thread: answers queued ``export`` calls."""
    return 0

  @abc.abstractmethod
  def block_stats(self) -> dict[str, int]:
    """Lookups and evictions so far: hits, misses, evictions."""


class PrefillBackend(Protocol):
  """A prefill pool, as the prefill worker drives it (one thread)."""

  cfg: Any            # ModelConfig
  config: Any         # PrefillConfig
  mesh: Mesh
  prefix_store: PrefixStore | None

  def prefill(self, requests: Sequence[PrefillRequest], *,
              kv_ready: Callable[[int, RequestKV], None] | None = None,
              on_result: Callable[[int, PrefillResult], None] | None = None
              ) -> list[PrefillResult]: ...

  def close(self) -> None: ...


class DecodeBackend(Protocol):
  """A decode pool that may prefill its own requests, as the decode worker
  drives it: admission and requests from any thread, ``step`` from the
  worker's loop thread."""

  cfg: Any            # ModelConfig

  @property
  def max_seq_len(self) -> int: ...

  @property
  def has_work(self) -> bool: ...

  @property
  def num_waiting(self) -> int: ...

  @property
  def devices(self) -> list: ...

  @property
  def cache_events(self) -> Any: ...

  def reserve(self, request_id: str, prompt_len: int, max_tokens: int, *,
              transfer_id: str = "", prompt_ids: Sequence[int] | None = None,
              cache_salt: str = "") -> Any: ...

  def unreserve(self, request_id: str) -> Any: ...

  def reservation(self, request_id: str) -> Any: ...

  def payload_sharding(self, replica: int, num_pages: int) -> Sharding: ...

  def submit(self, request_id: str, prompt_ids: Sequence[int],
             sampling: SamplingParams, callback: TokenCallback,
             seed_u32: int = 0, *, forced_first_token: int | None = None,
             cache_salt: str = "") -> None: ...

  def submit_decode(self, request: DecodeRequest) -> None: ...

  def cancel(self, request_id: str) -> None: ...

  def step(self) -> int: ...

  def fail_all(self, message: str) -> None: ...

  def last_iteration(self) -> Any: ...

  def kv_usage(self) -> dict[str, int]: ...

  def block_stats(self) -> dict[str, dict[str, int]]: ...

  def prefill_tokens(self) -> tuple[int, int]: ...

  def preemption_stats(self) -> dict[str, int]: ...

  def close(self) -> bool: ...


__all__ = ["DecodeBackend", "PrefillBackend", "PrefixStore"]
