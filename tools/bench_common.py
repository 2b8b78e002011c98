r"""Shared pieces of pdjax's engine benchmarks (``tools/bench_*.py``).

Every benchmark answers one question: how close does an engine program come
to what the hardware allows? So every tool does the same four things, and
they live here so the tools agree on them:

* **Model presets** (``--model``): ``llama3-8b`` and ``llama3-1b`` shapes with
  random bf16 weights made on their devices (``llama.init_params`` with
  shardings: an 8B model never passes through host memory), the built-in
  ``tiny`` config for CPU, or ``custom`` (a Hugging Face ``config.json``).
* **Limits** the ratios are taken against. ``--hbm_bw`` and ``--matmul_flops``
  default to the ceilings measured on an H100 SXM through JAX 0.11.2
  (2.55e12 B/s read+write of an elementwise op, 689e12 FLOP/s bf16 matmul
  of 8192^3); ``--spec_hbm_bw``/``--spec_matmul_flops`` to the H100 SXM
  datasheet (3.35e12, 989e12). The measured defaults apply only on a device
  whose kind matches ``--limits_device`` (H100 by default) unless a flag is
  given: on CPU, or on an H200, the ratios print as "n/a" rather than as a
  ratio against some other chip's numbers. Datasheet figures of H200 and
  H100 PCIe are known and used when the device is one of them.
  ``--measure_ceilings`` measures both rates in the same run (an elementwise
  pass and a square matmul), and every ratio then also has a column against
  this run's own ceiling: the fairest comparison on any card.
* **Records**: one JSON line per measurement (``--out``, appended and flushed
  as each is made, so a run killed by a timeout keeps what it measured), with
  every parameter, the device kind, JAX version, XLA flags, date and a run id.
* **Timing**: warm-up calls first (the first call compiles; its time is
  recorded separately as ``compile_s``), then ``--repeat`` timed calls that
  each block until the result is ready; the median is the figure reported.

Also a correctness check run before the GPU benchmarks (``python
tools/bench_common.py --check``): a small random bf16 Llama is prefilled by
``PrefillEngine`` and decoded by ``DecodeEngine``; every token's logprob must
match a full forward pass (``llama.reference_forward``) over prompt + tokens,
and each token must be the reference's argmax within the tolerance. A fast
engine that computes the wrong thing must not produce a benchmark table.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  # The GPU machine runs a copy of the working tree without installing it.
  sys.path.insert(0, str(REPO_ROOT))

# Several CPU devices so tensor parallelism and device-to-device copies can be
# exercised on a CPU-only machine. This flag only shapes the host platform: on
# a GPU machine jax.devices() still lists the GPUs. It must be set before
# jax is imported, hence at import time of this module, which every tool
# imports before jax.
if "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4"
                             ).strip()

from absl import flags  # noqa: E402

FLAGS = flags.FLAGS

# Measured on an H100 SXM through JAX 0.11.2.
H100_MEASURED_HBM_BW = 2.55e12      # B/s, read+write bytes of an elementwise op
H100_MEASURED_MATMUL = 689e12       # FLOP/s, bf16 8192^3
# Datasheet figures by device kind (substring match, first hit wins).
SPEC_LIMITS = (
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100", 3.35e12, 989e12),
    ("H200", 4.8e12, 989e12),
)

MODEL_PRESETS = ("tiny", "llama3-8b", "llama3-1b", "custom")


def define_common_flags() -> None:
  """Flags every benchmark takes. Called once by each tool at import time
  (each tool is its own process, so flag names never clash)."""
  flags.DEFINE_enum("model", "tiny", MODEL_PRESETS,
                    "Model shapes: tiny (built-in, CPU), llama3-8b, llama3-1b "
                    "(random bf16 weights) or custom (--model_config).")
  flags.DEFINE_string("model_config", None,
                      "For --model=custom: a Hugging Face config.json or the "
                      "directory holding it.")
  flags.DEFINE_string("dtype", None,
                      "Override the preset's weight/KV dtype (bfloat16, "
                      "float32, float16).")
  flags.DEFINE_integer("seed", 0, "Seed of the random weights and inputs.")
  flags.DEFINE_enum("weight_dtype", "", ["", "fp8"],
                    "fp8: the layers' projections quantized to float8 e4m3 "
                    "with per-output-channel scales, as a pool with "
                    "weight_dtype = \"fp8\" loads them (tools that build "
                    "their weights with bc.benchmark_weights).")
  flags.DEFINE_bool("fuse_projections", False,
                    "q/k/v and gate/up joined into one matrix each, as a "
                    "decode pool with fuse_projections = true stores them.")
  flags.DEFINE_bool("unroll_layers", False,
                    "Probe: every layer's weights as an array of its own "
                    "(``llama.per_layer``), so the layer loops run unrolled "
                    "(one call per layer) instead of as a lax.scan over "
                    "the stacked weights, FP8 or not.")
  flags.DEFINE_bool("scan_unroll", False,
                    "Probe: the layer loops as lax.scan(..., unroll=True) "
                    "over the stacked weights (straight-line code reading "
                    "each layer's slice) instead of a loop.")
  flags.DEFINE_bool("fp8_activations", False,
                    "With --weight_dtype=fp8: the projections read FP8 "
                    "activations too, each token by its own scale (W8A8, "
                    "activation_dtype = \"float8_e4m3fn\"): FP8 GEMMs.")
  flags.DEFINE_string("out", None,
                      "JSON-lines file the records are appended to.")
  flags.DEFINE_integer("warmup", 2, "Untimed calls after the compiling one.")
  flags.DEFINE_integer("repeat", 5, "Timed samples; the median is reported.")
  flags.DEFINE_float("hbm_bw", H100_MEASURED_HBM_BW,
                     "HBM bandwidth limit in B/s. Default: measured on H100 "
                     "(read+write elementwise bytes / time).")
  flags.DEFINE_float("matmul_flops", H100_MEASURED_MATMUL,
                     "bf16 matmul limit in FLOP/s per device. Default: "
                     "measured on H100 (8192^3).")
  flags.DEFINE_float("spec_hbm_bw", 3.35e12,
                     "Datasheet HBM bandwidth (B/s); default H100 SXM.")
  flags.DEFINE_float("spec_matmul_flops", 989e12,
                     "Datasheet dense bf16 FLOP/s; default H100 SXM.")
  flags.DEFINE_string("limits_device", "H100",
                      "The measured-limit defaults apply only when the device "
                      "kind contains this (and is not a PCIe card); elsewhere "
                      "ratios are n/a unless the limit flags are given.")
  flags.DEFINE_bool("measure_ceilings", False,
                    "Also measure HBM bandwidth and matmul rate in this run "
                    "and report ratios against them.")
  flags.DEFINE_integer("ceiling_hbm_mib", None,
                       "Array size of the bandwidth measurement (default "
                       "2048 MiB on GPU, 64 on CPU).")
  flags.DEFINE_integer("ceiling_matmul_n", None,
                       "Matmul size n of n^3 (default 8192 on GPU, 512 on "
                       "CPU).")


# ------------------------------------------------------------------ models
def preset_config(name: str, *, model_config: str | None = None,
                  dtype: str | None = None):
  """The ModelConfig of a preset (``--model``)."""
  from pdjax.model.config import ModelConfig
  from pdjax.model.presets import preset_config as named_preset
  if name != "custom":
    cfg = named_preset(name)
  else:
    if not model_config:
      raise ValueError("--model=custom needs --model_config (a config.json "
                       "or its directory)")
    path = Path(model_config)
    if path.is_dir():
      cfg = ModelConfig.from_hf_dir(path)
    else:
      cfg = ModelConfig.from_hf_dict(json.loads(path.read_text()),
                                     source=str(path), name=path.parent.name)
  if dtype:
    cfg = cfg.replace(dtype=dtype)
  return cfg


def model_from_flags():
  return preset_config(FLAGS.model, model_config=FLAGS.model_config,
                       dtype=FLAGS.dtype)


def random_params(cfg, rules, mesh, seed: int = 0, std: float = 0.02):
  """Random weights born in ``rules``' layout on ``mesh`` (never on host)."""
  import jax
  from pdjax.engine.setup import param_shardings
  from pdjax.model import llama
  params = llama.init_params(cfg, seed, std=std,
                             shardings=param_shardings(cfg, rules, mesh))
  jax.block_until_ready(params)
  return params


