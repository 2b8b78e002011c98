"""Shared pytest setup: a CPU "cluster" of 8 virtual devices, tiny HF models.

The XLA flags must be in the environment before jax is first imported, which
is why they are set here at import time rather than in a fixture. Both use
``setdefault``-style updates, so a GPU run can override them, e.g.
``JAX_PLATFORMS=cuda pytest ...``.

torch and transformers are imported lazily inside the fixture: most tests do
not need them, and importing torch costs seconds.
"""

from __future__ import annotations

import os

_DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " " + _DEVICE_FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiling is most of the suite's time on a cold cache (as on CI), and the
# tests' programs are tiny: LLVM's optimisations cost more than they save.
# Comparisons with the reference use tolerances derived from the arithmetic,
# not from one compiler's rounding, and every worker a test starts inherits
# the setting, so programs compared across processes are compiled alike.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"


def _xla_check(flags: str):
  """Starts trying whether the installed jaxlib's XLA accepts ``flags`` (an
  unknown flag in XLA_FLAGS aborts the process) in a child process, since
  they must be set before this one imports jax; ``_accepted`` waits for
  the answer, so that this process imports the rest meanwhile (the child
  takes a second, most of it importing jax). The test processes xdist
  starts inherit the result with the environment."""
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  try:
    return subprocess.Popen(
        [sys.executable, "-c", "import jax; jax.devices()"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  except OSError:
    return None


def _accepted(check) -> bool:
  import subprocess
  if check is None:
    return False
  try:
    return check.wait(timeout=120) == 0
  except subprocess.TimeoutExpired:
    check.kill()
    check.wait()
    return False


# Two more settings of XLA:CPU's code generation, most of a compile at
# that level: the MLIR fusion emitters take twice the time of the classic
# elemental emitters for these programs (the compile of a test deployment's
# decode worker warm-up: 12.7 CPU-s -> 5.9), and splitting a module's code
# generation over threads only adds work on the suite's two cores (-> 5.0).
# Both choose how a program is turned into machine code, not what it
# computes, and are inherited like the flag above. Added below, once the
# check has answered.
_CODEGEN_FLAGS = ("--xla_cpu_use_fusion_emitters=false "
                  "--xla_cpu_parallel_codegen_split_count=1")
_CODEGEN_CHECK = (
    None if ("xla_cpu_use_fusion_emitters" in os.environ["XLA_FLAGS"]
             or "xla_cpu_parallel_codegen_split_count"
             in os.environ["XLA_FLAGS"])
    else _xla_check(_CODEGEN_FLAGS))

# Persistent XLA compilation cache. Engine tests build many engines whose
# programs are identical (same shapes, same devices) but belong to different
# jit objects, so each would compile again; with the cache a repeat is a file
# read, within a run and across runs. Compiles of a few seconds each are most
# of the suite's time on CPU. JAX reads these variables when it is imported;
# set JAX_COMPILATION_CACHE_DIR yourself, or JAX_ENABLE_COMPILATION_CACHE=false,
# to override.
if os.environ.get("PDJAX_CACHE"):
  _JAX_CACHE = os.path.join(os.path.expanduser(os.environ["PDJAX_CACHE"]),
                            "jax_compilation_cache")
else:
  _JAX_CACHE = os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), ".pytest_cache", "jax_compilation_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _JAX_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# Property tests draw the same examples on every run (CI must not fail by
# chance); set HYPOTHESIS_PROFILE=explore locally to search with new seeds.
from hypothesis import settings as _hyp_settings  # noqa: E402

_hyp_settings.register_profile("pdjax", derandomize=True, deadline=None)
_hyp_settings.register_profile("explore", deadline=None)
_hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "pdjax"))

import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import pytest  # noqa: E402

if _accepted(_CODEGEN_CHECK):    # before anything here imports jax
  os.environ["XLA_FLAGS"] += " " + _CODEGEN_FLAGS

# Small dims shared by the random-weight models unless a test overrides them.
TINY_DIMS = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
)

_HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


def _randomize_(model, seed: int) -> None:
  """Gives a fresh HF model weights that exercise every code path.

  HF's default init (std 0.02, unit norms, zero biases) makes logits nearly
  flat, so greedy decoding is a coin toss between near-ties and a dropped norm
  or bias goes unnoticed. Instead: norms are 1 + noise, biases are nonzero,
  projections are scaled by 1/sqrt(fan_in) so activations stay O(1), and the
  embedding/LM head are large enough that logits spread over several units.
  """
  import torch
  g = torch.Generator().manual_seed(seed)
  # A tied LM head scores each token against its own embedding, which sits in
  # the residual stream: a large embedding makes greedy decoding repeat the
  # input token forever. Keep it small relative to the layers' outputs.
  embed_std = 0.1 if model.config.tie_word_embeddings else 0.5
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
      if "norm" in name:
        p.copy_(1.0 + 0.1 * noise)
      elif name.endswith("bias"):
        p.copy_(0.1 * noise)
      elif "embed_tokens" in name:
        p.copy_(embed_std * noise)
      elif "lm_head" in name:
        p.copy_(0.3 * noise)
      else:
        p.copy_(noise / p.shape[-1] ** 0.5)


