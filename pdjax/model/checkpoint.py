"""pdjax checkpoints: the weight pytree in orbax format, plus the config.

Why a second format next to Hugging Face safetensors: a safetensors file
holds torch's per-layer ``[out, in]`` tensors, so loading one means reading
every layer, transposing, stacking and only then sharding. An orbax
checkpoint stores pdjax's stacked arrays as they are, chunked by tensorstore,
so a restore reads from disk only the chunks each device's shard needs and
places them straight into the target sharding: a worker never holds the full
model on the host, and a checkpoint written by a 4-way tensor-parallel job
restores into an 8-way data-parallel pool (or any other mesh) unchanged.

Layout of a checkpoint directory::

  <dir>/params/            orbax StandardCheckpointer output (the pytree)
  <dir>/pdjax_model.json   format version, config, tensor shapes and dtypes
  <dir>/tokenizer.json ... copied from the HF source so the dir is
                           self-contained (see ``copy_tokenizer_files``)

``ocp.StandardCheckpointer`` rather than ``CheckpointManager``: a served model
is one immutable snapshot, not a training run's sequence of steps, so the
manager's step directories, retention policy and step-number bookkeeping
would only add a level of nesting that every caller has to know about. The
checkpointer's ``save(dir, tree)`` / ``restore(dir, abstract_tree)`` pair is
the smallest public orbax API that does sharded, chunked IO, and it has been
stable across the orbax versions pdjax supports.

``pdjax_model.json`` is written last, after orbax has committed the arrays, so
its presence marks a complete checkpoint. It records every tensor's shape, so
a config that does not match the arrays is reported by name before any IO.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pdjax.model import llama
from pdjax.model.config import ModelConfig, RopeConfig
from pdjax.model.weights import WeightsError

FORMAT_NAME = "pdjax-orbax"
FORMAT_VERSION = 1
METADATA_FILE = "pdjax_model.json"
PARAMS_DIR = "params"
# Files that make a checkpoint directory usable without its HF source.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)


# ------------------------------------------------------------------ helpers
def _checkpointer():
  """orbax's ``StandardCheckpointer``. orbax (and tensorstore under it) is
  imported here, when a checkpoint is saved or restored: every worker and
  tool imports this module (``pdjax.model.loading``) whatever format it
  loads, and the import was a fifth of a second of CPU at each start."""
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer()


def _flatten(tree) -> dict[str, Any]:
  """{"layers/wq": leaf, ...} for a nested dict pytree."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out["/".join(str(getattr(k, "key", k)) for k in path)] = leaf
  return out


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  return {k: tuple(v.shape) for k, v in
          _flatten(llama.abstract_params(cfg)).items()}


def _describe_mismatch(where: str, have: dict[str, tuple[int, ...]],
                       want: dict[str, tuple[int, ...]],
                       have_name: str, want_name: str) -> str | None:
  """One readable message for missing, unexpected and misshapen tensors."""
  problems = []
  for k in sorted(set(want) - set(have)):
    problems.append(f"tensor {k!r} is missing from the {have_name}")
  for k in sorted(set(have) - set(want)):
    problems.append(f"tensor {k!r} is in the {have_name} but not expected by "
                    f"the {want_name}")
  for k in sorted(set(have) & set(want)):
    if tuple(have[k]) != tuple(want[k]):
      problems.append(f"tensor {k!r} has shape {tuple(have[k])} in the "
                      f"{have_name}, the {want_name} expects {tuple(want[k])}")
  if not problems:
    return None
  return f"{where}: " + "; ".join(problems)


def _config_to_json(cfg: ModelConfig) -> dict[str, Any]:
  return dataclasses.asdict(cfg)


def _config_from_json(d: dict[str, Any], source: str) -> ModelConfig:
  try:
    d = dict(d)
    d["rope"] = RopeConfig(**d["rope"])
    d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
    return ModelConfig(**d)
  except (TypeError, KeyError) as e:
    raise WeightsError(f"{source}: invalid 'pdjax_config': {e}") from e