def benchmark_weights(cfg, rules, mesh, seed: int = 0):
  """(params, cfg): random weights in ``rules``' layout, quantized as
  ``--weight_dtype`` says (the returned config says so too); the probes'
  ``--unroll_layers`` (weights split per layer) and ``--scan_unroll`` (the
  model's layer loops unrolled, for this process) applied here, where every
  tool that times the model builds its weights."""
  import jax
  params = random_params(cfg, rules, mesh, seed=seed)
  if getattr(FLAGS, "fuse_projections", False):
    from pdjax.engine.setup import fuse_sharded
    params, cfg = fuse_sharded(params, cfg, rules, mesh)
    jax.block_until_ready(params)
  if FLAGS.weight_dtype:
    from pdjax.engine.setup import quantize_sharded
    from pdjax.model.quant import FP8
    params, cfg = quantize_sharded(
        params, cfg, rules, mesh, FP8,
        FP8 if FLAGS.fp8_activations else None)
    jax.block_until_ready(params)
  if getattr(FLAGS, "unroll_layers", False):
    params = unstack_layers(params, cfg.num_layers)
  if getattr(FLAGS, "scan_unroll", False):
    unroll_layer_scans()
  return params, cfg


def unroll_layer_scans() -> None:
  """``llama.scan_layers`` made to unroll its scans (``unroll=True``): the
  same stacked weights, straight-line code."""
  import jax
  from pdjax.model import llama
  looped = llama.scan_layers
  if getattr(looped, "unrolled", False):
    return

  def scan_layers(layer, carry, layers, xs=None):
    if llama.per_layer(layers):
      return looped(layer, carry, layers, xs)
    return jax.lax.scan(layer, carry, layers if xs is None else (layers, xs),
                        unroll=True)
  scan_layers.unrolled = True
  llama.scan_layers = scan_layers


