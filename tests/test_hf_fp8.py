"""Hugging Face FP8 checkpoints (``pdjax.model.hf_fp8``): the tiny model's
projections written in F8_E4M3 with their scales, as llm-compressor /
fbgemm (a scale per output channel, or one per tensor) and transformers'
fine-grained FP8 (a scale per 128 x 128 block, here 16 x 32) publish them,
load to exactly ``q * scale`` in pdjax's layout; the unquantized tensors
load as they are; a model served from them decodes; an unsupported
quantization method is refused by name.
"""

from __future__ import annotations

import json
import shutil

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safetensors.numpy import load_file   # noqa: E402
from safetensors.torch import save_file   # noqa: E402

from pdjax.model.config import ModelConfigError   # noqa: E402
from pdjax.model.hf_fp8 import dequantize   # noqa: E402
from pdjax.model.loading import load_model   # noqa: E402
from pdjax.model.weights import _LAYER_MAP, _hf_to_pdjax   # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
        "down_proj")
E4M3 = ml_dtypes.float8_e4m3fn


def _quantize(w: np.ndarray, scheme: str, block=(16, 32)):
  """(q, scale name, scale) of a float32 [out, in] weight."""
  if scheme == "channel":
    s = np.abs(w).max(axis=1, keepdims=True) / 448.0
    return (w / s).astype(E4M3), "weight_scale", s.astype(np.float32)
  if scheme == "tensor":
    s = np.float32(np.abs(w).max() / 448.0)
    return (w / s).astype(E4M3), "weight_scale", np.asarray(s)
  bo, bi = block
  nb = (-(-w.shape[0] // bo), -(-w.shape[1] // bi))
  s = np.zeros(nb, np.float32)
  q = np.zeros(w.shape, E4M3)
  for a in range(nb[0]):
    for b in range(nb[1]):
      blk = w[a * bo:(a + 1) * bo, b * bi:(b + 1) * bi]
      s[a, b] = np.abs(blk).max() / 448.0
      q[a * bo:(a + 1) * bo, b * bi:(b + 1) * bi] = (blk / s[a, b]).astype(
          E4M3)
  return q, "weight_scale_inv", s


QUANT_CONFIGS = {
    "channel": {"quant_method": "compressed-tensors", "format":
                "float-quantized", "config_groups": {"group_0": {
                    "weights": {"num_bits": 8, "type": "float",
                                "strategy": "channel"}}}},
    "tensor": {"quant_method": "fbgemm_fp8"},
    "block": {"quant_method": "fp8", "fmt": "e4m3",
              "weight_block_size": [16, 32]},
}


@pytest.fixture(scope="module", params=sorted(QUANT_CONFIGS))
def fp8_checkpoint(request, tiny_model_dir, tmp_path_factory):
  """(directory, {tensor name: float32 dequantized weight}) of the tiny
  model with its projections in FP8."""
  scheme = request.param
  out = tmp_path_factory.mktemp(f"fp8-{scheme}")
  for f in tiny_model_dir.iterdir():
    if f.name != "model.safetensors":
      shutil.copy(f, out / f.name)
  tensors = load_file(str(tiny_model_dir / "model.safetensors"))
  written, want = {}, {}
  for name, x in tensors.items():
    if any(f".{p}.weight" in name for p in PROJ):
      q, sname, s = _quantize(x.astype(np.float32), scheme)
      written[name] = torch.from_numpy(q.view(np.uint8)).view(
          torch.float8_e4m3fn)
      written[name[:-len("weight")] + sname] = torch.from_numpy(s)
      want[name] = dequantize(
          q, **({"scale_inv": s, "block": (16, 32)} if scheme == "block"
                else {"scale": s}))
    else:
      written[name] = torch.from_numpy(np.ascontiguousarray(x))
  save_file(written, str(out / "model.safetensors"))
  cfg = json.loads((out / "config.json").read_text())
  cfg["quantization_config"] = QUANT_CONFIGS[scheme]
  (out / "config.json").write_text(json.dumps(cfg))
  return out, want


def test_dequantize_arithmetic():
  q = np.asarray([[1.0, -2.0, 0.5], [448.0, 0.0, -0.25]], E4M3)
  np.testing.assert_array_equal(
      dequantize(q, scale=np.asarray([[2.0], [0.5]], np.float32)),
      [[2.0, -4.0, 1.0], [224.0, 0.0, -0.125]])
  np.testing.assert_array_equal(dequantize(q, scale=np.float32(3.0)),
                                q.astype(np.float32) * 3)
  np.testing.assert_array_equal(
      dequantize(q, scale_inv=np.asarray([[2.0, 4.0]], np.float32),
                 block=(2, 2)),
      [[2.0, -4.0, 2.0], [896.0, 0.0, -1.0]])
  with pytest.raises(ValueError, match="output channels"):
    dequantize(q, scale=np.ones((3, 1), np.float32))
  with pytest.raises(ValueError, match="blocks"):
    dequantize(q, scale_inv=np.ones((2, 2), np.float32), block=(2, 2))


def test_fp8_checkpoint_loads_to_q_times_scale(fp8_checkpoint, tiny_model_dir):
  path, want = fp8_checkpoint
  params, cfg = load_model(path, dtype="float32")
  plain, _ = load_model(tiny_model_dir, dtype="float32")
  for key, (pattern, kind) in _LAYER_MAP.items():
    if key not in params["layers"]:
      continue
    got = np.asarray(params["layers"][key])
    for i in range(cfg.num_layers):
      name = pattern.format(i=i)
      if name in want:
        exp = _hf_to_pdjax(want[name], kind, got.shape[1:])
        np.testing.assert_array_equal(got[i], exp, err_msg=name)
      else:   # norms: as they were
        np.testing.assert_array_equal(got[i],
                                      np.asarray(plain["layers"][key])[i])
  np.testing.assert_array_equal(np.asarray(params["embed"]),
                                np.asarray(plain["embed"]))


def test_fp8_checkpoint_serves(fp8_checkpoint):
  """Greedy generation from the FP8 checkpoint, through an engine, with
  pdjax's own FP8 weights on top (quantized again per channel at load)."""
  import jax
  from pdjax.engine.colocated import ColocatedEngine
  from pdjax.engine.decode_config import DecodeConfig
  from pdjax.engine.prefill import PrefillConfig
  from pdjax.engine.sampling import SamplingParams
  from pdjax.engine.setup import load_sharded
  from pdjax.sharding import ShardingRules, make_mesh
  path, _ = fp8_checkpoint
  rules = ShardingRules.load("decode_dp")
  mesh = make_mesh({"dp": 1}, jax.devices()[:1])
  params, cfg = load_sharded(path, rules, mesh, weight_dtype="float8_e4m3fn")
  engine = ColocatedEngine(
      params, cfg, mesh, rules,
      PrefillConfig(buckets=(16,), max_batch=1, page_size=16,
                    max_seq_len=64),
      DecodeConfig(max_seqs=2, num_pages=16, page_size=16, max_seq_len=64,
                   row_buckets=(2,)))
  out = []
  s = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
  engine.submit("a", [5, 6, 7, 8], s, lambda ev: out.extend(ev.token_ids),
                seed_u32=0)
  engine.drain()
  assert len(out) == 6 and all(0 <= t < cfg.vocab_size for t in out)


@pytest.mark.parametrize("dtype,fuse", [(None, "off"), ("bfloat16", "on")])
def test_fp8_weights_are_the_checkpoints_own(fp8_checkpoint, dtype, fuse):
  """A pool that stores FP8 weights takes a per-tensor or per-channel
  checkpoint's e4m3 values and scales as they are, bit for bit (read in
  float32 or bf16, projections separate or joined); block scales do not
  fit per-channel GEMMs, so those weights get scales of their own."""
  import jax
  from pdjax.engine.setup import load_sharded
  from pdjax.model import llama
  from pdjax.model.hf_fp8 import read_raw
  from pdjax.sharding import ShardingRules, make_mesh
  path, _ = fp8_checkpoint
  block = json.loads((path / "config.json").read_text())[
      "quantization_config"]["quant_method"] == "fp8"
  rules = ShardingRules.load("decode_dp")
  mesh = make_mesh({"dp": 1}, jax.devices()[:1])
  params, cfg = load_sharded(path, rules, mesh, dtype=dtype,
                             weight_dtype="float8_e4m3fn",
                             fuse_projections=fuse)
  assert cfg.fused_projections == (fuse == "on")
  layers = params["layers"]
  f = path / "model.safetensors"
  for i in range(cfg.num_layers):
    for proj, (key, start) in {
        "q_proj": ("wqkv", 0), "k_proj": ("wqkv", cfg.num_heads),
        "v_proj": ("wqkv", cfg.num_heads + cfg.num_kv_heads),
        "gate_proj": ("w_gate_up", 0),
        "up_proj": ("w_gate_up", cfg.intermediate_size),
        "o_proj": ("wo", 0), "down_proj": ("w_down", 0)}.items():
      if fuse == "off":
        key = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv",
               "gate_proj": "w_gate", "up_proj": "w_up"}.get(proj, key)
        start = 0
      kind = "self_attn" if proj in ("q_proj", "k_proj", "v_proj",
                                     "o_proj") else "mlp"
      name = f"model.layers.{i}.{kind}.{proj}.weight"
      q_ckpt = read_raw(f, name)                      # [out, in]
      q = np.asarray(layers[key][i])                  # output-major
      scale = np.asarray(layers[key + llama.SCALE_SUFFIX][i])
      heads = proj in ("q_proj", "k_proj", "v_proj")
      rows = q_ckpt.shape[0] // (cfg.head_dim if heads else 1)
      q = q[start:start + rows].reshape(q_ckpt.shape[0], -1)
      scale = scale[start:start + rows].reshape(-1)
      if block:
        assert (np.abs(scale) > 0).all()
        continue
      s_ckpt = np.broadcast_to(
          read_raw(f, name[:-len("weight")] + "weight_scale").reshape(-1),
          scale.shape)
      np.testing.assert_array_equal(scale, s_ckpt, err_msg=name)
      np.testing.assert_array_equal(q.view(np.uint8),
                                    q_ckpt.view(np.uint8), err_msg=name)


def test_other_quantization_methods_are_refused(tiny_model_dir, tmp_path):
  for f in tiny_model_dir.iterdir():
    shutil.copy(f, tmp_path / f.name)
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ModelConfigError, match="'gptq' is not supported"):
    load_model(tmp_path)
  cfg["quantization_config"] = {
      "quant_method": "compressed-tensors",
      "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}}
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ModelConfigError, match="4-bit int"):
    load_model(tmp_path)


