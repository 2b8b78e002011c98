"""Mesh specs such as ``"dp=2,tp=4"``: parsed here without JAX, so that the
router and the launchers read a worker's mesh without importing it
(``pdjax.sharding`` builds meshes from them)."""

from __future__ import annotations

from typing import Mapping


class ShardingError(ValueError):
  """A rule set that cannot shard a given array on a given mesh."""


def parse_mesh(spec: str | Mapping[str, int]) -> dict[str, int]:
  """``"dp=2,tp=4"`` (or a mapping) -> ordered {axis: size}."""
  if isinstance(spec, Mapping):
    return {str(k): int(v) for k, v in spec.items()}
  out: dict[str, int] = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    if "=" not in part:
      raise ShardingError(f"mesh {spec!r}: expected axis=size items like "
                          "'tp=2' or 'dp=2,tp=1'")
    k, v = part.split("=", 1)
    if not v.strip().isdigit() or int(v) < 1:
      raise ShardingError(f"mesh {spec!r}: size of axis {k!r} must be a "
                          "positive integer")
    out[k.strip()] = int(v)
  if not out:
    raise ShardingError(f"mesh {spec!r} is empty")
  return out


def axis_size(spec: str, axis: str) -> int:
  """The size of ``axis`` in a mesh spec (1 where the spec lacks it or is
  empty)."""
  return parse_mesh(spec).get(axis, 1) if spec else 1


def mesh_size(spec: str) -> int:
  """Devices a mesh spec takes."""
  n = 1
  for v in parse_mesh(spec).values():
    n *= v
  return n


__all__ = ["ShardingError", "axis_size", "mesh_size", "parse_mesh"]