def unstack_layers(params, num_layers: int):
  """``params`` with every stacked layer weight split into one array per
  layer (a list, as ``llama.per_layer`` reads it), and ``llama.param_shapes``
  (what the engines shard weights by) made to say so for every model."""
  import jax
  from pdjax.model import llama
  if not getattr(llama.param_shapes, "unstacked", False):
    stacked_shapes = llama.param_shapes

    def param_shapes(cfg):
      out = stacked_shapes(cfg)
      out["layers"] = {
          k: v if isinstance(v, list)
          else [(v[0][1:], v[1][1:])] * cfg.num_layers
          for k, v in out["layers"].items()}
      return out
    param_shapes.unstacked = True
    llama.param_shapes = param_shapes
  layers = dict(params["layers"])
  for name in list(layers):
    v = layers[name]
    if not isinstance(v, list):
      layers[name] = [v[i] for i in range(num_layers)]
      jax.block_until_ready(layers[name])
  return {**params, "layers": layers}


def quantized_param_count(cfg) -> int:
  """Weights stored in FP8 when ``cfg.weight_dtype`` is set (the layers'
  projections), else 0."""
  if cfg.weight_dtype is None:
    return 0
  d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  per_layer = (d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
               + 3 * d * f)
  return cfg.num_layers * per_layer


def param_bytes(cfg) -> dict[str, int]:
  """Bytes of the weights: total, and the embedding table's share (a decode
  step reads only B of its rows; a tied table is read whole as the LM head).
  FP8 projections count one byte each (their scales are negligible)."""
  import jax.numpy as jnp
  item = jnp.dtype(cfg.jnp_dtype).itemsize
  q = quantized_param_count(cfg)
  total = (cfg.param_count() - q) * item + q
  embed = cfg.vocab_size * cfg.hidden_size * item
  return {"total": total, "embed": embed}


