"""Deployment configuration: what each pool runs, read from a deployment
file (a path, or a name the package ships under ``pdjax/configs/deployments``).

A deployment file (TOML) has shared keys (checkpoint, dtype, page size,
context length, transport: the things pools must agree on) and one table per
pool. Launcher flags override file values; unset flags leave them alone.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from pdjax.engine.decode import DecodeConfig
from pdjax.engine.prefill import PrefillConfig
# Layer groups of an auto-configured prefill worker whose hand-offs can take
# the CUDA IPC path: the hand-off left after the prefill is about a quarter
# of the KV's copy (docs/notes/2026-11-26-h200x2-handoff-overlap.md).
AUTO_LAYER_GROUPS = 4


def resolve_layer_groups(setting: int, *, layer_wise_sender: bool) -> int:
  """``PoolConfig.layer_groups`` (or the flag) -> the engine's count."""
  if setting < 0:
    raise ValueError(f"layer_groups must be >= 0 (0: auto), got {setting}")
  if setting:
    return setting
  return AUTO_LAYER_GROUPS if layer_wise_sender else 1


@dataclasses.dataclass
class PoolConfig:
  mesh: str = "tp=1"
  sharding: str = "prefill_tp"
  buckets: tuple[int, ...] = (16, 32, 64, 128, 256)
  max_batch: int = 4
  max_batch_tokens: int = 0
  max_seqs: int = 8
  num_pages: int = 512
  steps_per_call: int = 4
  table_buckets: tuple[int, ...] = ()
  row_buckets: tuple[int, ...] = ()
  # Decode workers that prefill (colocated): prompt tokens of prefill
  # between two generate calls (DecodeConfig.prefill_token_budget).
  prefill_token_budget: int = 0
  # Prefix caching: pages of the prefill worker's block store (0: off), and
  # whether decode workers keep finished sequences' blocks for reuse.
  cache_pages: int = 0
  prefix_caching: bool = False
  # Prefill workers: run bucketed prompts' layers as this many programs so
  # the KV hand-off moves each group under the rest of the prefill (0:
  # auto, ``AUTO_LAYER_GROUPS`` when hand-offs can take the CUDA IPC path,
  # which writes layer ranges; 1 otherwise).
  layer_groups: int = 0
  # On GPUs: the pool's GEMM kernels (PrefillConfig / DecodeConfig
  # .triton_gemm), and how decode attention reads the pages (DecodeConfig).
  triton_gemm: str = "auto"
  attention: str = "auto"
  # XLA's DotMerger in the pool's programs (Prefill/DecodeConfig.merge_dots).
  merge_dots: str = "auto"
  # Share of each GPU's memory XLA may use in the pool's workers (None:
  # XLA's 0.75; --gpu_memory_fraction overrides).
  gpu_memory_fraction: float | None = None
  # Decode workers: device memory that KV receives in flight may allocate
  # at once (MiB; 0: no bound; pdjax.service.receive_budget).
  max_receive_mib: int = 2048

  def __post_init__(self):
    f = self.gpu_memory_fraction
    if f is not None and not 0 < f <= 1:
      raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {f}")
    if self.max_receive_mib < 0:
      raise ValueError(f"max_receive_mib must be >= 0, got "
                       f"{self.max_receive_mib}")


@dataclasses.dataclass
class DeploymentConfig:
  checkpoint: str = "tiny"
  dtype: str | None = None
  kv_transport: str = "grpc"
  page_size: int = 16
  max_seq_len: int = 1024
  prefill: PoolConfig = dataclasses.field(default_factory=lambda: PoolConfig(
      mesh="tp=1", sharding="prefill_tp"))
  decode: PoolConfig = dataclasses.field(default_factory=lambda: PoolConfig(
      mesh="dp=1", sharding="decode_dp"))
  router: dict[str, Any] = dataclasses.field(default_factory=dict)

  @classmethod
  def load(cls, path: str | Path | None) -> "DeploymentConfig":
    """A deployment file, by path or by a name the package ships."""
    if path is None:
      return cls()
    from pdjax import resources
    text, p = resources.read("deployment", path)
    data = tomllib.loads(text)
    pools = {}
    for name in ("prefill", "decode"):
      table = dict(data.pop(name, {}))
      for key in ("buckets", "table_buckets", "row_buckets"):
        if key in table:
          table[key] = tuple(table[key])
      unknown = set(table) - {f.name for f in dataclasses.fields(PoolConfig)}
      if unknown:
        raise ValueError(f"{p}: unknown keys in [{name}]: {sorted(unknown)}")
      pools[name] = PoolConfig(**table)
    router = data.pop("router", {})
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"{p}: unknown keys: {sorted(unknown)}")
    return cls(**data, router=router, **pools)

  def prefill_engine_config(self, pool: PoolConfig | None = None, *,
                            layer_groups: int = 1) -> PrefillConfig:
    pool = pool or self.prefill
    return PrefillConfig(buckets=tuple(pool.buckets), max_batch=pool.max_batch,
                         max_batch_tokens=pool.max_batch_tokens,
                         page_size=self.page_size,
                         max_seq_len=self.max_seq_len,
                         layer_groups=layer_groups,
                         triton_gemm=pool.triton_gemm,
                         merge_dots=pool.merge_dots)

  def decode_engine_config(self) -> DecodeConfig:
    d = self.decode
    return DecodeConfig(max_seqs=d.max_seqs, page_size=self.page_size,
                        num_pages=d.num_pages, max_seq_len=self.max_seq_len,
                        steps_per_call=d.steps_per_call,
                        table_buckets=tuple(d.table_buckets),
                        row_buckets=tuple(d.row_buckets),
                        prefill_token_budget=d.prefill_token_budget,
                        triton_gemm=d.triton_gemm,
                        merge_dots=d.merge_dots,
                        attention=d.attention,
                        prefix_caching=d.prefix_caching)


__all__ = ["DeploymentConfig", "PoolConfig", "AUTO_LAYER_GROUPS",
           "resolve_layer_groups"]
