"""Named model shapes for benchmarks and experiments with random weights.

``random:<name>`` as a ``--checkpoint`` serves a preset with seeded random
weights made directly on the devices (born sharded, nothing on the host), so
a Llama-3-8B-shaped deployment needs no download. The tokens it produces are
meaningless; its speed is the real thing.
"""

from __future__ import annotations

from pdjax.model.config import ModelConfig, RopeConfig

RANDOM_PREFIX = "random:"


def preset_config(name: str, *, dtype: str | None = None) -> ModelConfig:
  """The ModelConfig of a preset: tiny, llama3-8b, llama3-1b."""
  if name == "tiny":
    from pdjax.model.tiny import tiny_config
    cfg = tiny_config()
  elif name == "llama3-8b":
    cfg = ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0,
                        low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192),
        max_position_embeddings=131072, dtype="bfloat16",
        eos_token_ids=(128001, 128009), bos_token_id=128000,
        name="llama3-8b-random")
  elif name == "llama3-1b":
    # Llama-3.2-1B: tied embeddings, head_dim 64, rope factor 32.
    cfg = ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=2048,
        intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
        head_dim=64, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=500000.0, rope_type="llama3", factor=32.0,
                        low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192),
        max_position_embeddings=131072, tie_word_embeddings=True,
        eos_token_ids=(128001, 128009), bos_token_id=128000,
        dtype="bfloat16", name="llama3-1b-random")
  else:
    raise ValueError(f"unknown model preset {name!r} (tiny, llama3-8b, "
                     "llama3-1b)")
  return cfg.replace(dtype=dtype) if dtype else cfg


def is_random(spec) -> bool:
  return str(spec).startswith(RANDOM_PREFIX)


def random_preset(spec) -> str:
  return str(spec)[len(RANDOM_PREFIX):]


__all__ = ["preset_config", "is_random", "random_preset", "RANDOM_PREFIX"]