@pytest.fixture(scope="session")
def hf_model_dir_factory(tmp_path_factory) -> Callable[..., Path]:
  """Builds (once per argument set) a random-weight HF model directory.

  Usage: ``hf_model_dir_factory("llama", max_shard_size="40KB",
  num_hidden_layers=3, rope_scaling={...})``. ``arch`` is one of
  "llama", "mistral", "qwen2"; other keyword arguments override the config
  fields in ``TINY_DIMS``; ``max_shard_size`` (passed to ``save_pretrained``)
  makes a sharded checkpoint with an index file; ``seed`` picks the weights.
  EOS is disabled in the saved config and generation config so that
  ``generate`` always produces ``max_new_tokens`` tokens.
  """
  cache: dict[str, Path] = {}

  def build(arch: str, *, seed: int = 0, max_shard_size: str | None = None,
            **overrides: Any) -> Path:
    key = json.dumps([arch, seed, max_shard_size, overrides], sort_keys=True)
    if key in cache:
      return cache[key]
    import torch
    import transformers
    cfg_name, model_name = _HF_CLASSES[arch]
    fields = {**TINY_DIMS, "bos_token_id": 1, "eos_token_id": None,
              "pad_token_id": 0, **overrides}
    hf_cfg = getattr(transformers, cfg_name)(**fields)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(hf_cfg).to(torch.float32)
    _randomize_(model, seed)
    if hf_cfg.tie_word_embeddings:
      model.tie_weights()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    out = tmp_path_factory.mktemp(f"hf_{arch}")
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **kw)
    cache[key] = out
    return out

  return build


# --------------------------------------------- two test processes (xdist)
# tools/run_tests.sh runs the suite in two pytest-xdist workers with
# ``--dist loadgroup``. Each group below runs whole in one worker, so module
# fixtures (engines, deployments) are made once, and groups are handed out
# heaviest first, so that neither worker is left with a long one at the end.
#
# A group is a file, except the files that start deployments (several
# processes each): those are two groups, each running its files one after
# another, and balanced so that the two workers finish together. With the
# suite's CPU shared out this way, the two groups overlap only partly;
# the services' latency bounds (e.g. "cancel frees the row") are loose
# enough for a deployment that shares the two cores with another's.
#
# The grouping is done by the scheduler below rather than by xdist_group
# marks: xdist's loadgroup reads those through the test ids it rewrites,
# which pytest 9.2 no longer lets it do, and then every test is scheduled
# on its own (fixtures made in both workers).
_DEPLOYMENT_GROUPS = {
    "test_services.py": "deployments-a",
    "test_prefix_cache_services.py": "deployments-a",
    "test_elastic.py": "deployments-a",
    "test_batch_eval_e2e.py": "deployments-b",
    "test_reliability.py": "deployments-b",
    "test_security.py": "deployments-b",
    "test_kv_router.py": "deployments-b",
    "test_gateway.py": "deployments-b",
    "test_kv_sharing_cluster.py": "deployments-b",
    "test_chaos.py": "deployments-b",
}
# Handed out in this order (longest first, the two deployment groups apart);
# groups not named here come after, in collection order.
_HEAVY_GROUPS = ("deployments-a", "test_engines.py", "deployments-b",
                 "test_benchmarks_smoke.py", "test_prefix_cache.py",
                 "test_reference.py")


def _group(file_name: str) -> str:
  return _DEPLOYMENT_GROUPS.get(file_name, file_name)


def _group_rank(file_name: str) -> int:
  group = _group(file_name)
  return (_HEAVY_GROUPS.index(group) if group in _HEAVY_GROUPS
          else len(_HEAVY_GROUPS))


def pytest_collection_modifyitems(config, items):
  # Heavy groups first; the order within a file is kept (sort is stable).
  items.sort(key=lambda item: _group_rank(item.path.name))


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """``--dist loadgroup`` as described above: xdist's scheduler of whole
  scopes, a scope being the test's group; scopes in collection order."""
  if config.getvalue("dist") != "loadgroup":
    return None
  from xdist.scheduler import LoadScopeScheduling

  class GroupScheduling(LoadScopeScheduling):

    def _split_scope(self, nodeid: str) -> str:
      return _group(nodeid.split("::", 1)[0].rsplit("/", 1)[-1])

  config.option.loadscopereorder = False     # keep the order given above
  return GroupScheduling(config, log)


# ------------------------------------------------- the default tiny model
@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
  """pdjax-tiny as a Hugging Face directory (made once, kept on disk)."""
  from pdjax.model.tiny import ensure_tiny_model
  return ensure_tiny_model()


@pytest.fixture(scope="session")
def tiny_decode_params(tiny_model_dir):
  """(params, cfg, mesh, rules) of the tiny model on a one-device
  ``decode_dp`` mesh, the layout most engine tests decode in."""
  import jax
  from pdjax.engine.setup import load_sharded
  from pdjax.sharding import ShardingRules, make_mesh
  rules = ShardingRules.load("decode_dp")
  mesh = make_mesh({"dp": 1}, jax.devices()[:1])
  params, cfg = load_sharded(tiny_model_dir, rules, mesh)
  return params, cfg, mesh, rules
