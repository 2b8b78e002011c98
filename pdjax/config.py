"""Deployment configuration: one resolved, typed value per deployment.

A deployment file (TOML; a path, or a name the package ships under
``pdjax/configs/deployments/``) has shared keys, the things every process
must agree on (checkpoint, dtype, page size, context length, KV transport),
and one table per part of the deployment:

=============  =========================================================
``[prefill]``  ``PrefillPoolConfig``: a prefill worker's mesh, rule set,
               engine (``pdjax.engine.prefill.PrefillConfig``) and cache
``[decode]``   ``DecodePoolConfig``: a decode worker's mesh, rule set,
               engine (``DecodeConfig``), its own prefill's batching
``[router]``   ``pdjax.service.router.RouterConfig`` (its transport is
               the deployment's)
=============  =========================================================

Every setting has one default, on the dataclass that owns it: the engine
configs for engine settings (the pool tables take their defaults from
them, field by field), the pool configs for what only a worker process
reads, ``RouterConfig`` for the router. All are frozen.

``resolve`` is the one place a deployment's configuration is computed: the
file's tables, then the launcher's flags on top (``pdjax.launch.
config_flags`` generates one flag per field: ``--KEY`` for shared keys and
``[router]`` keys, ``--prefill_KEY`` and ``--decode_KEY`` for the pools').
Unknown keys and values of the wrong type are errors that name the file (or
the flags) and the key; the engine configs are built once there too, so an
inconsistent deployment (a bucket that is no multiple of the page size) is
refused before any process loads a weight. ``to_toml`` writes the resolved
value back as a deployment file: what a launcher logs, and what
``pdjax.launch.local`` hands every process it starts, so they all run one
configuration.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pdjax.engine.decode_config import DecodeConfig
from pdjax.engine.prefill_config import PrefillConfig
from pdjax.service.router import RouterConfig

# Layer groups of an auto-configured prefill worker whose hand-offs can take
# the CUDA IPC path: the hand-off left after the prefill is about a quarter
# of the KV's copy (docs/notes/2026-11-26-h200x2-handoff-overlap.md).
AUTO_LAYER_GROUPS = 4


def resolve_layer_groups(setting: int, *, layer_wise_sender: bool) -> int:
  """``PrefillPoolConfig.layer_groups`` -> the engine's count."""
  if setting < 0:
    raise ValueError(f"layer_groups must be >= 0 (0: auto), got {setting}")
  if setting:
    return setting
  return AUTO_LAYER_GROUPS if layer_wise_sender else 1


# A worker's serving limits, the same defaults in both pools' tables.
MAX_QUEUE = 256            # requests queued before RESOURCE_EXHAUSTED
TRANSFER_TIMEOUT_S = 30.0  # the longest a KV hand-off may take
KV_TTL_S = 60.0            # unclaimed KV and unredeemed reservations
# Stored weights other than the model's dtype (pdjax.model.quant.FP8).
WeightDtype = Literal["float8_e4m3fn"]


def _default(cls, name: str):
  """The default of ``cls.name``: a pool table's engine setting starts
  where the engine's own default is."""
  return cls.__dataclass_fields__[name].default


def _engine_config(cls, pool, **given):
  """The engine config ``cls`` with every setting of it that the pool
  table ``pool`` holds (sequences as tuples), and ``given`` on top."""
  kw = {}
  for f in dataclasses.fields(cls):
    if hasattr(pool, f.name):
      v = getattr(pool, f.name)
      kw[f.name] = tuple(v) if isinstance(v, list) else v
  return cls(**{**kw, **given})