def _write_json_atomic(path: Path, content: dict[str, Any]) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(content, indent=2, sort_keys=True))
  os.replace(tmp, path)


def _single_device_shardings(cfg: ModelConfig):
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda _: sharding, llama.abstract_params(cfg))


# ------------------------------------------------------------------ public
def copy_tokenizer_files(src_dir: str | Path, dst_dir: str | Path
                         ) -> list[str]:
  """Copies the tokenizer / generation files found in ``src_dir``.

  Returns the names copied (missing ones are skipped: a model directory
  without a tokenizer is still a valid model).
  """
  src_dir, dst_dir = Path(src_dir), Path(dst_dir)
  dst_dir.mkdir(parents=True, exist_ok=True)
  copied = []
  for name in TOKENIZER_FILES:
    if (src_dir / name).is_file():
      shutil.copyfile(src_dir / name, dst_dir / name)
      copied.append(name)
  return copied


def save_checkpoint(path: str | Path, params: llama.Params, cfg: ModelConfig,
                    *, extra: dict[str, Any] | None = None,
                    tokenizer_dir: str | Path | None = None,
                    overwrite: bool = False) -> Path:
  """Writes ``params`` (any sharding) and ``cfg`` as a pdjax checkpoint.

  Args:
    path: the checkpoint directory (created; its ``params/`` must not exist
      unless ``overwrite``).
    params: the weights pytree, shaped as ``llama.param_shapes(cfg)`` and of
      dtype ``cfg.dtype``. Each process writes only its own shards.
    cfg: the model config stored alongside.
    extra: JSON-serialisable user metadata kept under ``"extra"``.
    tokenizer_dir: if given, ``copy_tokenizer_files(tokenizer_dir, path)``.
    overwrite: replace an existing checkpoint at ``path``.

  Returns:
    The checkpoint directory as an absolute path.

  Raises:
    WeightsError: the params do not match the config.
    FileExistsError: a checkpoint exists at ``path`` and not ``overwrite``.
  """
  path = Path(path).resolve()
  flat = _flatten(params)
  have = {k: tuple(np.shape(v)) for k, v in flat.items()}
  msg = _describe_mismatch(str(path), have, _expected_shapes(cfg),
                           "params", "config")
  if msg:
    raise WeightsError(msg)
  bad_dtypes = sorted(k for k, v in flat.items()
                      if np.dtype(v.dtype) != np.dtype(cfg.jnp_dtype))
  if bad_dtypes:
    raise WeightsError(
        f"{path}: params {bad_dtypes[:3]}... have dtype "
        f"{flat[bad_dtypes[0]].dtype}, but cfg.dtype is {cfg.dtype!r}; cast "
        "them or save with cfg.replace(dtype=...)")
  if (path / PARAMS_DIR).exists() and not overwrite:
    raise FileExistsError(f"{path}: already holds a checkpoint (pass "
                          "overwrite=True, or --overwrite to the converter, "
                          "to replace it)")

  is_writer = jax.process_index() == 0
  path.mkdir(parents=True, exist_ok=True)
  if is_writer and (path / METADATA_FILE).exists():
    # Until the new arrays are committed the directory is not a checkpoint.
    (path / METADATA_FILE).unlink()

  checkpointer = _checkpointer()
  try:
    checkpointer.save(path / PARAMS_DIR, params, force=overwrite)
    checkpointer.wait_until_finished()
  finally:
    checkpointer.close()

  if is_writer:
    if tokenizer_dir is not None:
      copy_tokenizer_files(tokenizer_dir, path)
    _write_json_atomic(path / METADATA_FILE, {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dtype": cfg.dtype,
        "hf_config": cfg.to_hf_dict(),
        "pdjax_config": _config_to_json(cfg),
        "tensors": {k: {"shape": list(have[k]),
                        "dtype": str(np.dtype(v.dtype))}
                    for k, v in sorted(flat.items())},
        "param_count": int(sum(np.prod(s) for s in have.values())),
        "extra": extra or {},
    })
  return path


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
  """The parsed ``pdjax_model.json`` of a checkpoint, validated."""
  path = Path(path)
  meta_file = path / METADATA_FILE
  if not meta_file.is_file():
    raise WeightsError(f"{meta_file}: not found ({path} is not a complete "
                       "pdjax checkpoint)")
  try:
    meta = json.loads(meta_file.read_text())
  except json.JSONDecodeError as e:
    raise WeightsError(f"{meta_file}: not valid JSON: {e}") from e
  fmt = meta.get("format") if isinstance(meta, dict) else None
  if fmt != FORMAT_NAME:
    raise WeightsError(f"{meta_file}: not a pdjax checkpoint description "
                       f"(format {fmt!r}, expected {FORMAT_NAME!r})")
  version = meta.get("format_version")
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise WeightsError(f"{meta_file}: format_version {version!r} is not one "
                       f"this pdjax reads (<= {FORMAT_VERSION}); upgrade "
                       "pdjax")
  for key in ("pdjax_config", "tensors"):
    if key not in meta:
      raise WeightsError(f"{meta_file}: field {key!r} is missing")
  if not (path / PARAMS_DIR).is_dir():
    raise WeightsError(f"{path / PARAMS_DIR}: not found (the orbax arrays "
                       "of the checkpoint are missing)")
  return meta


