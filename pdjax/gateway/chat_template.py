"""Chat messages -> prompt text, with the model's Jinja chat template,
rendered as Hugging Face ``transformers`` renders it.

A model's template is written against transformers' environment, so the
same prompt text needs the same one: a sandboxed Jinja environment (the
templates come from checkpoints, i.e. untrusted code) with ``trim_blocks``
and ``lstrip_blocks``, the ``loopcontrols`` extension, a no-op
``{% generation %}`` block (transformers uses it to mark assistant tokens),
a ``tojson`` filter that does not HTML-escape, the globals
``raise_exception`` and ``strftime_now``, and as variables the messages,
``add_generation_prompt``, ``tools``/``documents`` (None: templates test
``tools is not none``) and the tokenizer's special tokens by name
(``bos_token``, ``eos_token``, ...). The rendered text already holds the
BOS string where the model wants one, so it is sent to the router with
``add_special_tokens=False``.

The template comes from a file (``--chat_template``) or from the
checkpoint's ``tokenizer_config.json``, whose ``chat_template`` is a string
or a list of named templates (the one named "default" is used). A GGUF
checkpoint has no such file: its metadata holds the same fields
(``tokenizer.chat_template``, the special token ids), read by
``pdjax.model.gguf_tokenizer.tokenizer_config``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pdjax.tokenizer import TokenizerError, read_json_config, special_token_text

# tokenizer_config.json keys whose strings templates see by name (the
# special tokens transformers passes: its special_tokens_map).
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token",
                       "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
  """A template that cannot be loaded or rendered; the message says why."""


class _GenerationBlock(jinja2.ext.Extension):
  """``{% generation %}...{% endgeneration %}`` renders its body as is."""
  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_render"), [], [],
                                  body).set_lineno(lineno)

  def _render(self, caller):
    return caller()


def _raise_exception(message: str):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None,
            sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                    separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
  return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
  env = ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  return env


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A compiled chat template and the special tokens it may refer to."""
  source: str
  special_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
  origin: str = "<string>"

  def __post_init__(self):
    try:
      compiled = _environment().from_string(self.source)
    except jinja2.TemplateSyntaxError as e:
      raise ChatTemplateError(f"{self.origin}: not a valid Jinja template: "
                              f"{e}") from e
    object.__setattr__(self, "_compiled", compiled)

  def render(self, messages: Sequence[Mapping[str, Any]], *,
             add_generation_prompt: bool = True) -> str:
    """The prompt text for ``messages``.

    Raises:
      ChatTemplateError: the template refused the conversation (its
        ``raise_exception``, e.g. roles that do not alternate) or failed.
    """
    try:
      return self._compiled.render(
          messages=[dict(m) for m in messages], tools=None, documents=None,
          add_generation_prompt=add_generation_prompt,
          **self.special_tokens)
    except jinja2.TemplateError as e:
      raise ChatTemplateError(f"chat template: {e}") from e
    except (TypeError, ValueError, KeyError, AttributeError) as e:
      raise ChatTemplateError(f"chat template failed on these messages: "
                              f"{type(e).__name__}: {e}") from e


def _config_template(value: Any, origin: str) -> str | None:
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, list):
    named = {t.get("name"): t.get("template") for t in value
             if isinstance(t, dict)}
    if isinstance(named.get("default"), str):
      return named["default"]
    raise ChatTemplateError(f"{origin}: chat_template lists templates "
                            f"{sorted(map(str, named))} but none named "
                            "'default'; pass --chat_template")
  raise ChatTemplateError(f"{origin}: chat_template must be a string or a "
                          "list of named templates")


def _tokenizer_config(checkpoint: str | Path) -> tuple[dict[str, Any], str]:
  """A checkpoint's tokenizer_config.json fields and where they came from:
  the file in a directory, or a GGUF's metadata."""
  from pdjax.model.gguf_file import GGUFError, find_gguf
  try:
    gguf_path = find_gguf(checkpoint)
    if gguf_path is not None:
      from pdjax.model.gguf_tokenizer import tokenizer_config
      return tokenizer_config(gguf_path), str(gguf_path)
    config_path = Path(checkpoint) / "tokenizer_config.json"
    return read_json_config(config_path) or {}, str(config_path)
  except (TokenizerError, GGUFError) as e:
    raise ChatTemplateError(str(e)) from e


def load_chat_template(template_file: str | Path | None,
                       tokenizer_dir: str | Path | None
                       ) -> ChatTemplate | None:
  """The template to serve with, or None when there is none.

  ``template_file`` wins; otherwise the checkpoint's own: the
  ``chat_template`` of ``tokenizer_dir/tokenizer_config.json``, or of the
  GGUF's metadata when ``tokenizer_dir`` is a GGUF file (or a directory
  holding one). Special tokens come from that config either way (when it
  exists).
  """
  config: dict[str, Any] = {}
  config_path = None
  if tokenizer_dir is not None:
    config, config_path = _tokenizer_config(tokenizer_dir)
  special = {k: s for k in _SPECIAL_TOKEN_KEYS
             if (s := special_token_text(config.get(k))) is not None}
  if template_file is not None:
    path = Path(template_file)
    try:
      source = path.read_text(encoding="utf-8")
    except OSError as e:
      raise ChatTemplateError(f"chat template {path}: {e}") from e
    return ChatTemplate(source, special, str(path))
  source = _config_template(config.get("chat_template"), str(config_path))
  if source is None:
    return None
  return ChatTemplate(source, special, config_path)


__all__ = ["ChatTemplate", "ChatTemplateError", "load_chat_template"]
