"""The transformers model with pdjax's shapes (flag-free: tests import it)."""

from __future__ import annotations


def hf_config(cfg):
  """A transformers LlamaConfig with the shapes of pdjax's ``cfg``."""
  from transformers import LlamaConfig
  rope = {"rope_type": "default", "rope_theta": cfg.rope.theta}
  if cfg.rope.rope_type == "llama3":
    rope.update(rope_type="llama3", factor=cfg.rope.factor,
                low_freq_factor=cfg.rope.low_freq_factor,
                high_freq_factor=cfg.rope.high_freq_factor,
                original_max_position_embeddings=(
                    cfg.rope.original_max_position_embeddings))
  return LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope.theta,
      rope_parameters=rope, rope_scaling=None if rope["rope_type"] ==
      "default" else rope,
      max_position_embeddings=cfg.max_position_embeddings,
      tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=None,
      eos_token_id=None, pad_token_id=0)
