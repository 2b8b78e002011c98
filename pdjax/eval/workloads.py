"""Seeded synthetic workloads with the length shapes of published datasets.

Prefill/decode disaggregation pays off or not depending on the input/output
length mix: long prompts with short answers (summarization) stress prefill and
the KV hand-off, short prompts with long answers (chat, code) stress decode.
So the driver ships named presets whose length distributions follow the
datasets DistServe (OSDI'24) evaluates on, plus two shapes that exercise
prefix reuse. Prompts are random token ids, so no tokenizer, dataset download
or network is needed, and a seed fixes the workload exactly.

Length shapes (all log-normal, i.e. ``median * exp(sigma * N(0, 1))``, then
clipped to ``[lo, hi]``, then multiplied by ``length_scale``). They are
hand-set approximations of the published histograms, not fits:

* ``chat`` -- ShareGPT conversations (the vLLM paper's Fig. 11 and DistServe's
  chatbot workload): right-skewed with a long tail. Input median 250 tokens,
  sigma 1.0 (p90 ~ 900, clipped at 4096); output median 200, sigma 0.9 (p90
  ~ 630, clipped at 2048).
* ``summarize`` -- LongBench summarization (GovReport / QMSum / MultiNews):
  thousands of input tokens, short outputs. Input median 3000, sigma 0.5,
  clipped to [1000, 12000]; output median 90, sigma 0.55, clipped to
  [16, 256].
* ``code`` -- HumanEval: a function signature and docstring in, a function
  body out. Input median 160, sigma 0.35, clipped to [64, 512] (p10-p90
  ~ 100-250); output median 180, sigma 0.35, clipped to [32, 512] (p10-p90
  ~ 115-280).
* ``multiturn`` -- ShareGPT-like conversations of 2-6 rounds; every round
  resends the whole history (previous prompts and replies) plus a new user
  message, with per-turn lengths drawn from the ``chat`` shapes. A
  conversation ends early once the next round would not fit
  ``max_model_len``. Turns of several conversations are interleaved (8 live
  at a time) so that consecutive requests rarely belong to one conversation.
* ``shared-prefix`` -- a 2048-token system prompt common to every request,
  followed by a short per-request question (median 64, sigma 0.8) and a
  chat-like output.

Length limits: after scaling, each request is made to fit ``max_model_len``
(prompt + max_tokens <= max_model_len) by first capping the output at
``max_model_len - 1`` and then truncating the prompt; the output length is
kept because it sets the decode work the preset is about.

Default SLOs are DistServe's (chatbot TTFT 0.25 s / TPOT 0.1 s, code
completion 0.125 / 0.2, summarization 15 / 0.15); ``multiturn`` and
``shared-prefix`` use the chat ones. They are absolute times for DistServe's
models and GPUs: scale them for other hardware.

JSONL / JSON datasets (``load_dataset``): ``{"prompt": "..."}`` lines
(optional ``"max_tokens"``), ``{"prompt_token_ids": [...]}`` lines, or
ShareGPT records ``{"conversations": [{"from": "human", "value": ...},
{"from": "gpt", "value": ...}, ...]}``, one per line or as one JSON array (the
original ShareGPT file). For ShareGPT the first human turn is the prompt and
the first gpt turn's token count is the target output length, when a
``count_tokens`` function is given.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass
class WorkItem:
  """One request to send. Exactly one of prompt_token_ids / prompt is set."""
  request_id: str
  max_tokens: int
  prompt_token_ids: list[int] | None = None
  prompt: str | None = None
  # Multiturn: the conversation and the 0-based round. Round k > 0 is sent
  # only after round k-1 finished.
  conversation_id: str | None = None
  turn: int | None = None
  # Multiturn, round k > 0: the tokens this round appends after the previous
  # round's reply (the new user message). The runner builds the prompt that
  # is actually sent from the previous round's *sent* prompt, its *generated*
  # tokens and these; ``prompt_token_ids`` holds a synthetic stand-in history
  # used only when the previous round failed.
  new_token_ids: list[int] | None = None
  # Known prompt length (token-id prompts, or text with a token counter).
  num_prompt_tokens: int | None = None
  # Position in the workload; the CLI derives per-request sampling seeds.
  index: int = 0

  def __post_init__(self):
    if (self.prompt_token_ids is None) == (self.prompt is None):
      raise ValueError(f"{self.request_id}: set exactly one of "
                       "prompt_token_ids and prompt")
    if self.num_prompt_tokens is None and self.prompt_token_ids is not None:
      self.num_prompt_tokens = len(self.prompt_token_ids)


@dataclasses.dataclass(frozen=True)
class LogNormal:
  """``median * exp(sigma * N(0,1))`` clipped to ``[lo, hi]`` (tokens)."""
  median: float
  sigma: float
  lo: int
  hi: int

  def sample(self, rng: np.random.Generator, n: int,
             scale: float = 1.0) -> np.ndarray:
    x = self.median * np.exp(self.sigma * rng.standard_normal(n))
    x = np.clip(x, self.lo, self.hi) * scale
    return np.maximum(1, np.round(x)).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Preset:
  """A named workload shape and its default SLOs (seconds)."""
  name: str
  description: str
  input_len: LogNormal
  output_len: LogNormal
  ttft_slo: float
  tpot_slo: float
  kind: str = "single"  # "single" | "multiturn" | "shared_prefix"
  # multiturn: rounds per conversation, uniform in [min_turns, max_turns];
  # conversations interleaved at a time.
  min_turns: int = 2
  max_turns: int = 6
  live_conversations: int = 8
  # shared_prefix: length of the common system prompt.
  prefix_len: int = 0


_CHAT_IN = LogNormal(median=250, sigma=1.0, lo=4, hi=4096)
_CHAT_OUT = LogNormal(median=200, sigma=0.9, lo=4, hi=2048)

PRESETS: dict[str, Preset] = {
    p.name: p for p in (
        Preset("chat", "ShareGPT-like chatbot", _CHAT_IN, _CHAT_OUT,
               ttft_slo=0.25, tpot_slo=0.1),
        Preset("summarize", "LongBench-like summarization",
               LogNormal(median=3000, sigma=0.5, lo=1000, hi=12000),
               LogNormal(median=90, sigma=0.55, lo=16, hi=256),
               ttft_slo=15.0, tpot_slo=0.15),
        Preset("code", "HumanEval-like code completion",
               LogNormal(median=160, sigma=0.35, lo=64, hi=512),
               LogNormal(median=180, sigma=0.35, lo=32, hi=512),
               ttft_slo=0.125, tpot_slo=0.2),
        Preset("multiturn", "ShareGPT-like multi-round conversations",
               _CHAT_IN, _CHAT_OUT, ttft_slo=0.25, tpot_slo=0.1,
               kind="multiturn"),
        Preset("shared-prefix", "one long system prompt, short questions",
               LogNormal(median=64, sigma=0.8, lo=4, hi=1024), _CHAT_OUT,
               ttft_slo=0.25, tpot_slo=0.1, kind="shared_prefix",
               prefix_len=2048),
    )
}


def get_preset(name: str) -> Preset:
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(f"unknown preset {name!r}; choose one of "
                     f"{sorted(PRESETS)}") from None


def fit_lengths(prompt_len: int, output_len: int,
                max_model_len: int) -> tuple[int, int]:
  """Caps output at max_model_len - 1, then truncates the prompt to fit."""
  if max_model_len < 2:
    raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
  out = max(1, min(output_len, max_model_len - 1))
  return max(1, min(prompt_len, max_model_len - out)), out


class _TokenSampler:
  """Uniform token ids from [min_id, vocab_size) minus the excluded ids."""

  def __init__(self, rng: np.random.Generator, vocab_size: int,
               exclude: Iterable[int], min_id: int):
    self._rng = rng
    self._ids = np.setdiff1d(np.arange(min_id, vocab_size, dtype=np.int64),
                             np.asarray(list(exclude), dtype=np.int64))
    if self._ids.size == 0:
      raise ValueError("no token ids left to sample from: vocab_size "
                       f"{vocab_size}, min_token_id {min_id}, all excluded")

  def __call__(self, n: int) -> list[int]:
    return self._ids[self._rng.integers(0, self._ids.size, n)].tolist()


def generate(preset: str | Preset, num_requests: int, *, vocab_size: int,
             max_model_len: int, seed: int = 0,
             exclude_token_ids: Iterable[int] = (), min_token_id: int = 0,
             length_scale: float = 1.0,
             max_tokens: int | None = None) -> list[WorkItem]:
  """A deterministic synthetic workload of ``num_requests`` items.

  Args:
    preset: a name in ``PRESETS`` or a ``Preset``.
    num_requests: number of requests (multiturn: rounds, all conversations
      together; the last conversation may be cut short).
    vocab_size: token ids are drawn from ``[min_token_id, vocab_size)``.
    max_model_len: every item satisfies prompt + max_tokens <= this.
    seed: fixes lengths and token ids. Lengths are drawn from their own
      stream, so the same seed gives the same shapes for any vocabulary.
    exclude_token_ids: never drawn (BOS/EOS/pad and other special ids).
    min_token_id: lowest id drawn.
    length_scale: multiplies every length (after clipping to the preset's
      range), e.g. 0.05 runs the shapes on a tiny CPU model.
    max_tokens: if set, replaces every sampled output length.
  """
  p = get_preset(preset) if isinstance(preset, str) else preset
  if num_requests < 0:
    raise ValueError(f"num_requests must be >= 0, got {num_requests}")
  if length_scale <= 0:
    raise ValueError(f"length_scale must be > 0, got {length_scale}")
  len_ss, tok_ss = np.random.SeedSequence(seed).spawn(2)
  len_rng = np.random.default_rng(len_ss)
  tokens = _TokenSampler(np.random.default_rng(tok_ss), vocab_size,
                         exclude_token_ids, min_token_id)

  def out_lens(n: int) -> np.ndarray:
    o = p.output_len.sample(len_rng, n, length_scale)
    return np.full(n, max_tokens) if max_tokens is not None else o

  if p.kind == "multiturn":
    return _multiturn(p, num_requests, len_rng, tokens, out_lens,
                      max_model_len, length_scale)
  items = []
  ins = p.input_len.sample(len_rng, num_requests, length_scale)
  outs = out_lens(num_requests)
  prefix: list[int] = []
  if p.kind == "shared_prefix":
    prefix = tokens(max(1, round(p.prefix_len * length_scale)))
  for i, (n_in, n_out) in enumerate(zip(ins.tolist(), outs.tolist())):
    n_prompt, n_out = fit_lengths(len(prefix) + n_in, n_out, max_model_len)
    own = tokens(max(0, n_prompt - len(prefix)))
    items.append(WorkItem(
        request_id=f"{p.name}-{i:06d}", max_tokens=n_out,
        prompt_token_ids=(prefix + own)[:n_prompt], index=i))
  return items


def _multiturn(p: Preset, num_requests: int, rng: np.random.Generator,
               tokens: _TokenSampler, out_lens: Callable[[int], np.ndarray],
               max_model_len: int, length_scale: float) -> list[WorkItem]:
  """Conversations whose rounds resend the history, interleaved."""

  def conversation(c: int) -> list[WorkItem]:
    n_turns = int(rng.integers(p.min_turns, p.max_turns + 1))
    user = p.input_len.sample(rng, n_turns, length_scale).tolist()
    outs = out_lens(n_turns).tolist()
    turns: list[WorkItem] = []
    history: list[int] = []
    for t in range(n_turns):
      n_user, n_out = user[t], outs[t]
      if t == 0:
        n_user, n_out = fit_lengths(n_user, n_out, max_model_len)
      elif len(history) + n_user + n_out > max_model_len:
        break  # out of context: the conversation ends here
      new = tokens(n_user)
      prompt = history + new
      turns.append(WorkItem(
          request_id="", max_tokens=n_out, prompt_token_ids=prompt,
          conversation_id=f"conv-{c:06d}", turn=t,
          new_token_ids=new if t else None))
      history = prompt + tokens(n_out)  # stand-in for the reply
    return turns

  pending: list[list[WorkItem]] = []  # live conversations' remaining rounds
  items: list[WorkItem] = []
  next_conv = 0
  while len(items) < num_requests:
    while len(pending) < p.live_conversations:
      pending.append(conversation(next_conv))
      next_conv += 1
    k = int(rng.integers(0, len(pending)))
    item = pending[k].pop(0)
    if not pending[k]:
      pending.pop(k)
    item.request_id = f"{p.name}-{len(items):06d}"
    item.index = len(items)
    items.append(item)
  return items


def _sharegpt_turns(conv: Sequence[dict[str, Any]]) -> tuple[str | None,
                                                              str | None]:
  human = gpt = None
  for m in conv:
    role = str(m.get("from", m.get("role", ""))).lower()
    text = m.get("value", m.get("content"))
    if role in ("human", "user") and human is None:
      human = text
    elif role in ("gpt", "assistant", "chatgpt") and human is not None:
      gpt = text
      break
  return human, gpt


def load_dataset(path: str | Path, *, num_requests: int | None = None,
                 seed: int = 0,
                 count_tokens: Callable[[str], int] | None = None,
                 default_max_tokens: int = 256,
                 max_tokens: int | None = None,
                 max_model_len: int | None = None) -> list[WorkItem]:
  """Work items from a JSONL (or JSON array) file; see the module docstring.

  Args:
    path: the file.
    num_requests: how many items; drawn in a seeded random order (cycling
      through the file again when it has fewer usable records). None: every
      record, in file order.
    seed: fixes that order.
    count_tokens: text -> token count. Used for ShareGPT output targets and to
      make prompts fit ``max_model_len``; without it text prompt lengths are
      unknown until the server reports usage.
    default_max_tokens: output budget when a record gives none.
    max_tokens: if set, replaces every record's output budget.
    max_model_len: with known prompt lengths, records whose prompt alone
      does not fit are dropped and the others' outputs are capped to fit.
  """
  text = Path(path).read_text()
  if text.lstrip().startswith("["):
    raw = json.loads(text)
  else:
    raw = [json.loads(line) for line in text.splitlines() if line.strip()]
  parsed: list[WorkItem] = []
  for rec in raw:
    prompt = ids = None
    n_out = rec.get("max_tokens")
    if "prompt_token_ids" in rec:
      ids = [int(t) for t in rec["prompt_token_ids"]]
    elif "prompt" in rec:
      prompt = str(rec["prompt"])
    elif "conversations" in rec:
      prompt, reply = _sharegpt_turns(rec["conversations"])
      if prompt is None:
        continue
      if n_out is None and reply is not None and count_tokens is not None:
        n_out = count_tokens(reply)
    else:
      continue
    n_out = max(1, int(max_tokens if max_tokens is not None else
                       n_out if n_out is not None else default_max_tokens))
    n_prompt = (len(ids) if ids is not None else
                count_tokens(prompt) if count_tokens is not None else None)
    if max_model_len is not None and n_prompt is not None:
      if n_prompt >= max_model_len:
        continue
      n_out = min(n_out, max_model_len - n_prompt)
    parsed.append(WorkItem(request_id="", max_tokens=n_out, prompt=prompt,
                           prompt_token_ids=ids, num_prompt_tokens=n_prompt))
  if not parsed:
    raise ValueError(f"{path}: no usable records")
  if num_requests is None:
    order = list(range(len(parsed)))
  else:
    rng = np.random.default_rng(seed)
    order = []
    while len(order) < num_requests:
      order.extend(rng.permutation(len(parsed)).tolist())
    order = order[:num_requests]
  items = []
  for i, k in enumerate(order):
    items.append(dataclasses.replace(parsed[k], request_id=f"req-{i:06d}",
                                     index=i))
  return items
