"""pdjax-tiny: a small Llama the project builds itself, with no download.

Tests, examples and CI need a real checkpoint directory — config.json,
safetensors, tokenizer.json — that loads through exactly the same code as a
Hugging Face model, and transformers must accept it too so logits can be
compared. Downloading one is slow, flaky and impossible offline, so pdjax
makes its own: a byte-level BPE tokenizer trained on a small corpus shipped
in the package (``assets/tiny_corpus.txt``), and random weights.

Everything is deterministic down to the bytes: the tokenizer trainer is
deterministic, and the weights come from numpy's PCG64 bit generator (whose
raw stream numpy guarantees across versions) turned into floats with exact
arithmetic only, so neither jax's PRNG nor a platform's libm can change
them. Any change to the recipe must bump ``TINY_MODEL_VERSION``, because
``ensure_tiny_model`` trusts a directory that already exists.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from pdjax.model.config import ModelConfig, RopeConfig

TINY_MODEL_NAME = "pdjax-tiny"
TINY_MODEL_VERSION = "v2"  # v2: a chat template in tokenizer_config.json
TINY_VOCAB_SIZE = 512
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)  # ids 0, 1, 2
CORPUS_PATH = Path(__file__).parent / "assets" / "tiny_corpus.txt"
WEIGHTS_SEED = 20240601

# Files whose presence marks a complete model directory.
TINY_MODEL_FILES = ("config.json", "generation_config.json",
                    "model.safetensors", "tokenizer.json",
                    "tokenizer_config.json")

# Standard deviations of the random weights. Embedding and LM head are much
# larger than the usual 0.02 so the logits have a scale of a few units and
# greedy decoding wanders instead of locking onto one token; the residual
# branches are large enough that attention over the context, not only the
# current token, moves the prediction.
_STD = {
    "embed": 1.0,
    "lm_head": 0.3,
    "wq": 0.25, "wk": 0.25, "wv": 0.25, "wo": 0.25,
    "w_gate": 0.2, "w_up": 0.2, "w_down": 0.2,
}
_NORM_NOISE = 0.1


def tiny_config() -> ModelConfig:
  """The architecture of pdjax-tiny (a 2-layer GQA Llama, ~0.4M params)."""
  return ModelConfig(
      architecture="llama",
      vocab_size=TINY_VOCAB_SIZE,
      hidden_size=128,
      intermediate_size=256,
      num_layers=2,
      num_heads=8,
      num_kv_heads=4,
      head_dim=16,
      rms_norm_eps=1e-5,
      rope=RopeConfig(theta=10000.0),
      max_position_embeddings=2048,
      tie_word_embeddings=False,
      bos_token_id=SPECIAL_TOKENS.index(BOS_TOKEN),
      eos_token_ids=(SPECIAL_TOKENS.index(EOS_TOKEN),),
      pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN),
      dtype="float32",
      name=TINY_MODEL_NAME,
  )


# ------------------------------------------------------------------ tokenizer
def train_tiny_tokenizer(corpus_path: str | Path = CORPUS_PATH,
                         vocab_size: int = TINY_VOCAB_SIZE
                         ) -> tokenizers.Tokenizer:
  """A GPT-2 style byte-level BPE: every string encodes, nothing is <unk>.

  The 256 byte symbols are all in the initial alphabet, so rare characters
  (CJK, emoji) fall back to single bytes. The post-processor prepends BOS,
  as Llama's tokenizers do, so transformers' tokenizer adds it too.
  """
  text = Path(corpus_path).read_text(encoding="utf-8")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      min_frequency=2,
      special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tok.train_from_iterator(text.splitlines(keepends=True), trainer)
  if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
    raise AssertionError(
        f"{corpus_path}: BPE training gave a vocabulary of "
        f"{tok.get_vocab_size(with_added_tokens=True)}, expected {vocab_size}"
        " (is the corpus too small?)")
  for i, special in enumerate(SPECIAL_TOKENS):
    assert tok.token_to_id(special) == i, special
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BOS_TOKEN} $A",
      pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
      special_tokens=[(BOS_TOKEN, SPECIAL_TOKENS.index(BOS_TOKEN))],
  )
  return tok


# ------------------------------------------------------------------ weights
def _bitexact_normal(seed: int, name: str, shape: tuple[int, ...]
                     ) -> np.ndarray:
  """Approximately N(0, 1) samples, identical on every platform.

  Irwin-Hall with four 16-bit uniforms per sample (each 64-bit raw draw of
  PCG64 gives one sample): only exact integer math, one division by a power
  of two and one correctly rounded multiply, so no libm is involved.
  Bounded at about 3.46 sigma, which is fine for random weights.
  """
  seq = np.random.SeedSequence([seed, zlib.crc32(name.encode())])
  raw = np.random.PCG64(seq).random_raw(math.prod(shape))
  raw = np.asarray(raw, dtype=np.uint64)
  total = np.zeros(raw.shape, np.int64)
  for k in range(4):
    total += ((raw >> np.uint64(16 * k)) & np.uint64(0xFFFF)).astype(np.int64)
  # Each 16-bit value u has mean 32767.5 and variance (65536^2 - 1) / 12.
  centred = (total.astype(np.float64) * 2.0 - 4 * 65535.0) / 131072.0
  scale = math.sqrt(12.0 / 4.0)  # 4 uniforms on [-1/2, 1/2] have var 1/3
  return (centred * scale).reshape(shape)


def tiny_params(cfg: ModelConfig | None = None, seed: int = WEIGHTS_SEED
                ) -> dict:
  """The weights as a pytree of float32 numpy arrays in pdjax layout."""
  from pdjax.model.llama import param_shapes  # Imports jax.
  cfg = cfg or tiny_config()
  spec = param_shapes(cfg)

  def make(name: str, shape: tuple[int, ...]) -> np.ndarray:
    x = _bitexact_normal(seed, name, shape)
    if "norm" in name:
      x = 1.0 + _NORM_NOISE * x
    else:
      x = _STD.get(name.rsplit("/", 1)[-1], 0.02) * x
    return x.astype(np.float32)

  params: dict = {"layers": {}}
  for key, (shape, _) in spec["layers"].items():
    params["layers"][key] = make(f"layers/{key}", shape)
  for key in ("embed", "final_norm", "lm_head"):
    if key in spec:
      params[key] = make(key, spec[key][0])
  return params


# ------------------------------------------------------------------ writing
def _chat_template() -> str:
  """The plain "Role: content" template (the packaged chat template
  ``plain``, pdjax/configs/chat_templates/plain.jinja): instruct checkpoints
  carry their chat template in tokenizer_config.json, and so does
  pdjax-tiny, so its chat serving runs the same code path."""
  from pdjax import resources
  return resources.read("chat_template", "plain")[0]


def _tokenizer_config(cfg: ModelConfig) -> dict:
  return {
      "chat_template": _chat_template(),
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": BOS_TOKEN,
      "eos_token": EOS_TOKEN,
      "pad_token": PAD_TOKEN,
      "add_bos_token": True,
      "add_eos_token": False,
      "clean_up_tokenization_spaces": False,
      "model_max_length": cfg.max_position_embeddings,
  }


def _generation_config(cfg: ModelConfig) -> dict:
  return {
      "bos_token_id": cfg.bos_token_id,
      "eos_token_id": cfg.eos_token_ids[0],
      "pad_token_id": cfg.pad_token_id,
  }


def tiny_tokenizer_files(cfg: ModelConfig | None = None) -> dict[str, Any]:
  """tokenizer.json, tokenizer_config.json and generation_config.json, as
  ``save_hf_checkpoint``'s ``extra_files`` (strings or JSON objects)."""
  cfg = cfg or tiny_config()
  return {
      "tokenizer.json": train_tiny_tokenizer().to_str(pretty=True),
      "tokenizer_config.json": _tokenizer_config(cfg),
      "generation_config.json": _generation_config(cfg),
  }


