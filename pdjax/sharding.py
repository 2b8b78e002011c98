"""Declarative sharding: logical axes -> mesh axes, from the rule files in
``pdjax/shardings/`` (package data: ``--sharding=prefill_tp``) or any TOML
file.

The model names each array dimension by what it means (``vocab``, ``heads``,
``kv_heads``, ``mlp``, ``replica``...). A rule set maps those names to mesh
axes; this module turns a rule set and a mesh into ``NamedSharding``s and
refuses, with the axis and sizes named, any rule that does not divide its
dimension. Pools differ only in the rule set and mesh they are given.

A mesh with a ``dp`` axis is split into per-replica sub-meshes
(``replica_meshes``): each data-parallel decode replica runs its own jitted
programs on its own devices, as JetStream runs one generate engine per slice.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pdjax.mesh_spec import ShardingError, parse_mesh

LOGICAL_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp",
                "layers", "batch", "seq", "replica", "pages", "page_slot", "kv",
                "layer_pages")


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  name: str
  mesh_axes: tuple[str, ...]
  rules: Mapping[str, tuple[str, ...]]

  @classmethod
  def load(cls, name_or_path: str | Path) -> "ShardingRules":
    """Loads a packaged rule set by name (``pdjax/shardings/<name>.toml``)
    or a TOML file path."""
    from pdjax import resources
    try:
      text, source = resources.read("sharding", name_or_path)
    except FileNotFoundError:
      known = resources.names("sharding")
      raise ShardingError(f"sharding rule set {str(name_or_path)!r} not found "
                          f"(known: {', '.join(known)})") from None
    return cls.from_dict(tomllib.loads(text), source=source)

  @classmethod
  def from_dict(cls, data: dict[str, Any], source: str = "<dict>"):
    mesh_axes = tuple(data.get("mesh_axes", ()))
    rules: dict[str, tuple[str, ...]] = {}
    for logical, target in data.get("rules", {}).items():
      if logical not in LOGICAL_AXES:
        raise ShardingError(f"{source}: unknown logical axis {logical!r} "
                            f"(known: {', '.join(LOGICAL_AXES)})")
      targets = ((target,) if isinstance(target, str) else tuple(target))
      targets = tuple(t for t in targets if t)
      for t in targets:
        if t not in mesh_axes:
          raise ShardingError(f"{source}: rule {logical} -> {t!r} names a mesh "
                              f"axis not in mesh_axes {list(mesh_axes)}")
      rules[logical] = targets
    return cls(name=data.get("name", Path(source).stem), mesh_axes=mesh_axes,
               rules=rules)

  def without(self, *mesh_axes: str) -> "ShardingRules":
    """The rules with some mesh axes dropped (used for per-replica meshes)."""
    return ShardingRules(
        name=self.name,
        mesh_axes=tuple(a for a in self.mesh_axes if a not in mesh_axes),
        rules={k: tuple(t for t in v if t not in mesh_axes)
               for k, v in self.rules.items()})

  def partition_spec(self, logical_axes: Sequence[str | None]
                     ) -> PartitionSpec:
    parts = []
    used: set[str] = set()
    for ax in logical_axes:
      targets = self.rules.get(ax, ()) if ax else ()
      for t in targets:
        if t in used:
          raise ShardingError(
              f"rule set {self.name!r}: mesh axis {t!r} is used by two "
              f"dimensions of {tuple(logical_axes)}")
        used.add(t)
      parts.append(None if not targets else
                   (targets[0] if len(targets) == 1 else targets))
    return PartitionSpec(*parts)

  def sharding(self, mesh: Mesh, logical_axes: Sequence[str | None],
               shape: Sequence[int] | None = None, *, what: str = "array"
               ) -> NamedSharding:
    spec = self.partition_spec(logical_axes)
    for ax in mesh.axis_names:
      if ax not in self.mesh_axes and mesh.shape[ax] > 1:
        raise ShardingError(
            f"rule set {self.name!r} expects mesh axes {list(self.mesh_axes)}"
            f" but the mesh has axis {ax!r} of size {mesh.shape[ax]}")
    if shape is not None:
      for dim, (size, part, logical) in enumerate(
          zip(shape, spec, logical_axes)):
        if part is None:
          continue
        axes = (part,) if isinstance(part, str) else part
        n = int(np.prod([mesh.shape[a] for a in axes if a in mesh.shape]))
        if size % n:
          raise ShardingError(
              f"rule set {self.name!r}: {what} dimension {dim} ({logical}, "
              f"size {size}) is split over mesh axis "
              f"{'x'.join(axes)} of size {n}, and {size} is not divisible by "
              f"{n}")
    return NamedSharding(mesh, _restrict(spec, mesh))

  def tree(self, mesh: Mesh, shapes_and_axes) -> Any:
    """Maps a pytree of (shape, logical_axes) leaves to NamedShardings."""
    leaves = jax.tree_util.tree_flatten_with_path(
        shapes_and_axes, is_leaf=_is_shape_axes)[0]
    treedef = jax.tree.structure(shapes_and_axes, is_leaf=_is_shape_axes)
    out = [self.sharding(mesh, axes, shape,
                         what=jax.tree_util.keystr(path, simple=True,
                                                   separator="/"))
           for path, (shape, axes) in leaves]
    return jax.tree.unflatten(treedef, out)


def _restrict(spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes the mesh does not have (a replica's sub-mesh has no dp)."""
  parts = []
  for p in spec:
    axes = () if p is None else ((p,) if isinstance(p, str) else tuple(p))
    axes = tuple(a for a in axes if a in mesh.shape)
    parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*parts)


def _is_shape_axes(x) -> bool:
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple)


# ------------------------------------------------------------------ meshes
def make_mesh(axes: Mapping[str, int], devices: Sequence[Any] | None = None
              ) -> Mesh:
  """A mesh over the first prod(sizes) of ``devices`` (default: all devices,
  across every process of a multi-controller job)."""
  devices = list(jax.devices() if devices is None else devices)
  n = int(np.prod(list(axes.values())))
  if n > len(devices):
    raise ShardingError(f"mesh {dict(axes)} needs {n} devices, only "
                        f"{len(devices)} available")
  arr = np.array(devices[:n], dtype=object).reshape(tuple(axes.values()))
  return Mesh(arr, tuple(axes.keys()))


def replica_meshes(mesh: Mesh, axis: str = "dp") -> list[Mesh]:
  """Splits a mesh along ``axis`` into one sub-mesh per replica."""
  if axis not in mesh.axis_names:
    return [mesh]
  i = mesh.axis_names.index(axis)
  names = tuple(a for a in mesh.axis_names if a != axis)
  subs = []
  for r in range(mesh.shape[axis]):
    devs = np.take(mesh.devices, r, axis=i)
    if not names:
      devs = np.array([devs], dtype=object)
      names_r = ("tp",)
    else:
      names_r = names
    subs.append(Mesh(devs, names_r))
  return subs


def replica_view(x: jax.Array, sub_mesh: Mesh, spec: PartitionSpec
                 ) -> jax.Array:
  """The part of a dp-replicated global array that lives on one replica's
  devices, as an array on the sub-mesh: zero-copy (it reuses the shards)."""
  devs = set(sub_mesh.devices.flat)
  shards = [s.data for s in x.addressable_shards if s.device in devs]
  sharding = NamedSharding(sub_mesh, spec)
  return jax.make_array_from_single_device_arrays(x.shape, sharding, shards)


__all__ = ["ShardingRules", "ShardingError", "parse_mesh", "make_mesh",
           "replica_meshes", "replica_view", "LOGICAL_AXES"]
