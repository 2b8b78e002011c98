"""Text <-> token ids for serving, on top of Hugging Face ``tokenizers``.

Two things here are easy to get subtly wrong and matter for a server:

* **BOS.** Some tokenizers add BOS in their post-processor (Llama 2/3,
  Mistral), some never want one even though ``config.json`` names a
  ``bos_token_id`` (Qwen2: ``"bos_token": null``), and chat templates often
  render the BOS string into the prompt text themselves. ``Tokenizer.encode``
  follows the tokenizer's own post-processor, adds BOS only where the model
  expects one and the post-processor did not, and never returns two.

* **Streaming text.** Decoding one token at a time is wrong: a character
  can be split over several byte-level tokens (emoji, CJK), and SentencePiece
  style decoders drop or keep the leading space of a piece depending on what
  precedes it. ``IncrementalDetokenizer`` uses the vLLM prefix/read offset
  scheme: it decodes a short window of already-emitted tokens with and
  without the new ones and emits only the difference, holding text back
  while it may still change (an incomplete UTF-8 sequence, or a run of
  byte-fallback tokens that a later byte could still invalidate). The
  concatenation of everything it emits equals ``decode`` of all the ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tokenizers

if TYPE_CHECKING:
  from pdjax.model.config import ModelConfig

_REPLACEMENT_CHAR = "\ufffd"
# Tokens of the previous context the detokenizer re-decodes with a prompt
# (as vLLM): enough for any decoder's look-behind, cheap to decode.
_PROMPT_CONTEXT_TOKENS = 5


class TokenizerError(ValueError):
  """A tokenizer directory or file that cannot be used, with the file named."""


def read_json_config(path: Path) -> dict[str, Any] | None:
  """A checkpoint's JSON config file (tokenizer_config.json,
  generation_config.json) as a dict; None when it is absent."""
  if not path.exists():
    return None
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise TokenizerError(f"{path}: not valid JSON: {e}") from e
  if not isinstance(data, dict):
    raise TokenizerError(f"{path}: expected a JSON object")
  return data


def special_token_text(value: Any) -> str | None:
  """A special token of tokenizer_config.json: a string or AddedToken dict."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _as_id_tuple(value: Any) -> tuple[int, ...]:
  if value is None:
    return ()
  if isinstance(value, (list, tuple)):
    return tuple(int(v) for v in value)
  return (int(value),)


def _unique(ids: Iterable[int]) -> tuple[int, ...]:
  return tuple(dict.fromkeys(ids))


def _byte_level_decoder() -> dict[str, int]:
  """The inverse of GPT-2's bytes_to_unicode: byte-level BPE writes each
  byte of a token as one printable character."""
  keep = (list(range(ord("!"), ord("~") + 1))
          + list(range(ord("\xa1"), ord("\xac") + 1))
          + list(range(ord("\xae"), ord("\xff") + 1)))
  chars = list(keep)
  n = 0
  for b in range(256):
    if b not in keep:
      keep.append(b)
      chars.append(256 + n)
      n += 1
  return {chr(c): b for b, c in zip(keep, chars)}


def _uses_decoder(tok: tokenizers.Tokenizer, kind: str) -> bool:
  """Whether the tokenizer's decoder is (or chains) a ``kind`` decoder."""
  try:
    decoder = json.loads(tok.to_str()).get("decoder") or {}
  except Exception:  # noqa: BLE001 - an unreadable config: assume not
    return False
  stack = [decoder]
  while stack:
    d = stack.pop()
    if d.get("type") == kind:
      return True
    stack.extend(d.get("decoders") or ())
  return False


def _load_tokenizer_json(path: Path) -> tokenizers.Tokenizer:
  if not path.is_file():
    raise TokenizerError(
        f"{path}: not found (pdjax needs a Hugging Face fast tokenizer "
        "file, tokenizer.json)")
  try:
    return tokenizers.Tokenizer.from_file(str(path))
  except Exception as e:  # tokenizers raises a bare Exception.
    raise TokenizerError(f"{path}: not a valid tokenizer.json: {e}") from e


