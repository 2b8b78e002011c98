"""What the launchers refuse at start-up, before serving anything: a model
served past its trained context, and a port another service already holds.
Each refusal is one clear line and a non-zero exit, never a traceback.

The processes here stop at their first checks (no weights are loaded, no
program compiled), so each costs an interpreter start and its imports.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pdjax.model.config import ModelConfig, RopeConfig, context_length_problem

_ROOT = Path(__file__).resolve().parents[1]


def _run(module: str, *args: str, timeout: float = 180
         ) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args],
                        capture_output=True, text=True, timeout=timeout,
                        cwd=_ROOT)


def _refused(out: subprocess.CompletedProcess) -> str:
  """The one-line refusal of a launcher that exited non-zero."""
  text = out.stdout + out.stderr
  assert out.returncode != 0, text[-3000:]
  assert "Traceback" not in text, text[-3000:]
  return out.stderr.strip().splitlines()[-1]


# ------------------------------------------------------- trained context
def _short_context_model(src: Path, dst: Path, n: int) -> Path:
  """The tiny model whose config.json says it was trained for ``n``
  positions."""
  dst.mkdir()
  for f in src.iterdir():
    if f.name != "config.json":
      (dst / f.name).symlink_to(f)
  cfg = json.loads((src / "config.json").read_text())
  cfg["max_position_embeddings"] = n
  (dst / "config.json").write_text(json.dumps(cfg))
  return dst


def test_a_model_is_not_served_past_its_trained_context(tiny_model_dir,
                                                        tmp_path):
  """pdjax/configs/deployments/test.toml serves 256 positions; a checkpoint
  trained for 128 is refused by the worker before it loads a weight."""
  ckpt = _short_context_model(tiny_model_dir, tmp_path / "short", 128)
  out = _run("pdjax.launch.decode", "--config=test", f"--checkpoint={ckpt}",
             "--mesh=dp=1", "--nowarmup")
  line = _refused(out)
  for part in ("max_seq_len 256", "max_position_embeddings 128",
               "--allow_long_max_seq_len"):
    assert part in line, line


def test_context_length_rule():
  cfg = ModelConfig(architecture="llama", vocab_size=8, hidden_size=8,
                    intermediate_size=8, num_layers=1, num_heads=1,
                    num_kv_heads=1, head_dim=8, max_position_embeddings=512)
  assert context_length_problem(cfg, 512) is None
  assert "max_position_embeddings 512" in context_length_problem(cfg, 1024)
  # Linear rope scaling stretches the trained positions by its factor (as
  # vLLM derives the model's length); llama3 scaling's config already
  # states the extended length.
  linear = cfg.replace(rope=RopeConfig(rope_type="linear", factor=2.0))
  assert context_length_problem(linear, 1024) is None
  assert context_length_problem(linear, 1025) is not None
  llama3 = cfg.replace(rope=RopeConfig(rope_type="llama3", factor=8.0))
  assert context_length_problem(llama3, 1024) is not None


# ------------------------------------------------------------ port in use
@pytest.fixture
def held_port():
  """A port a gRPC server listens on, with gRPC's default options: it sets
  SO_REUSEPORT, as every pdjax service did, so a second process that sets
  it too could bind the same port and share its connections."""
  from concurrent import futures

  import grpc
  server = grpc.server(futures.ThreadPoolExecutor(1))
  port = server.add_insecure_port("127.0.0.1:0")
  server.start()
  yield port
  server.stop(0)


# The test deployment throughout: the default one's model is SmolLM2,
# whose tokenizer (a 49,152-token vocabulary parsed from its GGUF) the
# router and the gateway would load before binding, 4 s of each start.
@pytest.mark.parametrize("module, args", [
    ("pdjax.launch.router", ["--config=test",
                             "--decode_workers=127.0.0.1:1"]),
    ("pdjax.launch.decode", ["--config=test", "--mesh=dp=1",
                             "--nowarmup"]),
    ("pdjax.launch.gateway", ["--config=test", "--router=127.0.0.1:1",
                              "--wait_router_s=0"]),
])
def test_a_port_in_use_is_refused(held_port, module, args):
  line = _refused(_run(module, "--host=127.0.0.1", f"--port={held_port}",
                       *args))
  assert f"127.0.0.1:{held_port}" in line and "in use" in line, line


def test_the_local_launcher_refuses_a_port_in_use_in_one_line(held_port):
  """Before starting anything: exit status 2 (the deployment cannot run as
  asked) and one line naming the port, no traceback."""
  out = _run("pdjax.launch.local", "--config=test", f"--port={held_port}")
  assert out.returncode == 2, out.stdout + out.stderr
  line = _refused(out)
  assert line.startswith("pdjax.launch.local: "), line
  assert f"127.0.0.1:{held_port}" in line and "in use" in line, line


def test_the_router_and_gateway_start_without_jax(tiny_model_dir):
  """The router and the gateway run no programs: importing them, and
  loading the model's tokenizer as they do at start, loads no JAX (1.5 s
  of every start, and a backend they must not hold)."""
  code = ("import sys, pdjax.launch.router, pdjax.launch.gateway, "
          "pdjax.launch.kvstore; "
          "from pdjax.model.registry import resolve_checkpoint; "
          "from pdjax.tokenizer import Tokenizer; "
          "Tokenizer.from_checkpoint(resolve_checkpoint('tiny')); "
          "print(sorted(m for m in ('jax', 'jaxlib') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=120, check=True).stdout
  assert out.strip() == "[]", out
