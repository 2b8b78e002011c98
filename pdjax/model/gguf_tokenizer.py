"""The tokenizer and chat template a GGUF file carries in its metadata.

A GGUF has no ``tokenizer.json``: llama.cpp's converter stores the
vocabulary (``tokenizer.ggml.tokens``), each token's kind
(``tokenizer.ggml.token_type``: 1 normal, 3 control, 4 user-defined, ...),
the BPE merges, the special token ids, ``add_bos_token`` and the chat
template (``tokenizer.chat_template``) as metadata. This module rebuilds
from them what a Hugging Face checkpoint ships as files:

* ``build_tokenizer``: a ``tokenizers`` byte-level BPE (``tokenizer.ggml.model``
  ``gpt2``, the GPT-2 / Llama 3 / SmolLM family) with the vocabulary in the
  file's order, its merges, control tokens as special added tokens and
  user-defined ones as plain added tokens (both always matched whole, as
  llama.cpp does), a byte-level decoder, and the pre-tokenizer
  ``tokenizer.ggml.pre`` names (the regex its merges were learned with);
  wrapped in ``pdjax.tokenizer.Tokenizer`` with the file's BOS/EOS.
  SentencePiece vocabularies (``tokenizer.ggml.model`` ``llama``) and
  pre-tokenizers not listed in ``PRE_TOKENIZERS`` are refused by name.
* ``tokenizer_config``: the fields of a ``tokenizer_config.json`` (chat
  template, special token strings, ``add_bos_token``), so the gateway's chat
  templates see the same variables as with a Hugging Face checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from pdjax.model.gguf_file import GGUFError, GGUFFile, open_gguf, token_id
from pdjax.tokenizer import Tokenizer

# llama.cpp's token types (llama_token_type / gguf TokenType).
_CONTROL, _USER_DEFINED = 3, 4

# The Llama 3 split: contractions, letters with one leading non-letter,
# numbers of up to three digits, punctuation runs, newlines, spaces.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+"
                 r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
# Qwen2's: the same with single digits.
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _gpt2():
  return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2():
  return pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _split(regex: str):
  def make():
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  return make


# tokenizer.ggml.pre -> the pre-tokenizer (llama.cpp's pre-tokenizer types).
PRE_TOKENIZERS = {
    "default": _gpt2, "gpt2": _gpt2, "gpt-2": _gpt2, "mpt": _gpt2,
    "olmo": _gpt2,
    # Each digit on its own, then GPT-2's split (StarCoder lineage).
    "smollm": _digits_then_gpt2, "starcoder": _digits_then_gpt2,
    "refact": _digits_then_gpt2, "codeshell": _digits_then_gpt2,
    "llama3": _split(_LLAMA3_SPLIT), "llama-v3": _split(_LLAMA3_SPLIT),
    "llama-bpe": _split(_LLAMA3_SPLIT), "smaug-bpe": _split(_LLAMA3_SPLIT),
    "dbrx": _split(_LLAMA3_SPLIT), "falcon3": _split(_LLAMA3_SPLIT),
    "qwen2": _split(_QWEN2_SPLIT), "deepseek-r1-qwen": _split(_QWEN2_SPLIT),
}
# tokenizer_config.json special-token keys -> tokenizer.ggml id keys.
_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                   "unk_token": "unknown_token_id",
                   "pad_token": "padding_token_id"}


def _tokens(f: GGUFFile) -> list[str]:
  tokens = f.get("tokenizer.ggml.tokens")
  if not tokens:
    raise GGUFError(f"{f.path}: no tokenizer (tokenizer.ggml.tokens is "
                    "missing); clients must send token ids")
  return tokens


def build_raw_tokenizer(f: GGUFFile) -> tokenizers.Tokenizer:
  """The ``tokenizers.Tokenizer`` a GGUF's metadata describes."""
  kind = f.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise GGUFError(
        f"{f.path}: tokenizer model {kind!r} is not supported (pdjax builds "
        "byte-level BPE tokenizers, tokenizer.ggml.model 'gpt2')")
  pre = f.get("tokenizer.ggml.pre", "default")
  if pre not in PRE_TOKENIZERS:
    raise GGUFError(
        f"{f.path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not "
        f"supported; known: {', '.join(sorted(PRE_TOKENIZERS))}")
  tokens = _tokens(f)
  merges = f.get("tokenizer.ggml.merges")
  if merges is None:
    raise GGUFError(f"{f.path}: a BPE tokenizer needs tokenizer.ggml.merges")
  vocab = {t: i for i, t in enumerate(tokens)}
  pairs = []
  for m in merges:
    left, sep, right = m.partition(" ")
    if not sep:
      raise GGUFError(f"{f.path}: malformed merge {m!r} (expected 'a b')")
    pairs.append((left, right))
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs))
  tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
  tok.decoder = decoders.ByteLevel()
  types = f.get("tokenizer.ggml.token_type") or []
  control = [t for t, k in zip(tokens, types) if k == _CONTROL]
  user = [t for t, k in zip(tokens, types) if k == _USER_DEFINED]
  if control:
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in control])
  if user:
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t in user])
  if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
    raise GGUFError(
        f"{f.path}: the tokenizer has {len(tokens)} tokens but only "
        f"{tok.get_vocab_size(with_added_tokens=True)} distinct ones")
  return tok


def _add_bos(f: GGUFFile) -> bool:
  value = f.get("tokenizer.ggml.add_bos_token")
  return bool(value) if value is not None else False


def build_tokenizer(path: str | Path) -> Tokenizer:
  """``pdjax.tokenizer.Tokenizer`` of the GGUF at ``path``: BOS from
  ``bos_token_id`` (added to prompts iff ``add_bos_token``), EOS from
  ``eos_token_id`` and the end-of-turn ids chat models stop on."""
  f = open_gguf(path)
  eos = [token_id(f, k) for k in ("eos_token_id", "eot_token_id",
                                  "eom_token_id")]
  return Tokenizer(build_raw_tokenizer(f),
                   bos_token_id=token_id(f, "bos_token_id"),
                   eos_token_ids=[e for e in eos if e is not None],
                   add_bos=_add_bos(f), source=str(f.path))


def tokenizer_config(path: str | Path) -> dict[str, Any]:
  """The ``tokenizer_config.json`` fields the GGUF's metadata holds:
  ``chat_template`` (if any), the special tokens as strings and
  ``add_bos_token``."""
  f = open_gguf(path)
  tokens = _tokens(f)
  out: dict[str, Any] = {"add_bos_token": _add_bos(f)}
  template = f.get("tokenizer.chat_template")
  if template is not None:
    out["chat_template"] = template
  for name, key in _SPECIAL_TOKENS.items():
    i = token_id(f, key)
    if i is not None:
      if not 0 <= i < len(tokens):
        raise GGUFError(f"{f.path}: tokenizer.ggml.{key} {i} is outside the "
                        f"vocabulary of {len(tokens)}")
      out[name] = tokens[i]
  return out


__all__ = ["build_tokenizer", "build_raw_tokenizer", "tokenizer_config",
           "PRE_TOKENIZERS"]