@pytest.mark.parametrize("scheme", ["tensor", "channel"])
def test_make_fp8_checkpoint_writes_what_pools_serve_as_is(
    scheme, tiny_model_dir, tmp_path):
  """tools/make_fp8_checkpoint.py: the tiny model's projections in FP8 with
  a scale per tensor or channel; an FP8 pool loads them bit for bit."""
  import os
  import subprocess
  import sys
  from pathlib import Path

  import jax
  from pdjax.engine.setup import load_sharded
  from pdjax.model import llama
  from pdjax.model.hf_fp8 import read_raw
  from pdjax.sharding import ShardingRules, make_mesh
  repo = Path(__file__).resolve().parents[1]
  out = tmp_path / "fp8"
  subprocess.run([sys.executable, str(repo / "tools/make_fp8_checkpoint.py"),
                  f"--checkpoint={tiny_model_dir}", f"--scheme={scheme}",
                  f"--out={out}"], check=True, capture_output=True,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
  config = json.loads((out / "config.json").read_text())
  assert config["quantization_config"]["config_groups"]["group_0"][
      "weights"]["strategy"] == scheme
  name = "model.layers.1.mlp.down_proj.weight"
  q_ckpt = read_raw(out / "model.safetensors", name)
  s_ckpt = read_raw(out / "model.safetensors",
                    name[:-len("weight")] + "weight_scale")
  assert s_ckpt.size == (1 if scheme == "tensor" else q_ckpt.shape[0])
  params, _ = load_sharded(out, ShardingRules.load("decode_dp"),
                           make_mesh({"dp": 1}, jax.devices()[:1]),
                           weight_dtype="float8_e4m3fn")
  np.testing.assert_array_equal(
      np.asarray(params["layers"]["w_down"][1]).view(np.uint8),
      q_ckpt.view(np.uint8))
  np.testing.assert_array_equal(
      np.asarray(params["layers"]["w_down" + llama.SCALE_SUFFIX][1]),
      np.broadcast_to(s_ckpt.reshape(-1), (q_ckpt.shape[0],)))


def test_fp8_checkpoint_with_folded_kv_scales(fp8_checkpoint, tmp_path):
  """KV scales folded into the attention weights before they are quantized:
  q, k and v (scaled by powers of two, their scales with them) and the
  MLP's projections (left alone) keep the checkpoint's e4m3 values; o
  (heads scaled differently, mixed) is quantized with its own scales; every
  projection gives its folded weight back within e4m3's rounding."""
  import jax
  from pdjax.engine.setup import load_sharded
  from pdjax.model import kv_scales as kvs
  from pdjax.model import llama, quant
  from pdjax.model.hf_fp8 import read_raw
  from pdjax.model.kv_fold import fold_kv_scales
  from pdjax.sharding import ShardingRules, make_mesh
  path, _ = fp8_checkpoint
  if json.loads((path / "config.json").read_text())[
      "quantization_config"]["quant_method"] == "fp8":
    pytest.skip("block scales: quantized per channel either way")
  rules = ShardingRules.load("decode_dp")
  mesh = make_mesh({"dp": 1}, jax.devices()[:1])
  plain, cfg = load_sharded(path, rules, mesh, dtype="float32")
  scales = kvs.KvScales(k=np.full((cfg.num_layers, cfg.num_kv_heads), 0.5),
                        v=np.full((cfg.num_layers, cfg.num_kv_heads), 4.0))
  kvs.write_file(tmp_path / "s.json", scales)
  params, qcfg = load_sharded(path, rules, mesh, dtype="float32",
                              weight_dtype="float8_e4m3fn", kv_dtype="fp8",
                              kv_scales=str(tmp_path / "s.json"))
  folded, _ = fold_kv_scales(plain, cfg, scales)
  layers = params["layers"]
  f = path / "model.safetensors"
  for key, name, factor in (
      ("w_down", "mlp.down_proj", 1.0), ("wq", "self_attn.q_proj", 0.5),
      ("wk", "self_attn.k_proj", 2.0), ("wv", "self_attn.v_proj", 0.25)):
    name = f"model.layers.0.{name}.weight"
    q = np.asarray(layers[key][0])
    q_ckpt = read_raw(f, name)
    np.testing.assert_array_equal(q.reshape(q_ckpt.shape).view(np.uint8),
                                  q_ckpt.view(np.uint8), err_msg=key)
    s = np.asarray(layers[key + llama.SCALE_SUFFIX][0]).reshape(-1)
    s_ckpt = read_raw(f, name[:-len("weight")] + "weight_scale").reshape(-1)
    np.testing.assert_array_equal(
        s, np.broadcast_to(s_ckpt * np.float32(factor), s.shape),
        err_msg=key)
  for key, contracted in llama.QUANTIZED.items():
    back = np.asarray(quant.dequantize(
        layers[key], layers[key + llama.SCALE_SUFFIX], contracted))
    want = np.asarray(folded["layers"][key])
    s = np.asarray(layers[key + llama.SCALE_SUFFIX])
    s = s.reshape(s.shape[:1] + (1,) * contracted + s.shape[1:])
    bound = 2.0**-4 * np.abs(want) + 2.0**-10 * s + 1e-6 * np.abs(want)
    assert (np.abs(back - want) <= bound).all(), key