def matmul_params_per_token(cfg) -> int:
  """Weights every token multiplies by in the layers (attention projections
  and MLP); embedding lookups are gathers, not matmuls, and norms are not
  counted."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  attn = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  return cfg.num_layers * (attn + 3 * d * f)


def prefill_flops(cfg, batch: int, tokens: int) -> dict[str, float]:
  """Useful FLOPs of one causal prefill of ``batch`` x ``tokens`` (see
  bench_prefill's docstring for the formula and what it leaves out)."""
  linear = 2.0 * matmul_params_per_token(cfg) * batch * tokens
  # QK^T and PV each 2*T*T*hd per head; the causal mask keeps half.
  attn = 2.0 * 2.0 * cfg.num_layers * batch * tokens * tokens * (
      cfg.num_heads * cfg.head_dim) / 2.0
  lm_head = 2.0 * cfg.hidden_size * cfg.vocab_size * batch  # last token only
  return {"linear": linear, "attention": attn, "lm_head": lm_head,
          "total": linear + attn + lm_head}


# ------------------------------------------------------------------ limits
@dataclasses.dataclass
class Limits:
  """The rates ratios are taken against; None where unknown (ratio n/a)."""
  hbm_bw: float | None
  matmul_flops: float | None
  spec_hbm_bw: float | None
  spec_matmul_flops: float | None
  run_hbm_bw: float | None = None
  run_matmul_flops: float | None = None
  source: str = ""

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def device_kind() -> str:
  import jax
  return jax.devices()[0].device_kind


def resolve_limits() -> Limits:
  """Limits for this device from the flags (see the module docstring)."""
  import jax
  kind = device_kind()
  gpu = jax.default_backend() == "gpu"
  default_device = (gpu and FLAGS.limits_device.lower() in kind.lower()
                    and "pcie" not in kind.lower())

  def pick(name: str):
    if FLAGS[name].present or default_device:
      return float(FLAGS[name].value)
    return None

  hbm, mm = pick("hbm_bw"), pick("matmul_flops")
  spec_hbm = spec_mm = None
  for sub, bw, fl in SPEC_LIMITS:
    if gpu and sub.lower() in kind.lower():
      spec_hbm, spec_mm = bw, fl
      break
  if FLAGS["spec_hbm_bw"].present:
    spec_hbm = FLAGS.spec_hbm_bw
  if FLAGS["spec_matmul_flops"].present:
    spec_mm = FLAGS.spec_matmul_flops
  source = ("measured-H100 defaults" if default_device and not (
      FLAGS["hbm_bw"].present or FLAGS["matmul_flops"].present)
            else "flags" if hbm or mm else "none (n/a)")
  return Limits(hbm, mm, spec_hbm, spec_mm, source=source)


def measure_ceilings(limits: Limits, writer: "RecordWriter | None" = None,
                     tool: str = "") -> Limits:
  """Measures HBM (elementwise) bandwidth and matmul rate on device 0 and
  stores them in ``limits.run_*``. Same method as the probes that produced
  the README figures: bytes read + written / time, and 2 n^3 / time."""
  import jax
  import jax.numpy as jnp
  gpu = jax.default_backend() == "gpu"
  mib = FLAGS.ceiling_hbm_mib or (2048 if gpu else 64)
  n = FLAGS.ceiling_matmul_n or (8192 if gpu else 512)
  dev = jax.devices()[0]
  dtype = jnp.bfloat16 if gpu else jnp.float32
  elems = mib * (1 << 20) // jnp.dtype(dtype).itemsize
  x = jax.device_put(jnp.ones((elems,), dtype), dev)
  scale = jax.jit(lambda a: a * jnp.asarray(1.0001, dtype))
  t_bw = time_calls(lambda: scale(x), warmup=2, repeat=max(FLAGS.repeat, 5))
  bw = 2 * x.nbytes / t_bw.median
  x = None  # Frees the array before the matmul's.
  a = jax.device_put(jnp.ones((n, n), dtype), dev)
  mm = jax.jit(lambda p, q: jnp.dot(p, q, preferred_element_type=dtype))
  t_mm = time_calls(lambda: mm(a, a), warmup=2, repeat=max(FLAGS.repeat, 5))
  flops = 2.0 * n ** 3 / t_mm.median
  a = None
  limits.run_hbm_bw, limits.run_matmul_flops = bw, flops
  if writer is not None:
    writer.write(tool, "ceilings", {"hbm_mib": mib, "matmul_n": n,
                                    "dtype": jnp.dtype(dtype).name},
                 {"hbm_bw": bw, "matmul_flops": flops,
                  "hbm_time_s": t_bw.as_dict(), "matmul_time_s": t_mm.as_dict()})
  print(f"ceilings this run: HBM {bw / 1e9:.0f} GB/s (read+write, "
        f"{mib} MiB), matmul {flops / 1e12:.1f} TFLOP/s (n={n})", flush=True)
  return limits


def ratio(value: float | None, limit: float | None) -> float | None:
  if value is None or limit is None or limit == 0:
    return None
  return value / limit


# ------------------------------------------------------------------ timing
@dataclasses.dataclass
class Timing:
  samples: list[float]  # seconds

  @property
  def median(self) -> float:
    return statistics.median(self.samples)

  def as_dict(self) -> dict[str, Any]:
    return {"median": self.median, "min": min(self.samples),
            "max": max(self.samples), "mean": statistics.fmean(self.samples),
            "samples": self.samples}


def time_calls(fn: Callable[[], Any], *, warmup: int, repeat: int,
               pause_s: float = 0.0) -> Timing:
  """Times ``fn`` (which returns jax arrays), blocking on each result: each
  sample is one call's wall time, dispatch included. ``pause_s``: the
  device left idle that long before each timed call (as between one-at-a-
  time requests, rather than calls back to back)."""
  import jax
  for _ in range(warmup):
    jax.block_until_ready(fn())
  samples = []
  for _ in range(max(repeat, 1)):
    if pause_s > 0:
      time.sleep(pause_s)
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    samples.append(time.perf_counter() - t0)
  return Timing(samples)


# ------------------------------------------------------------------ records
def _git_commit() -> str | None:
  """HEAD's commit, read from .git without running git (the GPU machine's
  copy of the tree may have no .git at all)."""
  head = REPO_ROOT / ".git" / "HEAD"
  try:
    ref = head.read_text().strip()
    if ref.startswith("ref: "):
      path = REPO_ROOT / ".git" / ref[5:]
      if path.exists():
        return path.read_text().strip()
      packed = REPO_ROOT / ".git" / "packed-refs"
      for line in packed.read_text().splitlines():
        if line.endswith(ref[5:]):
          return line.split()[0]
      return None
    return ref
  except OSError:
    return None


def environment() -> dict[str, Any]:
  """What identifies the machine and software a record was measured on."""
  import jax
  import jaxlib
  devs = jax.devices()
  return {
      "device_kind": devs[0].device_kind,
      "platform": devs[0].platform,
      "num_devices": len(devs),
      "jax_version": jax.__version__,
      "jaxlib_version": getattr(jaxlib, "__version__", None),
      "python": platform.python_version(),
      "hostname": socket.gethostname(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "git_commit": _git_commit(),
  }


class RecordWriter:
  """Appends one JSON object per measurement to ``path`` (if any) and keeps
  them for the closing table."""

  def __init__(self, path: str | None, *, model: str, cfg, limits: Limits):
    self.path = path
    self.run_id = uuid.uuid4().hex[:12]
    self.env = environment()
    self.model = model
    self.model_config = {
        "name": cfg.name, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "dtype": cfg.dtype, "param_count": cfg.param_count(),
        "weight_dtype": getattr(FLAGS, "weight_dtype", "") or cfg.dtype,
        "activation_dtype": cfg.activation_dtype or cfg.dtype,
        "fused_projections": cfg.fused_projections,
        "kv_bytes_per_token": cfg.kv_bytes_per_token()}
    self.limits = limits
    self.records: list[dict[str, Any]] = []
    if path:
      Path(path).parent.mkdir(parents=True, exist_ok=True)

  def write(self, tool: str, measurement: str, params: dict[str, Any],
            results: dict[str, Any]) -> dict[str, Any]:
    rec = {
        "tool": tool, "measurement": measurement, "run_id": self.run_id,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "model": self.model, "model_config": self.model_config,
        "params": params, "results": _json_safe(results),
        "limits": self.limits.as_dict(), **self.env}
    self.records.append(rec)
    if self.path:
      with open(self.path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def _json_safe(x):
  """inf/nan are not JSON: they become None."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  return x


# ------------------------------------------------------------------ tables
def fmt(x, spec: str = ".3g") -> str:
  """A table cell: None -> n/a."""
  if x is None:
    return "n/a"
  if isinstance(x, str):
    return x
  if isinstance(x, float) and not math.isfinite(x):
    return "inf" if x > 0 else "n/a"
  return format(x, spec)


def print_table(title: str, header: Sequence[str],
                rows: Sequence[Sequence[Any]], note: str = "") -> None:
  cells = [[str(c) for c in r] for r in rows]
  widths = [max([len(h)] + [len(r[i]) for r in cells])
            for i, h in enumerate(header)]
  line = "  ".join(h.rjust(w) for h, w in zip(header, widths))
  print(f"\n== {title}", flush=True)
  print(line)
  print("-" * len(line))
  for r in cells:
    print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
  if note:
    print(note)
  sys.stdout.flush()


def parse_ints(text: str) -> list[int]:
  return [int(t) for t in str(text).replace(" ", "").split(",") if t]


def is_gpu() -> bool:
  import jax
  return jax.default_backend() == "gpu"


def payload_page_count(engine, tokens: int) -> int:
  """Pages of the request KV a prefill hands a decode engine for a prompt
  of ``tokens`` tokens (its payload, padded as the prefill pads it)."""
  from pdjax.engine.kv import pages_for, payload_pages
  return payload_pages(pages_for(tokens, engine.dcfg.page_size))


def zero_request_kv(engine, cfg, tokens: int):
  """A zero request KV of ``tokens`` tokens, freshly allocated in the
  payload layout of the decode engine's first replica: the decode
  benchmarks' stand-in for a hand-off (decode time does not depend on the
  values, and zeros hold no NaN that would change the sampler's path)."""
  import jax.numpy as jnp
  from pdjax.engine.kv import request_kv_shape
  n = payload_page_count(engine, tokens)
  return jnp.zeros(request_kv_shape(cfg, n, engine.dcfg.page_size),
                   cfg.jnp_dtype,
                   device=engine.replicas[0].payload_sharding(n))


def hbm_budget_bytes(flag_gib: float | None) -> int:
  """Usable device memory: ``flag_gib`` if given, else what the allocator
  may use on device 0 (``bytes_limit``), else 80 GiB."""
  import jax
  if flag_gib:
    return int(flag_gib * (1 << 30))
  try:
    stats = jax.devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
      return int(stats["bytes_limit"])
  except Exception:  # pylint: disable=broad-except
    pass
  return 80 << 30


# ------------------------------------------------------------------ check
def correctness_check(devices=None, *, cfg=None, prompt_len: int = 50,
                      new_tokens: int = 12, tol: float | None = None,
                      attention: str = "auto") -> dict[str, Any]:
  """Prefill (PrefillEngine, TP=1 and TP=2 where 2 devices exist) + decode
  (DecodeEngine) of a small random bf16 Llama against a full forward pass.

  The reference runs ``reference_forward`` once over prompt + generated
  tokens and reads the log-softmax at each position. The engine's logprob of
  each token it chose must match the reference's within ``tol``, and the
  token must be the reference's argmax within ``tol`` (bf16 near-ties may
  legitimately flip an argmax; a wrong cache position or a stale page moves
  logprobs by whole units). head_dim is 128 so the GPU takes the cuDNN paths
  the benchmarks time; ``attention``: the decode pool's
  (``DecodeConfig.attention``, e.g. "pallas" for the Pallas kernel).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from pdjax.engine.decode import DecodeConfig, DecodeEngine
  from pdjax.engine.prefill import PrefillConfig, PrefillEngine
  from pdjax.engine.requests import DecodeRequest, PrefillRequest
  from pdjax.engine.sampling import SamplingParams
  from pdjax.model import llama
  from pdjax.model.config import ModelConfig, RopeConfig
  from pdjax.sharding import ShardingRules, make_mesh

  devices = list(devices or jax.devices())
  cfg = cfg or ModelConfig(
      architecture="llama", vocab_size=1024, hidden_size=512,
      intermediate_size=1024, num_layers=4, num_heads=8, num_kv_heads=4,
      head_dim=128, rope=RopeConfig(theta=500000.0, rope_type="llama3",
                                    factor=8.0, original_max_position_embeddings=64),
      max_position_embeddings=4096, dtype="bfloat16", name="check-random")
  tol = tol if tol is not None else 0.15
  page = 16
  pcfg = PrefillConfig(buckets=(64,), max_batch=1, page_size=page,
                       max_seq_len=128)
  # Rows enough for the GEMM kernels decode serves with (CUBLAS_MIN_ROWS).
  dcfg = DecodeConfig(max_seqs=4, page_size=page, num_pages=24,
                      max_seq_len=128, steps_per_call=4, attention=attention)
  rng = np.random.default_rng(0)
  prompt = rng.integers(0, cfg.vocab_size, prompt_len).tolist()
  greedy = SamplingParams(max_tokens=new_tokens, temperature=0.0,
                          ignore_eos=True)
  decode_rules = ShardingRules.load("decode_dp")
  decode_mesh = make_mesh({"dp": 1}, devices[:1])
  params = random_params(cfg, decode_rules, decode_mesh, std=0.05)
  decoder = DecodeEngine(params, cfg, decode_mesh, decode_rules, dcfg,
                         eos_ids=())
  ref = jax.jit(functools.partial(llama.reference_forward, cfg=cfg))
  out: dict[str, Any] = {"ok": True, "cases": []}
  prefill_rules = ShardingRules.load("prefill_tp")
  # The buffered path too: a prompt longer than the largest bucket runs in
  # chunks, each attending to the earlier ones' KV (the path cached
  # prefixes take).
  chunked = PrefillConfig(buckets=(16, 32), max_batch=1, page_size=page,
                          max_seq_len=128)
  for path, tp, pcfg in (("bucket", 1, pcfg), ("bucket", 2, pcfg),
                         ("chunked", 1, chunked)):
    if tp > len(devices):
      continue
    mesh = make_mesh({"tp": tp}, devices[:tp])
    from pdjax.engine.setup import shard_params
    pparams = shard_params(params, cfg, prefill_rules, mesh)
    pre = PrefillEngine(pparams, cfg, mesh, prefill_rules, pcfg)
    res = pre.prefill([PrefillRequest("check", prompt, greedy)])[0]
    events = []
    rid = f"check-{path}-tp{tp}"
    kv = res.kv
    from pdjax.engine.kv import reshard_kv
    rep = decoder.replicas[0]
    kv = reshard_kv(kv, rep.payload_sharding(kv.kv.shape[2]))
    decoder.submit(DecodeRequest(rid, prompt, res.first_token,
                                 res.first_logprob, kv, greedy, 0,
                                 events.append))
    decoder.drain()
    tokens = [res.first_token] + [t for e in events for t in e.token_ids]
    lps = [res.first_logprob] + [lp for e in events for lp in e.logprobs]
    seq = np.asarray([prompt + tokens], np.int32)
    logits = ref(params, jnp.asarray(seq))
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1))[0]
    diffs, gaps = [], []
    for i, (tok, lp) in enumerate(zip(tokens, lps)):
      row = logp[prompt_len - 1 + i]
      diffs.append(abs(float(row[tok]) - lp))
      gaps.append(float(row.max() - row[tok]))
    case = {"path": path, "tp": tp, "tokens": tokens, "max_logprob_diff": max(diffs),
            "max_argmax_gap": max(gaps), "num_tokens": len(tokens),
            "ok": (len(tokens) == new_tokens and max(diffs) <= tol
                   and max(gaps) <= tol)}
    out["cases"].append(case)
    out["ok"] = out["ok"] and case["ok"]
  out["tol"] = tol
  out["cfg"] = cfg
  return out


def _check_main(argv) -> None:
  del argv
  import jax
  cfg = preset_config("tiny") if FLAGS.check_model == "tiny" else None
  t0 = time.perf_counter()
  result = correctness_check(cfg=cfg, attention=FLAGS.check_attention)
  cfg = result.pop("cfg")
  writer = RecordWriter(FLAGS.out, model=FLAGS.check_model, cfg=cfg,
                        limits=Limits(None, None, None, None, source="n/a"))
  elapsed = time.perf_counter() - t0
  writer.write("check", "prefill_decode_vs_reference",
               {"backend": jax.default_backend(),
                "attention": FLAGS.check_attention},
               {**result, "elapsed_s": elapsed})
  rows = [(c["path"], c["tp"], c["num_tokens"],
           fmt(c["max_logprob_diff"], ".4f"),
           fmt(c["max_argmax_gap"], ".4f"), "ok" if c["ok"] else "FAILED")
          for c in result["cases"]]
  print_table(f"correctness: engine prefill+decode vs full forward "
              f"({cfg.name}, {cfg.dtype}, tol {result['tol']})",
              ["prefill", "tp", "tokens", "max|dlogp|", "argmax_gap",
               "status"],
              rows)
  print("CHECK", "PASSED" if result["ok"] else "FAILED", flush=True)
  if not result["ok"]:
    sys.exit(1)


if __name__ == "__main__":
  from absl import app
  define_common_flags()
  flags.DEFINE_bool("check", True, "Run the correctness check (the only "
                    "thing this module does as a program).")
  flags.DEFINE_enum("check_attention", "auto",
                    ["auto", "paged", "pallas", "gather"],
                    "The decode pool's attention over the pages.")
  flags.DEFINE_enum("check_model", "random-bf16", ["random-bf16", "tiny"],
                    "random-bf16: 4 layers, head_dim 128, bf16 (the GPU "
                    "kernels' path); tiny: the built-in f32 config (fast "
                    "smoke test of the check itself).")
  app.run(_check_main)
