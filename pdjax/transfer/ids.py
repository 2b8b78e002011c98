"""Random ids of KV transfers (no JAX: the router makes them)."""

from __future__ import annotations

import secrets


def new_transfer_id() -> str:
  return secrets.token_hex(16)


def new_pull_uuid() -> int:
  return secrets.randbits(63) or 1


__all__ = ["new_transfer_id", "new_pull_uuid"]
