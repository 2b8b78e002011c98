"""KV layouts and the one function that moves a prompt's KV between them.

Layouts (logical axes, mapped to meshes by the rule sets):

* request KV (what prefill hands on): ``[layers, kv, pages, page_slot,
  kv_heads, head_dim]``, where ``kv`` is 2 (K then V). Under ``prefill_tp``
  the kv_heads are split over the prefill mesh's ``tp`` axis.
* decode pool: the same axes with ``pages`` = every page of one replica.

``reshard_kv`` is the single place a request KV changes layout (TP prefill
layout -> a decode replica's layout, on another mesh in this process). Every
transport ends in it, so layout rules live in one spot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from pdjax.engine.requests import RequestKV
from pdjax.model.config import ModelConfig
from pdjax.sharding import ShardingRules

KV_AXES = ("layers", "kv", "pages", "page_slot", "kv_heads", "head_dim")


def next_pow2(n: int) -> int:
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def pages_for(tokens: int, page_size: int) -> int:
  return -(-int(tokens) // page_size)


def payload_pages(num_pages: int) -> int:
  """Padded page count of a KV payload: powers of two, so consumers compile
  one program per size class instead of one per prompt length."""
  return next_pow2(max(num_pages, 1))


def zero_kv(*, shape, dtype):
  """A K and a V array of ``shape``, zeros (jitted with their shardings
  where a pool, buffer or cache is made)."""
  return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def request_kv_shape(cfg: ModelConfig, num_pages: int, page_size: int):
  return (cfg.num_layers, 2, num_pages, page_size, cfg.num_kv_heads,
          cfg.head_dim)


def kv_sharding(rules: ShardingRules, mesh: Mesh, shape) -> NamedSharding:
  return rules.sharding(mesh, KV_AXES, shape, what="kv cache")


def reshard_kv(kv: RequestKV, sharding: NamedSharding) -> RequestKV:
  """Places a request KV in the destination layout (any mesh of this
  process). A no-op when it is already there."""
  if kv.kv.sharding == sharding:
    return kv
  moved = jax.device_put(kv.kv, sharding)
  # A borrowed source is read by the copy: it is given back with the copy.
  return RequestKV(kv=moved, num_tokens=kv.num_tokens,
                   first_page=kv.first_page, release_fn=kv.release_fn)


def host_pages(kv: RequestKV) -> np.ndarray:
  """The pages that carry data, as one host array (for host-staged
  transports): ``[layers, 2, num_pages, page, kv_heads, head_dim]``."""
  arr = np.asarray(jax.device_get(kv.kv))
  return arr[:, :, :kv.num_pages]


__all__ = ["KV_AXES", "next_pow2", "pages_for", "payload_pages",
           "request_kv_shape", "kv_sharding", "reshard_kv", "host_pages"]