def write_tiny_model(path: str | Path) -> Path:
  """Writes the model into ``path`` (not atomic: see ``ensure_tiny_model``)."""
  from pdjax.model.weights import save_hf_checkpoint  # Imports jax.
  cfg = tiny_config()
  return save_hf_checkpoint(tiny_params(cfg), cfg, path,
                            extra_files=tiny_tokenizer_files(cfg))


def default_tiny_model_dir() -> Path:
  """``$PDJAX_CACHE/models/pdjax-tiny-v2``, ``$PDJAX_CACHE`` defaulting to
  ``~/.cache/pdjax``."""
  root = os.environ.get("PDJAX_CACHE") or Path.home() / ".cache" / "pdjax"
  return Path(root).expanduser() / "models" / (
      f"{TINY_MODEL_NAME}-{TINY_MODEL_VERSION}")


def is_complete(path: str | Path) -> bool:
  path = Path(path)
  return all((path / f).is_file() for f in TINY_MODEL_FILES)


def ensure_tiny_model(path: str | Path | None = None) -> Path:
  """Returns a directory holding pdjax-tiny, building it if absent.

  The model is written to a temporary sibling directory and renamed into
  place, so a reader never sees a half-written model and processes that
  race all end up with one complete copy. Cheap when the directory exists.
  """
  path = Path(path).expanduser() if path is not None else (
      default_tiny_model_dir())
  if is_complete(path):
    return path
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise FileExistsError(
        f"{path}: exists but is not a complete {TINY_MODEL_NAME} model "
        f"(needs {', '.join(TINY_MODEL_FILES)}); remove it to rebuild")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
  try:
    write_tiny_model(tmp)
    try:
      # Atomic on POSIX; replaces an empty directory, fails on a full one.
      os.rename(tmp, path)
    except OSError:
      if not is_complete(path):  # Not a lost race: a real error.
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return path


__all__ = [
    "TINY_MODEL_NAME", "TINY_MODEL_VERSION", "TINY_VOCAB_SIZE",
    "SPECIAL_TOKENS", "tiny_config", "train_tiny_tokenizer", "tiny_params",
    "tiny_tokenizer_files",
    "write_tiny_model", "default_tiny_model_dir", "ensure_tiny_model",
    "is_complete",
]
