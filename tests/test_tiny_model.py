"""Tests of the built-in pdjax-tiny model, its registry entry and its tool.

The model is the fixture most other tests will stand on, so this checks what
they rely on: it is bit-for-bit reproducible, it is a genuine Hugging Face
checkpoint (transformers computes the same logits as pdjax), its tokenizer
round-trips, and greedy decoding from it does not collapse into a loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import tomllib
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from pdjax.model import llama, registry, tiny, weights
from pdjax.model.config import ModelConfig
from pdjax.tokenizer import IncrementalDetokenizer, Tokenizer
from tolerances import assert_close, logit_weights

REPO = Path(__file__).resolve().parents[1]

# Digests of the v1 recipe. If one changes, the model changed: bump
# tiny.TINY_MODEL_VERSION (caches trust existing directories) and update.
WEIGHTS_SHA256 = (
    "256445b7e77b240169c95c1f1e73c5f53f64b2425cd930e19a08e6181070d668")
TOKENIZER_SHA256 = (
    "e286ce9f86de694494cf7d4764a74fdd61b681223298bb161f95fb6ab5e16c05")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
  return tiny.ensure_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def cfg(model_dir) -> ModelConfig:
  return ModelConfig.from_hf_dir(model_dir)


@pytest.fixture(scope="module")
def params(model_dir, cfg):
  return weights.load_hf_params(model_dir, cfg)


@pytest.fixture(scope="module")
def tok(model_dir, cfg) -> Tokenizer:
  return Tokenizer.from_dir(model_dir, cfg)


def _weights_digest(path: Path) -> str:
  tensors = load_file(str(path / "model.safetensors"))
  h = hashlib.sha256()
  for name in sorted(tensors):
    t = tensors[name]
    h.update(f"{name}:{t.dtype}:{t.shape};".encode())
    h.update(np.ascontiguousarray(t).tobytes())
  return h.hexdigest()


def _tokenizer_digest(path: Path) -> str:
  model = json.loads((path / "tokenizer.json").read_text())["model"]
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  blob = json.dumps([sorted(model["vocab"].items(), key=lambda kv: kv[1]),
                     merges], ensure_ascii=False)
  return hashlib.sha256(blob.encode()).hexdigest()


# ------------------------------------------------------------------ contents
def test_directory_is_a_hf_checkpoint(model_dir, cfg):
  assert sorted(os.listdir(model_dir)) == sorted(tiny.TINY_MODEL_FILES)
  assert cfg.replace(name=tiny.TINY_MODEL_NAME) == tiny.tiny_config()
  assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers) == (512, 128, 2)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (8, 4, 16)
  assert not cfg.tie_word_embeddings and cfg.dtype == "float32"
  gen = json.loads((model_dir / "generation_config.json").read_text())
  assert (gen["bos_token_id"], gen["eos_token_id"]) == (0, 1)
  tcfg = json.loads((model_dir / "tokenizer_config.json").read_text())
  assert (tcfg["bos_token"], tcfg["eos_token"], tcfg["pad_token"]) == (
      "<|bos|>", "<|eos|>", "<|pad|>")
  assert tcfg["model_max_length"] == 2048


def test_build_is_deterministic(model_dir, tmp_path):
  again = tiny.ensure_tiny_model(tmp_path / "again")
  for name in tiny.TINY_MODEL_FILES:
    assert (model_dir / name).read_bytes() == (again / name).read_bytes(), name


def test_recipe_is_pinned(model_dir):
  assert _weights_digest(model_dir) == WEIGHTS_SHA256
  assert _tokenizer_digest(model_dir) == TOKENIZER_SHA256


def test_weight_statistics():
  x = tiny._bitexact_normal(0, "probe", (200_000,))
  assert abs(x.mean()) < 0.01 and abs(x.std() - 1.0) < 0.01
  assert np.abs(x).max() <= np.sqrt(3.0) * 2
  p = tiny.tiny_params()
  assert abs(p["embed"].std() - 1.0) < 0.02
  assert abs(p["layers"]["attn_norm"].mean() - 1.0) < 0.05


# ------------------------------------------------------------------ loading
def test_transformers_and_pdjax_logits_match(model_dir, cfg, params, tok):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf = transformers.LlamaForCausalLM.from_pretrained(
      str(model_dir), dtype=torch.float32).eval()
  rng = np.random.default_rng(0)
  batch = np.stack([
      np.array(tok.encode("The bus to the coast leaves at 8:42. 京都 😀")
               [:24]),
      rng.integers(0, cfg.vocab_size, 24),
  ])
  with torch.no_grad():
    want = hf(torch.tensor(batch)).logits.numpy()
  got = np.asarray(llama.reference_forward(params, jnp.asarray(batch),
                                           cfg=cfg))
  assert np.abs(want).max() > 1.0  # Logits are not vanishingly small.
  # torch's kernels against XLA's: the same sums in other orders.
  assert_close(got, want, logit_weights(cfg, batch.shape[1]),
               err_msg="logits")
  # transformers' tokenizer agrees with ours, BOS included.
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
  for text in ["Hello world", "café 京都 😀 3.50", "", " <|eos|> x\n"]:
    assert tok.encode(text) == hf_tok(text)["input_ids"], text
  # Where the text already starts with BOS, transformers doubles it; we don't.
  assert hf_tok("<|bos|>x")["input_ids"] == [0] + tok.encode("<|bos|>x")
  assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (
      0, 1, 2)
  # Its chat template (tokenizer_config.json) renders for transformers as
  # for the gateway.
  from pdjax.gateway.chat_template import load_chat_template
  chat = [{"role": "system", "content": "Be brief."},
          {"role": "user", "content": "Hi"}]
  want = hf_tok.apply_chat_template(chat, tokenize=False,
                                    add_generation_prompt=True)
  assert want == "<|bos|>System: Be brief.\nUser: Hi\nAssistant:"
  assert load_chat_template(None, model_dir).render(chat) == want


def test_tokenizer(tok, model_dir):
  assert tok.vocab_size == 512
  assert (tok.bos_token_id, tok.eos_token_ids) == (0, (1,))
  corpus = tiny.CORPUS_PATH.read_text(encoding="utf-8")
  assert 30_000 <= len(corpus.encode()) <= 60_000
  for text in [corpus[:2000], "Zürich, São Paulo, 東京, 你好 😀", "\x00\x7f"]:
    ids = tok.encode(text)
    assert ids[0] == 0 and max(ids) < 512
    assert tok.decode(ids) == text
  # The BPE learned English: the corpus compresses well.
  assert len(tok.encode(corpus, add_bos=False)) < len(corpus) / 2


def test_training_is_deterministic():
  a = tiny.train_tiny_tokenizer().to_str(pretty=True)
  b = tiny.train_tiny_tokenizer().to_str(pretty=True)
  assert a == b


# ------------------------------------------------------------------ behaviour
def _greedy(params, cfg, prompts: list[list[int]], steps: int) -> np.ndarray:
  """Greedy decoding by re-running prefill on a fixed-size padded buffer."""
  width = max(map(len, prompts)) + steps
  buf = np.zeros((len(prompts), width), np.int32)
  lens = np.array([len(p) for p in prompts], np.int32)
  for i, p in enumerate(prompts):
    buf[i, :len(p)] = p
  for _ in range(steps):
    logits = llama.prefill_forward(params, jnp.asarray(buf), jnp.asarray(lens),
                                   cfg=cfg).logits
    nxt = np.asarray(jnp.argmax(logits, axis=-1))
    buf[np.arange(len(prompts)), lens] = nxt
    lens += 1
  return np.stack([buf[i, len(p):len(p) + steps]
                   for i, p in enumerate(prompts)])


def test_greedy_output_is_not_degenerate(params, cfg, tok):
  prompts = ["The bus", "Once a week I", "Hello", "1, 2, 3,"]
  out = _greedy(params, cfg, [tok.encode(p) for p in prompts], steps=32)
  for row in out:
    assert len(set(row.tolist())) >= 16, row
    tail = row[-16:].tolist()
    for period in range(1, 5):
      assert tail[period:] != tail[:-period], (period, row)
  # Different prompts lead to different continuations.
  assert len({tuple(r) for r in out.tolist()}) == len(prompts)
  # And the stream decodes to the same text as a whole.
  det = IncrementalDetokenizer(tok)
  text = "".join(det.push([t]) for t in out[0].tolist()) + det.flush()
  assert text == tok.decode(out[0].tolist())


# ------------------------------------------------------------------ caching
def test_ensure_is_cheap_when_present(model_dir):
  before = {f: (model_dir / f).stat().st_mtime_ns
            for f in tiny.TINY_MODEL_FILES}
  assert tiny.ensure_tiny_model(model_dir) == model_dir
  assert before == {f: (model_dir / f).stat().st_mtime_ns
                    for f in tiny.TINY_MODEL_FILES}


def test_ensure_races_and_leaves_no_temp_dirs(tmp_path):
  target = tmp_path / "raced"
  results, errors = [], []

  def build():
    try:
      results.append(tiny.ensure_tiny_model(target))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=build) for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and results == [target] * 3
  assert tiny.is_complete(target)
  assert os.listdir(tmp_path) == ["raced"]  # Losers cleaned up after.


def test_ensure_refuses_a_foreign_directory(tmp_path):
  (tmp_path / "junk.txt").write_text("x")
  with pytest.raises(FileExistsError, match="not a complete pdjax-tiny"):
    tiny.ensure_tiny_model(tmp_path)
  empty = tmp_path / "empty"
  empty.mkdir()
  assert tiny.is_complete(tiny.ensure_tiny_model(empty))


def test_default_location(monkeypatch, tmp_path):
  monkeypatch.setenv("PDJAX_CACHE", str(tmp_path))
  want = tmp_path / "models" / "pdjax-tiny-v2"
  assert tiny.default_tiny_model_dir() == want
  monkeypatch.delenv("PDJAX_CACHE")
  assert tiny.default_tiny_model_dir() == (
      Path.home() / ".cache" / "pdjax" / "models" / "pdjax-tiny-v2")


# ------------------------------------------------------------------ registry
def test_resolve_checkpoint(monkeypatch, tmp_path, model_dir):
  monkeypatch.setenv("PDJAX_CACHE", str(tmp_path / "cache"))
  want = tmp_path / "cache" / "models" / "pdjax-tiny-v2"
  monkeypatch.setattr(tiny, "write_tiny_model", _copy_from(model_dir))
  for spec in ("tiny", "builtin:tiny", "pdjax-tiny", "builtin:pdjax-tiny"):
    assert registry.resolve_checkpoint(spec) == want
  assert tiny.is_complete(want)
  assert registry.resolve_checkpoint(str(model_dir)) == model_dir
  assert registry.resolve_checkpoint(model_dir) == model_dir
  with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
    registry.resolve_checkpoint(str(tmp_path / "missing"))
  with pytest.raises(NotADirectoryError, match="is a file"):
    registry.resolve_checkpoint(str(model_dir / "config.json"))
  with pytest.raises(ValueError, match="unknown built-in model 'huge'"):
    registry.resolve_checkpoint("builtin:huge")
  with pytest.raises(ValueError, match="empty model spec"):
    registry.resolve_checkpoint(" ")


def _copy_from(src: Path):
  def write(path):
    for name in tiny.TINY_MODEL_FILES:
      (Path(path) / name).write_bytes((src / name).read_bytes())
    return Path(path)
  return write


def test_tiny_toml_names_the_builtin(monkeypatch, tmp_path, model_dir):
  from pdjax import resources
  spec = tomllib.loads(resources.read("model", "tiny")[0])
  assert spec["name"] == tiny.TINY_MODEL_NAME
  assert (spec["dtype"], spec["max_seq_len"], spec["page_size"]) == (
      "float32", 1024, 16)
  monkeypatch.setenv("PDJAX_CACHE", str(tmp_path))
  monkeypatch.setattr(tiny, "write_tiny_model", _copy_from(model_dir))
  assert tiny.is_complete(registry.resolve_checkpoint(spec["source"]))


def test_make_tiny_model_tool(tmp_path, model_dir):
  """The CLI, run as users run it (a subprocess: its absl flags stay out of
  the test process)."""
  import subprocess
  import sys
  out = tmp_path / "out"
  out.mkdir()
  for name in tiny.TINY_MODEL_FILES:  # pre-filled: the tool must notice
    (out / name).write_bytes((model_dir / name).read_bytes())
  proc = subprocess.run(
      [sys.executable, str(REPO / "tools" / "make_tiny_model.py"),
       f"--out={out}"], capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == [
      f"pdjax-tiny-v2 already present: {out}"]
  assert tiny.is_complete(out)