@dataclasses.dataclass(frozen=True)
class PrefillPoolConfig:
  """``[prefill]``: what a prefill worker runs."""
  mesh: str = "tp=1"
  sharding: str = "prefill_tp"
  # The engine (PrefillConfig; page_size and max_seq_len are the
  # deployment's).
  buckets: tuple[int, ...] = _default(PrefillConfig, "buckets")
  max_batch: int = _default(PrefillConfig, "max_batch")
  max_batch_tokens: int = _default(PrefillConfig, "max_batch_tokens")
  triton_gemm: str = _default(PrefillConfig, "triton_gemm")
  merge_dots: str = _default(PrefillConfig, "merge_dots")
  # Which cached prefixes a prompt starts from ("shrinking", "always":
  # PrefillConfig.cached_prefix).
  cached_prefix: Literal["shrinking", "always"] = _default(
      PrefillConfig, "cached_prefix")
  # Bucketed prompts' layers run as this many programs so the KV hand-off
  # moves each group under the rest of the prefill (0: auto,
  # ``AUTO_LAYER_GROUPS`` when hand-offs can take the CUDA IPC path, which
  # writes layer ranges; 1 otherwise). The engine gets the resolved count.
  layer_groups: int = 0
  # Prefix caching: pages of the worker's block store (0: off), and blocks
  # evicted from it kept in host memory (0: off).
  cache_pages: int = 0
  host_cache_blocks: int = 0
  # Storage of the layers' projection weights: None (the model's dtype) or
  # "float8_e4m3fn" (quantized as the pool loads them, a scale per output
  # channel; pdjax.model.quant). It names the model's fingerprint, so a
  # deployment's pools must agree.
  weight_dtype: WeightDtype | None = None
  # The activations those FP8 projections read: None (the model's dtype)
  # or "float8_e4m3fn" (each token scaled to e4m3 by its own max: FP8
  # GEMMs, W8A8). Needs weight_dtype; in the fingerprint too.
  activation_dtype: WeightDtype | None = None
  # q/k/v and gate/up joined into one matrix each, as [decode]
  # fuse_projections (8B on an H100: 512-token prefill 15.93 -> 15.20 ms).
  # Joining holds one group's joined copy beside the weights while the
  # pool loads (8B: 7.5 GB), which fits gpu-8b-1gpu's prefill share.
  fuse_projections: Literal["auto", "on", "off"] = "auto"
  # Shared KV (pdjax.engine.remote_tier): a worker with a prefix cache
  # serves its blocks to peers and fetches a prompt's leading blocks it
  # lacks from the peers the router names and from its host's KV store
  # (the worker's --kv_store) instead of computing them: "auto" where the
  # fetch is predicted faster than the prefill it saves, "always" whenever
  # a source has them, "off" neither. What it writes to the store
  # ("through": every block it computes; "evict": the blocks its host tier
  # drops), and the longest one fetch or write may take.
  kv_fetch: Literal["off", "auto", "always"] = "off"
  kv_store_write: Literal["through", "evict"] = "through"
  kv_fetch_timeout_s: float = 2.0
  # --kv_transport=device on GPU: the CUDA IPC landing buffer (MiB) that
  # peers on this host copy the blocks asked of them into (0: none; blocks
  # that do not fit are pulled with jax.experimental.transfer).
  kv_pull_landing_mib: int = 256
  # Share of each GPU's memory XLA may use in this pool's workers (None:
  # XLA's 0.75).
  gpu_memory_fraction: float | None = None
  # Serving: requests queued, the KV hand-off's deadline, how long KV a
  # decode worker has not claimed is kept.
  max_queue: int = MAX_QUEUE
  transfer_timeout_s: float = TRANSFER_TIMEOUT_S
  kv_ttl_s: float = KV_TTL_S

  def __post_init__(self):
    _check_pool(self)
    if self.layer_groups < 0:
      raise ValueError(f"layer_groups must be >= 0 (0: auto), got "
                       f"{self.layer_groups}")
    if self.cache_pages < 0:
      raise ValueError(f"cache_pages must be >= 0, got {self.cache_pages}")
    if not self.kv_fetch_timeout_s > 0:
      raise ValueError(f"kv_fetch_timeout_s must be > 0, got "
                       f"{self.kv_fetch_timeout_s}")
    if self.kv_pull_landing_mib < 0:
      raise ValueError(f"kv_pull_landing_mib must be >= 0, got "
                       f"{self.kv_pull_landing_mib}")


