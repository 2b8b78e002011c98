"""Flags generated from the configuration's dataclasses.

A launcher names the parts of the deployment configuration it reads, and
``define`` gives it one absl flag per field, typed by the field (integers,
floats, strings, booleans, comma lists for tuples, enums for ``Literal``
fields) and unset by default: an unset flag leaves the deployment file's
value, or the field's own default, alone. Names: ``--KEY`` for the shared
keys and the ``[router]`` table, ``--prefill_KEY`` / ``--decode_KEY`` for
the pools' (``--decode_max_seqs`` is ``[decode] max_seqs``). ``--config``
(the deployment file) comes with them.

A new setting is a field on its dataclass (``pdjax.config``), which makes
its TOML key and its flag in every launcher that reads that table; a help
line in ``HELP`` is optional. ``ConfigFlags.resolve`` is the one place the
file and the flags meet (``pdjax.config.resolve``), and logs the result.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from absl import flags

from pdjax import config as C

log = logging.getLogger("pdjax.config")

ALL = None      # every field of a table

# Help of the generated flags, by (table or None for a shared key, field);
# a field without one gets a line naming its table, key and default.
HELP: dict[tuple[str | None, str], str] = {
    (None, "checkpoint"): "Model: a pdjax orbax checkpoint, a Hugging Face "
    "directory, a .gguf file, or a name ('tiny', 'smollm2-135m-instruct').",
    (None, "dtype"): "Weight and KV dtype (the deployment's; unset there: "
    "the checkpoint's).",
    (None, "kv_transport"): "KV hand-off between the pools.",
    (None, "page_size"): "Tokens per KV page (every pool of a deployment "
    "must agree).",
    (None, "max_seq_len"): "Longest sequence, prompt + generated tokens.",
    (None, "kv_dtype"): "How the KV is stored, in the decode pool's pages "
    "and in every hand-off: auto (the model's dtype) or fp8 (float8 e4m3, "
    "saturating at +-448, scaled per head by --kv_scales: half the bytes; "
    "on one GPU attention reads the pages in place, elsewhere it gathers "
    "them). Every worker of a deployment must agree.",
    (None, "kv_scales"): "kv_dtype=fp8: a JSON file of per-head K and V "
    "scales (tools/calibrate_kv_scales.py), folded into the attention "
    "weights so each head's KV uses e4m3's range (unset: the checkpoint's "
    "own k_scale/v_scale where it has them, else unscaled). Every worker "
    "of a deployment must read the same scales.",
    ("prefill", "mesh"): "The prefill worker's mesh, e.g. 'tp=2'.",
    ("decode", "mesh"): "The decode worker's mesh, e.g. 'dp=2' or "
    "'dp=2,tp=2'.",
    ("prefill", "sharding"): "Sharding rule set of the prefill worker: a "
    "packaged name (prefill_tp) or a TOML path.",
    ("decode", "sharding"): "Sharding rule set of the decode worker: a "
    "packaged name (decode_dp, decode_dp_tp) or a TOML path.",
    ("prefill", "buckets"): "Prompt-length buckets of the prefill programs, "
    "e.g. 32,128 (longer prompts run in chunks of the largest).",
    ("prefill", "cached_prefix"): "Which cached prefixes a prompt that "
    "fits a bucket starts from: shrinking (only one that leaves the rest "
    "to a smaller bucket: a chunk after a prefix costs more than the "
    "bucketed program of its length) or always.",
    ("decode", "cached_prefix"): "As --prefill_cached_prefix, for the "
    "decode worker's own prefills.",
    ("prefill", "layer_groups"): "Run each bucketed prompt's layers as this "
    "many programs, so the CUDA IPC hand-off copies each group's KV while "
    "later layers compute (1: one fused program; 0: auto, 4 when hand-offs "
    "can take the CUDA IPC path).",
    ("prefill", "cache_pages"): "Pages of the prefill worker's prefix-cache "
    "block store (0: off).",
    ("prefill", "kv_fetch"): "Prefill workers with a prefix cache: share "
    "it with the deployment. The worker serves its cached blocks to peer "
    "prefill workers (BlockStore on its port), and a prompt whose leading "
    "blocks it lacks fetches them from the peers the router names and from "
    "--kv_store instead of computing them: 'auto' where the fetch is "
    "predicted faster than the prefill it saves (measured rates), 'always' "
    "whenever a source has them; 'off': neither.",
    ("prefill", "kv_store_write"): "With --kv_store: write every block the "
    "worker computes through to the store (it has a prefix at once, and "
    "after a restart), or only the blocks its host tier evicts (far fewer "
    "bytes).",
    ("prefill", "kv_fetch_timeout_s"): "Shared KV: longest one fetch from a "
    "peer or the store, or one write-through, may take (then the prompt is "
    "computed; a failed source is skipped for a backoff).",
    ("prefill", "kv_pull_landing_mib"): "Shared KV, --kv_transport=device "
    "on GPU: MiB of the CUDA IPC landing buffer that peer prefill workers "
    "on this host copy the blocks asked of them into (0: none; blocks "
    "that do not fit are pulled with jax.experimental.transfer).",
    ("decode", "prefix_caching"): "Keep finished sequences' KV blocks for "
    "requests sharing a prefix.",
    ("prefill", "host_cache_blocks"): "KV blocks evicted from the device "
    "prefix cache kept in host memory (pinned where the backend has it) "
    "and uploaded back on a later hit (0: off).",
    ("decode", "host_cache_blocks"): "KV blocks evicted from the device "
    "prefix cache kept in host memory (pinned where the backend has it) "
    "and uploaded back on a later hit (0: off; needs prefix_caching).",
    ("decode", "max_receive_mib"): "Device memory (MiB) that KV receives "
    "in flight may allocate at once; a receive past it waits, up to its "
    "deadline, then gets RESOURCE_EXHAUSTED (0: no bound).",
    ("decode", "ipc_landing_buffers"): "--kv_transport=device on GPU: CUDA "
    "IPC landing buffers to allocate once and lend (in regions, one per "
    "request) to same-host prefill workers; 0 turns CUDA IPC off.",
    ("decode", "ipc_landing_bytes"): "Bytes of each CUDA IPC landing buffer "
    "(0: the largest KV payload this worker accepts, so every request fits "
    "one).",
    ("decode", "speculative"): "Speculative decoding: 'ngram' drafts up to "
    "spec_tokens ids per row by prompt lookup, 'draft' by the draft model "
    "(draft_checkpoint), and one pass of the model verifies them; 'off': "
    "plain decoding.",
    ("decode", "draft_checkpoint"): "speculative='draft': the draft model "
    "(same tokenizer, smaller), loaded as the checkpoint is.",
    ("decode", "spec_tokens"): "Speculative decoding: draft tokens per row "
    "and call.",
    ("decode", "spec_ngram"): "Speculative decoding: the longest n-gram the "
    "prompt lookup matches.",
    ("decode", "batch_invariant"): "Batch-invariant decoding: every "
    "generate call runs max_seqs rows with the whole page table, and "
    "speculation verifies each drafted position as a row of that decode "
    "step, so a greedy stream's tokens are the same alone, beside any "
    "others, and with speculation on or off. Costs: one stream pays for a "
    "max_seqs-row step, and a verify call's drafts share the rows the live "
    "rows leave of it.",
    ("decode", "kv_admission"): "How admission promises KV pages: "
    "on_demand (pages as rows grow, newest rows preempted when the pool is "
    "short) or full (a request's whole budget reserved up front).",
    ("decode", "admission_watermark"): "on_demand admission: share of the "
    "pool's pages kept free for the running rows' growth.",
    ("decode", "swap_pages"): "on_demand admission: host pages for "
    "preempted rows' KV (-1: as many as the pool holds; 0: recompute "
    "only).",
    ("decode", "queue_deadline_s"): "How long a request prefilled on a "
    "decode worker may wait in the admission queue for KV pages and a row "
    "before RESOURCE_EXHAUSTED (0: no deadline).",
    ("prefill", "weight_dtype"): "Storage of the layers' projection weights "
    "(unset: the model's dtype; float8_e4m3fn: quantized as the pool loads "
    "them, a scale per output channel). Both pools must agree.",
    ("decode", "weight_dtype"): "Storage of the layers' projection weights "
    "(unset: the model's dtype; float8_e4m3fn: quantized as the pool loads "
    "them, a scale per output channel). Both pools must agree.",
    ("prefill", "activation_dtype"): "The activations the FP8 projections "
    "read (unset: the model's dtype; float8_e4m3fn: each token quantized by "
    "its own scale, FP8 GEMMs). Needs weight_dtype; both pools must agree.",
    ("decode", "activation_dtype"): "The activations the FP8 projections "
    "read (unset: the model's dtype; float8_e4m3fn: each token quantized by "
    "its own scale, FP8 GEMMs). Needs weight_dtype; both pools must agree.",
    ("prefill", "max_queue"): "Requests a prefill worker queues before "
    "RESOURCE_EXHAUSTED.",
    ("decode", "max_queue"): "Prompts a decode worker queues for its own "
    "prefill before RESOURCE_EXHAUSTED.",
    ("prefill", "transfer_timeout_s"): "Longest a KV hand-off may take.",
    ("decode", "transfer_timeout_s"): "Longest a KV hand-off may take.",
    ("prefill", "kv_ttl_s"): "KV a decode worker has not claimed is freed "
    "after this long.",
    ("decode", "kv_ttl_s"): "Reservations and KV not redeemed are freed "
    "after this long.",
    ("router", "local_prefill_threshold"): "Prompts shorter than this many "
    "tokens are prefilled on the decode worker.",
    ("router", "max_inflight"): "Requests the router admits at once; "
    "beyond it, RESOURCE_EXHAUSTED.",
    ("router", "on_full"): "When decode KV capacity is full: wait for it "
    "(up to --queue_timeout_s) or refuse at once.",
    ("router", "queue_timeout_s"): "Longest wait for decode capacity.",
    ("router", "kv_failure_policy"): "After a failed KV hand-off: "
    "recompute the prompt on a decode worker, or fail the request.",
    ("router", "kv_overlap_weight"): "KV-aware routing: a worker's score is "
    "this times the request's prompt blocks it holds cached, minus its load "
    "(prefill: queued requests; decode: KV pages); 0: load only.",
    ("router", "kv_fetch_weight"): "Shared KV: a prompt block a prefill "
    "worker can fetch from a peer or a store counts this much (0..1) of a "
    "block it holds in its KV-aware score.",
    ("router", "lease_s"): "Elastic pools: the lease of a worker that "
    "registers with the router (pdjax.v1.Registry; workers started with "
    "--router ask for it): one that has not renewed for this long is "
    "dropped.",
    ("router", "kv_stale_after_s"): "KV-aware routing: a worker whose cache "
    "was last polled longer ago than this is judged on load alone.",
    ("router", "transfer_timeout_s"): "Longest the router waits for a KV "
    "hand-off.",
    ("router", "max_attempts"): "Workers tried for a request before its "
    "first token.",
    ("router", "worker_sessions"): "Send Decode and Prefill calls as "
    "messages on one long-lived stream to each worker (DecodeSession, "
    "PrefillSession) rather than a new call each.",
}


def flag_name(table: str | None, key: str) -> str:
  """The flag of a configuration key (``table`` None: a shared key)."""
  if table is None or table == "router":
    return key
  return f"{table}_{key}"


def _fields(cls, only: Iterable[str] | None, skip: Iterable[str] = ()
            ) -> list[dataclasses.Field]:
  fields = [f for f in dataclasses.fields(cls) if f.name not in skip]
  if only is None:
    return fields
  only = list(only)
  unknown = set(only) - {f.name for f in fields}
  if unknown:
    raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}")
  return [f for f in fields if f.name in only]


def define_field(fv: flags.FlagValues, name: str, cls, key: str,
                 help_: str | None = None) -> None:
  """Defines ``--name`` for the field ``key`` of the configuration class
  ``cls``: typed by the field, unset by default (a launcher's own flag
  that sets that field, as a worker's ``--mesh`` sets its pool's)."""
  f = cls.__dataclass_fields__[key]
  table = next((t for t, c in C.SECTIONS.items() if c is cls), None)
  _define(fv, name, C._hints(cls)[key], f.default,
          help_ or HELP.get((table, key), f"[{table}] {key}."),
          whose="its pool's")


def _define(fv: flags.FlagValues, name: str, hint, default, help_: str, *,
            whose: str = "the deployment file's") -> None:
  base, choices, _ = C.field_type(hint)
  shown = ("unset" if default is None or default == "" else
           ",".join(map(str, default)) if isinstance(default, tuple) else
           str(default).lower() if isinstance(default, bool) else default)
  help_ = f"{help_} (default: {whose}, else {shown})"
  kw = dict(default=None, help=help_, flag_values=fv)
  if choices is not None:
    flags.DEFINE_enum(name, enum_values=list(choices), **kw)
  elif base is bool:
    flags.DEFINE_bool(name, **kw)
  elif base is int:
    flags.DEFINE_integer(name, **kw)
  elif base is float:
    flags.DEFINE_float(name, **kw)
  elif base is tuple:
    flags.DEFINE_list(name, **kw)
  else:
    flags.DEFINE_string(name, **kw)


@dataclasses.dataclass(frozen=True)
class ConfigFlags:
  """The configuration flags one launcher defined."""
  flag_values: flags.FlagValues
  # Flag name -> (table or None for a shared key, field).
  keys: Mapping[str, tuple[str | None, str]]

  @property
  def config(self) -> str | None:
    return self.flag_values["config"].value

  def overrides(self) -> dict[str, Any]:
    """What the flags given set, as ``pdjax.config.resolve`` takes it:
    ``{"checkpoint": ..., "prefill": {"mesh": ...}}``."""
    out: dict[str, Any] = {}
    for name, (table, key) in self.keys.items():
      value = self.flag_values[name].value
      if value is None:
        continue
      if table is None:
        out[key] = value
      else:
        out.setdefault(table, {})[key] = value
    return out

  def given(self) -> list[str]:
    """The configuration flags given, as ``--name=value``."""
    out = []
    for name in self.keys:
      value = self.flag_values[name].value
      if value is not None:
        if isinstance(value, list):
          value = ",".join(value)
        out.append(f"--{name}={value}")
    return out

  def resolve(self, extra: Mapping[str, Any] | None = None, *,
              what: str = "", log_it: bool = True) -> C.DeploymentConfig:
    """The deployment's configuration: ``--config``'s file, these flags
    (and ``extra`` overrides, a launcher's own, on top), logged whole.
    A problem is a one-line ``SystemExit``."""
    overrides = merge(self.overrides(), extra or {})
    try:
      dep = C.resolve(self.config, overrides)
    except (OSError, ValueError) as e:
      raise SystemExit(f"error: {e}") from None
    if log_it:
      log.info("%sconfiguration: --config=%s %s\n%s", what, self.config,
               " ".join(self.given()), dep.to_toml())
    return dep


def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
  """``b`` over ``a``, table by table."""
  out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in a.items()}
  for k, v in b.items():
    if isinstance(v, Mapping):
      out[k] = {**out.get(k, {}), **v}
    else:
      out[k] = v
  return out


def define(fv: flags.FlagValues = flags.FLAGS, *,
           shared: Iterable[str] | None = ALL,
           tables: Mapping[str, Iterable[str] | None] | None = None,
           config_default: str | None = "local",
           aliases: Mapping[str, str] | None = None) -> ConfigFlags:
  """Defines ``--config`` and a flag per configuration field a launcher
  reads: the shared keys named in ``shared`` (ALL: every one) and, per
  table in ``tables``, the fields named (ALL: every one).
  ``aliases`` maps old flag names onto generated ones (``{"prefix_caching":
  "decode_prefix_caching"}``)."""
  flags.DEFINE_string(
      "config", config_default, "Deployment file: a TOML path or a name "
      "the package ships (pdjax/configs/deployments: "
      + ", ".join(_deployment_names()) + "); flags override its values.",
      flag_values=fv)
  keys: dict[str, tuple[str | None, str]] = {}
  top = C._hints(C.DeploymentConfig)
  for f in _fields(C.DeploymentConfig, shared, skip=C.SECTIONS):
    name = flag_name(None, f.name)
    _define(fv, name, top[f.name], f.default,
            HELP.get((None, f.name), f"Deployment key {f.name}."))
    keys[name] = (None, f.name)
  for table, only in (tables or {}).items():
    cls = C.SECTIONS[table]
    hints = C._hints(cls)
    for f in _fields(cls, only, skip=C.SHARED_IN_SECTION.get(table, ())):
      name = flag_name(table, f.name)
      _define(fv, name, hints[f.name], f.default,
              HELP.get((table, f.name), f"[{table}] {f.name}."))
      keys[name] = (table, f.name)
  for alias, target in (aliases or {}).items():
    flags.DEFINE_alias(alias, target, flag_values=fv)
  return ConfigFlags(fv, keys)


def _deployment_names() -> list[str]:
  from pdjax import resources
  return resources.names("deployment")


__all__ = ["ALL", "ConfigFlags", "HELP", "define", "define_field",
           "flag_name", "merge"]