def read_checkpoint_config(path: str | Path) -> ModelConfig:
  """The ``ModelConfig`` a checkpoint was saved with."""
  meta = read_checkpoint_metadata(path)
  return _config_from_json(meta["pdjax_config"],
                           str(Path(path) / METADATA_FILE))


def is_pdjax_checkpoint(path: str | Path) -> bool:
  """True if ``path`` is a complete pdjax checkpoint directory."""
  try:
    read_checkpoint_metadata(path)
  except (WeightsError, OSError):
    return False
  return True


def restore_checkpoint(path: str | Path, shardings=None, *,
                       cfg: ModelConfig | None = None
                       ) -> tuple[llama.Params, ModelConfig]:
  """Reads a pdjax checkpoint straight into the requested sharding.

  Args:
    path: a directory written by ``save_checkpoint``.
    shardings: a pytree of ``jax.sharding.Sharding`` shaped like the params
      (as used by ``llama.abstract_params``), a single ``Sharding`` for every
      array, or None for the first local device. Each device reads only its
      shard; no process holds the full arrays unless the sharding says so.
    cfg: the config to restore for; defaults to the saved one. Its shapes
      must match the saved arrays; its dtype may differ (arrays are cast).

  Returns:
    ``(params, cfg)``.

  Raises:
    WeightsError: not a pdjax checkpoint, or shapes that do not match ``cfg``.
  """
  path = Path(path).resolve()
  meta = read_checkpoint_metadata(path)
  saved_cfg = _config_from_json(meta["pdjax_config"], str(path / METADATA_FILE))
  cfg = saved_cfg if cfg is None else cfg
  saved = {k: tuple(v["shape"]) for k, v in meta["tensors"].items()}
  msg = _describe_mismatch(str(path), saved, _expected_shapes(cfg),
                           "checkpoint", "config")
  if msg:
    raise WeightsError(msg)

  if shardings is None:
    shardings = _single_device_shardings(cfg)
  elif isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, llama.abstract_params(cfg))
  target = llama.abstract_params(cfg, shardings)

  checkpointer = _checkpointer()
  try:
    params = checkpointer.restore(path / PARAMS_DIR, target)
  except Exception as e:  # orbax/tensorstore raise many types; add context.
    raise WeightsError(f"{path / PARAMS_DIR}: orbax restore failed: "
                       f"{type(e).__name__}: {e}") from e
  finally:
    checkpointer.close()
  return params, cfg


__all__ = [
    "FORMAT_VERSION", "METADATA_FILE", "PARAMS_DIR", "TOKENIZER_FILES",
    "copy_tokenizer_files", "save_checkpoint", "restore_checkpoint",
    "read_checkpoint_metadata", "read_checkpoint_config",
    "is_pdjax_checkpoint",
]
