"""Model configuration, read from a Hugging Face ``config.json``.

One frozen dataclass covers the Llama family (Llama 2/3, Mistral, Qwen2): they
differ only in a handful of fields (rope scaling, q/k/v bias, tied embeddings,
sliding window). Everything the jitted code needs is a static Python value here,
so a ``ModelConfig`` can be closed over by ``jax.jit`` without retracing.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# The activation/KV dtypes by name, and their sizes in bytes (the dtypes
# themselves come from jax.numpy when asked for: configs are read where no
# JAX backend is wanted, e.g. the router).
_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Quantized storage of the projection weights (ModelConfig.weight_dtype).
WEIGHT_DTYPES = ("float8_e4m3fn",)


class ModelConfigError(ValueError):
  """A config.json that pdjax cannot serve, with the file and the field named."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary embedding parameters in the Hugging Face convention."""
  theta: float = 10000.0
  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and options of a Llama-family decoder."""
  architecture: str  # "llama" | "mistral" | "qwen2"
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope: RopeConfig = RopeConfig()
  max_position_embeddings: int = 4096
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  sliding_window: int | None = None
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  # Storage dtype of the weights and the KV cache; activations follow it,
  # norms, softmax and rotary math always run in float32.
  dtype: str = "bfloat16"
  # Storage of the layers' projection weights when it differs from
  # ``dtype``: "float8_e4m3fn" keeps them in FP8 with a float32 scale per
  # output channel (``pdjax.model.quant``), computing in ``dtype``. None:
  # ``dtype``.
  weight_dtype: str | None = None
  # The activations the quantized projections read: None (``dtype``, the
  # weights widened to it) or "float8_e4m3fn" (each token's activations
  # scaled to e4m3 by their own max, so both operands of the GEMM are FP8:
  # W8A8, as vLLM's dynamic FP8). Needs ``weight_dtype``.
  activation_dtype: str | None = None
  # A short hash of the per-head K/V scales folded into the attention
  # weights for an FP8 KV cache (``pdjax.model.kv_fold``): the K and V
  # this model computes are the checkpoint's divided by them. None: not
  # folded (left out of the fingerprint, which then stays what it was).
  kv_scales: str | None = None
  name: str = "model"
  # Rows added to the embedding and the LM head so the vocabulary splits
  # evenly over a tensor-parallel mesh (as vLLM's VocabParallelEmbedding
  # pads): zeros, never looked up (token ids are checked against
  # vocab_size), their logits -inf (never sampled) and cut from logits a
  # caller gets. Set by pdjax.engine.setup for the mesh a pool runs on; not
  # part of the fingerprint (it changes no KV).
  vocab_padding: int = 0
  # The layer's projections that read the same input stored as one matrix
  # each (``pdjax.model.fused``): q, k and v as ``wqkv``, gate and up as
  # ``w_gate_up``, so a decode step at a few rows reads each in one GEMM
  # rather than in thin ones that leave HBM idle. The model's numbers are
  # those of the separate matrices (not part of the fingerprint). Set by
  # a pool that fuses (``[decode] fuse_projections``).
  fused_projections: bool = False

  def __post_init__(self):
    if self.vocab_padding < 0:
      raise ModelConfigError(f"vocab_padding must be >= 0, got "
                             f"{self.vocab_padding}")
    if self.num_heads % self.num_kv_heads:
      raise ModelConfigError(
          f"num_attention_heads ({self.num_heads}) must be a multiple of "
          f"num_key_value_heads ({self.num_kv_heads})")
    if self.dtype not in _DTYPES:
      raise ModelConfigError(
          f"dtype {self.dtype!r} is not one of {sorted(_DTYPES)}")
    if self.weight_dtype not in (None,) + WEIGHT_DTYPES:
      raise ModelConfigError(
          f"weight_dtype {self.weight_dtype!r} is not one of "
          f"{list(WEIGHT_DTYPES)} (or unset)")
    if self.activation_dtype not in (None,) + WEIGHT_DTYPES:
      raise ModelConfigError(
          f"activation_dtype {self.activation_dtype!r} is not one of "
          f"{list(WEIGHT_DTYPES)} (or unset)")
    if self.activation_dtype is not None and self.weight_dtype is None:
      raise ModelConfigError(
          "activation_dtype needs weight_dtype: FP8 activations feed GEMMs "
          "whose weights are FP8 too")

  @property
  def padded_vocab(self) -> int:
    """Rows of the embedding (columns of the LM head) as stored."""
    return self.vocab_size + self.vocab_padding

  @property
  def jnp_dtype(self):
    import jax.numpy as jnp
    return getattr(jnp, self.dtype)

  @property
  def q_per_kv(self) -> int:
    return self.num_heads // self.num_kv_heads

  def kv_bytes_per_token(self) -> int:
    """Bytes of K and V for one token across all layers."""
    itemsize = _DTYPES[self.dtype]
    return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

  def param_count(self) -> int:
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    attn = d * self.head_dim * (self.num_heads * 2 + self.num_kv_heads * 2)
    per_layer = attn + 3 * d * f + 2 * d
    if self.qkv_bias:
      per_layer += (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    if self.o_bias:
      per_layer += d
    if self.mlp_bias:
      per_layer += 2 * f + d
    emb = v * d * (1 if self.tie_word_embeddings else 2)
    return self.num_layers * per_layer + emb + d

  def fingerprint(self) -> str:
    """A short stable id of everything that changes the KV layout or values.

    Used by the compatibility handshake between pools and to name KV blocks:
    two workers may exchange KV only if their fingerprints are equal.
    """
    import hashlib
    fields = dataclasses.asdict(self)
    fields.pop("name")
    fields.pop("vocab_padding")
    fields.pop("fused_projections")
    if fields["kv_scales"] is None:
      fields.pop("kv_scales")
    blob = json.dumps(fields, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  # ---------------------------------------------------------------- parsing
  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], *, source: str = "config.json",
                   dtype: str | None = None, name: str | None = None,
                   generation_config: dict[str, Any] | None = None,
                   ) -> "ModelConfig":
    """Builds a config from the fields of a Hugging Face ``config.json``."""
    def need(key):
      if key not in hf or hf[key] is None:
        raise ModelConfigError(f"{source}: required field {key!r} is missing")
      return hf[key]

    from pdjax.model.hf_fp8 import check_quantization
    check_quantization(hf, source)
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    arch = None
    for a in archs:
      if a in SUPPORTED_ARCHITECTURES:
        arch = SUPPORTED_ARCHITECTURES[a]
    if arch is None and model_type in SUPPORTED_ARCHITECTURES.values():
      arch = model_type
    if arch is None:
      raise ModelConfigError(
          f"{source}: unsupported architecture {archs or model_type!r}; "
          f"pdjax serves {sorted(SUPPORTED_ARCHITECTURES)}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise ModelConfigError(
          f"{source}: hidden_act {act!r} is not supported (only 'silu')")

    num_heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    head_dim = hf.get("head_dim") or hidden // num_heads
    rope = _parse_rope(hf, source)

    sliding_window = None
    if arch == "mistral" and hf.get("sliding_window"):
      sliding_window = int(hf["sliding_window"])
    if arch == "qwen2" and hf.get("use_sliding_window"):
      raise ModelConfigError(
          f"{source}: use_sliding_window=true (Qwen2 per-layer sliding "
          "windows) is not supported")

    gen = generation_config or {}
    eos = gen.get("eos_token_id", hf.get("eos_token_id"))
    if eos is None:
      eos_ids: tuple[int, ...] = ()
    elif isinstance(eos, (list, tuple)):
      eos_ids = tuple(int(e) for e in eos)
    else:
      eos_ids = (int(eos),)
    bos = gen.get("bos_token_id", hf.get("bos_token_id"))

    if dtype is None:
      dtype = hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"
      if dtype not in _DTYPES:
        dtype = "bfloat16"

    return cls(
        architecture=arch,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        rope=rope,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        qkv_bias=bool(hf.get("attention_bias", False)) or arch == "qwen2",
        o_bias=bool(hf.get("attention_bias", False)) and arch != "qwen2",
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=sliding_window,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=eos_ids,
        pad_token_id=hf.get("pad_token_id"),
        dtype=dtype,
        name=name or hf.get("_name_or_path") or arch,
    )

  @classmethod
  def from_hf_dir(cls, path: str | Path, **kw) -> "ModelConfig":
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
      raise ModelConfigError(f"{cfg_file}: not found (a Hugging Face model "
                             "directory needs config.json)")
    try:
      hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
      raise ModelConfigError(f"{cfg_file}: not valid JSON: {e}") from e
    gen = None
    gen_file = path / "generation_config.json"
    if gen_file.exists():
      try:
        gen = json.loads(gen_file.read_text())
      except json.JSONDecodeError as e:
        raise ModelConfigError(f"{gen_file}: not valid JSON: {e}") from e
    kw.setdefault("name", path.name)
    return cls.from_hf_dict(hf, source=str(cfg_file), generation_config=gen,
                            **kw)

  def to_hf_dict(self) -> dict[str, Any]:
    """The inverse of ``from_hf_dict``: a config.json transformers can load."""
    arch_name = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[
        self.architecture]
    rope: dict[str, Any] = {"rope_type": self.rope.rope_type,
                            "rope_theta": self.rope.theta}
    if self.rope.rope_type == "linear":
      rope["factor"] = self.rope.factor
    if self.rope.rope_type == "llama3":
      rope.update(factor=self.rope.factor,
                  low_freq_factor=self.rope.low_freq_factor,
                  high_freq_factor=self.rope.high_freq_factor,
                  original_max_position_embeddings=(
                      self.rope.original_max_position_embeddings))
    out: dict[str, Any] = {
        "architectures": [arch_name],
        "model_type": self.architecture,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "max_position_embeddings": self.max_position_embeddings,
        "rope_theta": self.rope.theta,
        "rope_parameters": rope,
        "rope_scaling": None if self.rope.rope_type == "default" else rope,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": (list(self.eos_token_ids) if len(self.eos_token_ids) > 1
                         else (self.eos_token_ids[0] if self.eos_token_ids
                               else None)),
        "pad_token_id": self.pad_token_id,
        "torch_dtype": self.dtype,
    }
    if self.architecture == "llama":
      out["attention_bias"] = self.qkv_bias
      out["mlp_bias"] = self.mlp_bias
    if self.architecture == "mistral":
      out["sliding_window"] = self.sliding_window
    if self.architecture == "qwen2":
      out["use_sliding_window"] = False
      out["sliding_window"] = None
    return out


def trained_context(cfg: ModelConfig) -> int:
  """The longest sequence the model is made for, as vLLM derives a model's
  length: ``max_position_embeddings``, stretched by the factor of linear
  rope scaling (whose config keeps the original length). llama3 scaling's
  config already states the extended length."""
  n = cfg.max_position_embeddings
  if cfg.rope.rope_type == "linear":
    n = int(n * cfg.rope.factor)
  return n


def context_length_problem(cfg: ModelConfig, max_seq_len: int) -> str | None:
  """Why serving ``cfg`` with ``max_seq_len`` positions would run it past
  its trained context (None if it would not). Past it a model's output is
  not what it was trained to give: vLLM refuses such a length unless told
  otherwise, and so do the pdjax workers (``--allow_long_max_seq_len``)."""
  limit = trained_context(cfg)
  if max_seq_len <= limit:
    return None
  rope = ("" if cfg.rope.rope_type != "linear" else
          f" x linear rope scaling factor {cfg.rope.factor:g}")
  return (f"max_seq_len {max_seq_len} of the deployment is longer than "
          f"{cfg.name}'s trained context (max_position_embeddings "
          f"{cfg.max_position_embeddings}{rope} = {limit} positions): lower "
          "max_seq_len in the deployment file, or pass "
          "--allow_long_max_seq_len to serve past it anyway")


def _parse_rope(hf: dict[str, Any], source: str) -> RopeConfig:
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  merged = {**scaling, **params}
  rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise ModelConfigError(
        f"{source}: rope type {rope_type!r} is not supported "
        f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
  return RopeConfig(
      theta=float(theta),
      rope_type=rope_type,
      factor=float(merged.get("factor", 1.0)),
      low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
      high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
      original_max_position_embeddings=int(
          merged.get("original_max_position_embeddings", 8192)),
  )


def rope_inv_freq(rope: RopeConfig, head_dim: int):
  """Inverse frequencies exactly as transformers computes them (float32)."""
  import numpy as np
  inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.int64)
                              .astype(np.float32) / head_dim))
  if rope.rope_type == "linear":
    inv = inv / rope.factor
  elif rope.rope_type == "llama3":
    old_ctx = rope.original_max_position_embeddings
    low_wavelen = old_ctx / rope.low_freq_factor
    high_wavelen = old_ctx / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (old_ctx / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv = np.where(is_medium, smoothed, scaled)
  return inv.astype(np.float32)
