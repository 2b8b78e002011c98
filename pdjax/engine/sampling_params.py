"""Sampling parameters, named as vLLM names them, and their checks (no JAX:
the router validates requests without a backend)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np


MAX_STOP_TOKEN_IDS = 16


class InvalidRequest(ValueError):
  """A request field with an unusable value; ``field`` names it."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field = field


def outside_vocabulary(field: str, token_id: int, vocab_size: int
                       ) -> InvalidRequest:
  """The refusal of a token id outside ``[0, vocab_size)``."""
  return InvalidRequest(field, f"token id {token_id} is outside the "
                        f"vocabulary [0, {vocab_size})")


def check_in_vocabulary(ids: np.ndarray, vocab_size: int,
                        field: str = "prompt_token_ids") -> None:
  """Refuses the integer array ``ids`` naming its first id outside the
  vocabulary (one array comparison, not a loop over the ids)."""
  outside = (ids < 0) | (ids >= vocab_size)
  if outside.any():
    raise outside_vocabulary(field, int(ids[np.argmax(outside)]), vocab_size)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  max_tokens: int = 16
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0          # 0 or -1: no top-k
  # Tokens less likely than min_p times the likeliest one are dropped
  # (after the temperature, before top-k and top-p; 0: off), as vLLM does.
  min_p: float = 0.0
  # EOS and the stop ids cannot be sampled before this many tokens (vLLM's
  # min_tokens; 0: off).
  min_tokens: int = 0
  seed: int | None = None
  stop_token_ids: tuple[int, ...] = ()
  ignore_eos: bool = False
  # In a pool that speculates (DecodeConfig.speculative), whether this
  # request's tokens are drafted and verified (False: plain decoding).
  speculative: bool = True
  # vLLM's penalties (0, 0, 1: off), applied to the logits before the
  # temperature: presence and frequency over the output's tokens,
  # repetition over the prompt's and the output's.
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  repetition_penalty: float = 1.0

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  @property
  def penalized(self) -> bool:
    """Whether any penalty is on."""
    return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0)

  @property
  def drafted(self) -> bool:
    """Whether a speculating pool drafts this request's tokens: not where
    it opted out, nor where a penalty is on (a drafted token's penalty
    would depend on the drafts before it; vLLM serves such requests
    without speculation too)."""
    return self.speculative and not self.penalized

  def validate(self, vocab_size: int | None = None) -> None:
    if self.max_tokens is None or self.max_tokens <= 0:
      raise InvalidRequest("max_tokens", f"must be >= 1, got {self.max_tokens}")
    if not math.isfinite(self.temperature) or self.temperature < 0:
      raise InvalidRequest("temperature",
                           f"must be >= 0 (0 = greedy), got {self.temperature}")
    if not (0.0 < self.top_p <= 1.0):
      raise InvalidRequest("top_p", f"must be in (0, 1], got {self.top_p}")
    if not 0 <= self.min_tokens <= self.max_tokens:
      raise InvalidRequest("min_tokens", f"must be in [0, max_tokens = "
                           f"{self.max_tokens}], got {self.min_tokens}")
    if not (0.0 <= self.min_p <= 1.0):
      raise InvalidRequest("min_p", f"must be in [0, 1], got {self.min_p}")
    if self.top_k < -1:
      raise InvalidRequest("top_k", f"must be -1, 0 (disabled) or >= 1, got "
                           f"{self.top_k}")
    for name in ("presence_penalty", "frequency_penalty"):
      v = getattr(self, name)
      if not -2.0 <= v <= 2.0:
        raise InvalidRequest(name, f"must be in [-2, 2], got {v}")
    if not 0.0 < self.repetition_penalty <= 2.0:
      raise InvalidRequest("repetition_penalty", f"must be in (0, 2], got "
                           f"{self.repetition_penalty}")
    if self.seed is not None and not (0 <= self.seed < 2**63):
      raise InvalidRequest("seed", f"must be in [0, 2**63), got {self.seed}")
    if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
      raise InvalidRequest("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} "
                           f"ids, got {len(self.stop_token_ids)}")
    if vocab_size is not None:
      for t in self.stop_token_ids:
        if not 0 <= t < vocab_size:
          raise InvalidRequest("stop_token_ids", f"id {t} is outside the "
                               f"vocabulary [0, {vocab_size})")

  def seed_u32(self, fallback: int) -> int:
    """The 32-bit key seed for this request (``fallback`` when unseeded)."""
    s = fallback if self.seed is None else self.seed
    return (s ^ (s >> 32)) & 0xFFFFFFFF


__all__ = ["SamplingParams", "InvalidRequest", "MAX_STOP_TOKEN_IDS",
           "check_in_vocabulary", "outside_vocabulary"]
