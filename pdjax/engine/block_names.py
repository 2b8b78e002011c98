"""The names of KV blocks: a chained hash of a block's tokens, the model's
layout and a salt, equal wherever the same prefix is cached (no JAX: the
router names blocks to route by them)."""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from pdjax.model.config import ModelConfig

HASH_BYTES = 16


def layout_fingerprint(cfg: ModelConfig, page_size: int) -> bytes:
  """What must match for two pools to exchange blocks."""
  return hashlib.blake2b(f"{cfg.fingerprint()}:{page_size}".encode(),
                         digest_size=HASH_BYTES).digest()


def block_hashes(token_ids: Sequence[int], page_size: int, fingerprint: bytes,
                 salt: str = "") -> list[bytes]:
  """Names of the full blocks of ``token_ids``, in order (chained)."""
  ids = np.asarray(token_ids, dtype="<i4")
  n = len(ids) // page_size
  salt_b = salt.encode()
  out: list[bytes] = []
  parent = b""
  for i in range(n):
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    h.update(parent)
    h.update(fingerprint)
    h.update(len(salt_b).to_bytes(4, "little"))
    h.update(salt_b)
    h.update(ids[i * page_size:(i + 1) * page_size].tobytes())
    parent = h.digest()
    out.append(parent)
  return out


__all__ = ["HASH_BYTES", "block_hashes", "layout_fingerprint"]
