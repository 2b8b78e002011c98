"""Broken model directories fail with a message naming the file and problem.

An operator pointing a server at the wrong or half-downloaded directory should
read what is wrong from the first line of the error, not from a stack trace
inside safetensors or a shape error deep in a jitted function.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from pdjax.model import llama
from pdjax.model.config import ModelConfig, ModelConfigError
from pdjax.model.loading import load_model
from pdjax.model.weights import WeightsError, load_hf_params, save_hf_checkpoint

CFG = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32,
                  intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, dtype="float32")
WQ0 = "model.layers.0.self_attn.q_proj.weight"


def _host_params(cfg: ModelConfig):
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype),
                      llama.abstract_params(cfg))


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> Path:
  return save_hf_checkpoint(_host_params(CFG),
                            CFG, tmp_path_factory.mktemp("good") / "m")


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory) -> Path:
  return save_hf_checkpoint(_host_params(CFG), CFG,
                            tmp_path_factory.mktemp("sharded") / "m",
                            max_shard_bytes=20_000)


@pytest.fixture
def model_dir(good_dir, tmp_path) -> Path:
  """A fresh, writable copy of a valid checkpoint for a test to break."""
  return Path(shutil.copytree(good_dir, tmp_path / "m"))


def _load(path: Path):
  """The way servers load: auto-detect, config from the directory."""
  return load_model(path, dtype="float32")


def test_good_directory_loads(good_dir, sharded_dir):
  params, cfg = _load(good_dir)
  assert cfg.num_layers == 2
  assert len(list(sharded_dir.glob("model-*.safetensors"))) > 1
  sharded, _ = _load(sharded_dir)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(sharded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_tensor(model_dir):
  f = model_dir / "model.safetensors"
  tensors = load_file(str(f))
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, str(f))
  with pytest.raises(WeightsError) as e:
    _load(model_dir)
  assert str(model_dir) in str(e.value)
  assert "'model.layers.1.mlp.up_proj.weight' is missing" in str(e.value)


def test_wrong_shape(model_dir):
  f = model_dir / "model.safetensors"
  tensors = load_file(str(f))
  tensors[WQ0] = np.zeros((32, 16), np.float32)
  save_file(tensors, str(f))
  with pytest.raises(WeightsError) as e:
    _load(model_dir)
  msg = str(e.value)
  assert str(f) in msg and WQ0 in msg
  assert "shape (32, 16), expected (32, 32)" in msg


def test_unsupported_architecture(model_dir):
  f = model_dir / "config.json"
  hf = json.loads(f.read_text())
  hf.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
  f.write_text(json.dumps(hf))
  with pytest.raises(ModelConfigError) as e:
    _load(model_dir)
  assert str(f) in str(e.value)
  assert "GPT2LMHeadModel" in str(e.value)
  assert "unsupported architecture" in str(e.value)


def test_truncated_safetensors(model_dir):
  f = model_dir / "model.safetensors"
  data = f.read_bytes()
  f.write_bytes(data[:len(data) // 2])
  with pytest.raises(WeightsError) as e:
    _load(model_dir)
  assert str(f) in str(e.value)
  assert "corrupt" in str(e.value)


def test_garbage_header(model_dir):
  f = model_dir / "model.safetensors"
  f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" +
                b"\x00" * 64)
  with pytest.raises(WeightsError) as e:
    _load(model_dir)
  assert str(f) in str(e.value)
  assert "corrupt" in str(e.value)


def test_missing_config(model_dir):
  (model_dir / "config.json").unlink()
  # Without config.json the directory is not recognisable as a model at all.
  with pytest.raises(WeightsError, match="no config.json"):
    _load(model_dir)
  # Reading it explicitly as a HF directory names the missing file.
  with pytest.raises(ModelConfigError) as e:
    ModelConfig.from_hf_dir(model_dir)
  assert str(model_dir / "config.json") in str(e.value)
  assert "not found" in str(e.value)


def test_invalid_config_json(model_dir):
  (model_dir / "config.json").write_text("{\"hidden_size\": 32,")
  with pytest.raises(ModelConfigError, match="config.json: not valid JSON"):
    _load(model_dir)


def test_index_names_missing_shard(sharded_dir, tmp_path):
  d = Path(shutil.copytree(sharded_dir, tmp_path / "m"))
  shards = sorted(d.glob("model-*.safetensors"))
  shards[-1].unlink()
  with pytest.raises(WeightsError) as e:
    _load(d)
  assert str(shards[-1]) in str(e.value)
  assert "model.safetensors.index.json" in str(e.value)
  assert "missing" in str(e.value)


def test_pytorch_bin_only(model_dir):
  (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
  with pytest.raises(WeightsError) as e:
    _load(model_dir)
  assert str(model_dir) in str(e.value)
  assert "pytorch_model.bin" in str(e.value)
  assert "safetensors" in str(e.value)


def test_config_disagrees_with_weights(model_dir):
  """A config.json edited to other dims: the first mismatching tensor."""
  f = model_dir / "config.json"
  hf = json.loads(f.read_text())
  hf["intermediate_size"] = 48
  f.write_text(json.dumps(hf))
  with pytest.raises(WeightsError, match=r"mlp\.gate_proj\.weight' has shape "
                     r"\(64, 32\), expected \(48, 32\) from config.json"):
    load_hf_params(model_dir, ModelConfig.from_hf_dir(model_dir))