_BYTE_LEVEL_DECODER = _byte_level_decoder()


class Tokenizer:
  """A ``tokenizers.Tokenizer`` plus the model's BOS/EOS conventions.

  Attributes:
    bos_token_id: the model's BOS id, or None if it has none.
    eos_token_ids: every id that ends generation (Llama 3 instruct has two).
    adds_bos: whether ``encode(text, add_bos=True)`` starts with BOS.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, *,
               bos_token_id: int | None = None,
               eos_token_ids: Sequence[int] = (),
               add_bos: bool | None = None, source: str = "<memory>"):
    """Wraps ``tokenizer``.

    Args:
      tokenizer: the underlying fast tokenizer.
      bos_token_id: BOS id, or None.
      eos_token_ids: ids that end generation.
      add_bos: whether prompts should start with BOS when the tokenizer's
        post-processor does not add it. None: yes iff there is a BOS id.
        Ignored (True) when the post-processor adds BOS itself.
      source: where the tokenizer came from, for messages.
    """
    self._tok = tokenizer
    self.source = source
    self.bos_token_id = None if bos_token_id is None else int(bos_token_id)
    self.eos_token_ids: tuple[int, ...] = _unique(int(e) for e in eos_token_ids)
    vocab = self.vocab_size
    for what, ids in (("bos_token_id", (self.bos_token_id,)),
                      ("eos_token_ids", self.eos_token_ids)):
      for i in ids:
        if i is not None and not 0 <= i < vocab:
          raise TokenizerError(f"{source}: {what} {i} is outside the "
                               f"tokenizer's vocabulary of {vocab}")
    self._post_processor_adds_bos = self._probe_post_processor_bos()
    if self._post_processor_adds_bos:
      self.adds_bos = True
    elif add_bos is None:
      self.adds_bos = self.bos_token_id is not None
    else:
      self.adds_bos = bool(add_bos) and self.bos_token_id is not None
    # Byte-fallback pieces ("<0x41>"): a run of them decodes as one unit and a
    # later byte can turn already-valid text into U+FFFD, so the incremental
    # detokenizer never ends a window inside such a run.
    self.byte_fallback_ids: frozenset[int] = frozenset(
        i for i in (tokenizer.token_to_id(f"<0x{b:02X}>") for b in range(256))
        if i is not None)
    self.special_ids: frozenset[int] = frozenset(
        i for i, t in tokenizer.get_added_tokens_decoder().items()
        if t.special)
    self._added_ids = frozenset(tokenizer.get_added_tokens_decoder())
    self._byte_level = _uses_decoder(tokenizer, "ByteLevel")

  # ---------------------------------------------------------------- loading
  @classmethod
  def from_file(cls, path: str | Path, *, bos_token_id: int | None = None,
                eos_token_ids: Sequence[int] = (),
                add_bos: bool | None = None) -> "Tokenizer":
    """Loads a ``tokenizer.json``; BOS/EOS only as given here."""
    path = Path(path)
    return cls(_load_tokenizer_json(path), bos_token_id=bos_token_id,
               eos_token_ids=eos_token_ids, add_bos=add_bos, source=str(path))

  @classmethod
  def from_dir(cls, path: str | Path,
               model_config: "ModelConfig | None" = None) -> "Tokenizer":
    """Loads ``path/tokenizer.json`` with the model's BOS/EOS.

    BOS/EOS come from ``model_config`` where it sets them, else from
    ``generation_config.json`` and ``tokenizer_config.json`` in ``path``.
    """
    path = Path(path)
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
      hint = ""
      if (path / "tokenizer.model").exists():
        hint = (" (only tokenizer.model is present: SentencePiece-only "
                "tokenizers must be converted to tokenizer.json, e.g. by "
                "saving them with transformers' fast tokenizer)")
      raise TokenizerError(f"{tok_file}: not found{hint}")
    tcfg_file = path / "tokenizer_config.json"
    tcfg = read_json_config(tcfg_file) or {}
    gen = read_json_config(path / "generation_config.json") or {}

    raw = _load_tokenizer_json(tok_file)

    def lookup(key: str) -> int | None:
      content = special_token_text(tcfg.get(key))
      if content is None:
        return None
      i = raw.token_to_id(content)
      if i is None:
        raise TokenizerError(f"{tcfg_file}: {key} {content!r} is not in "
                             f"{tok_file.name}")
      return i

    bos = model_config.bos_token_id if model_config is not None else None
    if bos is None:
      bos = gen.get("bos_token_id")
    if bos is None:
      bos = lookup("bos_token")
    eos = tuple(model_config.eos_token_ids) if model_config is not None else ()
    if not eos:
      eos = _as_id_tuple(gen.get("eos_token_id"))
      tok_eos = lookup("eos_token")
      eos = _unique(eos + (() if tok_eos is None else (tok_eos,)))

    add_bos = tcfg.get("add_bos_token")
    if add_bos is None and "bos_token" in tcfg and tcfg["bos_token"] is None:
      add_bos = False  # Qwen2 style: the config names a BOS no prompt uses.
    return cls(raw, bos_token_id=bos, eos_token_ids=eos,
               add_bos=None if add_bos is None else bool(add_bos),
               source=str(tok_file))

  @classmethod
  def from_checkpoint(cls, path: str | Path) -> "Tokenizer | None":
    """The tokenizer of any checkpoint ``pdjax.model.loading`` serves, or
    None when it has none.

    A GGUF (a ``.gguf`` file, or a directory holding one) carries its
    tokenizer in its metadata (``pdjax.model.gguf_tokenizer``); a Hugging
    Face or pdjax directory has ``tokenizer.json``, with BOS/EOS from its
    ``config.json`` where there is one (``from_dir``).
    """
    from pdjax.model.gguf_file import find_gguf
    gguf_path = find_gguf(path)
    if gguf_path is not None:
      from pdjax.model.gguf_tokenizer import build_tokenizer
      return build_tokenizer(gguf_path)
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
      return None
    cfg = None
    if (path / "config.json").exists():
      from pdjax.model.config import ModelConfig
      cfg = ModelConfig.from_hf_dir(path)
    return cls.from_dir(path, model_config=cfg)

  def _probe_post_processor_bos(self) -> bool:
    if self.bos_token_id is None:
      return False
    with_special = self._tok.encode("a", add_special_tokens=True).ids
    without = self._tok.encode("a", add_special_tokens=False).ids
    return (len(with_special) > len(without) and
            with_special[0] == self.bos_token_id and
            (not without or without[0] != self.bos_token_id))

  # ---------------------------------------------------------------- codec
  @property
  def vocab_size(self) -> int:
    """Number of ids the tokenizer knows, added tokens included."""
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def raw(self) -> tokenizers.Tokenizer:
    """The wrapped ``tokenizers.Tokenizer``."""
    return self._tok

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    """Token ids of ``text``, starting with exactly one BOS if ``add_bos``
    and the model uses BOS (a BOS written into ``text`` counts)."""
    ids = self._tok.encode(text, add_special_tokens=add_bos).ids
    if not add_bos or not self.adds_bos:
      return ids
    bos = self.bos_token_id
    if not ids or ids[0] != bos:
      ids.insert(0, bos)
    elif self._post_processor_adds_bos and len(ids) > 1 and ids[1] == bos:
      del ids[0]  # The text began with the BOS string: keep one.
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self._tok.decode([int(i) for i in ids],
                            skip_special_tokens=skip_special_tokens)

  def id_to_token(self, token_id: int) -> str | None:
    return self._tok.id_to_token(int(token_id))

  def token_bytes(self, token_id: int) -> bytes:
    """The bytes one token stands for, even where they end inside a UTF-8
    character (``decode`` of such a token alone is U+FFFD): what OpenAI's
    logprobs ``bytes`` hold. Byte-level BPE pieces map back to their bytes,
    byte-fallback pieces ("<0xC3>") are their byte, SentencePiece pieces
    have their "▁" as a space; added tokens are their text."""
    token_id = int(token_id)
    piece = self._tok.id_to_token(token_id)
    if piece is None:
      return b""
    if token_id in self._added_ids:
      return piece.encode("utf-8")
    if token_id in self.byte_fallback_ids:
      return bytes([int(piece[3:5], 16)])
    if self._byte_level:
      table = _BYTE_LEVEL_DECODER
      if all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    return piece.replace("\u2581", " ").encode("utf-8")

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def is_eos(self, token_id: int) -> bool:
    return token_id in self.eos_token_ids

  def __repr__(self) -> str:
    return (f"Tokenizer({self.source}, vocab_size={self.vocab_size}, "
            f"bos={self.bos_token_id}, eos={self.eos_token_ids})")


class IncrementalDetokenizer:
  """Turns a stream of generated ids into a stream of text deltas.

  Without ``prompt_ids`` the concatenation of every ``push`` and the final
  ``flush`` equals ``tokenizer.decode(generated_ids)``. With them the text
  continues the prompt (a generated "▁world" after "Hello" yields " world"):
  it equals ``decode(prompt + generated)`` minus ``decode(prompt)``, for
  prompts that end on a character boundary (any prompt ``encode`` made).
  """

  def __init__(self, tokenizer: Tokenizer,
               prompt_ids: Sequence[int] | None = None,
               skip_special_tokens: bool = True):
    self._tokenizer = tokenizer
    self._skip = skip_special_tokens
    self._byte_ids = tokenizer.byte_fallback_ids
    # Skipped special tokens vanish from the text, so byte-fallback pieces on
    # either side of them decode as one run: look through them.
    self._invisible = tokenizer.special_ids if skip_special_tokens else (
        frozenset())
    self._ids: list[int] = list(prompt_ids or ())
    self._num_prompt = len(self._ids)
    # ids[prefix:read] decode to text already accounted for (emitted, or
    # the prompt); ids[read:] are pending. Both offsets sit on character
    # boundaries and never inside a byte-fallback run.
    self._read = len(self._ids)
    self._prefix = max(self._read - _PROMPT_CONTEXT_TOKENS, 0)
    while (0 < self._prefix < self._read and
           self._ids[self._prefix - 1] in self._byte_ids and
           self._ids[self._prefix] in self._byte_ids):
      self._prefix -= 1
    self._prefix_text = self._decode(self._prefix, self._read)

  def _decode(self, start: int, stop: int | None = None) -> str:
    return self._tokenizer.decode(self._ids[start:stop],
                                  skip_special_tokens=self._skip)

  @property
  def generated_ids(self) -> list[int]:
    return self._ids[self._num_prompt:]

  def push(self, new_ids: Sequence[int]) -> str:
    """Adds generated ids; returns the text they complete (maybe "")."""
    if len(new_ids) == 0:
      return ""
    self._ids.extend(int(i) for i in new_ids)
    last = next((i for i in reversed(self._ids) if i not in self._invisible),
                None)
    if last in self._byte_ids:
      return ""  # Mid byte-fallback run: its text is not final yet.
    return self._advance(final=False)

  def flush(self) -> str:
    """Returns the text still held back; call once after the last push."""
    return self._advance(final=True)

  def _advance(self, *, final: bool) -> str:
    if self._read == len(self._ids):
      return ""
    new_text = self._decode(self._prefix)
    if not final and (len(new_text) <= len(self._prefix_text) or
                      new_text.endswith(_REPLACEMENT_CHAR)):
      # Nothing visible yet, or an incomplete UTF-8 sequence at the end
      # (a genuine U+FFFD is released by the next token or by flush).
      return ""
    delta = new_text[len(self._prefix_text):]
    self._prefix = self._read
    self._read = len(self._ids)
    self._prefix_text = self._decode(self._prefix, self._read)
    return delta


__all__ = ["Tokenizer", "IncrementalDetokenizer", "TokenizerError",
           "read_json_config", "special_token_text"]
