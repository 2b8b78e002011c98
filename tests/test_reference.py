"""pdjax against Hugging Face transformers on random-weight models (CPU, fp32).

transformers is the reference implementation: a model pdjax loads from a HF
directory must produce the same logits and the same greedy tokens. Each
architecture is built with the feature that distinguishes it switched on
(Llama-3 rope scaling with a small original context so all three frequency
bands are used, a Mistral sliding window shorter than the long prompt, Qwen2
q/k/v biases with tied embeddings) and one prompt is ~500 tokens long,
because RoPE and window bugs are invisible on short prompts. Internal
consistency is checked too: paged decode and chunked prefill must agree with
one full forward pass.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdjax.model import llama
from pdjax.model.config import ModelConfig, RopeConfig, rope_inv_freq
from pdjax.model.generate import greedy_generate
from pdjax.model.loading import load_model
from tolerances import assert_close, kv_weights, logit_weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# The transformers 4.x spelling (rope_scaling + rope_theta); 5.x accepts it
# and stores it as rope_parameters.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
MODELS: dict[str, dict[str, Any]] = {
    # Sharded HF save (several model-*.safetensors + index) for this one.
    "llama": dict(num_hidden_layers=3, rope_scaling=LLAMA3_ROPE,
                  rope_theta=500000.0, max_shard_size="150KB"),
    "mistral": dict(sliding_window=48),
    "qwen2": dict(tie_word_embeddings=True),
}
# One long prompt and two short ones. With its 32 new tokens the long one
# still fits the 512-token pad, so every full-sequence check below reuses one
# compiled shape.
PROMPT_LENS = (480, 61, 7)
PAD_TO = 512
NEW_TOKENS = 32
# fp32 logits and K/V, against transformers or pdjax's other paths (paged
# decode, chunked prefill), differ by rounding alone: the sums run in
# other orders. Their tolerances come from the arithmetic, for queries
# attending to up to PAD_TO keys (tests/tolerances.py).


def _rel_err(got, ref) -> float:
  got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
  return float(np.abs(got - ref).max() / np.abs(ref).max())


def _assert_logits_close(got, ref, cfg, msg):
  assert_close(got, ref, logit_weights(cfg, PAD_TO), err_msg=str(msg))


def _assert_kv_close(got, ref, cfg, msg):
  """K or V of every layer, [layers, ...], each against its own bound."""
  for layer in range(ref.shape[0]):
    assert_close(got[layer], ref[layer], kv_weights(cfg, layer, PAD_TO),
                 err_msg=f"{msg} layer {layer}")


@dataclasses.dataclass
class Model:
  arch: str
  hf_dir: Path
  cfg: ModelConfig
  params: Any
  hf: Any  # the torch model
  prompts: list[np.ndarray]
  _cache: dict[str, Any] = dataclasses.field(default_factory=dict)

  def hf_logits(self, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
      return self.hf(torch.tensor(ids[None], dtype=torch.long)
                     ).logits[0].numpy()

  def full(self) -> llama.PrefillOut:
    """One full pdjax pass over the padded prompt batch (computed once)."""
    if "full" not in self._cache:
      tokens, lens = _padded(self.prompts)
      self._cache["full"] = jax.device_get(llama.prefill_forward(
          self.params, tokens, lens, cfg=self.cfg, all_logits=True))
    return self._cache["full"]

  def greedy(self):
    """pdjax greedy tokens and logits for the prompts (computed once)."""
    if "greedy" not in self._cache:
      self._cache["greedy"] = greedy_generate(
          self.params, self.cfg, self.prompts, NEW_TOKENS, return_logits=True)
    return self._cache["greedy"]


# pdjax calls below share a few shapes ([3, 512] with all_logits, the [3, 480]
# prefill of greedy_generate, one chunked shape): compiling dominates runtime.
def _padded(seqs: list[np.ndarray], length: int = PAD_TO):
  tokens = np.zeros((len(seqs), length), np.int32)
  for b, s in enumerate(seqs):
    tokens[b, :len(s)] = s
  return jnp.asarray(tokens), jnp.asarray([len(s) for s in seqs], jnp.int32)


def _all_logits(params, cfg, seqs):
  """Full-sequence pdjax logits of right-padded, ragged sequences."""
  tokens, lens = _padded(seqs)
  return np.asarray(llama.prefill_forward(params, tokens, lens, cfg=cfg,
                                          all_logits=True).logits)


@functools.cache
def _build(arch: str, factory) -> Model:
  overrides = dict(MODELS[arch])
  hf_dir = factory(arch, **overrides)
  params, cfg = load_model(hf_dir, dtype="float32")
  hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()
  rng = np.random.default_rng(sum(map(ord, arch)))
  prompts = [rng.integers(2, cfg.vocab_size, n).astype(np.int32)
             for n in PROMPT_LENS]
  return Model(arch, hf_dir, cfg, params, hf, prompts)


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request, hf_model_dir_factory) -> Model:
  return _build(request.param, hf_model_dir_factory)


# ------------------------------------------------------------- the models
def test_models_exercise_their_features(model):
  cfg = model.cfg
  if model.arch == "llama":
    assert cfg.rope.rope_type == "llama3"
    assert cfg.rope.theta == 500000.0
    assert cfg.rope.original_max_position_embeddings == 64
    assert len(list(model.hf_dir.glob("model-*-of-*.safetensors"))) > 1
    assert (model.hf_dir / "model.safetensors.index.json").exists()
    # All three llama3 bands occur: unscaled, smoothed and fully scaled.
    base = rope_inv_freq(RopeConfig(theta=cfg.rope.theta), cfg.head_dim)
    ratio = rope_inv_freq(cfg.rope, cfg.head_dim) / base
    assert np.isclose(ratio, 1.0).any()
    assert np.isclose(ratio, 1 / cfg.rope.factor).any()
    assert ((ratio > 1 / cfg.rope.factor + 1e-6) & (ratio < 1 - 1e-6)).any()
  if model.arch == "mistral":
    assert cfg.sliding_window is not None
    assert cfg.sliding_window < max(PROMPT_LENS)
  if model.arch == "qwen2":
    assert cfg.qkv_bias and cfg.tie_word_embeddings
    assert "lm_head" not in model.params


@pytest.mark.parametrize("arch,change", [
    ("mistral", dict(sliding_window=None)),
    ("llama", dict(rope=RopeConfig(theta=500000.0))),
])
def test_features_matter(arch, change, hf_model_dir_factory):
  """Dropping the window / the rope scaling must break the match, or the
  comparisons against transformers would not be testing them."""
  m = _build(arch, hf_model_dir_factory)
  got = _all_logits(m.params, m.cfg.replace(**change), m.prompts[:1])
  ref = m.hf_logits(m.prompts[0])
  assert _rel_err(got[0, :len(ref)], ref) > 1e-2


# ------------------------------------------------------- vs transformers
def test_logits_match_transformers(model):
  """A ragged batch (480, 61, 7 tokens) in one pdjax call, each row against
  transformers run on that prompt alone."""
  got = model.full().logits
  for b, p in enumerate(model.prompts):
    _assert_logits_close(got[b, :len(p)], model.hf_logits(p), model.cfg,
                         (model.arch, len(p)))


def test_greedy_matches_transformers_generate(model):
  tokens, _ = model.greedy()
  assert tokens.shape == (len(model.prompts), NEW_TOKENS)
  for b, p in enumerate(model.prompts):
    with torch.no_grad():
      out = model.hf.generate(
          torch.tensor(p[None], dtype=torch.long),
          attention_mask=torch.ones((1, len(p)), dtype=torch.long),
          do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=None,
          eos_token_id=None, pad_token_id=0)
    ref = out[0, len(p):].numpy()
    assert len(ref) == NEW_TOKENS  # generate did not stop at an EOS
    np.testing.assert_array_equal(tokens[b], ref,
                                  err_msg=f"{model.arch} prompt {len(p)}")


# ------------------------------------------------------ internal agreement
def test_paged_decode_matches_full_forward(model):
  """Every decode step's logits (read through the page table) equal the
  full-forward logits at that position of prompt + generated tokens."""
  tokens, logits = model.greedy()
  seqs = [np.concatenate([p, t]) for p, t in zip(model.prompts, tokens)]
  full = _all_logits(model.params, model.cfg, seqs)
  for b, p in enumerate(model.prompts):
    ref = full[b, len(p) - 1:len(p) - 1 + NEW_TOKENS]
    _assert_logits_close(logits[b], ref, model.cfg, (model.arch, len(p)))


def test_chunked_prefill_matches_unchunked(model):
  """Prefill each prompt in two parts, the second through ``prefill_chunk``
  over a buffer holding the first part's K/V, split at a different point
  per row (the buffer's rows hold prefixes of different lengths), against
  the unchunked pass. For Mistral the window straddles the split."""
  cfg, params, full = model.cfg, model.params, model.full()
  split = np.array([200, 40, 3], np.int32)
  # Padded like greedy_generate pads its prompts: the same compiled prefill.
  first_tokens, _ = _padded([p[:s] for p, s in zip(model.prompts, split)],
                            length=llama.num_pages_for(max(PROMPT_LENS), 16)
                            * 16)
  first = llama.prefill_forward(params, first_tokens, jnp.asarray(split),
                                cfg=cfg)
  rest = [p[s:] for p, s in zip(model.prompts, split)]
  rest_tokens, rest_lens = _padded(rest, length=288)
  # Room for the longest prefix plus the second part, and 64 positions
  # more; junk past each row's prefix must never be read.
  span = int(split.max()) + 288
  S = span + 64
  T1 = first.k.shape[2]

  def buffer(part):
    junk = jnp.full(part.shape[:2] + (S,) + part.shape[3:], 7.0, part.dtype)
    return jax.lax.dynamic_update_slice(junk, part, (0, 0, 0, 0, 0))

  second = llama.prefill_chunk(
      params, rest_tokens, rest_lens, buffer(first.k), buffer(first.v),
      jnp.asarray(split), cfg=cfg, all_logits=True)
  assert second.k.shape[2] == S and T1 <= S
  # Attending over the buffers' first ``span`` positions only (all that the
  # rows hold) computes the same: the keys left out were masked.
  spanned = llama.prefill_chunk(
      params, rest_tokens, rest_lens, buffer(first.k), buffer(first.v),
      jnp.asarray(split), cfg=cfg, all_logits=True, span=span)
  for b, r in enumerate(rest):
    _assert_logits_close(spanned.logits[b, :len(r)],
                         second.logits[b, :len(r)], cfg, (model.arch, b))
    for buf, ref in ((spanned.k, second.k), (spanned.v, second.v)):
      _assert_kv_close(buf[:, b], ref[:, b], cfg, (model.arch, b, "span"))
  with pytest.raises(ValueError, match="span"):
    llama.prefill_chunk(params, rest_tokens, rest_lens, buffer(first.k),
                        buffer(first.v), jnp.asarray(split), cfg=cfg,
                        span=S + 1)

  for b, (s, r) in enumerate(zip(split, rest)):
    n = len(r)
    _assert_logits_close(second.logits[b, :n], full.logits[b, s:s + n], cfg,
                         (model.arch, b))
    for buf, ref in ((second.k, full.k), (second.v, full.v)):
      # The part lands after the row's prefix, and the prefix is intact.
      _assert_kv_close(buf[:, b, s:s + n], ref[:, b, s:s + n], cfg,
                       (model.arch, b, "part"))
      _assert_kv_close(buf[:, b, :s], ref[:, b, :s], cfg,
                       (model.arch, b, "prefix"))


# ------------------------------------------------------------- bfloat16
# bf16 keeps 8 mantissa bits (relative step 2**-8 ~ 0.4%) and every matmul
# output is rounded to it, so on these O(10)-scale logits we allow 5% of the
# logit scale (measured: ~1-2%). Free-running greedy decoding diverges for
# good once one near-tie flips, so token agreement is judged teacher-forced
# (bf16 argmax at each position of the fp32 greedy sequence, >= 90%; measured
# ~98%), plus the first few free-running tokens, which must be identical.
BF16_RTOL = 5e-2
BF16_TEACHER_FORCED_AGREEMENT = 0.9
BF16_FREE_RUNNING_PREFIX = 4


def test_bf16_close_to_fp32(hf_model_dir_factory):
  m = _build("llama", hf_model_dir_factory)
  params16, cfg16 = load_model(m.hf_dir, dtype="bfloat16")
  assert cfg16.dtype == "bfloat16"
  assert params16["layers"]["wq"].dtype == jnp.bfloat16

  fp32_tokens, _ = m.greedy()
  seqs = [np.concatenate([p, t]) for p, t in zip(m.prompts, fp32_tokens)]
  ref = _all_logits(m.params, m.cfg, seqs)
  got = _all_logits(params16, cfg16, seqs)
  agree = []
  for b, (p, s) in enumerate(zip(m.prompts, seqs)):
    assert _rel_err(got[b, :len(s)], ref[b, :len(s)]) <= BF16_RTOL
    forced = got[b, len(p) - 1:len(s) - 1].argmax(-1)
    agree.append(forced == fp32_tokens[b])
  assert np.mean(agree) >= BF16_TEACHER_FORCED_AGREEMENT, np.mean(agree)

  bf16_tokens = greedy_generate(params16, cfg16, m.prompts, NEW_TOKENS)
  np.testing.assert_array_equal(bf16_tokens[:, :BF16_FREE_RUNNING_PREFIX],
                                fp32_tokens[:, :BF16_FREE_RUNNING_PREFIX])
