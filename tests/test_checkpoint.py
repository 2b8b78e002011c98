"""pdjax orbax checkpoints: resharding round trips, conversion, clear errors.

A checkpoint written under one mesh must restore under any other, with each
array carrying exactly the sharding asked for (not merely equal values on
some default placement): that is what lets a tensor-parallel converter feed a
data-parallel serving pool.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pdjax.model import checkpoint as ckpt
from pdjax.model import llama
from pdjax.model.config import ModelConfig
from pdjax.model.loading import detect_format, load_model
from pdjax.model.weights import WeightsError, load_hf_params

REPO = Path(__file__).resolve().parents[1]

# Head, kv-head, mlp and vocab counts divisible by 4 so a 4-way TP mesh splits
# every kind of axis.
CFG = ModelConfig(architecture="llama", vocab_size=256, hidden_size=64,
                  intermediate_size=128, num_layers=2, num_heads=8,
                  num_kv_heads=4, head_dim=16, dtype="float32",
                  eos_token_ids=(2, 3), bos_token_id=1)
TP_RULES = {"heads": "tp", "kv_heads": "tp", "mlp": "tp", "vocab": "tp"}


def _mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> Mesh:
  n = int(np.prod(shape))
  return Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


def _shardings(cfg: ModelConfig, mesh: Mesh, rules: dict[str, str]):
  return jax.tree.map(
      lambda axes: NamedSharding(
          mesh, PartitionSpec(*[rules.get(a) for a in axes])),
      llama.param_logical_axes(cfg),
      is_leaf=lambda x: isinstance(x, tuple))


def _random_params(cfg: ModelConfig, shardings=None, seed: int = 0):
  """Host-generated random weights (jax.random compiles slowly on CPU)."""
  rng = np.random.default_rng(seed)
  abstract = llama.abstract_params(cfg)
  host = jax.tree.map(
      lambda a: rng.standard_normal(a.shape).astype(a.dtype), abstract)
  if shardings is None:
    return host, jax.device_put(host)
  return host, jax.device_put(host, shardings)


def _assert_tree_equal(host, restored):
  flat_h = ckpt._flatten(host)
  flat_r = ckpt._flatten(restored)
  assert flat_h.keys() == flat_r.keys()
  for k in flat_h:
    np.testing.assert_array_equal(np.asarray(flat_r[k]), flat_h[k], err_msg=k)


@pytest.fixture(scope="module")
def tp_checkpoint(tmp_path_factory):
  """A checkpoint saved from params split 4 ways over heads/mlp/vocab."""
  mesh = _mesh((4,), ("tp",))
  shardings = _shardings(CFG, mesh, TP_RULES)
  host, params = _random_params(CFG, shardings)
  assert params["layers"]["wq"].sharding.spec == PartitionSpec(
      None, None, "tp", None)
  path = tmp_path_factory.mktemp("ckpt") / "tp4"
  ckpt.save_checkpoint(path, params, CFG, extra={"note": "tp4"})
  return path, host


def test_layout_and_metadata(tp_checkpoint):
  path, _ = tp_checkpoint
  assert ckpt.is_pdjax_checkpoint(path)
  assert detect_format(path) == "pdjax"
  meta = json.loads((path / ckpt.METADATA_FILE).read_text())
  assert meta["format_version"] == ckpt.FORMAT_VERSION
  assert meta["dtype"] == "float32"
  assert meta["hf_config"] == CFG.to_hf_dict()
  assert meta["extra"] == {"note": "tp4"}
  assert meta["tensors"]["layers/wq"]["shape"] == [2, 64, 8, 16]
  assert meta["param_count"] == sum(
      a.size for a in jax.tree.leaves(llama.abstract_params(CFG)))
  assert ckpt.read_checkpoint_config(path) == CFG


@pytest.mark.parametrize("layout", ["dp8_replicated", "dp2_tp4", "default"])
def test_restore_into_other_sharding(tp_checkpoint, layout):
  path, host = tp_checkpoint
  if layout == "dp8_replicated":
    mesh = _mesh((8,), ("dp",))
    want = _shardings(CFG, mesh, {})
  elif layout == "dp2_tp4":
    mesh = _mesh((2, 4), ("dp", "tp"))
    want = _shardings(CFG, mesh, {**TP_RULES, "embed": "dp"})
  else:
    want = None
  params, cfg = ckpt.restore_checkpoint(path, want)
  assert cfg == CFG
  _assert_tree_equal(host, params)
  flat = ckpt._flatten(params)
  if want is None:
    for k, x in flat.items():
      assert x.sharding.device_set == {jax.local_devices()[0]}, k
    return
  for k, w in ckpt._flatten(want).items():
    x = flat[k]
    assert x.sharding.is_equivalent_to(w, x.ndim), (k, x.sharding, w)
    # The shards really have the split shapes, not full copies.
    for shard in x.addressable_shards:
      assert shard.data.shape == w.shard_shape(x.shape), k
  if layout == "dp2_tp4":
    wq = flat["layers/wq"]  # [L, D/dp, H/tp, hd]
    assert wq.addressable_shards[0].data.shape == (2, 32, 2, 16)
    assert len(wq.sharding.device_set) == 8


def test_restore_single_sharding_and_dtype_cast(tp_checkpoint):
  path, host = tp_checkpoint
  replicated = NamedSharding(_mesh((2,), ("dp",)), PartitionSpec())
  params, cfg = ckpt.restore_checkpoint(path, replicated,
                                        cfg=CFG.replace(dtype="bfloat16"))
  assert cfg.dtype == "bfloat16"
  emb = params["embed"]
  assert emb.dtype == jax.numpy.bfloat16
  assert emb.sharding.is_equivalent_to(replicated, 2)
  np.testing.assert_array_equal(
      np.asarray(emb), host["embed"].astype(jax.numpy.bfloat16))


def test_shape_mismatch_is_a_clear_error(tp_checkpoint):
  path, _ = tp_checkpoint
  with pytest.raises(WeightsError) as e:
    ckpt.restore_checkpoint(path, cfg=CFG.replace(intermediate_size=96))
  msg = str(e.value)
  assert str(path) in msg
  assert "'layers/w_gate' has shape (2, 64, 128)" in msg
  assert "(2, 64, 96)" in msg
  with pytest.raises(WeightsError, match="'lm_head' is in the checkpoint but "
                     "not expected"):
    ckpt.restore_checkpoint(path, cfg=CFG.replace(tie_word_embeddings=True))


def test_save_rejects_mismatched_params_and_existing(tmp_path, tp_checkpoint):
  _, host = tp_checkpoint
  with pytest.raises(WeightsError, match="'layers/wq' has shape"):
    ckpt.save_checkpoint(tmp_path / "x", host, CFG.replace(num_heads=4))
  with pytest.raises(WeightsError, match="dtype"):
    ckpt.save_checkpoint(tmp_path / "x", host, CFG.replace(dtype="bfloat16"))
  assert not ckpt.is_pdjax_checkpoint(tmp_path / "x")
  path, _ = tp_checkpoint
  with pytest.raises(FileExistsError):
    ckpt.save_checkpoint(path, host, CFG)


def test_not_a_checkpoint(tmp_path, tp_checkpoint):
  assert not ckpt.is_pdjax_checkpoint(tmp_path)
  with pytest.raises(WeightsError, match="neither a pdjax checkpoint"):
    load_model(tmp_path)
  with pytest.raises(FileNotFoundError, match="no such model directory"):
    load_model(tmp_path / "missing")
  path, _ = tp_checkpoint
  with pytest.raises(WeightsError, match="did you mean"):
    load_model(path / ckpt.PARAMS_DIR)
  # A half-written checkpoint (arrays gone) is reported, not half-loaded.
  broken = tmp_path / "broken"
  broken.mkdir()
  shutil.copyfile(path / ckpt.METADATA_FILE, broken / ckpt.METADATA_FILE)
  assert not ckpt.is_pdjax_checkpoint(broken)
  with pytest.raises(WeightsError, match="orbax arrays"):
    load_model(broken)


@functools.cache
def _converter():
  """The tool, imported as a module."""
  spec = importlib.util.spec_from_file_location(
      "convert_hf_to_orbax", REPO / "tools" / "convert_hf_to_orbax.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_convert_hf_round_trip(hf_model_dir_factory, tmp_path):
  src = hf_model_dir_factory("qwen2", tie_word_embeddings=True)
  hf_dir = tmp_path / "hf"
  shutil.copytree(src, hf_dir)
  (hf_dir / "tokenizer.json").write_text('{"version": "1.0"}')
  (hf_dir / "tokenizer_config.json").write_text('{"model_max_length": 99}')

  summary = _converter().convert(hf_dir, tmp_path / "out", "float32")
  out = Path(summary["out"])
  assert ckpt.is_pdjax_checkpoint(out)
  assert {"tokenizer.json", "tokenizer_config.json",
          "generation_config.json"} <= set(summary["copied"])
  assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
  assert summary["params"] == sum(
      int(np.prod(a.shape)) for a in jax.tree.leaves(
          llama.abstract_params(ckpt.read_checkpoint_config(out))))
  assert summary["bytes"] == 4 * summary["params"]

  # Both formats through the one entry point, into a TP sharding chosen from
  # the config once it is known.
  def shardings_fn(cfg):
    return _shardings(cfg, _mesh((2,), ("tp",)), TP_RULES)
  from_ckpt, cfg_c = load_model(out, shardings_fn)
  from_hf, cfg_h = load_model(hf_dir, shardings_fn, dtype="float32")
  assert cfg_c == cfg_h
  assert cfg_c.architecture == "qwen2" and cfg_c.tie_word_embeddings
  _assert_tree_equal(jax.tree.map(np.asarray, from_hf), from_ckpt)
  assert from_ckpt["layers"]["w_up"].sharding.spec == PartitionSpec(
      None, None, "tp")
  direct = load_hf_params(hf_dir, cfg_h)
  _assert_tree_equal(jax.tree.map(np.asarray, direct), from_ckpt)

  # dtype override at load time.
  bf16, cfg_b = load_model(out, dtype="bfloat16")
  assert cfg_b.dtype == "bfloat16"
  assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(bf16))


def test_convert_cli(hf_model_dir_factory, tmp_path, capsys):
  from absl import flags
  tool = _converter()
  src = hf_model_dir_factory("qwen2", tie_word_embeddings=True)
  fv = flags.FlagValues()  # private: other tools' flags may share names
  tool.define_flags(fv)
  fv(["convert", f"--hf_dir={src}", f"--out={tmp_path / 'c'}",
      "--dtype=bfloat16"])
  tool.main(["convert"], fv)
  printed = capsys.readouterr().out
  assert "params:" in printed and "bytes:" in printed and "time:" in printed
  params, cfg = load_model(tmp_path / "c")
  assert cfg.dtype == "bfloat16"
  assert params["embed"].dtype == jax.numpy.bfloat16