@dataclasses.dataclass(frozen=True)
class DecodePoolConfig:
  """``[decode]``: what a decode worker runs."""
  mesh: str = "dp=1"
  sharding: str = "decode_dp"
  # The engine (DecodeConfig; page_size and max_seq_len are the
  # deployment's).
  max_seqs: int = _default(DecodeConfig, "max_seqs")
  num_pages: int = _default(DecodeConfig, "num_pages")
  steps_per_call: int = _default(DecodeConfig, "steps_per_call")
  table_buckets: tuple[int, ...] = _default(DecodeConfig, "table_buckets")
  row_buckets: tuple[int, ...] = _default(DecodeConfig, "row_buckets")
  prefill_token_budget: int = _default(DecodeConfig, "prefill_token_budget")
  # Speculative decoding (DecodeConfig.speculative: "off", "ngram" or
  # "draft"; with "draft", the draft model's checkpoint, loaded as the
  # target is: a directory, GGUF file or model name).
  speculative: Literal["off", "ngram", "draft"] = _default(DecodeConfig,
                                                          "speculative")
  draft_checkpoint: str = ""
  spec_tokens: int = _default(DecodeConfig, "spec_tokens")
  spec_ngram: int = _default(DecodeConfig, "spec_ngram")
  # Batch-invariant decoding (DecodeConfig.batch_invariant): one program
  # shape for every call, so a stream's tokens do not depend on the others
  # decoded with it, nor on speculation.
  batch_invariant: bool = _default(DecodeConfig, "batch_invariant")
  # Pipeline-parallel pools (a pp mesh axis): microbatches per call.
  num_microbatches: int = _default(DecodeConfig, "num_microbatches")
  # KV admission ("on_demand" paging with preemption, or "full"), the share
  # of pages kept free for running rows, host pages for preempted rows.
  kv_admission: Literal["on_demand", "full"] = _default(DecodeConfig,
                                                        "kv_admission")
  admission_watermark: float = _default(DecodeConfig, "admission_watermark")
  swap_pages: int = _default(DecodeConfig, "swap_pages")
  prefix_caching: bool = _default(DecodeConfig, "prefix_caching")
  host_cache_blocks: int = _default(DecodeConfig, "host_cache_blocks")
  attention: str = _default(DecodeConfig, "attention")
  # The GEMM kernels and DotMerger setting of every program of the pool,
  # its own prefill's included.
  triton_gemm: str = _default(DecodeConfig, "triton_gemm")
  merge_dots: str = _default(DecodeConfig, "merge_dots")
  # The worker's own prefill (short prompts, colocated serving): its
  # PrefillConfig's batching.
  buckets: tuple[int, ...] = _default(PrefillConfig, "buckets")
  max_batch: int = _default(PrefillConfig, "max_batch")
  max_batch_tokens: int = _default(PrefillConfig, "max_batch_tokens")
  cached_prefix: Literal["shrinking", "always"] = _default(
      PrefillConfig, "cached_prefix")
  # The layers' projection weights' storage and the activations they read
  # (as [prefill] weight_dtype, activation_dtype).
  weight_dtype: WeightDtype | None = None
  activation_dtype: WeightDtype | None = None
  # q/k/v and gate/up each stored as one matrix (pdjax.model.fused), so a
  # step at a few rows reads each group in one GEMM: "auto" where the mesh
  # splits neither heads nor the MLP width (decode_dp), "on" (a mesh that
  # does is refused), "off". Llama-3-8B shapes on an H100: decode steps
  # 6-8% faster at 1-32 rows in bf16, 9-11% with FP8 weights.
  fuse_projections: Literal["auto", "on", "off"] = "auto"
  gpu_memory_fraction: float | None = None
  # Device memory that KV receives in flight may allocate at once (MiB; 0:
  # no bound; pdjax.service.receive_budget).
  max_receive_mib: int = 2048
  # Serving: requests queued (prompts waiting for the worker's own
  # prefill), the KV hand-off's deadline, how long a reservation and KV
  # not yet redeemed are kept.
  max_queue: int = MAX_QUEUE
  transfer_timeout_s: float = TRANSFER_TIMEOUT_S
  kv_ttl_s: float = KV_TTL_S
  # How long a request prefilled here may wait in the admission queue for
  # KV pages and a row before RESOURCE_EXHAUSTED (0: no deadline).
  queue_deadline_s: float = 30.0
  # --kv_transport=device on GPUs: CUDA IPC landing buffers lent to
  # same-host prefill workers (0: no CUDA IPC), and the bytes of each (0:
  # the largest KV payload the worker accepts, so every request fits one).
  ipc_landing_buffers: int = 2
  ipc_landing_bytes: int = 0

  def __post_init__(self):
    _check_pool(self)
    for name in ("max_receive_mib", "ipc_landing_buffers",
                 "ipc_landing_bytes", "queue_deadline_s"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def _check_pool(pool) -> None:
  from pdjax.mesh_spec import parse_mesh
  parse_mesh(pool.mesh)           # raises ShardingError, naming the mesh
  f = pool.gpu_memory_fraction
  if f is not None and not 0 < f <= 1:
    raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {f}")
  if pool.host_cache_blocks < 0:
    raise ValueError(f"host_cache_blocks must be >= 0, got "
                     f"{pool.host_cache_blocks}")
  if pool.max_queue < 1:
    raise ValueError(f"max_queue must be >= 1, got {pool.max_queue}")
  for name in ("transfer_timeout_s", "kv_ttl_s"):
    if not getattr(pool, name) > 0:
      raise ValueError(f"{name} must be > 0, got {getattr(pool, name)}")


# Table -> the dataclass its keys are the fields of.
SECTIONS: dict[str, type] = {"prefill": PrefillPoolConfig,
                             "decode": DecodePoolConfig,
                             "router": RouterConfig}
# Fields of a table's class that a shared key sets (not keys of the table).
SHARED_IN_SECTION = {"router": ("kv_transport",)}
ROLES = ("prefill", "decode")


@dataclasses.dataclass(frozen=True)
class DeploymentConfig:
  """A deployment's resolved configuration (``resolve`` makes one)."""
  checkpoint: str = "tiny"
  # Weight and KV dtype (None: the checkpoint's).
  dtype: Literal["float32", "bfloat16", "float16"] | None = None
  kv_transport: Literal["grpc", "device", "local"] = "grpc"
  page_size: int = _default(DecodeConfig, "page_size")
  max_seq_len: int = _default(DecodeConfig, "max_seq_len")
  # How the KV is stored, in the decode pool's pages and in every hand-off
  # ("auto": the model's dtype; "fp8": e4m3; pdjax.engine.kv_dtype).
  kv_dtype: Literal["auto", "fp8"] = _default(DecodeConfig, "kv_dtype")
  # An FP8 KV's per-head scales: a JSON file (tools/calibrate_kv_scales.py)
  # every pool folds into its weights (pdjax.model.kv_scales). None: the
  # checkpoint's own where it has them, else unscaled.
  kv_scales: str | None = None
  prefill: PrefillPoolConfig = dataclasses.field(
      default_factory=PrefillPoolConfig)
  decode: DecodePoolConfig = dataclasses.field(
      default_factory=DecodePoolConfig)
  router: RouterConfig = dataclasses.field(default_factory=RouterConfig)

  def __post_init__(self):
    if self.kv_scales == "":            # an empty --kv_scales: unset
      object.__setattr__(self, "kv_scales", None)
    if self.kv_scales is not None and self.kv_dtype != "fp8":
      raise ValueError(f"kv_scales ({self.kv_scales}) scales an FP8 KV: it "
                       f"needs kv_dtype = 'fp8', not {self.kv_dtype!r}")
    # The router hands KV over as the deployment does.
    if self.router.kv_transport != self.kv_transport:
      object.__setattr__(self, "router", dataclasses.replace(
          self.router, kv_transport=self.kv_transport))
    # Build every engine config once: a deployment whose pools could not
    # run is refused here, before any process starts.
    self.prefill_engine_config()
    self.prefill_engine_config(self.decode)
    self.decode_engine_config()

  @classmethod
  def load(cls, path: str | Path | None) -> "DeploymentConfig":
    """A deployment file, by path or by a name the package ships (None:
    every default)."""
    return resolve(path)

  def pool(self, role: str) -> PrefillPoolConfig | DecodePoolConfig:
    return {"prefill": self.prefill, "decode": self.decode}[role]

  def prefill_engine_config(self, pool=None, *, layer_groups: int = 1
                            ) -> PrefillConfig:
    """The prefill engine of the prefill pool, or of ``pool`` (the decode
    pool: a decode worker's own prefill)."""
    pool = pool or self.prefill
    return _engine_config(PrefillConfig, pool, page_size=self.page_size,
                          max_seq_len=self.max_seq_len,
                          kv_dtype=self.kv_dtype, layer_groups=layer_groups)

  def decode_engine_config(self) -> DecodeConfig:
    return _engine_config(DecodeConfig, self.decode, page_size=self.page_size,
                          max_seq_len=self.max_seq_len,
                          kv_dtype=self.kv_dtype)

  def memory_fraction(self, roles: tuple[str, ...]) -> float | None:
    """XLA's share of each GPU in a worker running ``roles``: its pool's
    ``gpu_memory_fraction`` (the larger of two for a worker running both);
    None: XLA's default."""
    shares = [self.pool(r).gpu_memory_fraction for r in roles
              if self.pool(r).gpu_memory_fraction is not None]
    return max(shares) if shares else None

  def to_toml(self) -> str:
    """This configuration as a deployment file ``resolve`` reads back to an
    equal value (None values are left out: they are the defaults)."""
    lines = []
    for f in dataclasses.fields(self):
      if f.name not in SECTIONS:
        lines += _toml_line(f.name, getattr(self, f.name))
    for name in SECTIONS:
      lines.append(f"\n[{name}]")
      section = getattr(self, name)
      for f in dataclasses.fields(section):
        if f.name not in SHARED_IN_SECTION.get(name, ()):
          lines += _toml_line(f.name, getattr(section, f.name))
    return "\n".join(lines) + "\n"


def _toml_line(key: str, value: Any) -> list[str]:
  if value is None:
    return []
  if isinstance(value, bool):
    text = "true" if value else "false"
  elif isinstance(value, (int, float)):
    text = repr(value)
  elif isinstance(value, str):
    text = json.dumps(value)            # a TOML basic string
  elif isinstance(value, tuple):
    text = "[" + ", ".join(repr(v) for v in value) + "]"
  else:
    raise TypeError(f"{key}: no TOML form for {value!r}")
  return [f"{key} = {text}"]


# ------------------------------------------------------------- resolution
def resolve(config: str | Path | None = None,
            overrides: Mapping[str, Any] | None = None
            ) -> DeploymentConfig:
  """A deployment's configuration: the file ``config`` names (a path or a
  packaged name; None: every default), then ``overrides`` on top (what
  flags set: ``{"checkpoint": ..., "prefill": {"mesh": ...}}``).

  Raises ValueError (a FileNotFoundError for a missing file) naming the
  file or the flags, the table and the key of what is wrong."""
  table: dict[str, Any] = {}
  source = "defaults"
  if config is not None:
    from pdjax import resources
    text, source = resources.read("deployment", config)
    try:
      table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
      raise ValueError(f"{source}: {e}") from None
  values = _values(table, source)
  for key, value in _values(overrides or {}, "flags").items():
    if key in SECTIONS:
      values[key] = {**values.get(key, {}), **value}
    else:
      values[key] = value
  where = source if not overrides else f"{source} with flags"
  try:
    sections = {name: cls(**values.pop(name, {}))
                for name, cls in SECTIONS.items()}
    return DeploymentConfig(**values, **sections)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: {e}") from None


def _values(table: Mapping[str, Any], source: str) -> dict[str, Any]:
  """The typed values of a deployment table (file or flags): unknown keys
  and values of the wrong type are a ValueError naming ``source``."""
  out: dict[str, Any] = {}
  top = _hints(DeploymentConfig)
  for key, value in table.items():
    if key in SECTIONS:
      if not isinstance(value, Mapping):
        raise ValueError(f"{source}: [{key}] must be a table")
      cls = SECTIONS[key]
      hints = _hints(cls)
      known = set(hints) - set(SHARED_IN_SECTION.get(key, ()))
      unknown = sorted(set(value) - known)
      if unknown:
        raise ValueError(f"{source}: unknown keys in [{key}]: {unknown} "
                         f"(known: {', '.join(sorted(known))})")
      out[key] = {k: coerce(hints[k], v, f"{source}: [{key}] {k}")
                  for k, v in value.items()}
    elif key in top:
      out[key] = coerce(top[key], value, f"{source}: {key}")
    else:
      known = sorted(set(top) - set(SECTIONS))
      raise ValueError(f"{source}: unknown key {key!r} (known: "
                       f"{', '.join(known)}; tables: "
                       f"{', '.join(f'[{s}]' for s in SECTIONS)})")
  return out


def _hints(cls) -> dict[str, Any]:
  hints = typing.get_type_hints(cls)
  return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def field_type(hint) -> tuple[type, tuple | None, bool]:
  """(base type, choices or None, optional) of a field's annotation:
  ``int``, ``float``, ``str``, ``bool``, ``tuple[int, ...]``, a
  ``Literal`` of strings, any of them ``| None``."""
  optional = False
  args = typing.get_args(hint)
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    rest = [a for a in args if a is not type(None)]
    optional = len(rest) < len(args)
    (hint,) = rest
    args = typing.get_args(hint)
  if typing.get_origin(hint) is Literal:
    return str, tuple(args), optional
  if typing.get_origin(hint) is tuple:
    return tuple, None, optional
  return hint, None, optional


def coerce(hint, value: Any, where: str) -> Any:
  """``value`` as the field type ``hint`` says, or a ValueError naming
  ``where``. Lists become tuples of ints; comma lists (a flag's) too."""
  base, choices, optional = field_type(hint)
  if value is None:
    if optional:
      return None
    raise ValueError(f"{where}: a value is required")
  if base is tuple:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
      raise ValueError(f"{where}: expected a list of integers, got "
                       f"{value!r}")
    out = []
    for v in items:
      if isinstance(v, str):
        if not v.strip():
          continue                      # "--prefill_buckets=" : empty
        try:
          v = int(v)
        except ValueError:
          pass
      if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"{where}: expected a list of integers, got "
                         f"{value!r}")
      out.append(v)
    return tuple(out)
  if base is bool:
    if isinstance(value, bool):
      return value
    raise ValueError(f"{where}: expected true or false, got {value!r}")
  if base is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    raise ValueError(f"{where}: expected an integer, got {value!r}")
  if base is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    raise ValueError(f"{where}: expected a number, got {value!r}")
  if not isinstance(value, str):
    raise ValueError(f"{where}: expected a string, got {value!r}")
  if choices is not None and value not in choices:
    raise ValueError(f"{where}: {value!r} is not one of "
                     f"{', '.join(choices)}")
  return value


__all__ = ["AUTO_LAYER_GROUPS", "DecodePoolConfig", "DeploymentConfig",
           "PrefillPoolConfig", "ROLES", "RouterConfig", "SECTIONS",
           "coerce", "field_type", "resolve", "resolve_layer_groups"]
